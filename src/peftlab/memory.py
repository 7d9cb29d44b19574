"""Training-memory (VRAM) estimator: weights, gradients, optimizer states and activations.

The model is built from its config on PyTorch's ``meta`` device, so parameter counts are exact
and nothing is allocated. The accounting (printed with every estimate):

* weights: every parameter, 4 bytes (fp32, and also under bf16 mixed precision, where the
  Trainer keeps fp32 master weights and autocasts matmuls), or 2 bytes with ``bf16-pure``;
* gradients: one per trainable parameter, in the weights' dtype;
* AdamW: two fp32 moments per trainable parameter (8 bytes);
* activations kept for the backward pass, per layer, with s = sequence length, b = batch,
  h = hidden, i = MLP width, kv = key/value width, e = activation bytes (4 fp32, 2 bf16):
  e*b*s*(2h [norm inputs] + h [attention input] + h + 2kv [q, k, v] + h [context] + h [MLP input]
  + g*i [MLP: g=2 for GELU, 3 for SwiGLU]), plus e*b*heads*s^2*2 with eager attention
  (scores and probabilities; SDPA/flash attention keeps none), plus the embedding output.
  This counts every layer as if gradients flow through it, which PEFT also needs (its weights
  sit in every layer), so it is an upper bound there: frozen linear layers need not keep inputs.
* not counted: the CUDA context (~0.3-0.5 GB), allocator fragmentation, temporary buffers.

Across N GPUs (``--gpus``, ``--sharding``; the batch is per GPU), per GPU:

* ddp: a full replica of everything above;
* zero1 / zero2: the optimizer state / also the gradients divided by N (DeepSpeed ZeRO stage 1 / 2);
* zero3 and fsdp (full shard): weights, gradients and optimizer state divided by N, plus the largest
  unit gathered whole for its forward or backward (one decoder layer, or the embeddings), in the
  weights' dtype;
* ``--offload``: ZeRO's optimizer state lives in CPU memory (offload_optimizer_device: cpu); FSDP's
  parameters, gradients and optimizer state do (fsdp_offload_params), leaving the gathered unit and
  the activations on the GPU. DDP has no offload.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, HfArgumentParser

from .cli import non_negative_int, positive_int
from .errors import InvalidArgument, exit_on_user_error
from .markdown import table
from .methods import MethodArguments, get_method, known_method_label, meta_model, method_from_label, wrap_on_meta

BUILTIN_CONFIGS = Path(__file__).parent / "configs"
GIB = 2**30


def builtin_config_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_CONFIGS.glob("*.json"))


def load_config(name_or_path: str, num_labels: int = 2):
    """A built-in config (bert-base-uncased, roberta-large, Qwen2.5-*), a local folder, or a hub id."""
    builtin = BUILTIN_CONFIGS / f"{name_or_path.split('/')[-1]}.json"
    if builtin.exists():
        payload = json.loads(builtin.read_text())
        config = AutoConfig.for_model(payload.pop("model_type"), **payload)
    else:
        from .models import loading_errors, resolve_model

        resolved = resolve_model(name_or_path)
        with loading_errors(resolved):
            config = AutoConfig.from_pretrained(resolved.path)
    config.num_labels = num_labels
    return config


def activation_bytes(config, batch_size: int, seq_len: int, element_bytes: int, eager_attention: bool) -> int:
    h, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    kv = h * getattr(config, "num_key_value_heads", heads) // heads
    width = config.intermediate_size
    gated = 3 if config.model_type in {"qwen2", "llama", "mistral", "qwen3"} else 2  # SwiGLU vs GELU
    per_token = 2 * h + h + (h + 2 * kv) + h + h + gated * width
    per_layer = element_bytes * batch_size * seq_len * per_token
    if eager_attention:
        per_layer += element_bytes * batch_size * heads * seq_len * seq_len * 2
    return layers * per_layer + element_bytes * batch_size * seq_len * h


@dataclass
class Estimate:
    total_params: int
    trainable_params: int
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def as_dict(self) -> dict:
        return {"total_params": self.total_params, "trainable_params": self.trainable_params,
                "weights_bytes": self.weights, "gradients_bytes": self.gradients,
                "optimizer_bytes": self.optimizer, "activations_bytes": self.activations, "total_bytes": self.total}


def estimate(config, method: str = "full", precision: str = "fp32", batch_size: int = 16, seq_len: int = 256,
             eager_attention: bool = False, **method_fields) -> Estimate:
    """``method`` is a registered tuning method, ``method_fields`` its ``MethodArguments`` (``lora_r=16``,
    ``lora_target_modules="all-linear"``, ``adapter_reduction_factor=8``, ...)."""
    if precision not in ("fp32", "bf16-mixed", "bf16-pure"):
        raise ValueError(f"precision must be fp32, bf16-mixed or bf16-pure, got {precision!r}")
    total = sum(p.numel() for p in meta_model(config).parameters())
    # The method wraps a meta-device model as it would a real one: what it adds and trains, counted exactly
    # (PEFT keeps its weights beside the frozen model; LoRA's head is a trained copy).
    wrapped = wrap_on_meta(config, MethodArguments(tuning_method=method, **method_fields))
    stored = sum(p.numel() for p in wrapped.parameters())
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    weight_bytes = 2 if precision == "bf16-pure" else 4
    element = 4 if precision == "fp32" else 2
    return Estimate(
        total_params=total, trainable_params=trainable, weights=stored * weight_bytes,
        gradients=trainable * weight_bytes, optimizer=trainable * 8,
        activations=activation_bytes(config, batch_size, seq_len, element, eager_attention))


SHARDINGS = ("ddp", "zero1", "zero2", "zero3", "fsdp")


def gathered_bytes(config, precision: str) -> int:
    """Bytes of the largest piece ZeRO-3/FSDP gathers at once (one decoder/encoder layer or the rest:
    embeddings, final norm, head), in the weights' dtype."""
    return largest_unit_params(config) * (2 if precision == "bf16-pure" else 4)


