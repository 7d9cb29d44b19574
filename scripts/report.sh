#!/usr/bin/env bash
# Regenerate reports/REPORT.md, reports/results.csv and reports/figures/ from results/ (and the
# VRAM estimate tables it cites). Same inputs, same bytes. The measured tables it cites come from
# their own commands: reports/vram_measured.md (CPU, python -m peftlab.memory --check) and
# reports/vram_cuda.md (needs a CUDA GPU: benchmarks/cuda_memory.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
set -x
$PY -m peftlab.memory --model Qwen2.5-3B --table reports/vram_qwen2.5-3b.md
$PY -m peftlab.memory --model Qwen2.5-3B --precision bf16-mixed --multi_gpu_table reports/vram_qwen2.5-3b_multi_gpu.md
$PY -m peftlab.report --results results --prose reports --out reports
