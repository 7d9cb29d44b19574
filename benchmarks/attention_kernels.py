"""SDPA on CPU: the flash kernel against the math kernel, forward + backward, by tokens per row (issue 22).

PyTorch runs ``scaled_dot_product_attention`` on its CPU flash kernel whenever the call allows it (no
attention dropout: the decoders in training, every model in evaluation). The batches of the grid are short
(restaurant rows ~27 tokens), where that kernel's fixed costs may dominate. This times both kernels on the
attention of a Qwen2.5-0.5B layer (14 heads of 64, bf16, a causal boolean mask as transformers passes one),
alternating them ``--repeats`` times and quoting medians, to set ``peftlab.hardware.MATH_ATTENTION_MAX_LENGTH``:

    python benchmarks/attention_kernels.py --out benchmarks/results/attention_kernels
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from peftlab.cli import positive_int
from peftlab.hardware import MATH_ATTENTION_MAX_LENGTH, cpu_model
from peftlab.markdown import table

KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def attention_seconds(tokens: int, rows: int, heads: int, head_dim: int, repeats: int) -> dict[str, float]:
    """Median seconds of one forward + backward per kernel, and their outputs' largest difference."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(rows, heads, tokens, head_dim, generator=generator, dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    grad = torch.randn(rows, heads, tokens, head_dim, generator=generator, dtype=torch.bfloat16)
    mask = torch.ones(rows, 1, tokens, tokens, dtype=torch.bool).tril()

    def step(kernel):
        with sdpa_kernel([kernel]):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=positive_int, nargs="+", default=[27, 48, 96, 128, 160, 192, 256])
    parser.add_argument("--rows", type=positive_int, default=16, help="rows per batch")
    parser.add_argument("--heads", type=positive_int, default=14)
    parser.add_argument("--head_dim", type=positive_int, default=64)
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=positive_int, default=15)
    parser.add_argument("--out", type=Path, help="write the table to OUT.md as well")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for tokens in args.tokens:
        result = attention_seconds(tokens, args.rows, args.heads, args.head_dim, args.repeats)
        rows.append([str(tokens), f"{1e3 * result['flash']:.2f}", f"{1e3 * result['math']:.2f}",
                     f"{result['flash'] / result['math']:.2f}x", f"{result['max_diff']:.1e}",
                     "math" if tokens <= MATH_ATTENTION_MAX_LENGTH else "flash"])
    text = (f"Host: {cpu_model()}, torch {torch.__version__}, {args.threads} thread(s). SDPA forward + backward, "
            f"{args.rows} rows x {args.heads} heads x {args.head_dim} dims, bf16, causal boolean mask; median of "
            f"{args.repeats} alternated repeats. Command: `python benchmarks/attention_kernels.py`.\n\n"
            + table(["tokens per row", "flash ms", "math ms", "math's speed-up", "max |difference| of outputs",
                     f"train.py runs (up to {MATH_ATTENTION_MAX_LENGTH}: math)"], rows))
    print(text)
    if args.out:
        args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
