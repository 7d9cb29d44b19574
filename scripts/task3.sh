#!/usr/bin/env bash
# Task 3: LoRA r=8/16/32 and the Houlsby adapter (configs/grids/task3.yaml). Resumable; extra
# arguments go to the grid runner (--only, --shard, --dry_run).
set -euo pipefail
cd "$(dirname "$0")/.."
set -x
exec .venv/bin/python -m peftlab.experiments configs/grids/task3.yaml "$@"
