"""Where does a CPU train step spend its time? (issue 22) A ``torch.profiler`` table of the benchmark's step.

The model, method and real restaurant batches of ``peftlab.benchmark`` (batch 16, bf16 autocast, frozen
weights as train.py stores them, fused AdamW, train.py's attention kernels): ``--warmup`` steps unprofiled,
then ``--steps`` profiled; the operators sorted by their own CPU time.

    python benchmarks/profile_step.py --model Qwen2.5-Coder-0.5B-Instruct --method lora-r16 \\
        --out benchmarks/results/profile_qwen-0.5b_lora-r16
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from peftlab.benchmark import PADDINGS, adamw, matmul_peak, measuring_loop, real_setup
from peftlab.cli import positive_int, switch
from peftlab.hardware import cpu_model, native_bf16

MATRIX_PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm")  # the operators whose FLOPs the profiler counts here


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Qwen2.5-Coder-0.5B-Instruct")
    parser.add_argument("--method", default="lora-r16", help="a benchmark method label: full, lora-r16, adapter, ...")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    parser.add_argument("--warmup", type=positive_int, default=3)
    parser.add_argument("--steps", type=positive_int, default=5)
    parser.add_argument("--fast_dropout", type=switch, default=True,
                        help="1: dropout masks as train.py's --cpu_fast_dropout draws them, 0: torch.nn.Dropout")
    parser.add_argument("--compile_rms_norm", type=switch, default=False,
                        help="1: RMSNorm modules compiled, as train.py's --cpu_compile_rms_norm (the grid's decoders)")
    parser.add_argument("--compile_mlp", type=switch, default=False,
                        help="1: gated MLPs compiled, as train.py's --cpu_compile_mlp (the grid's decoders)")
    parser.add_argument("--padding", default="dynamic", choices=PADDINGS,
                        help="grouped: rows of similar length batched together, as train.py's --group_by_length")
    parser.add_argument("--rows", type=positive_int, default=30, help="operators listed")
    parser.add_argument("--out", type=Path, help="path stem: writes <out>.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    peak = matmul_peak(torch.bfloat16)
    model, tuning, batches, _ = real_setup(args.model, args.method, True, "auto", args.padding, 16, 256,
                                           args.warmup + args.steps, fast_dropout=args.fast_dropout,
                                           compile_rms_norm=args.compile_rms_norm, compile_mlp=args.compile_mlp)
    # one optimizer for both calls: its state is allocated in the warm-up, not in the first profiled step
    optimizer = adamw(model, fused=True)
    measuring_loop(model, tuning, batches[:args.warmup], 0, serve=False, optimizer=optimizer)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as profiler:
        measuring_loop(model, tuning, batches[args.warmup:], 0, serve=False, optimizer=optimizer)
    seconds = time.perf_counter() - start
    averages = profiler.key_averages()
    products = [event for event in averages if event.key in MATRIX_PRODUCTS]
    product_flops, product_us = sum(e.flops for e in products), sum(e.self_cpu_time_total for e in products)
    shapes = ", ".join("x".join(map(str, batch["input_ids"].shape)) for batch in batches[args.warmup:])
    text = (f"Host: {cpu_model()} (native bf16: {native_bf16() or 'none'}), torch {torch.__version__}, "
            f"{args.threads} thread(s), measured bf16 matmul peak {peak / 1e12:.2f} TFLOP/s (2048^3). "
            f"{args.model}, {args.method}, bf16 autocast, {'fast' if args.fast_dropout else 'torch'} dropout, "
            f"RMSNorm {'compiled' if args.compile_rms_norm else 'eager'}, MLP "
            f"{'compiled' if args.compile_mlp else 'eager'}, {args.steps} profiled steps on {args.padding} "
            "restaurant batches "
            f"({shapes}) after {args.warmup} unprofiled: {seconds:.2f} s under the profiler. Command: "
            f"`python benchmarks/profile_step.py --model {args.model} --method {args.method} "
            f"--fast_dropout {args.fast_dropout:d} --compile_rms_norm {args.compile_rms_norm:d} "
            f"--compile_mlp {args.compile_mlp:d} --padding {args.padding}`.\n\n"
            f"Matrix products ({', '.join(MATRIX_PRODUCTS)}): {product_flops / 1e9 / args.steps:.0f} GFLOP per step "
            f"at {product_flops / product_us / 1e6:.2f} TFLOP/s, {100 * product_flops / product_us * 1e6 / peak:.0f}% "
            f"of that peak, in {100 * product_us / sum(e.self_cpu_time_total for e in averages):.0f}% of the "
            "profiled CPU time.\n\n```\n"
            + averages.table(sort_by="self_cpu_time_total", row_limit=args.rows) + "```\n")
    if args.out:
        Path(f"{args.out}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
