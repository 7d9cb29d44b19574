"""Throughput benchmark: training and inference speed per model, method, precision and padding.

Each configuration runs in a fresh process (so its peak RSS is its own) on real
``restaurant_sup`` batches: a few warm-up steps, then timed AdamW steps and timed inference
batches; medians and interquartile ranges are reported. The matmul peak of this machine is
measured in the same run, so achieved FLOP/s can be given as a fraction of it.

FLOPs per trained token are counted as 2N (forward) + 2N (input gradients) + 2N_t (weight
gradients) for the N non-embedding weights, N_t of them trainable, plus the attention score
and context matmuls (4 * layers * seq * hidden per token forward, twice that backward).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from .cli import non_negative_int, positive_int
from .isolated import call_in_fresh_process

PADDINGS = ("dynamic", "max_length", "grouped")


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """Measured FLOP/s of a square matmul in ``dtype`` (median of ``repeats``)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def _batches(tokenizer, texts: list[str], batch_size: int, padding: str, max_length: int, count: int):
    """``count`` batches of real rows; ``grouped`` sorts each window of 50 batches by length (as
    ``group_by_length`` does), ``max_length`` pads every row to ``max_length``."""
    rows = texts[: batch_size * count]
    if padding == "grouped":
        window = batch_size * 50
        rows = [t for i in range(0, len(rows), window)
                for t in sorted(rows[i:i + window], key=lambda t: len(tokenizer(t)["input_ids"]))]
    pad = "max_length" if padding == "max_length" else "longest"
    return [tokenizer(rows[i:i + batch_size], padding=pad, truncation=True, max_length=max_length,
                      return_tensors="pt") for i in range(0, len(rows), batch_size)]