def largest_unit_params(config) -> int:
    model = meta_model(config)
    layers = [module for name, module in model.named_modules() if name.endswith(".layers") or name.endswith(".layer")]
    layer_sizes = [sum(p.numel() for p in layer.parameters()) for stack in layers for layer in stack]
    rest = sum(p.numel() for p in model.parameters()) - sum(layer_sizes)
    return max([rest, *layer_sizes])


def per_gpu_bytes(est: Estimate, gpus: int, sharding: str, offload: bool, gathered_bytes: int) -> int:
    """Memory on each of ``gpus`` GPUs for one of ``SHARDINGS`` (see the module's accounting)."""
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
    if sharding == "ddp":
        if offload:
            raise ValueError("DDP keeps everything on every GPU: offload needs ZeRO or FSDP")
        return est.total
    optimizer = 0 if offload else est.optimizer / gpus
    if sharding in ("zero1", "zero2"):
        gradients = est.gradients / gpus if sharding == "zero2" else est.gradients
        return int(est.weights + gradients + optimizer + est.activations)
    if sharding == "fsdp" and offload:  # parameters, gradients and optimizer state all in CPU memory
        return int(gathered_bytes + est.activations)
    return int((est.weights + est.gradients) / gpus + optimizer + gathered_bytes + est.activations)


def smallest_gpu_count(est: Estimate, sharding: str, offload: bool, gathered_bytes: int, card_bytes: int,
                       most: int = 64) -> int | None:
    """The fewest GPUs of ``card_bytes`` each that hold the run, or None up to ``most``."""
    return next((n for n in range(1, most + 1)
                 if per_gpu_bytes(est, n, sharding, offload, gathered_bytes) <= card_bytes), None)


MULTI_GPU_SCENARIOS = (("ddp", False), ("zero2", False), ("zero2", True), ("zero3", False), ("zero3", True),
                       ("fsdp", False), ("fsdp", True))


def multi_gpu_table(model: str, method: str = "full", precision: str = "bf16-mixed", batch_size: int = 16,
                    seq_len: int = 256, card_sizes_gb: tuple[int, ...] = (24, 40, 48, 80), **method_fields) -> str:
    """Per sharding strategy: per-GPU GiB on 2, 4 and 8 GPUs, and the fewest cards of each size that fit."""
    config = load_config(model)
    est = estimate(config, method, precision, batch_size, seq_len, **method_fields)
    gathered = gathered_bytes(config, precision)
    rows = []
    for sharding, offload in MULTI_GPU_SCENARIOS:
        per_gpu = [f"{per_gpu_bytes(est, n, sharding, offload, gathered) / GIB:.1f}" for n in (2, 4, 8)]
        fewest = [smallest_gpu_count(est, sharding, offload, gathered, size * 10**9) for size in card_sizes_gb]
        rows.append([sharding + (" + CPU offload" if offload else ""), *per_gpu,
                     *("does not fit" if n is None else str(n) for n in fewest)])
    return (f"Model `{model}`, {method}, {precision}, AdamW, batch {batch_size} x {seq_len} tokens per GPU, SDPA "
            f"attention; one GPU needs {est.total / GIB:.1f} GiB.\n\n"
            + table(["strategy", "GiB per GPU, 2 GPUs", "4 GPUs", "8 GPUs",
                     *(f"fewest {size} GB cards" for size in card_sizes_gb)], rows))


