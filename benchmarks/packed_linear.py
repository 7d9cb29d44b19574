"""Does prepacking the frozen weights speed up the bf16 linear layers of a PEFT step? (issue 22, AMX target)

A LoRA or adapter step runs every frozen linear layer twice: forward (x @ W^T) and the input gradient
(dy @ W). PyTorch hands oneDNN a plain row-major bf16 weight on each call, and oneDNN reorders it into
its blocked layout (VNNI tiles on AMX) every time; at the grid's batches (16 rows of ~27 tokens) a weight
is large next to the activations, so that reorder can be a large part of a call on a fast matmul unit.
Frozen weights never change, so they could be reordered once (``torch.ops.mkldnn._reorder_linear_weight``,
the packing inductor's freezing pass uses) and called through ``torch.ops.mkldnn._linear_pointwise``.

This measures both on the linear layers of one Qwen2.5-0.5B decoder layer (the grid's decoders), at
``--tokens`` rows per call, against this host's measured bf16 matmul peak, alternating plain and packed
calls ``--repeats`` times and quoting medians:

    python benchmarks/packed_linear.py --out benchmarks/results/packed_linear
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from pathlib import Path

import torch

from peftlab.benchmark import matmul_peak
from peftlab.cli import positive_int
from peftlab.hardware import cpu_model, native_bf16
from peftlab.markdown import table

# Qwen2.5-0.5B: hidden 896, MLP 4864, 14 query heads and 2 key/value heads of 64 (out, in) per layer.
DECODER_LAYER = {"q_proj": (896, 896), "k_proj": (128, 896), "v_proj": (128, 896), "o_proj": (896, 896),
                 "gate_proj": (4864, 896), "up_proj": (4864, 896), "down_proj": (896, 4864)}


def packed_linear(x: torch.Tensor, packed_weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, None, "none", [], "")


def seconds_per_call(call, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls


def measure_layer(out_features: int, in_features: int, tokens: int, repeats: int, calls: int) -> dict:
    """Median seconds per call of the forward and the input gradient, plain and prepacked, and the
    largest difference between their outputs (prepacking must not change the numbers)."""
    x = torch.randn(tokens, in_features, dtype=torch.bfloat16)
    grad_out = torch.randn(tokens, out_features, dtype=torch.bfloat16)
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16)
    weight_t = weight.t().contiguous()  # the input gradient is a linear layer whose weight is W^T
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, tokens)
    packed_t = torch.ops.mkldnn._reorder_linear_weight(weight_t, tokens)
    calls_by_name = {
        "forward": lambda: torch.nn.functional.linear(x, weight),
        "forward packed": lambda: packed_linear(x, packed),
        "input grad": lambda: grad_out @ weight,
        "input grad packed": lambda: packed_linear(grad_out, packed_t),
    }
    max_diff = max((calls_by_name["forward"]() - calls_by_name["forward packed"]()).abs().max().item(),
                   (calls_by_name["input grad"]() - calls_by_name["input grad packed"]()).abs().max().item())
    for call in calls_by_name.values():  # warm-up: oneDNN builds its primitives on first use
        call()
    times = {name: [] for name in calls_by_name}
    for _ in range(repeats):
        for name, call in calls_by_name.items():
            times[name].append(seconds_per_call(call, calls))
    return {"seconds": {name: statistics.median(values) for name, values in times.items()}, "max_diff": max_diff}


def report(tokens_list: list[int], threads: int, repeats: int, calls: int) -> str:
    torch.set_num_threads(threads)
    peak = matmul_peak(torch.bfloat16)
    rows, summary = [], []
    for tokens in tokens_list:
        total = Counter()  # seconds per kind of call, summed over the layer's linears
        flops = 0
        for name, (out_features, in_features) in DECODER_LAYER.items():
            result = measure_layer(out_features, in_features, tokens, repeats, calls)
            seconds = result["seconds"]
            layer_flops = 2 * tokens * out_features * in_features
            flops += layer_flops
            total.update(seconds)
            rows.append([str(tokens), name, f"{in_features} -> {out_features}",
                         *(f"{1e3 * seconds[key]:.3f} ({100 * layer_flops / seconds[key] / peak:.0f}%)"
                           for key in seconds),
                         f"{seconds['forward'] / seconds['forward packed']:.2f}x",
                         f"{seconds['input grad'] / seconds['input grad packed']:.2f}x",
                         f"{result['max_diff']:.1e}"])
        plain = total["forward"] + total["input grad"]
        packed = total["forward packed"] + total["input grad packed"]
        summary.append(f"- {tokens} rows per call: the layer's forward + input gradient take {1e3 * plain:.2f} ms "
                       f"plain ({100 * 2 * flops / plain / peak:.0f}% of peak) and {1e3 * packed:.2f} ms prepacked "
                       f"({100 * 2 * flops / packed / peak:.0f}%): {plain / packed:.2f}x.")
    header = (f"Host: {cpu_model()} (native bf16: {native_bf16() or 'none'}), torch {torch.__version__}, "
              f"{threads} thread(s); measured bf16 matmul peak {peak / 1e12:.2f} TFLOP/s (2048^3). The linear layers "
              "of one Qwen2.5-0.5B decoder layer, bf16, milliseconds per call (median of "
              f"{repeats} alternated repeats of {calls} calls) and the fraction of that peak. Command: "
              "`python benchmarks/packed_linear.py`.\n\n")
    columns = ["rows", "layer", "in -> out", "forward ms", "forward prepacked ms", "input grad ms",
               "input grad prepacked ms", "forward speed-up", "input grad speed-up", "max |difference|"]
    return header + table(columns, rows) + "\n" + "\n".join(summary) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=positive_int, nargs="+", default=[16 * 27, 16 * 64],
                        help="rows per call: the batch's tokens (16 rows of 27 tokens: a restaurant batch)")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=positive_int, default=7)
    parser.add_argument("--calls", type=positive_int, default=20, help="calls timed together in one repeat")
    parser.add_argument("--out", type=Path, help="write the table to OUT.md as well")
    args = parser.parse_args(argv)
    text = report(args.tokens, args.threads, args.repeats, args.calls)
    print(text)
    if args.out:
        Path(f"{args.out}.md").write_text(text)  # the stem may hold dots (qwen-0.5b)


if __name__ == "__main__":
    main()
