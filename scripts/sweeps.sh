#!/usr/bin/env bash
# The validation protocol's evidence (issue 23), cheapest cells first: each sweep, then that cell's
# seeds in the assignment grid at the selected settings (configs/grids/assignment.yaml, results/assignment:
# test evaluated once per run).
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
for model in minilm mpnet; do
  for dataset in acl_sup restaurant_sup; do
    for method in full lora-r16; do
      in_parallel scripts/sweep.sh "configs/sweeps/$model-$dataset-$method.yaml" --worker "{i}"
      in_parallel .venv/bin/python -m peftlab.experiments configs/grids/assignment.yaml \
        --only model=$model --only dataset=$dataset --only method=$method --shard "{i}/$workers"
    done
  done
done
