#!/usr/bin/env bash
# The validation protocol's evidence (issue 23) and the assignment grid (issue 24), cheapest model first:
# each of a model's sweeps (configs/sweeps/<model>-*.yaml) followed by that cell's seeds, then the rest of
# the model's row in the assignment grid (the cells whose settings transfer from its sweeps), test evaluated
# once per run (configs/grids/assignment.yaml, results/assignment).
# Resumable: studies continue, finished runs are skipped. Long: start it detached,
#   WORKERS=2 setsid nohup scripts/sweeps.sh > results/sweeps.log 2>&1 &
# WORKERS processes share each study and each grid (--shard), the CPU's cores split between them: on a
# 2-core host two 1-thread workers train MiniLM 1.22x faster in total than one 2-thread process
# (benchmarks/results/workers.md).
set -uo pipefail
cd "$(dirname "$0")/.."
workers=${WORKERS:-1}
export OMP_NUM_THREADS=$(( $(nproc) / workers > 0 ? $(nproc) / workers : 1 ))
in_parallel() {  # in_parallel CMD...: WORKERS copies of CMD, {i} replaced by the worker's index
  for ((i = 0; i < workers; i++)); do "${@//\{i\}/$i}" & sleep 5; done
  wait
}
grid() {  # grid FILTER...: the assignment grid's runs that match, sharded over the workers
  in_parallel .venv/bin/python -m peftlab.experiments configs/grids/assignment.yaml "$@" --shard "{i}/$workers"
}
for model in minilm mpnet qwen-0.5b qwen-1.5b; do
  for sweep in configs/sweeps/"$model"-*.yaml; do
    cell=$(basename "$sweep" .yaml); cell=${cell#"$model"-}  # <dataset>-<method>
    in_parallel scripts/sweep.sh "$sweep" --worker "{i}"
    grid --only model="$model" --only dataset="${cell%%-*}" --only method="${cell#*-}"
  done
  grid --only model="$model"
done
