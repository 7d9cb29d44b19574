"""Does compiling more of a decoder speed up its PEFT step on CPU? (issue 22, the decoders' hours)

``--candidate mlp``: a profile of a LoRA step on the 1.5B decoder's layers puts the MLP's elementwise work (SiLU
of the gate projection, its product with the up projection, and their backward) next to the matrix multiplies:
eager PyTorch makes a pass over a 16 x length x 8960 tensor for each of them. ``Module.compile`` (inductor,
dynamic shapes) of each ``Qwen2MLP`` fuses them into one kernel forward and one backward: train.py's
``--cpu_compile_mlp``, as ``--cpu_compile_rms_norm`` does for RMSNorm. Baseline: compiled RMSNorm.

``--candidate none``: two identical models (and the attention candidate's baseline), what noise alone gives.

``--candidate attention``: SDPA's math kernel (what training steps run up to 128 tokens per row) repeats the
keys and values per query head and makes separate passes for the scaling, mask and softmax; train.py's
``--cpu_compile_attention`` stacks each key/value head's query heads into one matrix and fuses the rest.
Baseline: compiled RMSNorm and MLPs (the grid's decoders).

Randomly initialised layers of a built-in config (``--layers`` of them: each layer costs what one of the real
model's does, and no checkpoint is needed), the grid's setup otherwise (bf16 frozen weights and autocast,
train.py's dropout masks, fused AdamW, batch 16). Four models built alike from one seed, two of each built in the
order baseline, candidate, candidate, baseline, take the same batches (16 rows of 77-100% of the length, padded to
it) in turn, alternating which goes first, so the host's load and the build order fall on both alike; per batch
length, the median step (of each arm's two models' mean) and the median of the per-step ratios:

    python benchmarks/compiled_modules.py --candidate mlp --out benchmarks/results/compiled_mlp_amx
    python benchmarks/compiled_modules.py --candidate attention --steps 8 --lengths 24 53 109 \
        --out benchmarks/results/compiled_attention_amx_qwen-1.5b
    python benchmarks/compiled_modules.py --candidate none --steps 8 --lengths 24 53 109 \
        --out benchmarks/results/compiled_aa_control_amx_qwen-1.5b
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from peftlab.benchmark import RandomSetup, random_batch
from peftlab.cli import positive_int
from peftlab.hardware import (
    attention_kernels,
    compile_modules,
    cpu_model,
    gated_mlp_classes,
    native_bf16,
    rms_norm_classes,
    use_cpu_compiled_attention,
    use_cpu_fast_dropout,
)
from peftlab.markdown import table


def train_step(model, optimizer, batch) -> tuple[float, float]:
    start = time.perf_counter()
    with attention_kernels(batch["input_ids"].shape[-1], "cpu"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, loss.item()


# candidate -> (the baseline arm's name, the candidate arm's name, what the candidate's models get on top)
CANDIDATES = {
    "mlp": ("eager", "compiled MLP", lambda model: compile_modules(model, gated_mlp_classes())),
    "attention": ("SDPA attention", "compiled attention", use_cpu_compiled_attention),
    "none": ("first", "second", lambda model: None),  # A/A: what the host's noise and the order alone give
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidate", choices=list(CANDIDATES), default="mlp", help="what the candidate compiles")
    parser.add_argument("--config", default="Qwen2.5-1.5B", help="a built-in config (peftlab.memory)")
    parser.add_argument("--method", default="lora-r16", help="a benchmark method label")
    parser.add_argument("--layers", type=positive_int, default=4)
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[24, 53, 109, 256],
                        help="tokens per row (the longest row of a batch); defaults: the median batch of "
                             "restaurant_sup and of acl_sup, acl_sup's 90th percentile, the grid's maximum")
    parser.add_argument("--steps", type=positive_int, default=6, help="timed steps per length")
    parser.add_argument("--warmup", type=positive_int, default=2, help="untimed steps per length (compilation)")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--out", type=Path, help="path stem: writes <out>.md")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    setup = RandomSetup.of(args.config, args.method, "auto", bf16=True)
    setup.config.num_hidden_layers = args.layers
    baseline_name, candidate_name, compile_candidate = CANDIDATES[args.candidate]
    # four models built from one seed in the order baseline, candidate, candidate, baseline: of two identical
    # models, the one built second ran 1.11-1.13x faster on the same batches (4 Qwen2.5-1.5B layers), so each arm's
    # time sums one model built early and one built late; in this order two identical arms (--candidate none, the
    # control to read a candidate against) still read 1.03-1.07x (compiled_aa_control_amx_qwen-1.5b.md)
    models = []
    for arm in (baseline_name, candidate_name, candidate_name, baseline_name):
        torch.manual_seed(0)
        # a config of its own: switching the attention function sets it on the model's config
        model = use_cpu_fast_dropout(dataclasses.replace(setup, config=copy.deepcopy(setup.config)).build("cpu"))
        compile_modules(model, rms_norm_classes())
        if args.candidate != "mlp":  # the grid decoders: compiled MLPs too
            compile_modules(model, gated_mlp_classes())
        if arm == candidate_name:
            compile_candidate(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True)
        models.append((arm, model, optimizer))
    rows = []
    for length in args.lengths:
        times = {baseline_name: [], candidate_name: []}
        losses = {baseline_name: [], candidate_name: []}
        for step in range(args.warmup + args.steps):
            # rows of 77-100% of the width, as in a length group: padded, so the attention has a mask
            batch = random_batch(setup.config, [length - i * length // 64 for i in range(16)], length, "cpu")
            step_times = {baseline_name: 0.0, candidate_name: 0.0}
            for arm, model, optimizer in models[::1 if step % 2 else -1]:
                torch.manual_seed(step)  # the same dropout masks for all
                seconds, loss = train_step(model.train(), optimizer, batch)
                step_times[arm] += seconds
                losses[arm].append(loss)
            if step >= args.warmup:
                for arm, seconds in step_times.items():
                    times[arm].append(seconds / 2)
        ratios = [a / b for a, b in zip(times[baseline_name], times[candidate_name], strict=True)]
        rows.append([length, f"{statistics.median(times[baseline_name]):.3f}",
                     f"{statistics.median(times[candidate_name]):.3f}",
                     f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}, {max(ratios):.2f}]",
                     f"{max(abs(a - b) for a, b in zip(*losses.values(), strict=True)):.1e}"])
        print(rows[-1], flush=True)
    text = (f"Host: {cpu_model()} (native bf16: {native_bf16() or 'none'}), torch {torch.__version__}, "
            f"{args.threads} thread(s). {args.config}'s layers, {args.layers} of them, randomly initialised, "
            f"{args.method}, batch 16, bf16; {args.steps} timed steps per length after {args.warmup}, two "
            f"models of each arm ({baseline_name}, {candidate_name}) in turn on each batch. Command: "
            f"`python benchmarks/compiled_modules.py --candidate {args.candidate} --config {args.config}`.\n\n"
            + table(["tokens per row", f"{baseline_name} step s (median)", f"{candidate_name} step s (median)",
                     f"{baseline_name} / {args.candidate} compiled (median [min, max] per step)",
                     "largest loss difference"], rows) + "\n")
    print(text)
    if args.out:
        Path(f"{args.out}.md").write_text(text)  # the stem may hold dots (qwen-0.5b)


if __name__ == "__main__":
    main()
