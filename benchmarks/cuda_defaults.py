"""train.py's speed defaults on a CUDA GPU (issue 22): each default against the same run without it.

The defaults were chosen on CPUs: bf16 autocast where the hardware has native bf16 matmuls, fused AdamW,
batches of rows of similar length (``--group_by_length``, in a random order) padded to their longest row, and
(under bf16) PEFT's frozen weights stored in bf16. Here each is switched off in turn, and all of them at once
(the stock recipe of ``benchmarks/stock_recipe.py``: fp32, PyTorch's default foreach AdamW, every row padded
to 128 tokens), on randomly initialised models of the assignment's architectures (built-in configs: a bare GPU
machine has no checkpoint, and speed does not depend on the weights' values).

The batches have restaurant_sup's training rows' real token counts under the model family's tokenizer
(``benchmarks/results/restaurant_token_lengths.json``, written by ``--write_lengths`` on a machine with the
checkpoints; roberta-large, whose tokenizer is not offline, takes BERT's WordPiece counts) and random token
ids. Each variant trains ``--steps`` batches of 16, timed after an untimed pass over them: random batches of
the shuffled rows, or for grouped batching a random sample of ``LengthGroupedSampler``'s batches, as
``--shuffle_length_groups`` trains them. Rows differ between orders, so speed is real (unpadded) tokens per
second; variants alternate in direction over ``--repeats``.

    python benchmarks/cuda_defaults.py --out reports/cuda/defaults            # on a CUDA machine
    python benchmarks/cuda_defaults.py --write_lengths benchmarks/results/restaurant_token_lengths.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

LENGTHS = Path(__file__).resolve().parent / "results" / "restaurant_token_lengths.json"
# tokenizer family -> the offline checkpoint whose tokenizer counts its tokens
TOKENIZERS = {"bert-base-uncased": "all-MiniLM-L6-v2", "Qwen2.5": "Qwen2.5-Coder-0.5B-Instruct"}
STOCK_MAX_LENGTH = 128
WARM_UP = "an untimed pass over the timed batches"
VARIANTS = {  # name -> (bf16 autocast, fused AdamW, batching); frozen weights follow bf16 as train.py's `auto`
    "defaults": (True, True, "grouped"),
    "fp32": (False, True, "grouped"),
    "foreach AdamW": (True, False, "grouped"),
    "random batches": (True, True, "random"),
    f"padded to {STOCK_MAX_LENGTH}": (True, True, "max_length"),
    "stock recipe": (False, False, "max_length"),
}


def write_lengths(path: str) -> None:
    """Token counts of restaurant_sup's training rows (validation held out, as train.py does) per tokenizer."""
    from peftlab.data import get_dataset, hold_out_validation, tokenize
    from peftlab.models import default_sep_token, load_tokenizer, resolve_model

    lengths = {}
    for family, checkpoint in TOKENIZERS.items():
        tokenizer = load_tokenizer(resolve_model(checkpoint))
        train, _, _ = hold_out_validation(get_dataset("restaurant_sup", default_sep_token(tokenizer))["train"], 0.1)
        lengths[family] = [len(ids) for ids in tokenize(train, tokenizer, 256)["input_ids"]]
    Path(path).write_text(json.dumps({"tokenizers": TOKENIZERS, "lengths": lengths}) + "\n")


def family(config) -> str:
    return "Qwen2.5" if config.model_type == "qwen2" else "bert-base-uncased"


