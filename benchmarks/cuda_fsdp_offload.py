"""Full fine-tuning under FSDP (full shard) with CPU offload, one process, against the estimator (issue 25).

A randomly initialised model of a built-in config (Qwen2.5-3B by default: memory does not depend on the
weights' values, so no checkpoint is needed) is wrapped in PyTorch FSDP, one unit per decoder layer and a
root unit for the rest, with bf16 mixed precision; ``--offload`` keeps parameters, gradients and AdamW
state in CPU memory (``CPUOffload(offload_params=True)``: the optimizer steps there). A few AdamW steps on
fixed-length random batches (on one process FSDP runs NO_SHARD: each unit's full parameters, copied to the
GPU only while it computes); the peak of ``torch.cuda.max_memory_allocated`` is set beside
``peftlab.memory.per_gpu_bytes`` for the same run (FSDP on 1 GPU, with or without offload).

    python benchmarks/cuda_fsdp_offload.py --offload --out $OUT/fsdp_offload      # on a CUDA machine
    python benchmarks/cuda_fsdp_offload.py --model <tiny config folder> --device cpu  # the code path, on a CPU
    python benchmarks/cuda_fsdp_offload.py --summarize reports/cuda/fsdp.md reports/cuda/fsdp_*.json      # the table
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def summarize(out: str, json_paths: list[str]) -> None:
    """One markdown table of the measurements in ``json_paths``."""
    from peftlab.markdown import table
    from peftlab.memory import GIB

    results = [json.loads(Path(path).read_text()) for path in sorted(json_paths)]
    head = results[0]
    rows = [[r["model"], "FSDP" + (" + CPU offload" if r["offload"] else ""), r["sharding_strategy"],
             r.get("backward_prefetch", "BACKWARD_PRE"),
             f"{r['batch_size']} x {r['seq_len']}",
             f"{r['estimated_bytes'] / GIB:.2f} (activations {r['estimated_activations_bytes'] / GIB:.2f}, gathered "
             f"unit {r['estimated_gathered_bytes'] / GIB:.2f})", f"{r['measured_peak_bytes'] / GIB:.2f}",
             f"{r['measured_peak_bytes'] / r['estimated_bytes']:.2f}", f"{r['median_step_s']:.2f}"] for r in results]
    Path(out).write_text(
        f"Device: {head['device']}, torch {head['torch']}; full fine-tuning, randomly initialised model, bf16 mixed "
        "precision, AdamW, one process (`benchmarks/cuda_fsdp_offload.py`); measured = "
        "`torch.cuda.max_memory_allocated` (the CUDA context comes on top).\n\n"
        + table(["model", "strategy", "FSDP ran as", "backward prefetch", "batch x seq", "estimated GiB per GPU",
                 "measured peak GiB",
                 "measured / estimated", "step s (median)"], rows))


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--summarize":
        return summarize(sys.argv[2], sys.argv[3:])
    from torch.distributed.fsdp import BackwardPrefetch, CPUOffload, MixedPrecision
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers import AutoModelForSequenceClassification

    from peftlab.memory import GIB, estimate, gathered_bytes, largest_unit_params, load_config, per_gpu_bytes

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Qwen2.5-3B")
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--backward_prefetch", default="BACKWARD_PRE",
                        choices=["BACKWARD_PRE", "BACKWARD_POST", "none"],
                        help="FSDP's prefetch of the next unit's parameters in the backward pass (its default: PRE)")
    parser.add_argument("--out", help="path stem for .json")
    args = parser.parse_args()

    cuda = args.device == "cuda"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    config = load_config(args.model, num_labels=3)
    if config.pad_token_id is None:  # the last-token head needs one; the batches have no padding
        config.pad_token_id = 0
    torch.manual_seed(0)
    started = time.perf_counter()
    model = AutoModelForSequenceClassification.from_config(config)  # fp32, in CPU memory
    layer_classes = {type(module) for name, module in model.named_modules()
                     if name.count(".") == 2 and (".layers." in name or ".layer." in name)}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    fsdp = FSDP(model, auto_wrap_policy=functools.partial(transformer_auto_wrap_policy,
                                                          transformer_layer_cls=layer_classes),
                mixed_precision=MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16,
                                               buffer_dtype=torch.bfloat16),
                cpu_offload=CPUOffload(offload_params=args.offload), use_orig_params=True,
                backward_prefetch=(None if args.backward_prefetch == "none"
                                   else BackwardPrefetch[args.backward_prefetch]),
                # offloaded, the module stays in CPU memory and computes on the current device; otherwise it moves
                device_id=None if args.offload else device)
    setup_s = time.perf_counter() - started
    optimizer = torch.optim.AdamW(fsdp.parameters(), lr=1e-5)
    ids = torch.randint(0, min(config.vocab_size, 1000), (args.batch_size, args.seq_len), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.zeros(args.batch_size, dtype=torch.long, device=device)}
    step_s = []
    for _ in range(args.steps):
        start = time.perf_counter()
        fsdp(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        step_s.append(time.perf_counter() - start)
    est = estimate(config, "full", "bf16-mixed", args.batch_size, args.seq_len)
    estimated = per_gpu_bytes(est, 1, "fsdp", args.offload, gathered_bytes(config, "bf16-mixed"))
    result = {
        "model": args.model, "offload": args.offload, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "sharding_strategy": fsdp.sharding_strategy.name,  # FSDP falls back to NO_SHARD on one process
        "backward_prefetch": args.backward_prefetch,
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "setup_s": setup_s, "step_s": step_s, "median_step_s": statistics.median(step_s[1:] or step_s),
        "measured_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "estimated_bytes": estimated, "estimated_activations_bytes": est.activations,
        "estimated_gathered_bytes": gathered_bytes(config, "bf16-mixed"),
        "largest_unit_params": largest_unit_params(config),
    }
    print(json.dumps(result), flush=True)
    if cuda:
        print(f"{args.model}, FSDP full shard on 1 GPU{' + CPU offload' if args.offload else ''}: measured "
              f"{result['measured_peak_bytes'] / GIB:.2f} GiB, estimated {estimated / GIB:.2f} GiB, "
              f"step {result['median_step_s']:.2f} s", flush=True)
    if args.out:
        Path(f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