def format_estimate(name: str, est: Estimate, args: dict) -> str:
    lines = [f"{name}: {args}",
             f"  parameters: {est.total_params:,} total, {est.trainable_params:,} trainable "
             f"({100 * est.trainable_params / est.total_params:.3f}%)"]
    for part in ("weights", "gradients", "optimizer", "activations"):
        lines.append(f"  {part:12s} {getattr(est, part) / GIB:8.2f} GiB")
    lines.append(f"  {'total':12s} {est.total / GIB:8.2f} GiB")
    return "\n".join(lines)


REPORT_SCENARIOS = (  # (label, method, precision, extra keyword arguments)
    ("full, fp32", "full", "fp32", {}),
    ("full, bf16 mixed", "full", "bf16-mixed", {}),
    ("LoRA r=8 (q,v), bf16 mixed", "lora", "bf16-mixed", {"lora_r": 8}),
    ("LoRA r=32 (q,v), bf16 mixed", "lora", "bf16-mixed", {"lora_r": 32}),
    ("LoRA r=16 (all linear), bf16 mixed", "lora", "bf16-mixed", {"lora_r": 16, "lora_target_modules": "all-linear"}),
    ("LoRA r=8 (q,v), bf16 weights", "lora", "bf16-pure", {"lora_r": 8}),
    ("Houlsby adapter (rf 16), bf16 mixed", "adapter", "bf16-mixed", {}),
)


def scenario_table(model: str, batch_size: int = 16, seq_len: int = 256) -> str:
    """A Markdown table of the standard scenarios for one model (for the report)."""
    config = load_config(model)
    rows = []
    for label, method, precision, extra in REPORT_SCENARIOS:
        est = estimate(config, method, precision, batch_size, seq_len, **extra)
        rows.append([label, f"{est.trainable_params:,}", *(f"{part / GIB:.2f}" for part in (
            est.weights, est.gradients, est.optimizer, est.activations, est.total))])
    return (f"Model `{model}`, AdamW, batch {batch_size} x {seq_len} tokens, SDPA attention.\n\n"
            + table(["scenario", "trainable params", "weights GiB", "gradients GiB", "AdamW GiB", "activations GiB",
                     "total GiB"], rows))


# The methods the --check and --check_device measurements compare unless told otherwise.
MEASURED_METHODS = ["full", "lora-r8", "adapter"]


