"""What this machine computes fast: whether bf16 matmuls are native here."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import platform
from functools import cache
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

logger = logging.getLogger(__name__)

# CPU flags whose instructions compute bf16 dot products natively: AMX tiles (Intel Sapphire Rapids and
# later), AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake). Measured with torch 2.13 on 2 threads:
# bf16 matmuls 0.85 against 0.19 TFLOP/s fp32 on an AMD EPYC with avx512_bf16, 2.6 against 0.37 with AMX.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpuinfo_fields(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The first processor's ``key: value`` lines of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    return fields


@cache
def cpu_flags() -> frozenset[str]:
    return frozenset(cpuinfo_fields().get("flags", "").split())


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The CPU's model name and generation (``AMD EPYC, family 25 model 1``): the host beside every time. A
    virtual machine's name may hide the generation (``AMD EPYC`` was Zen 1 in one session and Zen 3 in the next,
    their runs' times far apart), so the family and model numbers name it."""
    fields = cpuinfo_fields(cpuinfo)
    name = fields.get("model name")
    if name and fields.get("cpu family") and fields.get("model"):
        return f"{name}, family {fields['cpu family']} model {fields['model']}"
    return name or None


def cpu_has_amx_bf16() -> bool:
    return "amx_bf16" in cpu_flags()


# glibc's malloc serves a large block (over 128 KB, a threshold it raises up to 32 MB as such blocks are freed) with
# a fresh mmap() and unmaps it at free(), and it gives the heap's free top back to the kernel past 128 KB: so each
# train step's gradients and activations fault their pages in anew, zero-filled by the kernel. Full fine-tuning
# allocates a gradient for every weight each step. With no mmap() for large blocks and the heap's top kept
# (mallopt), freed memory is reused: full fine-tuning of Qwen2.5-Coder-0.5B's first 12 layers, grouped restaurant
# batches, one thread beside the grid on the AMX Xeon, took 1.19-1.28x less time per step at the same peak RSS
# (benchmarks/results/reuse_freed_memory_amx.md). Values as in glibc's malloc.h.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def reuse_freed_memory() -> bool:
    """From now on this process's glibc malloc takes large blocks from its heap instead of mmap(), and keeps up
    to 2 GB of the heap's free top instead of returning it to the kernel: freed memory is reused without page
    faults. Not undone (the setting is process-wide). Returns whether it applied: False off glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def native_bf16() -> str | None:
    """What runs bf16 matmuls natively here (``cuda``, ``amx_bf16``, ``avx512_bf16``), or None."""
    if torch.cuda.is_available():
        return "cuda" if torch.cuda.is_bf16_supported() else None
    return next((flag for flag in NATIVE_BF16_FLAGS if flag in cpu_flags()), None)


def bf16_helps() -> bool:
    """True where bf16 matmuls are native (about 3-4x fp32's speed); elsewhere bf16 is emulated and slower."""
    return native_bf16() is not None


# PyTorch computes CPU bf16 matrix products with oneDNN where the CPU has AVX-512 (natively with AMX or AVX512-BF16,
# by conversion otherwise); on an AVX2-only CPU (the 2-core AMD EPYC of 2026-11-30, no AVX-512 at all) a scalar
# fallback runs them: one 0.5B decoder MLP product (1024 x 896 -> 4864, 2 threads) at 10 GFLOP/s against fp32's 64,
# and LoRA r=16 on the 0.5B decoder's first 2 layers trained 3 tokens/s against 128 with the products by fp32
# kernels (:class:`Bf16MatmulsInFp32`; benchmarks/results/bf16_matmuls_in_fp32_avx2.md). oneDNN's conversion is
# slower than fp32 kernels too: on an AVX-512 Intel Xeon without AMX or AVX512-BF16 (family 6 model 106), a step of
# the 0.5B decoder's first 2 layers took 2.6x less time by fp32 kernels under full fine-tuning (against the
# compiled MLP and attention) and under LoRA r=16, and the 1.5B decoder's 2.6x less under LoRA r=16
# (benchmarks/results/bf16_matmuls_in_fp32_avx512_*.md).
def bf16_matmuls_fall_back() -> bool:
    """Whether this CPU's bf16 matrix products run PyTorch's scalar fallback (no oneDNN bf16 here)."""
    return not torch.ops.mkldnn._is_mkldnn_bf16_supported()


MATRIX_PRODUCTS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                   torch.ops.aten.baddbmm.default)


