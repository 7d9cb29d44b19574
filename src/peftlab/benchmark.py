"""Measurements: training and inference speed per model, method, precision and padding, and the memory
checks of the estimator in :mod:`peftlab.memory`, all through one loop (:func:`measuring_loop`).

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
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from .cli import non_negative_int, positive_int, switch
from .errors import exit_on_user_error
from .hardware import (
    attention_kernels,
    bf16_matmuls_in_fp32,
    bf16_matmuls_in_fp32_applies,
    cpu_compile_applies,
    cpu_model,
    reuse_freed_memory,
    use_cpu_module_options,
)
from .isolated import call_in_fresh_process
from .markdown import table
from .memory import GIB, estimate, load_config
from .methods import known_method_label

PADDINGS = ("dynamic", "max_length", "grouped")


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """Measured FLOP/s of a square matmul in ``dtype`` (median of ``repeats``); bf16 as train.py computes it here
    (by fp32 kernels where this CPU has no native bf16 products: ``--cpu_bf16_matmuls_in_fp32``)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    times = []
    with bf16_matmuls_in_fp32(bf16_matmuls_in_fp32_applies(None, dtype == torch.bfloat16, "cpu")):
        for _ in range(3):
            a @ b
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


def adamw(model, fused: bool) -> torch.optim.AdamW:
    """The benchmark's optimizer: AdamW over the trainable parameters."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=fused)


def measuring_loop(model, tuning, batches: list[dict], warmup: int, device: str = "cpu", bf16: bool = True,
                   fused_adamw: bool = False, serve: bool = True, after_training=None,
                   optimizer: torch.optim.Optimizer | None = None,
                   matmuls_in_fp32: bool | None = None) -> dict[str, list[float]]:
    """The one measuring loop of the benchmark and the memory checks.

    AdamW steps over ``batches`` (each holding its labels), with bf16 autocast if asked; then, with
    ``serve``, inference over the same batches, unmerged and, for a method that merges (LoRA), merged.
    Returns seconds per batch under ``train``, ``infer`` and ``merged_infer``, the first ``warmup`` left
    out, and the train step's ``forward`` and ``backward`` parts (on CPU only: timing them apart on CUDA
    would add a synchronisation); on CUDA each call waits for the device. ``after_training()`` runs between
    the two phases (the device check reads its training peak there). ``optimizer``: one that earlier calls
    stepped (its state already allocated), instead of a new AdamW. ``matmuls_in_fp32``: bf16 matrix products
    computed by fp32 kernels, as train.py's ``--cpu_bf16_matmuls_in_fp32`` (None: its default here)."""
    matmuls_in_fp32 = bf16_matmuls_in_fp32_applies(matmuls_in_fp32, bf16, device)
    if optimizer is None:
        optimizer = adamw(model, fused_adamw)
    parts = {"forward": [], "backward": []}

    def autocast():
        return torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)

    def train(batch):
        start = time.perf_counter()
        # the attention kernels of train.py's Trainer, over the backward too: gradient checkpointing recomputes
        # the forward there, and must pick the same kernel
        with attention_kernels(batch["input_ids"].shape[-1], device), bf16_matmuls_in_fp32(matmuls_in_fp32):
            with autocast():
                loss = model(**batch).loss
            forward_end = time.perf_counter()
            loss.backward()
        parts["forward"].append(forward_end - start)
        parts["backward"].append(time.perf_counter() - forward_end)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forward(served):
        def call(batch):
            # autocast per batch, as serving does: one context around all batches would keep the bf16
            # casts of trainable weights cached between batches and flatter full fine-tuning
            # PyTorch's attention kernels, as train.py evaluates
            with torch.no_grad(), autocast(), bf16_matmuls_in_fp32(matmuls_in_fp32):
                served(**{key: value for key, value in batch.items() if key != "labels"})
        return call

    model.train()
    times = {"train": _timed(train, batches, warmup, device)}
    if device == "cpu":
        times.update({part: seconds[warmup:] for part, seconds in parts.items()})
    if after_training is not None:
        after_training()
    if serve:
        times["infer"] = _timed(forward(model.eval()), batches, warmup, device)
        if tuning.merges:
            times["merged_infer"] = _timed(forward(tuning.for_inference(model).eval()), batches, warmup, device)
    return times


