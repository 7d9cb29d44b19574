"""SDPA on CPU: the flash kernel against the math kernel, by tokens per row (issue 22): forward + backward as in
training, or with ``--forward_only`` as in evaluation.

PyTorch runs ``scaled_dot_product_attention`` on its CPU flash kernel whenever the call allows it (no
attention dropout: the decoders in training, every model in evaluation). The batches of the grid are short
(restaurant rows ~27 tokens), where that kernel's fixed costs may dominate. This times both kernels on the
attention of a Qwen2.5-0.5B layer (14 heads of 64, bf16, a causal boolean mask as transformers passes one),
alternating them ``--repeats`` times and quoting medians, to set ``peftlab.hardware.MATH_ATTENTION_MAX_LENGTH``:

    python benchmarks/attention_kernels.py --out benchmarks/results/attention_kernels
    python benchmarks/attention_kernels.py --forward_only --rows 64 --out benchmarks/results/attention_kernels_eval_amx

``--runs RUN_DIR...`` times whole evaluations instead: each finished run's test rows predicted as train.py
predicts them (its Trainer, precision and batch size), under each kernel in turn, with how often the two
kernels' labels agree and each one's scores.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from peftlab.cli import positive_int
from peftlab.hardware import MATH_ATTENTION_MAX_LENGTH, cpu_model
from peftlab.markdown import table

KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def attention_seconds(tokens: int, rows: int, heads: int, head_dim: int, repeats: int,
                      backward: bool = True) -> dict[str, float]:
    """Median seconds of one forward (+ backward) per kernel, and their outputs' largest difference."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(rows, heads, tokens, head_dim, generator=generator, dtype=torch.bfloat16,
                           requires_grad=backward) for _ in range(3))
    grad = torch.randn(rows, heads, tokens, head_dim, generator=generator, dtype=torch.bfloat16)
    mask = torch.ones(rows, 1, tokens, tokens, dtype=torch.bool).tril()

    def step(kernel):
        with sdpa_kernel([kernel]), torch.set_grad_enabled(backward):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if backward:
            out.backward(grad)
        return out.detach()

    max_diff = (step(KERNELS["flash"]).float() - step(KERNELS["math"]).float()).abs().max().item()
    times = {name: [] for name in KERNELS}
    for _ in range(repeats):
        for name, kernel in KERNELS.items():
            start = time.perf_counter()
            step(kernel)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()} | {"max_diff": max_diff}


def evaluation_passes(run_dir: Path, repeats: int) -> dict:
    """A finished run's test rows predicted under each kernel, ``repeats`` alternated passes: median seconds per
    pass, and the labels' agreement and scores (first pass; the passes repeat their labels)."""
    from peftlab.data import tokenize
    from peftlab.metrics import classification_metrics
    from peftlab.predict import load_trained, prediction_trainer, rows_to_label
    from peftlab.runrecord import predicted_ids

    tokenizer, model, record = load_trained(run_dir, for_inference=False)  # LoRA unmerged, as evaluated in training
    rows = rows_to_label(record)
    encoded = tokenize(rows, tokenizer, record["data_args"]["max_seq_length"])
    times, labels = {name: [] for name in KERNELS}, {}
    with tempfile.TemporaryDirectory() as scratch:
        trainer = prediction_trainer(model, tokenizer, record, scratch)
        for _ in range(repeats):
            for name, kernel in KERNELS.items():
                start = time.perf_counter()
                with sdpa_kernel([kernel]):
                    labels.setdefault(name, predicted_ids(trainer.predict(encoded).predictions))
                times[name].append(time.perf_counter() - start)
    scores = {name: classification_metrics(ids, rows["label"]) for name, ids in labels.items()}
    return {"run": str(run_dir), "rows": len(rows), **{name: statistics.median(t) for name, t in times.items()},
            "agreement": float((labels["flash"] == labels["math"]).mean()), "scores": scores}


def evaluation_table(results: list[dict]) -> str:
    return table(["run", "test rows", "flash s", "math s", "flash's speed-up", "same label", "accuracy flash / math",
                  "macro-F1 flash / math"],
                 [[r["run"], str(r["rows"]), f"{r['flash']:.1f}", f"{r['math']:.1f}", f"{r['math'] / r['flash']:.2f}x",
                   f"{100 * r['agreement']:.1f}%",
                   *(" / ".join(f"{100 * r['scores'][name][metric]:.1f}" for name in ("flash", "math"))
                     for metric in ("accuracy", "macro_f1"))] for r in results])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=positive_int, nargs="+", default=[27, 48, 96, 128, 160, 192, 256])
    parser.add_argument("--rows", type=positive_int, default=16, help="rows per batch")
    parser.add_argument("--heads", type=positive_int, default=14)
    parser.add_argument("--head_dim", type=positive_int, default=64)
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=positive_int, default=15)
    parser.add_argument("--forward_only", action="store_true", help="time the forward alone, without gradients, "
                                                                    "as evaluation runs it")
    parser.add_argument("--runs", type=Path, nargs="+",
                        help="finished runs (train.py output_dirs with model/): time their whole test evaluations "
                             "instead of the kernels alone")
    parser.add_argument("--out", type=Path, help="write the table to OUT.md as well")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = " ".join(["python benchmarks/attention_kernels.py", *(argv if argv is not None else sys.argv[1:])])
    if args.runs:
        text = (f"Host: {cpu_model()}, torch {torch.__version__}, {args.threads} thread(s). Each run's test rows "
                f"predicted as train.py evaluates (LoRA unmerged), under SDPA's flash and math kernels in turn; median "
                f"of {args.repeats} alternated passes. Command: `{command}`.\n\n"
                + evaluation_table([evaluation_passes(run, args.repeats) for run in args.runs]))
    else:
        rows = []
        for tokens in args.tokens:
            result = attention_seconds(tokens, args.rows, args.heads, args.head_dim, args.repeats,
                                       backward=not args.forward_only)
            # train.py's choice: evaluation always PyTorch's (flash), training math up to the limit
            chosen = "math" if tokens <= MATH_ATTENTION_MAX_LENGTH and not args.forward_only else "flash"
            rows.append([str(tokens), f"{1e3 * result['flash']:.2f}", f"{1e3 * result['math']:.2f}",
                         f"{result['flash'] / result['math']:.2f}x", f"{result['max_diff']:.1e}", chosen])
        pass_ = "forward (no gradients)" if args.forward_only else "forward + backward"
        text = (f"Host: {cpu_model()}, torch {torch.__version__}, {args.threads} thread(s). SDPA {pass_}, "
                f"{args.rows} rows x {args.heads} heads x {args.head_dim} dims, bf16, causal boolean mask; median of "
                f"{args.repeats} alternated repeats. Command: `{command}`.\n\n"
                + table(["tokens per row", "flash ms", "math ms", "math's speed-up", "max |difference| of outputs",
                         f"train.py runs (training up to {MATH_ATTENTION_MAX_LENGTH}: math; evaluation: flash)"],
                        rows))
    print(text)
    if args.out:
        Path(f"{args.out}.md").write_text(text)  # the stem may hold dots (qwen-0.5b)


if __name__ == "__main__":
    main()
