#!/usr/bin/env bash
# The grid's typical decoder run, whole process, against the code issue 22 was filed on (BASE, default
# df4a62d): Qwen2.5-Coder-0.5B, LoRA r=16, 1000 restaurant rows, 3 epochs, --bf16 True, the same seed and
# learning rate. The baseline evaluates on the test split every epoch, as it did; today's code runs as the
# assignment grid does (validation split, evaluations on it, test once, --group_by_length). They run at once,
# half the cores each, so they share the host's conditions: today's code twice, one run after the other, beside
# the base's one longer run, so neither half of the host idles or takes other work; stop other work first.
# Usage: benchmarks/whole_process_vs_baseline.sh [BASE]  -> benchmarks/results/whole_process_vs_baseline.md
# (MODEL, ROWS and EPOCHS in the environment change the run, for a quick try: the table names them.)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
BASE=${1:-df4a62d}
TODAY=$(git rev-parse --short HEAD)  # the commit that runs, named before anything else can change it
OUT=benchmarks/results/whole_process_vs_baseline
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir "$WORK/base" && git archive "$BASE" | tar -x -C "$WORK/base"
export OMP_NUM_THREADS=$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))
MODEL=${MODEL:-Qwen2.5-Coder-0.5B-Instruct} ROWS=${ROWS:-1000} EPOCHS=${EPOCHS:-3}
COMMON=(--model_name_or_path "$MODEL" --dataset_name restaurant_sup --data_dir "$ROOT/data"
        --tuning_method lora --lora_r 16 --lora_alpha 32 --lora_dropout 0.1 --max_train_samples "$ROWS"
        --num_train_epochs "$EPOCHS" --learning_rate 2e-4 --warmup_ratio 0.06 --weight_decay 0.01
        --per_device_train_batch_size 16 --per_device_eval_batch_size 64 --max_seq_length 256 --bf16 True
        --seed 1 --logging_steps 10 --disable_tqdm True --report_to none)
# An untimed one-step run of each code first: imports, checkpoint files and caches are warm for every timed run.
WARM=(--max_train_samples 16 --max_eval_samples 16 --max_steps 1)
(cd "$WORK/base" && PYTHONPATH="$WORK/base/src" "$PY" train.py "${COMMON[@]}" "${WARM[@]}" \
    --output_dir "$WORK/base_warm" > "$WORK/base_warm.log" 2>&1) &
"$PY" train.py "${COMMON[@]}" "${WARM[@]}" --output_dir "$WORK/today_warm" > "$WORK/today_warm.log" 2>&1 &
wait
(cd "$WORK/base" && PYTHONPATH="$WORK/base/src" /usr/bin/time -f "%e %M" -o "$WORK/base.time" \
    "$PY" train.py "${COMMON[@]}" --output_dir "$WORK/base_run" > "$WORK/base.log" 2>&1) &
for run in today1 today2; do
  /usr/bin/time -f "%e %M" -o "$WORK/$run.time" \
      "$PY" train.py "${COMMON[@]}" --group_by_length True --output_dir "$WORK/${run}_run" > "$WORK/$run.log" 2>&1
done &
wait
"$PY" - "$WORK" "$BASE" "$TODAY" "$OMP_NUM_THREADS" "$OUT" "$MODEL" "$ROWS" "$EPOCHS" <<'PY'
import sys
from pathlib import Path
from peftlab.hardware import cpu_model
from peftlab.markdown import table
from peftlab.runrecord import RunDirectory
work, (base, head, threads, out, model, rows, epochs) = Path(sys.argv[1]), sys.argv[2:]
table_rows, seconds = [], {}
for name, commit in (("base", base), ("today1", head), ("today2", head)):
    wall, rss_kb = (float(v) for v in (work / f"{name}.time").read_text().split()[-2:])
    metrics = RunDirectory(work / f"{name}_run").metrics()
    seconds[name] = wall
    test_seconds = f"{metrics['runtime']:.0f}" if "runtime" in metrics else "–"
    table_rows.append([f"{name} ({commit})", f"{wall:.0f}", f"{metrics['train_runtime']:.0f}",
                       f"{metrics.get('eval_seconds_during_training', 0):.0f}", test_seconds,
                       f"{rss_kb / 1024:.0f}", f"{100 * metrics['accuracy']:.1f}", f"{100 * metrics['macro_f1']:.1f}"])
ratios = [seconds["base"] / seconds[run] for run in ("today1", "today2")]
text = (f"Host: {cpu_model()}, {threads} thread(s) per process, both "
        f"processes at once. {model}, LoRA r=16 (alpha 32), {rows} restaurant training rows, "
        f"{epochs} epochs, bf16, seed 1. Base: test split evaluated every epoch; today: validation split (10%), "
        "evaluations on it, the test split once, --group_by_length. Command: "
        "`benchmarks/whole_process_vs_baseline.sh`.\n\n"
        + table(["code", "wall s (whole process)", "train_runtime s", "evaluation s inside training",
                 "test prediction s", "peak RSS MB", "test accuracy", "test macro-F1"], table_rows)
        + f"\nWhole process: today {ratios[0]:.2f}x and {ratios[1]:.2f}x faster than the base (today's two runs "
        "one after the other, beside the base's one run).\n")
Path(f"{out}.md").write_text(text)
print(text)
PY
