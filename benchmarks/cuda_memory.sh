#!/usr/bin/env bash
# The accelerator check for the VRAM questions: estimated against measured CUDA memory, and train /
# inference step times, of randomly initialised models of the built-in configs (bert-base-uncased,
# roberta-large, Qwen2.5-0.5B/1.5B/3B) x full / LoRA r=8 / adapter. It needs no checkpoint, so it runs
# on a bare GPU machine (set up by cuda_env.sh).
# Usage: benchmarks/cuda_memory.sh [OUTPUT_STEM]   (default reports/vram_cuda -> .md and .json)
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/cuda_env.sh
$PY -m peftlab.memory --check_device "${1:-reports/vram_cuda}" --batch_size 16 --seq_len 256 --steps 30 --warmup 5
