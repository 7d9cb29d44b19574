#!/usr/bin/env bash
# The second accelerator check, on a bare CUDA machine (no checkpoints: randomly initialised models of the
# built-in configs), each step bounded so one failure leaves the others' results:
#  1. issue 25: full fine-tuning of Qwen2.5-3B's architecture under FSDP on one GPU, with CPU offload of
#     parameters, gradients and AdamW state, and without, against the estimator (cuda_fsdp_offload.py);
#  2. issue 22: PEFT with its frozen weights stored in fp32 or bf16 (--frozen_weights_dtype), LoRA r=8 and
#     the adapter on Qwen2.5-0.5B and 3B: memory and step times (peftlab.memory --check_device).
# Set up by cuda_env.sh. Usage: benchmarks/cuda_checks.sh OUT_DIR   (default reports/cuda)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-reports/cuda}
mkdir -p "$OUT"
source benchmarks/cuda_env.sh
timeout 210 $PY benchmarks/cuda_fsdp_offload.py --offload --out "$OUT/fsdp_offload_qwen2.5-3b" 2>&1 | grep -v Warning
timeout 120 $PY benchmarks/cuda_fsdp_offload.py --out "$OUT/fsdp_qwen2.5-3b" 2>&1 | grep -v Warning
# batch 1: what offloaded FSDP keeps on the GPU besides activations
timeout 150 $PY benchmarks/cuda_fsdp_offload.py --offload --batch_size 1 --backward_prefetch none \
    --out "$OUT/fsdp_offload_qwen2.5-3b_b1_none" 2>&1 | grep -v Warning
$PY benchmarks/cuda_fsdp_offload.py --summarize "$OUT/fsdp.md" "$OUT"/fsdp_*.json
timeout 200 $PY -m peftlab.memory --check_device "$OUT/vram_cuda_frozen" --device_configs Qwen2.5-0.5B Qwen2.5-3B \
    --device_methods lora-r8 adapter --frozen_weights_dtypes float32 bfloat16 --batch_size 16 --seq_len 256 \
    --steps 20 --warmup 3
ls -la "$OUT"