def _timed(call, batches: list[dict], warmup: int, device: str) -> list[float]:
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        call(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _train_flops_per_token(model, trainable: int, seq_len: float) -> float:
    config = model.config
    embeddings = sum(p.numel() for n, p in model.named_parameters() if "embed" in n)
    weights = sum(p.numel() for p in model.parameters()) - embeddings
    attention = 4 * config.num_hidden_layers * seq_len * config.hidden_size
    return 2 * weights + 2 * weights + 2 * min(trainable, weights) + 3 * attention


def real_setup(model_name: str, method: str, bf16: bool, frozen_weights_dtype: str, padding: str, batch_size: int,
               max_length: int, count: int, data_dir: str | None = None, attn_implementation: str | None = None,
               gradient_checkpointing: bool = False, fast_dropout: bool = True, lora_input_upcast: bool = False,
               compile_rms_norm: bool = False, compile_mlp: bool = False, compile_attention: bool = False,
               num_hidden_layers: int | None = None):
    """A model built as train.py builds it and ``count`` batches of real restaurant rows with their labels:
    (model, its method, batches, frozen weights' dtype). Frozen weights in ``frozen_weights_dtype``, resolved as
    ``--frozen_weights_dtype`` is; ``gradient_checkpointing`` as ``--gradient_checkpointing True
    --gradient_checkpointing_kwargs '{"use_reentrant": false}'`` sets it; ``fast_dropout`` as
    ``--cpu_fast_dropout``; ``lora_input_upcast`` keeps peft's cast of LoRA inputs to fp32, which train.py skips
    on bf16 frozen weights (the before of that change); ``compile_rms_norm`` as ``--cpu_compile_rms_norm``,
    ``compile_mlp`` as ``--cpu_compile_mlp``, ``compile_attention`` as ``--cpu_compile_attention``;
    ``num_hidden_layers``: only the checkpoint's first layers (a deep model's step in less memory)."""
    from .data import get_dataset
    from .methods import cast_lora_inputs, get_method, method_from_label, upcast_trainable
    from .methods import frozen_weights_dtype as resolve_frozen_dtype
    from .models import default_sep_token, get_model

    args = method_from_label(method)
    tuning = get_method(args.tuning_method)
    frozen_dtype = resolve_frozen_dtype(tuning, frozen_weights_dtype, bf16)
    overrides = {"num_hidden_layers": num_hidden_layers} if num_hidden_layers else None
    tokenizer, model = get_model(model_name, 3, attn_implementation=attn_implementation, dtype=frozen_dtype,
                                 config_overrides=overrides)
    rows = get_dataset("restaurant_sup", default_sep_token(tokenizer), data_dir=data_dir)["train"].shuffle(seed=0)
    model = upcast_trainable(tuning.wrap(model, args))
    if lora_input_upcast:
        cast_lora_inputs(model, True)
    model = use_cpu_module_options(model, fast_dropout=fast_dropout, compile_rms_norm=compile_rms_norm,
                                   compile_mlp=compile_mlp, compile_attention=compile_attention)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batches = _batches(tokenizer, list(rows["text"]), batch_size, padding, max_length, count)
    labels = torch.tensor(rows["label"])
    for i, batch in enumerate(batches):
        batch["labels"] = labels[i * batch_size:(i + 1) * batch_size]
    return model, tuning, batches, frozen_dtype


def measure(model_name: str, method: str, precision: str, padding: str, batch_size: int, steps: int,
            warmup: int, threads: int, data_dir: str | None, max_length: int, fused_adamw: bool = False,
            attn_implementation: str | None = None, frozen_weights_dtype: str = "auto",
            gradient_checkpointing: bool = False, fast_dropout: bool = True, lora_input_upcast: bool = False,
            compile_rms_norm: bool = False, compile_mlp: bool = False, compile_attention: bool = False,
            reuse_freed: bool = False, num_hidden_layers: int | None = None,
            matmuls_in_fp32: bool | None = None) -> dict:
    """One configuration, in this process, on :func:`real_setup`'s model and batches; ``reuse_freed`` as
    ``--cpu_reuse_freed_memory`` (for the whole process: run each configuration in a fresh one),
    ``matmuls_in_fp32`` as ``--cpu_bf16_matmuls_in_fp32`` (None: its default here), which compiles nothing."""
    from .methods import parameter_counts
    from .models import dtype_name

    if reuse_freed:
        reuse_freed_memory()
    bf16 = precision == "bf16"
    matmuls_in_fp32 = bf16_matmuls_in_fp32_applies(matmuls_in_fp32, bf16, "cpu")
    if not cpu_compile_applies("cpu", matmuls_in_fp32):  # as train.py
        compile_rms_norm = compile_mlp = compile_attention = False
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model, tuning, batches, frozen_dtype = real_setup(model_name, method, precision == "bf16", frozen_weights_dtype,
                                                      padding, batch_size, max_length, warmup + steps, data_dir,
                                                      attn_implementation, gradient_checkpointing, fast_dropout,
                                                      lora_input_upcast, compile_rms_norm, compile_mlp,
                                                      compile_attention, num_hidden_layers)
    counts = parameter_counts(model)
    times = measuring_loop(model, tuning, batches, warmup, bf16=bf16, fused_adamw=fused_adamw,
                           matmuls_in_fp32=matmuls_in_fp32)
    step_times = times["train"]
    real_tokens = [int(batch["attention_mask"].sum()) for batch in batches[warmup:]]
    padded_tokens = [batch["input_ids"].numel() for batch in batches[warmup:]]
    seq_len = sum(padded_tokens) / len(padded_tokens) / batch_size
    flops_per_token = _train_flops_per_token(model, counts["trainable_params"], seq_len)
    total_time = sum(step_times)
    result = {
        "model": model_name + (f" (first {num_hidden_layers} layers)" if num_hidden_layers else ""),
        "method": method, "precision": precision, "padding": padding,
        "batch_size": batch_size, "threads": threads, "fused_adamw": fused_adamw,
        "attn_implementation": model.config._attn_implementation, "frozen_weights_dtype": dtype_name(frozen_dtype),
        "gradient_checkpointing": gradient_checkpointing, "fast_dropout": fast_dropout,
        "lora_input_upcast": lora_input_upcast, "compile_rms_norm": compile_rms_norm, "compile_mlp": compile_mlp,
        "compile_attention": compile_attention, "reuse_freed": reuse_freed, "matmuls_in_fp32": matmuls_in_fp32,
        **counts,
        "train_step_s": quartiles(step_times),
        # the issue's bound on the frozen layers' backward pass: at most 1.3x the forward
        "backward_over_forward": statistics.median(
            b / f for f, b in zip(times["forward"], times["backward"], strict=True)),
        "train_examples_per_s": batch_size * len(step_times) / total_time,
        "train_tokens_per_s": sum(real_tokens) / total_time,
        "train_padded_tokens_per_s": sum(padded_tokens) / total_time,
        "train_flops_per_s": flops_per_token * sum(padded_tokens) / total_time,
        "mean_padded_length": seq_len,
    }

    for phase in ("infer", "merged_infer"):
        if phase in times:
            result[f"{phase}_batch_s"] = quartiles(times[phase])
            result[f"{phase}_examples_per_s"] = batch_size * len(times[phase]) / sum(times[phase])
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["rss_before_model_mb"] = rss_before
    return result


# ----------------------------------------------------------------------------- memory checks
# What the estimator (peftlab.memory) predicts, measured: peak RSS of CPU training steps, and peak CUDA
# memory and step times of randomly initialised models of the built-in configs.


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def random_batch(config, lengths: list[int], width: int, device: str, generator=None) -> dict:
    """Random tokens for rows of ``lengths`` tokens, right-padded with the pad token to ``width``: memory and
    speed do not depend on what the tokens are. Ids start at 2, clear of the pad and special ids a model reads
    (RoBERTa's positions skip its pad id, a decoder classifies its last non-pad token)."""
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(2, min(config.vocab_size, 1000), (len(lengths), width), generator=generator)
    if width > min(lengths):
        ids = ids.masked_fill(mask == 0, config.pad_token_id)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "labels": torch.zeros(len(lengths), dtype=torch.long, device=device)}


