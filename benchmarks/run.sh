#!/usr/bin/env bash
# The throughput benchmark (issue 6): run on an otherwise idle machine.
#  1. MiniLM and the 0.5B decoder x full / LoRA r=16 / adapter x fp32 / bf16 autocast, fused AdamW as in train.py
#  2. padding strategies (MiniLM, full, bf16), 3. thread counts (MiniLM, full, bf16)
#  4. foreach vs fused AdamW (0.5B decoder, full, fp32 and bf16): before/after of train.py's defaults
#  5. frozen weights stored in fp32 vs bf16 (--frozen_weights_dtype) for the decoders' PEFT, bf16 autocast
#  6. dropout masks: torch.nn.Dropout vs --cpu_fast_dropout (MPNet, whose dropout modules draw the most masks)
#  7. LoRA inputs on bf16 frozen weights: peft's fp32 cast vs left in bf16
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
set -x
$PY -m peftlab.benchmark --models all-MiniLM-L6-v2 Qwen2.5-Coder-0.5B-Instruct --methods full lora-r16 adapter \
    --precisions fp32 bf16 --fused_adamw 1 --steps 10 --out benchmarks/results/methods_precision "$@"
$PY -m peftlab.benchmark --models all-MiniLM-L6-v2 --methods full --precisions bf16 \
    --paddings max_length dynamic grouped --steps 20 --out benchmarks/results/padding "$@"
$PY -m peftlab.benchmark --models all-MiniLM-L6-v2 --methods full --precisions bf16 --threads 1 2 \
    --steps 20 --out benchmarks/results/threads "$@"
$PY -m peftlab.benchmark --models Qwen2.5-Coder-0.5B-Instruct --methods full --precisions fp32 bf16 \
    --fused_adamw 0 1 --steps 6 --out benchmarks/results/adamw "$@"
$PY -m peftlab.benchmark --models Qwen2.5-Coder-0.5B-Instruct --methods lora-r16 adapter --precisions bf16 \
    --frozen_weights_dtypes float32 auto --fused_adamw 1 --steps 8 --out benchmarks/results/frozen_bf16_qwen-0.5b "$@"
$PY -m peftlab.benchmark --models Qwen2.5-Coder-1.5B-Instruct --methods lora-r16 --precisions bf16 \
    --frozen_weights_dtypes float32 auto --fused_adamw 1 --steps 4 --warmup 1 \
    --out benchmarks/results/frozen_bf16_qwen-1.5b "$@"
$PY -m peftlab.benchmark --models all-mpnet-base-v2 --methods full lora-r16 adapter --precisions bf16 \
    --fast_dropout 0 1 --fused_adamw 1 --steps 10 --out benchmarks/results/fast_dropout_mpnet "$@"
$PY -m peftlab.benchmark --models all-mpnet-base-v2 Qwen2.5-Coder-0.5B-Instruct --methods lora-r16 --precisions bf16 \
    --lora_input_upcast 1 0 --fused_adamw 1 --steps 10 --out benchmarks/results/lora_input_upcast "$@"
