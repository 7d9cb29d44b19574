#!/usr/bin/env bash
# One hyperparameter sweep (an Optuna study, resumable): scripts/sweep.sh configs/sweeps/<name>.yaml
# [--n_trials N] [--storage URL]. Every sweep of the validation protocol in order: scripts/sweeps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m peftlab.sweep "$@"