def measure_step_memory(model_name: str, method: str, batch_size: int = 16, seq_len: int = 128,
                        steps: int = 2) -> dict:
    """Peak RSS growth over the bare process while loading a model and taking AdamW steps with bf16
    autocast on fixed-length random batches; beside it the estimate for the same setting."""
    import ctypes
    import gc
    import threading

    from .methods import get_method, method_from_label
    from .models import get_model

    libc = ctypes.CDLL("libc.so.6")
    gc.collect()
    libc.malloc_trim(0)
    baseline = _rss()
    peak = [baseline]
    running = threading.Event()
    running.set()

    def sample():
        while running.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    torch.manual_seed(0)
    _, model = get_model(model_name, 3)
    args = method_from_label(method)
    tuning = get_method(args.tuning_method)
    model = tuning.wrap(model, args)
    batch = random_batch(model.config, [seq_len] * batch_size, seq_len, "cpu")
    measuring_loop(model, tuning, [batch] * steps, warmup=0, serve=False)
    running.clear()
    sampler.join()
    est = estimate(model.config if not hasattr(model, "get_base_model") else model.get_base_model().config,
                   args.tuning_method, "bf16-mixed", batch_size, seq_len, lora_r=args.lora_r)
    return {"model": model_name, "method": method, "batch_size": batch_size, "seq_len": seq_len,
            "measured_bytes": peak[0] - baseline, **est.as_dict()}


