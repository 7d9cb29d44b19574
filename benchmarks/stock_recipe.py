"""train.py's defaults against the Hugging Face text-classification example's, whole process (issue 22).

The stock recipe is what ``run_classification.py`` does by default, rebuilt here with a plain
``transformers.Trainer``: every row padded to 128 tokens, fp32, ``default_data_collator``, the whole
training split, no evaluation during training. It shares with train.py the model, the batch size (16),
the learning rate (2e-5, train.py's default) and the epochs, and both evaluate the test split once at the
end with the same metrics. train.py runs with its defaults (validation split held out and evaluated at
least 4 times, dynamic padding, bf16 where the host has native bf16, fused AdamW, batches grouped by
length in a random order), with random batches instead (the default before), and with the length groups in
Trainer's own order (each mega-batch longest to shortest), so the test scores check the grouping default
(paired by seed with the random-batch arm).

Each run is a fresh process timed whole (start-up, model load, tokenization, training, test), the arms
alternated seed by seed, so a change in the machine's load hits all arms alike:

    .venv/bin/python benchmarks/stock_recipe.py --seeds 1 2 3 --out benchmarks/results/stock_recipe
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = {
    "stock": None,
    "train.py": [],  # its defaults: batches grouped by length, in a random order
    "train.py, ungrouped": ["--group_by_length", "False"],  # random batches: the default this one replaced
    "train.py, Trainer's length-group order": ["--shuffle_length_groups", "False"],
}
BASELINE = "train.py, ungrouped"  # the arm each other train.py arm is paired with, seed by seed (a default's check)


def stock_run(model: str, dataset: str, seed: int, epochs: float, out: Path) -> None:
    """The stock recipe, in this process; writes its test metrics to ``out``."""
    import torch
    from transformers import Trainer, TrainingArguments, default_data_collator, set_seed

    from peftlab.data import get_dataset
    from peftlab.metrics import compute_metrics
    from peftlab.models import default_sep_token, get_model, load_tokenizer, resolve_model

    set_seed(seed)
    data = get_dataset(dataset, default_sep_token(load_tokenizer(resolve_model(model))))
    labels = data["train"].features["label"].names
    tokenizer, classifier = get_model(model, len(labels), dict(enumerate(labels)))
    encoded = data.map(lambda rows: tokenizer(rows["text"], padding="max_length", max_length=128, truncation=True),
                       batched=True, remove_columns=["text"])
    args = TrainingArguments(output_dir=str(out.parent / "stock_trainer"), per_device_train_batch_size=16,
                             learning_rate=2e-5, num_train_epochs=epochs, seed=seed,
                             report_to="none", save_strategy="no", use_cpu=not torch.cuda.is_available())
    trainer = Trainer(model=classifier, args=args, train_dataset=encoded["train"], data_collator=default_data_collator,
                      compute_metrics=compute_metrics)
    trainer.train()
    metrics = trainer.evaluate(encoded["test"], metric_key_prefix="test")
    out.write_text(json.dumps({"accuracy": metrics["test_accuracy"], "macro_f1": metrics["test_macro_f1"]}))


def timed_run(arm: str, model: str, dataset: str, seed: int, epochs: float, scratch: Path) -> dict:
    out = scratch / f"{arm.replace(' ', '_').replace(',', '')}_seed{seed}"
    if ARMS[arm] is None:
        command = [sys.executable, __file__, "--stock_run", str(out / "metrics.json"), "--model", model,
                   "--dataset", dataset, "--seeds", str(seed), "--epochs", str(epochs)]
        out.mkdir(parents=True)
    else:
        command = [sys.executable, str(ROOT / "train.py"), "--model_name_or_path", model, "--dataset_name", dataset,
                   "--seed", str(seed), "--num_train_epochs", str(epochs), "--output_dir", str(out),
                   "--report_to", "none", "--save_model", "False", *ARMS[arm]]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True)
    seconds = time.perf_counter() - start
    metrics = json.loads((out / "metrics.json").read_text())
    return {"arm": arm, "seed": seed, "seconds": seconds, "accuracy": metrics["accuracy"],
            "macro_f1": metrics["macro_f1"]}


def summary(results: list[dict]) -> str:
    from peftlab.markdown import table
    from peftlab.results import DIFFERENCE_RANGE, mean_interval

    stock = statistics.median(r["seconds"] for r in results if r["arm"] == "stock")
    baseline = {r["seed"]: r for r in results if r["arm"] == BASELINE}
    rows = []
    for arm in ARMS:
        mine = [r for r in results if r["arm"] == arm]
        seconds = statistics.median(r["seconds"] for r in mine)
        cells = []
        for key in ("accuracy", "macro_f1"):
            cells.append(mean_interval([r[key] for r in mine]))
            if ARMS[arm] is None or arm == BASELINE:
                cells.append("–")
                continue
            cells.append(mean_interval([r[key] - baseline[r["seed"]][key] for r in mine], sign="+",
                                       bounds=DIFFERENCE_RANGE))
        rows.append([arm, len(mine), " / ".join(f"{r['seconds']:.0f}" for r in mine), f"{seconds:.0f}",
                     f"{stock / seconds:.2f}x", *cells])
    return table(["recipe", "seeds", "whole process s, per seed", "median s", "speed-up over stock",
                  "test accuracy % [95% CI]", f"accuracy vs {BASELINE}, paired", "test macro-F1 % [95% CI]",
                  f"macro-F1 vs {BASELINE}, paired"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--dataset", default="restaurant_sup")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", default="benchmarks/results/stock_recipe", help="path stem for .json and .md")
    parser.add_argument("--note", default="", help="a line on the conditions (other load on the machine)")
    parser.add_argument("--stock_run", help=argparse.SUPPRESS)  # the child process of one stock run
    args = parser.parse_args()
    if args.stock_run:
        stock_run(args.model, args.dataset, args.seeds[0], args.epochs, Path(args.stock_run))
        return

    sys.path.insert(0, str(ROOT / "src"))
    from peftlab.hardware import cpu_model, native_bf16

    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            for arm in ARMS:
                results.append(timed_run(arm, args.model, args.dataset, seed, args.epochs, Path(scratch)))
                print(json.dumps(results[-1]), flush=True)
    machine = {"processor": cpu_model() or platform.processor(), "cpu_count": os.cpu_count(),
               "native_bf16": native_bf16()}
    json_path, md_path = ROOT / f"{args.out}.json", ROOT / f"{args.out}.md"
    json_path.write_text(json.dumps({"machine": machine, "model": args.model, "dataset": args.dataset,
                                                    "epochs": args.epochs, "note": args.note,
                                                    "results": results}, indent=2) + "\n")
    md_path.write_text(
        f"{args.model} on {args.dataset}, {args.epochs:g} epoch(s), batch 16, learning rate 2e-5; host: "
        f"{machine['cpu_count']} CPUs ({machine['processor']}, native bf16: {machine['native_bf16']}). "
        f"{args.note}\n\n" + summary(results))
    print(md_path.read_text())


if __name__ == "__main__":
    main()