def main(argv: list[str] | None = None) -> None:
    # The method and its settings are train.py's own MethodArguments (--method / --tuning_method, --lora_r, ...).
    parser = HfArgumentParser(MethodArguments, description="Estimate training memory.", epilog=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", metavar="PATH",
                        help="write the report's scenario table for --model (full/LoRA/adapter, fp32/bf16) to PATH")
    parser.add_argument("--check", metavar="PATH",
                        help="measure peak RSS of real training steps for --check_models x --check_methods, each "
                             "in a fresh process, and write the estimated-vs-measured table to PATH")
    parser.add_argument("--check_models", nargs="+", default=["all-MiniLM-L6-v2", "Qwen2.5-Coder-0.5B-Instruct"],
                        help="checkpoints (aliases, local folders or hub ids) --check trains")
    parser.add_argument("--check_methods", nargs="+", type=known_method_label, default=MEASURED_METHODS,
                        help="method labels --check measures")
    parser.add_argument("--check_device", metavar="PATH",
                        help="on CUDA, measure peak memory and step times of randomly initialised --device_configs x "
                             "--device_methods, and write the estimated-vs-measured table to PATH.md and PATH.json")
    parser.add_argument("--device_configs", nargs="+", default=["bert-base-uncased", "roberta-large", "Qwen2.5-0.5B",
                                                                "Qwen2.5-1.5B", "Qwen2.5-3B"])
    parser.add_argument("--device_methods", nargs="+", type=known_method_label, default=MEASURED_METHODS,
                        help="method labels --check_device measures")
    parser.add_argument("--frozen_weights_dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                        help="--check_device: dtypes of the weights PEFT freezes (full fine-tuning: float32 only)")
    parser.add_argument("--steps", type=positive_int, default=10, help="timed steps per --check_device measurement")
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps before them")
    parser.add_argument("--model",
                        help=f"built-in config ({', '.join(builtin_config_names())}), local folder or hub id")
    parser.add_argument("--precision", choices=["fp32", "bf16-mixed", "bf16-pure"], default="fp32")
    parser.add_argument("--batch_size", type=positive_int, default=16)
    parser.add_argument("--seq_len", type=positive_int, default=256)
    parser.add_argument("--eager_attention", action="store_true", help="count the s^2 attention matrices")
    parser.add_argument("--gpus", type=positive_int, default=1, help="GPUs the run is spread over")
    parser.add_argument("--sharding", choices=SHARDINGS, default="ddp", help="how the GPUs share the run")
    parser.add_argument("--offload", action="store_true", help="keep sharded state in CPU memory (ZeRO, FSDP)")
    parser.add_argument("--card_gb", type=positive_int, help="print the fewest cards of this many GB that fit")
    parser.add_argument("--multi_gpu_table", metavar="PATH",
                        help="write the report's multi-GPU table for --model (sharding x offload, card sizes) to PATH")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    try:
        method_args, args = parser.parse_args_into_dataclasses(argv)
    except ValueError as err:
        raise InvalidArgument(str(err)) from None
    if args.check:
        from .benchmark import measurement_table
        from .isolated import call_in_fresh_process

        results = [call_in_fresh_process("peftlab.benchmark:measure_step_memory", model_name=m, method=method)
                   for m in args.check_models for method in args.check_methods]
        Path(args.check).parent.mkdir(parents=True, exist_ok=True)
        Path(args.check).write_text(measurement_table(results))
        Path(args.check).with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
        print(measurement_table(results))
        return
    if args.check_device:
        from .benchmark import device_table, measure_device_step

        if not torch.cuda.is_available():
            parser.error("--check_device measures CUDA memory and needs a CUDA device; --check measures this CPU")
        out = Path(args.check_device)
        out.parent.mkdir(parents=True, exist_ok=True)
        results = []
        runs = [(config_name, method, dtype) for config_name in args.device_configs for method in args.device_methods
                for dtype in args.frozen_weights_dtypes
                if dtype == "float32" or not get_method(method_from_label(method).tuning_method).trains_everything]
        for config_name, method, dtype in runs:
            results.append(measure_device_step(config_name, method, args.batch_size, args.seq_len, args.steps,
                                               args.warmup, frozen_weights_dtype=dtype))
            print(device_table(results[-1:]).splitlines()[-1], flush=True)
            # written after every row, so a run stopped early keeps what it measured; the stem may hold dots
            Path(f"{out}.json").write_text(json.dumps(results, indent=2) + "\n")
            Path(f"{out}.md").write_text(device_table(results))
        return
    if args.model is None:
        parser.error("--model is required")
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(scenario_table(args.model, args.batch_size, args.seq_len))
        print(f"wrote {args.table}")
        return
    method = get_method(method_args.tuning_method)
    method_fields = {name: getattr(method_args, name) for name in method.argument_fields}
    if args.multi_gpu_table:
        Path(args.multi_gpu_table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.multi_gpu_table).write_text(multi_gpu_table(args.model, method.name, args.precision,
                                                              args.batch_size, args.seq_len, **method_fields))
        print(f"wrote {args.multi_gpu_table}")
        return
    if args.offload and args.sharding == "ddp":
        raise InvalidArgument("--offload needs --sharding zero1, zero2, zero3 or fsdp (DDP keeps a full copy per GPU)")
    config = load_config(args.model)
    est = estimate(config, method.name, args.precision, args.batch_size, args.seq_len, args.eager_attention,
                   **method_fields)
    settings = {"method": method.name, **method_fields, "precision": args.precision, "batch_size": args.batch_size,
                "seq_len": args.seq_len, "eager_attention": args.eager_attention}
    gathered = gathered_bytes(config, args.precision)
    per_gpu = per_gpu_bytes(est, args.gpus, args.sharding, args.offload, gathered)
    fewest = (smallest_gpu_count(est, args.sharding, args.offload, gathered, args.card_gb * 10**9)
              if args.card_gb else None)
    if args.json:
        print(json.dumps(est.as_dict() | {"gpus": args.gpus, "sharding": args.sharding, "offload": args.offload,
                                          "per_gpu_bytes": per_gpu, "fewest_cards": fewest}))
        return
    print(format_estimate(args.model, est, settings))
    if args.gpus > 1 or args.sharding != "ddp":
        print(f"  per GPU on {args.gpus} GPUs ({args.sharding}{', CPU offload' if args.offload else ''}): "
              f"{per_gpu / GIB:.2f} GiB")
    if args.card_gb:
        print(f"  fewest {args.card_gb} GB cards ({args.sharding}{', CPU offload' if args.offload else ''}): "
              + (str(fewest) if fewest else "none up to 64"))
    print(__doc__.split("The accounting (printed with every estimate):")[1].rstrip())


if __name__ == "__main__":
    exit_on_user_error(main)
