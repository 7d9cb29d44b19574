#!/usr/bin/env bash
# One process with every core's thread against one 1-thread process per core at once (how scripts/sweeps.sh
# splits a host between WORKERS): total train examples/s of each, same model, methods and batches, the
# many-thread process run before and after. Run on an otherwise idle machine (pause the grid's workers).
# Usage: benchmarks/workers.sh [MODEL] [OUT]   (default all-mpnet-base-v2, benchmarks/results/workers_<host>)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
MODEL=${1:-all-mpnet-base-v2}
HOST=$(grep -q amx_bf16 /proc/cpuinfo && echo amx || echo noamx)
OUT=${2:-benchmarks/results/workers_$HOST}
CORES=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc itself follows OMP_NUM_THREADS
RAW=$(mktemp -d)
bench() { $PY -m peftlab.benchmark --models "$MODEL" --methods full lora-r16 --precisions bf16 --steps 20 "$@"; }
bench --threads "$CORES" --out "$RAW/many_first" > /dev/null
for ((i = 0; i < CORES; i++)); do bench --threads 1 --out "$RAW/single_$i" > /dev/null & done
wait
bench --threads "$CORES" --out "$RAW/many_again" > /dev/null
$PY - "$RAW" "$OUT" "$MODEL" "$CORES" <<'PY'
import json, sys
from pathlib import Path
from peftlab.hardware import cpu_model, native_bf16
raw, out, model, cores = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
names = ["many_first", *sorted(path.stem for path in raw.glob("single_*.json")), "many_again"]  # run order
runs = {name: json.loads((raw / f"{name}.json").read_text()) for name in names}
lines = [f"# One {cores}-thread process against {cores} 1-thread processes at once", "",
         f"Host: {cpu_model()} (native bf16: {native_bf16() or 'none'}), {cores} cores, torch {runs['many_first']['machine']['torch']}; {model}, bf16 autocast, "
         "batch 16, real restaurant batches, 20 timed steps. Order: the many-thread process, then the 1-thread "
         "processes at once, then the many-thread process again. Command: `benchmarks/workers.sh`.", "",
         "| process | method | threads | train ex/s | step s (median) | peak RSS MB |", "|---|---|---|---|---|---|"]
for name, run in runs.items():
    for r in run["results"]:
        lines.append(f"| {name} | {r['method']} | {r['threads']} | {r['train_examples_per_s']:.1f} | "
                     f"{r['train_step_s']['median']:.3f} | {r['peak_rss_mb']:.0f} |")
lines.append("")
for method in dict.fromkeys(r["method"] for r in runs["many_first"]["results"]):
    def rate(name):
        return next(r["train_examples_per_s"] for r in runs[name]["results"] if r["method"] == method)
    many = (rate("many_first") + rate("many_again")) / 2
    singles = sum(rate(name) for name in runs if name.startswith("single_"))
    lines.append(f"- {method}: one {cores}-thread process {many:.1f} train ex/s (mean of its two runs), "
                 f"{cores} 1-thread processes {singles:.1f} in total ({singles / many:.2f}x).")
Path(f"{out}.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
rm -rf "$RAW"