def _to_fp32(value):
    return value.float() if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16 else value


class Bf16MatmulsInFp32(TorchDispatchMode):
    """While active, every bf16 matrix product on CPU (mm, addmm, bmm, baddbmm: linear layers and attention's
    products, forward and backward) runs fp32 kernels on its bf16 operands and rounds the result to bf16: exact
    products of bf16 values summed in fp32, which is what a native bf16 kernel computes, up to the order of
    summation. Other operations run as they are. ``torch.compile`` does not trace under it (compiled modules run
    eagerly)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MATRIX_PRODUCTS and any(isinstance(arg, torch.Tensor) and arg.dtype == torch.bfloat16
                                           and arg.device.type == "cpu" for arg in args):
            args, kwargs = tree_map(_to_fp32, (args, kwargs))
            return func(*args, **kwargs).to(torch.bfloat16)
        return func(*args, **kwargs)


def bf16_matmuls_in_fp32_applies(requested: bool | None, bf16: bool, device_type: str) -> bool:
    """Whether bf16 matrix products run by fp32 kernels, as train.py's ``--cpu_bf16_matmuls_in_fp32`` resolves:
    only under bf16 on CPU, there as ``requested``, or where it is None (not given) where the CPU has no native
    bf16 products (neither AMX nor AVX512-BF16)."""
    return bf16 and device_type == "cpu" and (not bf16_helps() if requested is None else requested)


def cpu_compile_applies(device_type: str, matmuls_in_fp32: bool) -> bool:
    """Whether the ``--cpu_compile_*`` options compile anything: on CPU, and not with bf16 matrix products by fp32
    kernels, under which ``torch.compile`` does not trace."""
    return device_type == "cpu" and not matmuls_in_fp32


def bf16_matmuls_in_fp32(enabled: bool) -> contextlib.AbstractContextManager:
    """:class:`Bf16MatmulsInFp32` where ``enabled``, else nothing."""
    return Bf16MatmulsInFp32() if enabled else contextlib.nullcontext()


# On CPU, PyTorch runs SDPA on its flash kernel whenever the call allows it (no attention dropout: the decoders, and
# every model in evaluation), and at short rows that kernel's backward pass is slow. One AMD EPYC thread, 16 rows x
# 14 heads x 64 dims, bf16, forward + backward: the math kernel was 2.2x faster at 27 and 48 tokens per row, 1.18x
# at 128, 1.15x at 160, and slower from 192 (0.83x; 0.73x at 256) (benchmarks/results/attention_kernels.md; the
# AMX Xeon reads the same, attention_kernels_amx.md). Training batches up to this many tokens per row use the math
# kernel; the margin below the crossover is for other hosts. Evaluation keeps flash: its forward alone, 64 rows,
# was 1.9x faster than math's at 24 tokens and 4-10x at 48-256 on the AMX Xeon (attention_kernels_eval_amx.md).
MATH_ATTENTION_MAX_LENGTH = 128


def attention_kernels(tokens_per_row: int | None, device_type: str,
                      math_max_length: int = MATH_ATTENTION_MAX_LENGTH) -> contextlib.AbstractContextManager:
    """The SDPA kernels a training batch of this width runs: the math kernel on CPU up to ``math_max_length``
    tokens per row, PyTorch's own choice otherwise (and on CUDA, or for a batch of unknown width: ``None``).
    Models with their own attention (eager) are unaffected."""
    if device_type == "cpu" and tokens_per_row is not None and tokens_per_row <= math_max_length:
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


# PyTorch draws a CPU dropout mask one random number per element (bernoulli_: 5-7 ns per element on one thread of
# the AMX Xeon), which made dropout 19% of an MPNet LoRA r=16 step there (benchmarks/results/
# profile_amx_mpnet_lora-r16_fast_dropout0.md). Four 15-bit draws from each 64-bit random word take a fifth of
# that time (..._fast_dropout1.md); the keep probability is rounded to a multiple of 2^-15.
DROPOUT_MASK_BITS = 15


class CpuFastDropout(torch.nn.Dropout):
    """:class:`torch.nn.Dropout` with the same masks' distribution (p rounded to a multiple of 2^-15), drawn from
    the default generator (``set_seed`` makes it repeat) four elements per 64-bit random word. On another device
    it is ``torch.nn.Dropout``."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.device.type != "cpu" or not self.training or self.p == 0 or self.p == 1 or self.inplace:
            return super().forward(hidden)
        count = hidden.numel()
        # random_() on int64 draws from [0, 2^63): every 16-bit lane has 15 uniform low bits
        words = torch.empty((count + 3) // 4, dtype=torch.int64).random_()
        lanes = words.view(torch.int16)[:count].view(hidden.shape) & (2**DROPOUT_MASK_BITS - 1)
        keep = lanes >= round(self.p * 2**DROPOUT_MASK_BITS)
        # the scale applied to the masked values, not folded into a bf16 mask (1/0.9 rounds to 1.109 in bf16, as
        # torch.nn.Dropout's mask does): one rounding, the numbers an fp32 dropout cast to bf16 gives
        return (hidden * keep.to(hidden.dtype)).mul_(1 / (1 - self.p))


def use_cpu_fast_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Every ``torch.nn.Dropout`` module of ``model`` (the model's own, LoRA's, an adapter's) replaced by a
    :class:`CpuFastDropout` of the same probability. Functional dropout (inside SDPA, say) is left alone."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Dropout:
                setattr(module, name, CpuFastDropout(child.p, child.inplace).train(child.training))
    return model


@cache
def rms_norm_classes() -> tuple[type, ...]:
    """The decoders' RMSNorm modules: eager PyTorch ops (cast to fp32, square, mean, rsqrt, two products, cast
    back), each a pass over the activations, forward and backward."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    return LlamaRMSNorm, Qwen2RMSNorm


@cache
def gated_mlp_classes() -> tuple[type, ...]:
    """The decoders' MLPs, down(SiLU(gate(x)) * up(x)): eager PyTorch makes a pass over the intermediate-width
    activations (8960 wide on the 1.5B decoder) for the SiLU, for the product and for each of their gradients."""
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    return LlamaMLP, Qwen2MLP


def compile_modules(model: torch.nn.Module, classes: tuple[type, ...]) -> int:
    """Compile (inductor, dynamic shapes) in place every module of ``model`` that is one of ``classes``, so that its
    elementwise operations run fused, forward and backward; all of a class's modules share one graph (~10 s of
    compilation per process). A deep copy of the model drops it. Returns how many modules."""
    modules = [module for module in model.modules() if isinstance(module, classes)]
    for module in modules:
        module.compile(dynamic=True)
    return len(modules)


# The name under which transformers' AttentionInterface (and AttentionMaskInterface) know cpu_compiled_attention.
COMPILED_ATTENTION = "peftlab_cpu_compiled"


@cache
def grouped_attention_classes() -> tuple[type, ...]:
    """The decoders' attention modules, which call their attention function through transformers'
    AttentionInterface (the encoders here have their own attention code)."""
    from transformers.models.llama.modeling_llama import LlamaAttention
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

    return LlamaAttention, Qwen2Attention


def grouped_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float) -> torch.Tensor:
    """softmax(q k^T * scaling, masked) v, batch-first output ``[batch, length, heads, head_dim]`` as transformers'
    attention functions return it. The query heads that share a key/value head (grouped-query attention: 7 per
    key/value head on the 0.5B decoder) are stacked into one matrix, so keys and values are never repeated per
    query head, as SDPA's math kernel needs them; the softmax runs in float32, as transformers' eager attention.
    ``query`` ``[batch, heads, length, head_dim]``, ``key`` and ``value`` ``[batch, kv_heads, kv_length, head_dim]``,
    ``attention_mask`` boolean ``[batch, 1, length, kv_length]`` (True: attend), or None for a causal mask."""
    batch, heads, length, head_dim = query.shape
    kv_heads, kv_length = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scores = torch.matmul(query.reshape(batch, kv_heads, groups * length, head_dim), key.transpose(-1, -2))
    scores = scores.view(batch, kv_heads, groups, length, kv_length).float() * scaling
    if attention_mask is None:
        allowed = torch.ones(length, kv_length, dtype=torch.bool, device=query.device).tril(kv_length - length)
    else:
        allowed = attention_mask[:, :, None, :, :kv_length]
    probabilities = torch.softmax(scores.masked_fill(~allowed, torch.finfo(torch.float32).min), dim=-1)
    probabilities = torch.nn.functional.dropout(probabilities.to(value.dtype), dropout) if dropout else \
        probabilities.to(value.dtype)
    output = torch.matmul(probabilities.view(batch, kv_heads, groups * length, kv_length), value)
    return output.view(batch, heads, length, head_dim).transpose(1, 2).contiguous()


@cache
def compiled_grouped_query_attention():
    """:func:`grouped_query_attention` compiled (inductor, dynamic shapes): the scaling, mask, softmax and casts
    around the two matrix products fused, forward and backward."""
    return torch.compile(grouped_query_attention, dynamic=True)


def cpu_compiled_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """An attention function for transformers' AttentionInterface: a training step on CPU (autograd on) runs
    :func:`compiled_grouped_query_attention`; everything else (evaluation, whose forward SDPA's flash kernel does
    fastest; CUDA; a float mask; a non-causal module without a mask) runs transformers' own SDPA function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal_or_masked = (attention_mask.dtype == torch.bool if attention_mask is not None
                        else is_causal is not False and getattr(module, "is_causal", True))
    if torch.is_grad_enabled() and query.device.type == "cpu" and causal_or_masked:
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        return compiled_grouped_query_attention()(query, key, value, attention_mask, scaling, dropout), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def use_cpu_compiled_attention(model: torch.nn.Module) -> int:
    """Switch a decoder that runs SDPA (Llama, Qwen2) to :func:`cpu_compiled_attention`, registered with
    transformers' AttentionInterface as ``COMPILED_ATTENTION`` with SDPA's boolean masks. Returns how many
    attention modules it reaches: 0 for other models, or for a decoder on eager attention (the user's choice)."""
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    base = next(module for module in model.modules() if isinstance(module, PreTrainedModel))
    reached = sum(isinstance(module, grouped_attention_classes()) for module in model.modules())
    if not reached or base.config._attn_implementation != "sdpa":
        return 0
    AttentionInterface.register(COMPILED_ATTENTION, cpu_compiled_attention)
    AttentionMaskInterface.register(COMPILED_ATTENTION, sdpa_mask)
    base.set_attn_implementation(COMPILED_ATTENTION)
    return reached


def use_cpu_module_options(model: torch.nn.Module, *, fast_dropout: bool, compile_rms_norm: bool,
                           compile_mlp: bool, compile_attention: bool) -> torch.nn.Module:
    """``model`` with train.py's module options applied in train.py's order (``--cpu_fast_dropout``,
    ``--cpu_compile_rms_norm``, ``--cpu_compile_mlp``, ``--cpu_compile_attention``): train.py and the benchmark
    build their models through this. Logs what it compiled."""
    if fast_dropout:
        model = use_cpu_fast_dropout(model)
    if compile_rms_norm:
        logger.info("Compiled %d RMSNorm modules (inductor)", compile_modules(model, rms_norm_classes()))
    if compile_mlp:
        logger.info("Compiled %d MLP modules (inductor)", compile_modules(model, gated_mlp_classes()))
    if compile_attention:
        logger.info("Training steps' attention compiled (inductor) in %d attention modules",
                    use_cpu_compiled_attention(model))
    return model
