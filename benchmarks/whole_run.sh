#!/usr/bin/env bash
# Whole run against the isolated step (issue 22): train.py's training tokens/s over a full run (per-epoch
# evaluations left out, as results.training_throughput does) against the benchmark's median-step tokens/s,
# same model, method, precision, batch and threads, back to back. Run on an otherwise idle machine.
# Usage: benchmarks/whole_run.sh [MODEL] [METHOD]   (default all-MiniLM-L6-v2 full)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
MODEL=${1:-all-MiniLM-L6-v2}
METHOD=${2:-full}
OUT=benchmarks/results/whole_run_${MODEL}_${METHOD}
RUN=$(mktemp -d)
$PY train.py --model_name_or_path "$MODEL" --dataset_name restaurant_sup --tuning_method "$METHOD" \
    --num_train_epochs 1 --bf16 True --output_dir "$RUN/run" --report_to none --save_model False > /dev/null 2>&1
$PY -m peftlab.benchmark --models "$MODEL" --methods "$METHOD" --precisions bf16 --fused_adamw 1 --steps 30 \
    --out "$OUT" > /dev/null
$PY - "$RUN/run" "$OUT" <<'PY'
import json, sys
from peftlab.runrecord import RunDirectory
metrics = RunDirectory(sys.argv[1]).metrics()
step = json.loads(open(f"{sys.argv[2]}.json").read())["results"][0]
ratio = metrics["train_tokens_per_second"] / step["train_tokens_per_s"]
line = (f"\nWhole train.py run (1 epoch, restaurant_sup, bf16, evaluations left out): "
        f"{metrics['train_tokens_per_second']:.0f} train tokens/s; benchmark median step: "
        f"{step['train_tokens_per_s']:.0f} tokens/s; whole run / step = {ratio:.2f}\n")
open(f"{sys.argv[2]}.md", "a").write(line)
print(line)
PY
rm -rf "$RUN"
