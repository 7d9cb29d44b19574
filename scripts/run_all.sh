#!/usr/bin/env bash
# Every experiment of the report, in the priority order of the plan: cheap cells first, and seed by
# seed, so that a stop at any time leaves every started cell with as many seeds as possible.
# Resumable: run it again and finished runs are skipped. Long: start it in the background, e.g.
#   setsid nohup scripts/run_all.sh > results/run_all.log 2>&1 &
set -uo pipefail
cd "$(dirname "$0")/.."
for model in minilm mpnet qwen-0.5b; do
  for seed in 1 2 3; do
    scripts/task2.sh --only model=$model --only seed=$seed
    scripts/task3.sh --only model=$model --only seed=$seed
  done
done
scripts/task3.sh --only model=qwen-1.5b