def measurement_table(results: list[dict]) -> str:
    header = ["model", "method", "batch x seq", "estimated GiB (weights + grads + AdamW + activations)",
              "measured peak RSS growth GiB", "measured / estimated"]
    rows = []
    for r in results:
        parts = " + ".join(f"{r[k] / GIB:.2f}" for k in ("weights_bytes", "gradients_bytes", "optimizer_bytes",
                                                            "activations_bytes"))
        rows.append([r["model"], r["method"], f"{r['batch_size']} x {r['seq_len']}",
                     f"{r['total_bytes'] / GIB:.2f} ({parts})", f"{r['measured_bytes'] / GIB:.2f}",
                     f"{r['measured_bytes'] / r['total_bytes']:.2f}"])
    return table(header, rows)


@dataclass(frozen=True)
class RandomSetup:
    """A built-in config (3 labels) and a method, resolved as train.py resolves them for a checkpoint: what
    :meth:`build` makes a randomly initialised model of. Memory and speed do not depend on the weights' values,
    so the accelerator checks need no checkpoint."""
    config: object
    args: object  # MethodArguments
    tuning: object  # the registered method
    frozen_dtype: torch.dtype

    @classmethod
    def of(cls, config_name: str, method: str, frozen_weights_dtype: str, bf16: bool) -> RandomSetup:
        from .methods import frozen_weights_dtype as resolve_frozen_dtype
        from .methods import get_method, method_from_label

        config = load_config(config_name, num_labels=3)
        if config.pad_token_id is None:  # decoders classify the last non-pad token
            config.pad_token_id = 0
        args = method_from_label(method)
        tuning = get_method(args.tuning_method)
        return cls(config, args, tuning, resolve_frozen_dtype(tuning, frozen_weights_dtype, bf16=bf16))

    def build(self, device: str):
        from .methods import upcast_trainable

        with torch.device(device):
            model = AutoModelForSequenceClassification.from_config(self.config, dtype=self.frozen_dtype)
            return upcast_trainable(self.tuning.wrap(model, self.args)).to(device)


