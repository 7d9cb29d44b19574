"""Does ``torch.compile`` (inductor, dynamic shapes) speed up the CPU train step? (issue 22)

Eager and compiled train steps of one model and method on the same real restaurant batches (batch 16,
bf16 autocast, AdamW), each in a fresh process, alternated ``--repeats`` times: the first five steps
(compilation included) and the median of the next 25.

    python benchmarks/compile_check.py --model all-MiniLM-L6-v2 --method full --out benchmarks/results/compile
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from peftlab.hardware import cpu_model
from peftlab.isolated import call_in_fresh_process
from peftlab.markdown import table

WARMUP, TIMED, BATCH = 5, 25, 16


def measure(model_name: str, method: str, compiled: bool, threads: int) -> dict:
    from peftlab.benchmark import real_setup

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, _, batches, _ = real_setup(model_name, method, True, "auto", "dynamic", BATCH, 256, WARMUP + TIMED)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    forward = torch.compile(model, dynamic=True) if compiled else model
    model.train()

    def step(batch) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = forward(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    first = sum(step(batch) for batch in batches[:WARMUP])
    times = [step(batch) for batch in batches[WARMUP:]]
    return {"compiled": compiled, "first_steps_s": first, "median_step_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--method", default="full", help="a benchmark method label: full, lora-r16, adapter, ...")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", help="path stem: writes <out>.md")
    args = parser.parse_args()
    os.chdir(Path(__file__).resolve().parents[1])  # the fresh processes import this file as benchmarks.compile_check
    results = [call_in_fresh_process("benchmarks.compile_check:measure", model_name=args.model, method=args.method,
                                     compiled=compiled, threads=args.threads)
               for _ in range(args.repeats) for compiled in (False, True)]
    rows = [["compiled" if r["compiled"] else "eager", f"{r['first_steps_s']:.1f}", f"{r['median_step_s']:.3f}"]
            for r in results]
    eager = statistics.median(r["median_step_s"] for r in results if not r["compiled"])
    compiled = statistics.median(r["median_step_s"] for r in results if r["compiled"])
    text = (f"Host: {cpu_model()}, {args.threads} thread(s); {args.model}, {args.method}, bf16 autocast, "
            f"batch {BATCH}, restaurant batches; runs alternated, each in a fresh process "
            "(`benchmarks/compile_check.py`).\n\n"
            + table(["step", f"first {WARMUP} steps s (compilation included)", f"median of next {TIMED} steps s"], rows)
            + f"\nMedian step, eager / compiled: {eager / compiled:.2f}x.\n")
    if args.out:
        Path(f"{args.out}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
