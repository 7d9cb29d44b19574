#!/usr/bin/env bash
# The accelerator check for the VRAM questions: estimated against measured CUDA memory, and train /
# inference step times, of randomly initialised models of the built-in configs (bert-base-uncased,
# roberta-large, Qwen2.5-0.5B/1.5B/3B) x full / LoRA r=8 / adapter. It needs no checkpoint, so it runs
# on a bare GPU machine. Where a folder .whl holds this project's pinned wheels (transformers,
# tokenizers, huggingface_hub, peft, adapters), they are installed into /tmp/site first.
# Usage: benchmarks/cuda_memory.sh [OUTPUT_STEM]   (default reports/vram_cuda -> .md and .json)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -m peftlab.memory --check_device "${1:-reports/vram_cuda}" --batch_size 16 --seq_len 256 --steps 30 --warmup 5