def quartiles(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": q[1], "q1": q[0], "q3": q[2], "n": len(values)}


def _train_flops_per_token(model, trainable: int, seq_len: float) -> float:
    config = model.config
    embeddings = sum(p.numel() for n, p in model.named_parameters() if "embed" in n)
    weights = sum(p.numel() for p in model.parameters()) - embeddings
    attention = 4 * config.num_hidden_layers * seq_len * config.hidden_size
    return 2 * weights + 2 * weights + 2 * min(trainable, weights) + 3 * attention


def measure(model_name: str, method: str, precision: str, padding: str, batch_size: int, steps: int,
            warmup: int, threads: int, data_dir: str | None, max_length: int, fused_adamw: bool = False) -> dict:
    """One configuration, in this process."""
    from .data import get_dataset
    from .methods import get_method, method_from_label, parameter_counts
    from .models import default_sep_token, get_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokenizer, model = get_model(model_name, 3)
    dataset = get_dataset("restaurant_sup", default_sep_token(tokenizer), data_dir=data_dir)
    texts = list(dataset["train"].shuffle(seed=0)["text"])
    labels = torch.tensor(dataset["train"].shuffle(seed=0)["label"])
    args = method_from_label(method)
    tuning = get_method(args.tuning_method)
    model = tuning.wrap(model, args)
    counts = parameter_counts(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=fused_adamw)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    batches = _batches(tokenizer, texts, batch_size, padding, max_length, warmup + steps)
    model.train()
    step_times, real_tokens, padded_tokens = [], [], []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        with autocast:
            loss = model(**batch, labels=labels[i * batch_size:(i + 1) * batch_size]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            step_times.append(time.perf_counter() - start)
            real_tokens.append(int(batch["attention_mask"].sum()))
            padded_tokens.append(batch["input_ids"].numel())
    seq_len = sum(padded_tokens) / len(padded_tokens) / batch_size
    flops_per_token = _train_flops_per_token(model, counts["trainable_params"], seq_len)
    total_time = sum(step_times)
    result = {
        "model": model_name, "method": method, "precision": precision, "padding": padding,
        "batch_size": batch_size, "threads": threads, "fused_adamw": fused_adamw, **counts,
        "train_step_s": quartiles(step_times),
        "train_examples_per_s": batch_size * len(step_times) / total_time,
        "train_tokens_per_s": sum(real_tokens) / total_time,
        "train_padded_tokens_per_s": sum(padded_tokens) / total_time,
        "train_flops_per_s": flops_per_token * sum(padded_tokens) / total_time,
        "mean_padded_length": seq_len,
    }

    def infer(served) -> dict:
        served.eval()
        times = []
        for batch in batches[warmup:]:
            start = time.perf_counter()
            with torch.no_grad(), autocast:  # per batch: see memory.measure_device_step
                served(**batch)
            times.append(time.perf_counter() - start)
        return {"infer_batch_s": quartiles(times), "infer_examples_per_s": batch_size * len(times) / sum(times)}

    result.update(infer(model))
    if tuning.merges:
        merged = infer(tuning.for_inference(model))
        result.update({f"merged_{k}": v for k, v in merged.items()})
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["rss_before_model_mb"] = rss_before
    return result


def markdown(results: list[dict], peaks: dict) -> str:
    lines = [
        "| model | method | precision | padding | threads | AdamW | train ex/s | train tokens/s "
        "| step s (median [q1, q3]) | % of matmul peak | infer ex/s | merged infer ex/s | trainable % | peak RSS MB |",
        "|" + "---|" * 14,
    ]
    for r in results:
        step = r["train_step_s"]
        peak = peaks["bf16" if r["precision"] == "bf16" else "fp32"] * r["threads"] / peaks["threads"]
        merged = f"{r['merged_infer_examples_per_s']:.1f}" if "merged_infer_examples_per_s" in r else "–"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['precision']} | {r['padding']} | {r['threads']} "
            f"| {'fused' if r.get('fused_adamw') else 'foreach'} "
            f"| {r['train_examples_per_s']:.1f} | {r['train_tokens_per_s']:.0f} "
            f"| {step['median']:.3f} [{step['q1']:.3f}, {step['q3']:.3f}] "
            f"| {100 * r['train_flops_per_s'] / peak:.1f} | {r['infer_examples_per_s']:.1f} | {merged} "
            f"| {r['trainable_percent']:.2f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["all-MiniLM-L6-v2", "Qwen2.5-Coder-0.5B-Instruct"])
    parser.add_argument("--methods", nargs="+", default=["full", "lora-r16", "adapter"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--paddings", nargs="+", default=["dynamic"], choices=PADDINGS)
    parser.add_argument("--threads", nargs="+", type=positive_int, default=[os.cpu_count()])
    parser.add_argument("--fused_adamw", nargs="+", type=int, default=[0], choices=[0, 1],
                        help="AdamW implementation: 0 = foreach (PyTorch's default), 1 = fused")
    parser.add_argument("--batch_size", type=positive_int, default=16)
    parser.add_argument("--steps", type=positive_int, default=8, help="timed steps per configuration")
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument("--max_length", type=positive_int, default=256)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--out", default="benchmarks/results/throughput", help="path stem for .json and .md")
    args = parser.parse_args(argv)

    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16),
             "threads": torch.get_num_threads()}
    print(f"matmul peak: fp32 {peaks['fp32'] / 1e12:.2f} TFLOP/s, bf16 {peaks['bf16'] / 1e12:.2f} TFLOP/s", flush=True)
    results = []
    for model in args.models:
        for method in args.methods:
            for precision in args.precisions:
                for padding in args.paddings:
                    for threads, fused in itertools.product(args.threads, args.fused_adamw):
                        config = dict(model_name=model, method=method, precision=precision, padding=padding,
                                      batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                                      threads=threads, data_dir=args.data_dir, max_length=args.max_length,
                                      fused_adamw=bool(fused))
                        result = call_in_fresh_process("peftlab.benchmark:measure", **config)
                        results.append(result)
                        print(markdown([result], peaks).splitlines()[-1], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
               "torch": torch.__version__, "matmul_peak_flops": peaks}
    out.with_suffix(".json").write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    out.with_suffix(".md").write_text(
        f"Machine: {machine['cpu_count']} CPUs ({machine['processor']}), torch {machine['torch']}; measured matmul "
        f"peak fp32 {peaks['fp32'] / 1e12:.2f} TFLOP/s, bf16 {peaks['bf16'] / 1e12:.2f} TFLOP/s "
        f"({peaks['threads']} threads).\n\n" + markdown(results, peaks))
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
