#!/usr/bin/env bash
# The validation protocol's evidence (issue 23) and the assignment grid (issue 24), test evaluated once per
# run (configs/grids/assignment.yaml, results/assignment), ordered so that a stop at any point leaves the most
# evidence (the whole grid takes more CPU hours than any one stretch of sessions):
# 1. each model's sweeps (configs/sweeps/<model>-*.yaml), then its swept cells over seeds 1-3 (the selected
#    settings over seeds: the protocol's evidence; every other cell's settings transfer from these cells);
# 2. the other cells in passes over seeds: seed 1 of every cell, then seeds 2-3, then ACL-ARC's 4-5, each pass
#    in the grid command's order (peftlab.experiments.run_order: swept cells first, then seed by seed), the
#    0.5B decoder's runs first on a host without native bf16;
# 3. the bridge between the decoders (configs/grids/bridge.yaml: the 0.5B decoder's PEFT cells), last.
# The 0.5B decoder's full fine-tuning fits one worker on a 24 GB host, the other models two: a worker goes on
# to its next step without waiting for the other where both steps fit the same workers (MPNet's evidence, then
# the 1.5B decoder's sweep), and waits where a sweep's selections must be final or the memory changes.
# Resumable: studies continue, finished runs are skipped. Long: start it detached,
#   WORKERS=2 setsid nohup scripts/sweeps.sh > results/sweeps.log 2>&1 &
# Up to WORKERS processes share each study and each grid command (each takes the next free trial or run), the
# CPU's cores split between them: on a 2-core host two 1-thread workers train 1.17-1.42x faster in total than
# one 2-thread process (benchmarks/workers.sh: MiniLM on the AMD host, workers.md; MPNet on the AMX host,
# workers_amx.md). Runs and trials save a checkpoint at each epoch's end and every 15 minutes,
# and resume from the last.
set -uo pipefail
cd "$(dirname "$0")/.."
# Peak memory of one run in GB (the largest of each model's finished runs: ACL-ARC or AG News at 256 tokens, 0.5B full
# fine-tuning 17.8 GB, its LoRA 12.8 GB; the 1.5B's LoRA within the grid's 512-token recomputation budget at most 10,
# the 9 GB of its own that a 1024-token budget reached and half of the 2.9 GB of mapped weights two workers share):
# a model runs as many workers as fit in 90% of the host's memory, at most WORKERS, so the kernel never kills one
# mid-run. On a 24 GB host: two for the encoders and the 1.5B decoder, one for the 0.5B decoder.
declare -A peak_gb=([minilm]=4 [mpnet]=10 [qwen-0.5b]=18 [qwen-1.5b]=10 [qwen-0.5b-peft]=12)
memory_gb=$(awk '/MemTotal/ {print int($2 / 1048576)}' /proc/meminfo)
cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc itself follows OMP_NUM_THREADS, set below
use_workers() {  # use_workers MODEL...: sets workers (for the largest of the models) and each one's share of the cores
  local peak=0 model
  for model in "$@"; do peak=$(( ${peak_gb[$model]} > peak ? ${peak_gb[$model]} : peak )); done
  workers=$(( memory_gb * 9 / 10 / peak ))
  workers=$(( workers < ${WORKERS:-1} ? workers : ${WORKERS:-1} ))
  workers=$(( workers > 0 ? workers : 1 ))
  export OMP_NUM_THREADS=$(( cores / workers > 0 ? cores / workers : 1 ))
}
in_parallel() {  # in_parallel CMD...: $workers copies of CMD, {i} replaced by the worker's index
  for ((i = 0; i < workers; i++)); do "${@//\{i\}/$i}" & sleep 5; done
  wait
}
sweeps_of() {  # sweeps_of MODEL I: worker I's part of each of the model's sweeps, one after the other
  for sweep in configs/sweeps/"$1"-*.yaml; do scripts/sweep.sh "$sweep" --worker "$2"; done
}
grid() {  # grid MODELS SEEDS [--only KEY=VALUE...]: one worker of the assignment grid, those models and seeds
  local models=$1 seeds=$2
  shift 2
  .venv/bin/python -m peftlab.experiments configs/grids/assignment.yaml --only model="$models" --only seed="$seeds" "$@"
}
evidence() { grid "$1" 1,2,3 --only swept=true; }  # evidence MODEL: its swept cells over seeds 1-3
pairs=minilm,mpnet,qwen-1.5b  # the models that run two workers on a 24 GB host
evidence_mpnet_then_sweep_qwen15b() { evidence mpnet; sweeps_of qwen-1.5b "$1"; }
evidence_qwen15b_then_first_pass() { evidence qwen-1.5b; grid "$pairs" 1; }
qwen05b_first() { sweeps_of qwen-0.5b "$1"; evidence qwen-0.5b; grid qwen-0.5b 1; }
use_workers minilm
in_parallel sweeps_of minilm "{i}"
in_parallel evidence minilm
use_workers mpnet
in_parallel sweeps_of mpnet "{i}"
# the 1.5B decoder's checkpoint converted (GGUF dequantized, 2 min, 9 GB peak RSS) while nothing else runs,
# not beside an MPNet run when its sweep starts
.venv/bin/python -c 'import torch; from peftlab.models import resolve_model
resolve_model("Qwen2.5-Coder-1.5B-Instruct", torch.bfloat16)'
use_workers mpnet qwen-1.5b
in_parallel evidence_mpnet_then_sweep_qwen15b "{i}"
in_parallel evidence_qwen15b_then_first_pass
use_workers qwen-0.5b
in_parallel qwen05b_first "{i}"
pass_of_pairs() { use_workers ${pairs//,/ }; in_parallel grid "$pairs" "$1"; }
pass_of_qwen05b() { use_workers qwen-0.5b; in_parallel grid qwen-0.5b "$1"; }
# Where bf16 matrix products are not native (an AVX2-only CPU: fp32 kernels compute them), the bf16-frozen PEFT
# runs of the pairs lose most against an AMX host (the 1.5B decoder's ACL-ARC adapter, two workers: 22 min for its
# first two steps on the AVX2 EPYC against 22 s a step on the AMX Xeon), the 0.5B decoder's full fine-tuning least
# (13-18 train tokens/s against 95-135): such a host takes every 0.5B pass first, leaving the rest to faster hosts
# as long as it can.
seed_passes="2,3 4,5"
if .venv/bin/python -c 'import sys; from peftlab.hardware import native_bf16; sys.exit(native_bf16() is None)'; then
  for seeds in $seed_passes; do pass_of_pairs "$seeds"; pass_of_qwen05b "$seeds"; done
else
  for seeds in $seed_passes; do pass_of_qwen05b "$seeds"; done
  for seeds in $seed_passes; do pass_of_pairs "$seeds"; done
fi
use_workers qwen-0.5b-peft
in_parallel .venv/bin/python -m peftlab.experiments configs/grids/bridge.yaml
