#!/usr/bin/env bash
# Task 2: full fine-tuning, models x datasets x seeds (configs/grids/task2.yaml). Resumable:
# finished runs are skipped. Extra arguments go to the grid runner, e.g. --only model=minilm,
# --shard 0/2 or --dry_run.
set -euo pipefail
cd "$(dirname "$0")/.."
set -x
exec .venv/bin/python -m peftlab.experiments configs/grids/task2.yaml "$@"
