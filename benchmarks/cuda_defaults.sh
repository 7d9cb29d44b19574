#!/usr/bin/env bash
# Issue 22 on a bare CUDA machine: train.py's speed defaults (bf16 autocast, fused AdamW, length-grouped
# batches padded per batch, frozen PEFT weights in bf16) each against the same training without it, and all
# against the stock recipe, on randomly initialised bert-base-uncased, roberta-large and Qwen2.5-0.5B x full /
# LoRA r=16 / adapter (benchmarks/cuda_defaults.py); then, at batch 128, where the matmuls are large enough to
# show what bf16 does, the defaults against fp32 and the stock recipe. Set up by cuda_env.sh.
# Usage: benchmarks/cuda_defaults.sh [OUTPUT_STEM]   (default reports/cuda/defaults -> .md/.json, and _b128)
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/cuda_env.sh
$PY -c "from peftlab.hardware import bf16_helps; print('bf16_helps:', bf16_helps())"
OUT=${1:-reports/cuda/defaults}
timeout 380 $PY benchmarks/cuda_defaults.py --out "$OUT" --steps 20 --repeats 2 || true
timeout 150 $PY benchmarks/cuda_defaults.py --out "${OUT}_b128" --batch_size 128 --steps 10 --repeats 2 \
    --models Qwen2.5-0.5B bert-base-uncased --methods full lora-r16 --variants fp32 "stock recipe"
