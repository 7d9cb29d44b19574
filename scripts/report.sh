#!/usr/bin/env bash
# Regenerate reports/REPORT.md, reports/results.csv and reports/figures/ from results/ (and the
# VRAM estimate tables it cites). Same inputs, same bytes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
set -x
$PY -m peftlab.memory --model Qwen2.5-3B --table reports/vram_qwen2.5-3b.md
$PY -m peftlab.report --results results --prose reports --out reports