def measure_device_step(config_name: str, method: str, batch_size: int = 16, seq_len: int = 256, steps: int = 10,
                        warmup: int = 2, device: str = "cuda", frozen_weights_dtype: str = "float32") -> dict:
    """Peak memory and speed of training and inference for a randomly initialised model of ``config_name``.

    Memory and time do not depend on the weights' values, so a built-in config (Qwen2.5-3B, ...) needs no
    checkpoint. Training is fused AdamW with bf16 autocast on fixed-length random batches, as train.py
    runs it. On CUDA the peak is ``torch.cuda.max_memory_allocated`` over building the model and training
    (the CUDA context is not in it); inference is timed unmerged and, for LoRA, merged. A method that freezes
    weights stores them in ``frozen_weights_dtype`` (train.py's ``--frozen_weights_dtype``; estimated as
    ``bf16-pure`` when bfloat16)."""
    import gc

    from .methods import parameter_counts
    from .models import dtype_name

    cuda = device == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated() if cuda else 0
    torch.manual_seed(0)
    setup = RandomSetup.of(config_name, method, frozen_weights_dtype, bf16=True)
    config, args, frozen_dtype = setup.config, setup.args, setup.frozen_dtype
    result = {"model": config_name, "method": method, "batch_size": batch_size, "seq_len": seq_len,
              "frozen_weights_dtype": dtype_name(frozen_dtype),
              "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    precision = "bf16-pure" if frozen_dtype == torch.bfloat16 else "bf16-mixed"
    result.update({f"estimated_{k}": v for k, v in estimate(config, args.tuning_method, precision, batch_size,
                                                             seq_len, lora_r=args.lora_r).as_dict().items()})
    try:
        model = setup.build(device)
        result.update(parameter_counts(model))
        result["weights_bytes"] = torch.cuda.memory_allocated() - baseline if cuda else None
        batches = [random_batch(config, [seq_len] * batch_size, seq_len, device)] * (warmup + steps)

        def training_peak():
            result["peak_bytes"] = torch.cuda.max_memory_allocated() - baseline if cuda else None

        times = measuring_loop(model, setup.tuning, batches, warmup, device, fused_adamw=True,
                               after_training=training_peak)
        result["train_step_s"] = quartiles(times["train"])
        result["train_tokens_per_s"] = batch_size * seq_len / result["train_step_s"]["median"]
        for phase in ("infer", "merged_infer"):
            if phase in times:
                result[f"{phase}_batch_s"] = quartiles(times[phase])
    except torch.OutOfMemoryError:
        result["error"] = "out of memory"
    return result


def device_table(results: list[dict]) -> str:
    """Estimated against measured accelerator memory, and step times, per model and method."""
    head = results[0]
    caption = (f"Device: {head['device']}, torch {head['torch']}; randomly initialised models of the built-in "
               "configs, fused AdamW, bf16 autocast, fixed-length random batches; times are medians.\n\n")
    header = ["model", "method", "frozen weights", "batch x seq", "trainable %",
              "estimated GiB (weights + grads + AdamW + activations)",
              "measured peak GiB", "measured / estimated", "train step ms", "train tokens/s", "infer ms",
              "merged infer ms"]
    rows = []
    for r in results:
        parts = " + ".join(f"{r[f'estimated_{k}'] / GIB:.2f}" for k in ("weights_bytes", "gradients_bytes",
                                                                        "optimizer_bytes", "activations_bytes"))
        estimated = f"{r['estimated_total_bytes'] / GIB:.2f} ({parts})"
        cells = [r["model"], r["method"], r.get("frozen_weights_dtype", "float32"),
                 f"{r['batch_size']} x {r['seq_len']}"]
        if "error" in r:
            rows.append(cells + ["–", estimated, r["error"], "–", "–", "–", "–", "–"])
            continue
        peak = r["peak_bytes"]
        measured = [f"{peak / GIB:.2f}", f"{peak / r['estimated_total_bytes']:.2f}"] if peak is not None else ["–"] * 2
        merged = f"{1000 * r['merged_infer_batch_s']['median']:.1f}" if "merged_infer_batch_s" in r else "–"
        rows.append(cells + [f"{r['trainable_percent']:.2f}", estimated, *measured,
                             f"{1000 * r['train_step_s']['median']:.1f}", f"{r['train_tokens_per_s']:,.0f}",
                             f"{1000 * r['infer_batch_s']['median']:.1f}", merged])
    return caption + table(header, rows)


def markdown(results: list[dict], peaks: dict) -> str:
    header = ["model", "method", "precision", "frozen weights", "checkpointing", "padding", "attention", "dropout",
              "LoRA input", "RMSNorm", "MLP", "attention compiled", "bf16 products", "freed memory", "threads",
              "AdamW",
              "train ex/s", "train tokens/s", "step s (median [q1, q3])", "backward / forward", "% of matmul peak",
              "infer ex/s", "merged infer ex/s", "trainable %", "peak RSS MB"]
    rows = []
    for r in results:
        step = r["train_step_s"]
        peak = peaks["bf16" if r["precision"] == "bf16" else "fp32"] * r["threads"] / peaks["threads"]
        merged = f"{r['merged_infer_examples_per_s']:.1f}" if "merged_infer_examples_per_s" in r else "–"
        rows.append([r["model"], r["method"], r["precision"], r.get("frozen_weights_dtype", "float32"),
                     "yes" if r.get("gradient_checkpointing") else "no", r["padding"],
                     r.get("attn_implementation", "sdpa"), "fast" if r.get("fast_dropout") else "torch",
                     ("fp32 cast" if r.get("lora_input_upcast", True) else "as is")
                     if r.get("frozen_weights_dtype") == "bfloat16" else "–",
                     "compiled" if r.get("compile_rms_norm") else "eager",
                     "compiled" if r.get("compile_mlp") else "eager",
                     "yes" if r.get("compile_attention") else "no",
                     ("fp32 kernels" if r.get("matmuls_in_fp32") else "bf16 kernels") if r["precision"] == "bf16"
                     else "–",
                     "reused" if r.get("reuse_freed") else "unmapped", r["threads"],
                     "fused" if r.get("fused_adamw") else "foreach", f"{r['train_examples_per_s']:.1f}",
                     f"{r['train_tokens_per_s']:.0f}", f"{step['median']:.3f} [{step['q1']:.3f}, {step['q3']:.3f}]",
                     f"{r['backward_over_forward']:.2f}" if "backward_over_forward" in r else "–",
                     f"{100 * r['train_flops_per_s'] / peak:.1f}", f"{r['infer_examples_per_s']:.1f}", merged,
                     f"{r['trainable_percent']:.2f}", f"{r['peak_rss_mb']:.0f}"])
    return table(header, rows)


# the options that take several values, every combination measured (the first varies slowest, the last fastest, so
# "--reuse_freed_memory 0 1 0 1" alternates): option -> measure()'s keyword
VARIED = {"models": "model_name", "methods": "method", "precisions": "precision", "paddings": "padding",
          "threads": "threads", "fused_adamw": "fused_adamw", "attn_implementations": "attn_implementation",
          "frozen_weights_dtypes": "frozen_weights_dtype", "gradient_checkpointing": "gradient_checkpointing",
          "fast_dropout": "fast_dropout", "lora_input_upcast": "lora_input_upcast",
          "compile_rms_norm": "compile_rms_norm", "compile_mlp": "compile_mlp",
          "compile_attention": "compile_attention", "reuse_freed_memory": "reuse_freed",
          "bf16_matmuls_in_fp32": "matmuls_in_fp32"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["all-MiniLM-L6-v2", "Qwen2.5-Coder-0.5B-Instruct"],
                        help="checkpoints to compare (aliases, local folders or hub ids)")
    parser.add_argument("--methods", nargs="+", type=known_method_label, default=["full", "lora-r16", "adapter"],
                        help="method labels to compare: full, adapter, lora (the default rank) or lora-r16")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="fp32, or bf16 autocast as train.py's --bf16")
    parser.add_argument("--paddings", nargs="+", default=["dynamic"], choices=PADDINGS,
                        help="dynamic: each batch to its longest row (DataCollatorWithPadding); max_length: every "
                             "row to --max_length; grouped: rows of similar length batched together, as "
                             "--group_by_length does")
    parser.add_argument("--threads", nargs="+", type=positive_int, default=[os.cpu_count()],
                        help="torch threads (default: this machine's CPUs)")
    parser.add_argument("--fused_adamw", nargs="+", type=switch, default=[False],
                        help="AdamW implementation: 0 = foreach (PyTorch's default), 1 = fused")
    parser.add_argument("--attn_implementations", nargs="+", default=["default"], choices=["default", "sdpa", "eager"],
                        help="attention kernels to compare (transformers' attn_implementation); default: the "
                             "model's own, as train.py (SDPA where the architecture has it; MPNet has not)")
    parser.add_argument("--frozen_weights_dtypes", nargs="+", default=["auto"], choices=["auto", "float32", "bfloat16"],
                        help="dtype of the weights a PEFT method freezes (train.py's --frozen_weights_dtype)")
    parser.add_argument("--gradient_checkpointing", nargs="+", type=switch, default=[False],
                        help="1: recompute activations in the backward pass (train.py's --gradient_checkpointing)")
    parser.add_argument("--fast_dropout", nargs="+", type=switch, default=[True],
                        help="1: dropout masks as train.py's --cpu_fast_dropout draws them, 0: torch.nn.Dropout")
    parser.add_argument("--lora_input_upcast", nargs="+", type=switch, default=[False],
                        help="1: peft casts LoRA inputs to fp32 (autocast casts them back), as before train.py "
                             "skipped that on bf16 frozen weights; 0: train.py's way")
    parser.add_argument("--compile_rms_norm", nargs="+", type=switch, default=[False],
                        help="1: RMSNorm modules compiled, as train.py's --cpu_compile_rms_norm; 0: eager")
    parser.add_argument("--compile_mlp", nargs="+", type=switch, default=[False],
                        help="1: the decoders' gated MLPs compiled, as train.py's --cpu_compile_mlp; 0: eager")
    parser.add_argument("--compile_attention", nargs="+", type=switch, default=[False],
                        help="1: the decoders' training attention compiled, as train.py's --cpu_compile_attention")
    parser.add_argument("--reuse_freed_memory", nargs="+", type=switch, default=[False],
                        help="1: malloc keeps freed memory for reuse, as train.py's --cpu_reuse_freed_memory; 0: "
                             "glibc's default (large blocks mapped and unmapped)")
    parser.add_argument("--bf16_matmuls_in_fp32", nargs="+", type=switch, default=[None],
                        help="1: bf16 matrix products by fp32 kernels, as train.py's --cpu_bf16_matmuls_in_fp32 "
                             "(which compiles nothing); 0: PyTorch's bf16 kernels; not given: train.py's default here")
    parser.add_argument("--num_hidden_layers", type=positive_int, default=None,
                        help="only each checkpoint's first layers: a deep model's step in less memory")
    parser.add_argument("--batch_size", type=positive_int, default=16, help="rows per training step")
    parser.add_argument("--steps", type=positive_int, default=8, help="timed steps per configuration")
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps before them")
    parser.add_argument("--max_length", type=positive_int, default=256, help="tokens a row is truncated to")
    parser.add_argument("--data_dir", default=None,
                        help="folder holding the datasets (default: as train.py's --data_dir finds them)")
    parser.add_argument("--out", default="benchmarks/results/throughput", help="path stem for .json and .md")
    args = parser.parse_args(argv)

    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16),
             "threads": torch.get_num_threads()}
    print(f"matmul peak: fp32 {peaks['fp32'] / 1e12:.2f} TFLOP/s, bf16 {peaks['bf16'] / 1e12:.2f} TFLOP/s", flush=True)
    results = []
    for values in itertools.product(*(getattr(args, option) for option in VARIED)):
        config = dict(zip(VARIED.values(), values, strict=True), batch_size=args.batch_size, steps=args.steps,
                      warmup=args.warmup, data_dir=args.data_dir, max_length=args.max_length,
                      num_hidden_layers=args.num_hidden_layers)
        if config["attn_implementation"] == "default":
            config["attn_implementation"] = None
        result = call_in_fresh_process("peftlab.benchmark:measure", **config)
        results.append(result)
        print(markdown([result], peaks).splitlines()[-1], flush=True)
    # the stem may hold dots (frozen_bf16_qwen-0.5b): append the suffixes, never replace one
    json_path, md_path = Path(f"{args.out}.json"), Path(f"{args.out}.md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    machine = {"processor": cpu_model() or platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
               "torch": torch.__version__, "matmul_peak_flops": peaks}
    json_path.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    by_fp32_kernels = (" (by fp32 kernels: this CPU has no native bf16 products)"
                       if bf16_matmuls_in_fp32_applies(None, True, "cpu") else "")
    md_path.write_text(
        f"Machine: {machine['cpu_count']} CPUs ({machine['processor']}), torch {machine['torch']}; measured matmul "
        f"peak fp32 {peaks['fp32'] / 1e12:.2f} TFLOP/s, bf16 {peaks['bf16'] / 1e12:.2f} TFLOP/s{by_fp32_kernels} "
        f"({peaks['threads']} threads).\n\n" + markdown(results, peaks))
    print(f"wrote {md_path}")


if __name__ == "__main__":
    exit_on_user_error(main)