def batches(lengths: list[int], batching: str, count: int, batch_size: int, config, device: str,
            seed: int) -> list[dict]:
    """``count`` batches of random tokens with the rows' real lengths (:func:`peftlab.benchmark.random_batch`)."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from peftlab.benchmark import random_batch

    if count * batch_size > len(lengths):
        raise ValueError(f"{count} batches of {batch_size} need {count * batch_size} rows, the lengths have "
                         f"{len(lengths)}")
    generator = torch.Generator().manual_seed(seed)
    if batching == "grouped":
        rows = list(LengthGroupedSampler(batch_size, lengths=lengths, generator=generator))
        grouped = [rows[i:i + batch_size] for i in range(0, len(rows) - batch_size + 1, batch_size)]
        chosen = [grouped[i] for i in torch.randperm(len(grouped), generator=generator)[:count].tolist()]
    else:
        rows = torch.randperm(len(lengths), generator=generator).tolist()
        chosen = [rows[i * batch_size:(i + 1) * batch_size] for i in range(count)]
    padded = batching == "max_length"
    made = []
    for rows in chosen:
        row_lengths = [min(lengths[i], STOCK_MAX_LENGTH) if padded else lengths[i] for i in rows]
        made.append(random_batch(config, row_lengths, STOCK_MAX_LENGTH if padded else max(row_lengths), device,
                                 generator))
    return made


def measure(config_name: str, method: str, variant: str, lengths: list[int], steps: int, batch_size: int,
            device: str) -> dict:
    from peftlab.benchmark import RandomSetup, measuring_loop
    from peftlab.models import dtype_name

    bf16, fused, batching = VARIANTS[variant]
    torch.manual_seed(0)
    setup = RandomSetup.of(config_name, method, "auto", bf16=bf16)
    model = setup.build(device)
    timed = batches(lengths, batching, steps, batch_size, setup.config, device, seed=0)
    # warm-up: one untimed pass over the very batches timed, so every sequence length has met its kernels
    # (cuBLAS picks them per shape on first use) before timing
    times = measuring_loop(model, setup.tuning, timed + timed, steps, device, bf16=bf16, fused_adamw=fused,
                           serve=False)
    seconds = sum(times["train"])
    real_tokens = sum(int(b["attention_mask"].sum()) for b in timed)
    result = {"model": config_name, "method": method, "variant": variant, "bf16": bf16, "fused_adamw": fused,
              "batching": batching, "frozen_weights_dtype": dtype_name(setup.frozen_dtype),
              "batch_size": batch_size, "steps": steps,
              "seconds": seconds, "tokens_per_s": real_tokens / seconds,
              "padded_fraction": 1 - real_tokens / sum(b["input_ids"].numel() for b in timed)}
    del model, timed
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def summary(measured: dict) -> str:
    """Per model and method, repeat by repeat: the defaults' tokens/s, and their speed-up over each variant."""
    from peftlab.markdown import table

    results = measured["results"]
    others = [name for name in VARIANTS if name != "defaults" and any(r["variant"] == name for r in results)]
    rows = []
    for model, method in dict.fromkeys((r["model"], r["method"]) for r in results):
        by_variant = {name: [r for r in results if (r["model"], r["method"], r["variant"]) == (model, method, name)]
                      for name in ["defaults", *others]}
        defaults = by_variant["defaults"]
        cells = [" / ".join(f"{d['tokens_per_s'] / v['tokens_per_s']:.2f}x"
                            for d, v in zip(defaults, by_variant[name], strict=True)) for name in others]
        rows.append([model, method, " / ".join(f"{r['tokens_per_s']:,.0f}" for r in defaults),
                     f"{100 * defaults[0]['padded_fraction']:.0f}%", *cells])
    head = results[0]
    torch_version = f", torch {measured['torch']}" if "torch" in measured else ""
    note = f" {measured['note']}" if "note" in measured else ""  # what the run's record adds, e.g. where it stopped
    return (f"Device: {measured['device']}{torch_version}; randomly initialised models, batch {head['batch_size']}, "
            f"{head['steps']} timed steps per variant after {measured['warm_up']} (`benchmarks/cuda_defaults.py`)."
            f"{note} Speed is real "
            "tokens per second. Each variant column is the defaults' speed over that variant's (above 1: the "
            "default helps), one figure per repeat: the first repeat runs the variants in the columns' order, the "
            "defaults first; the next in reverse.\n\n"
            + table(["model", "method", "defaults tokens/s", "defaults' padding", *[f"vs {n}" for n in others]],
                    rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write_lengths", metavar="PATH", help="write the token counts file and stop")
    parser.add_argument("--summarize", metavar="STEM", help="rewrite STEM.md from STEM.json and stop")
    parser.add_argument("--models", nargs="+", default=["Qwen2.5-0.5B", "bert-base-uncased", "roberta-large"],
                        help="built-in configs (or config folders); the decoder first, where the grid's hours go")
    parser.add_argument("--methods", nargs="+", default=["full", "lora-r16", "adapter"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="the defaults and what to set them against (the defaults always run)")
    parser.add_argument("--batch_size", type=int, default=16, help="rows per batch (train.py's default: 16)")
    parser.add_argument("--steps", type=int, default=40, help="timed batches per variant")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lengths", default=str(LENGTHS))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", default="reports/cuda/defaults", help="path stem for .json and .md")
    args = parser.parse_args()
    if args.write_lengths:
        return write_lengths(args.write_lengths)
    if args.summarize:
        Path(f"{args.summarize}.md").write_text(summary(json.loads(Path(f"{args.summarize}.json").read_text())))
        return
    from peftlab.memory import load_config

    lengths = json.loads(Path(args.lengths).read_text())["lengths"]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    variants = ["defaults", *(name for name in args.variants if name != "defaults")]
    results = []
    for model in args.models:
        model_lengths = lengths[family(load_config(model))]
        for method in args.methods:
            for repeat in range(args.repeats):
                for variant in variants[::1 if repeat % 2 == 0 else -1]:
                    result = measure(model, method, variant, model_lengths, args.steps, args.batch_size, args.device)
                    results.append({**result, "repeat": repeat})
                    print(f"{model} {method} {variant} repeat {repeat}: {result['tokens_per_s']:,.0f} tokens/s",
                          flush=True)
            # written after every cell: a run stopped by its time limit keeps what it measured
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            measured = {"device": device_name, "torch": torch.__version__, "warm_up": WARM_UP, "results": results}
            Path(f"{args.out}.json").write_text(json.dumps(measured, indent=1))
            Path(f"{args.out}.md").write_text(summary(measured))


if __name__ == "__main__":
    main()
