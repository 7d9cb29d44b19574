#!/usr/bin/env bash
# Every experiment of the report, in the priority order of the plan (issue 7): Task 2 (full
# fine-tuning) for every model before Task 3 (PEFT). Within a task, seed by seed, each seed over the
# models in the grid file's order (the 1.5B decoder, PEFT only, last), so that a stop at any time
# leaves every model with as many seeds as possible.
# The control grid (MiniLM on the decoder's 1000-row slices, minutes) follows the first Task 2 seed:
# it is what the first model comparison needs.
# Resumable: run it again and finished runs are skipped. Long: start it in the background, e.g.
#   setsid nohup scripts/run_all.sh > results/run_all.log 2>&1 &
set -uo pipefail
cd "$(dirname "$0")/.."
for task in task2 task3; do
  for seed in 1 2 3; do
    scripts/$task.sh --only seed=$seed
    if [ $task = task2 ] && [ $seed = 1 ]; then
      .venv/bin/python -m peftlab.experiments configs/grids/control.yaml
    fi
  done
done
