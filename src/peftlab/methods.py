"""Tuning methods behind one small interface: wrap a model, save what trained, load it back.

``full`` trains every weight; ``lora`` adds peft low-rank updates; ``ia3`` peft's learned rescaling
vectors; ``adapter`` AdapterHub bottleneck adapters. In every method the modules the checkpoint lacked
(the classification head, ``classifier`` or ``score``, and e.g. a missing pooler), and those named by
``--modules_to_save``, train and are saved with the method's weights.

A method owns everything the rest of the package knows about it: its name, its arguments (the
``MethodArguments`` fields prefixed ``<name>_``), its label in run names and tables, whether serving
merges it into the base weights, and its parameter count (:func:`wrap_on_meta` wraps a model on
PyTorch's meta device through the same ``wrap``). A method is added here, with one
:func:`register_method` call and its argument fields; nothing else in the package names methods.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel

from .errors import InvalidArgument

HEAD_MODULES = ("classifier", "score")  # sequence-classification heads across architectures
ADAPTER_NAME = "task"
HEAD_FILE = "classification_head.safetensors"


def method_label(args: MethodArguments) -> str:
    """A method's short name in run names and result tables: ``full``, ``lora-r16``, ``adapter``."""
    return get_method(args.tuning_method).label(args)


def method_from_label(label: str) -> MethodArguments:
    """The inverse of :func:`method_label`: ``full``, ``adapter``, ``lora`` (the default rank) or ``lora-r16``.
    Other fields keep their defaults: the benchmarks that take labels measure cost, which alpha does not change."""
    for method in METHODS.values():
        args = method.parse_label(label)
        if args is not None:
            return args
    raise ValueError(f"unknown tuning_method {label!r}; choose one of {sorted(METHODS)}")


def known_method_label(label: str) -> str:
    """An argparse ``type`` for method labels: a misspelt one fails as the command line is read, before any
    model loads."""
    try:
        method_from_label(label)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return label


def modules_named(model: torch.nn.Module, names: list[str], option: str) -> dict[str, list[str]]:
    """Each name's modules as peft matches a name (every module whose qualified name is it or ends with
    ``.name``); a name that matches none is a typo in ``option``."""
    found = {name: [q for q, _ in model.named_modules() if q == name or q.endswith(f".{name}")] for name in names}
    absent = [name for name, modules in found.items() if not modules]
    if absent:
        raise InvalidArgument(f"{option} names modules {model.__class__.__name__} lacks: {', '.join(absent)}")
    return found


def new_modules(model: torch.nn.Module, also: str | None = None) -> list[str]:
    """Modules that train and are saved with every method: the classification head, whatever ``get_model``
    found missing from the checkpoint, and the comma-separated names in ``also`` (``--modules_to_save``);
    none nested in another."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    requested = modules_named(inner, _module_list(also) or [], "--modules_to_save")
    names = (set(getattr(inner, "newly_initialized_modules", ())) | {n for n in HEAD_MODULES if hasattr(inner, n)}
             | {q for found in requested.values() for q in found})
    return sorted(n for n in names if not any(n.startswith(f"{other}.") for other in names))


def head_parameters(model: torch.nn.Module, also: str | None = None) -> dict[str, torch.nn.Parameter]:
    """Parameters of the modules :func:`new_modules` names (the head at least), by their names in ``model``."""
    prefixes = tuple(f"{name}." for name in new_modules(model, also))
    return {name: p for name, p in model.named_parameters() if name.startswith(prefixes)}


def parameter_counts(model: torch.nn.Module) -> dict[str, float]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total, "trainable_percent": 100.0 * trainable / total}


class TuningMethod(ABC):
    """The interface: ``wrap`` before training, ``save`` after it, ``load`` in a fresh process."""

    name: str
    merges: bool = False  # whether for_inference folds the method into the base weights
    trains_everything: bool = False  # full fine-tuning: the baseline the other methods are compared with

    def label(self, args: MethodArguments) -> str:
        return self.name

    def parse_label(self, label: str) -> MethodArguments | None:
        """The arguments a label stands for, or None when the label is another method's."""
        return MethodArguments(tuning_method=self.name) if label == self.name else None

    @property
    def argument_fields(self) -> tuple[str, ...]:
        """The ``MethodArguments`` fields that configure this method."""
        return tuple(f.name for f in dataclasses.fields(MethodArguments) if f.name.startswith(f"{self.name}_"))

    @abstractmethod
    def wrap(self, model: PreTrainedModel, args: MethodArguments) -> torch.nn.Module:
        """The model to train, with exactly this method's parameters (and the new modules) trainable."""

    @abstractmethod
    def save(self, model: torch.nn.Module, directory: Path) -> None:
        """Write what trained (and the config) to ``directory``."""

    @abstractmethod
    def load(self, base_path: str, directory: Path) -> torch.nn.Module:
        """The trained model, from the pretrained checkpoint ``base_path`` and a saved ``directory``."""

    def for_inference(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to serve; LoRA merges its update into the base weights here."""
        return model


METHODS: dict[str, TuningMethod] = {}


def register_method(method: TuningMethod) -> TuningMethod:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> TuningMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown tuning_method {name!r}; choose one of {sorted(METHODS)}") from None


class FullFineTuning(TuningMethod):
    name = "full"
    trains_everything = True

    def wrap(self, model, args):
        model.requires_grad_(True)
        return model

    def save(self, model, directory):
        model.save_pretrained(directory)

    def load(self, base_path, directory):
        return AutoModelForSequenceClassification.from_pretrained(directory)


# --------------------------------------------------------------------------------------- LoRA

LORA_DEFAULT_TARGETS = {
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "mpnet": ["q", "v"], "qwen2": ["q_proj", "v_proj"], "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
}


def lora_targets(model_type: str, requested: str | None):
    if requested:
        return "all-linear" if requested == "all-linear" else [m.strip() for m in requested.split(",") if m.strip()]
    try:
        return LORA_DEFAULT_TARGETS[model_type]
    except KeyError:
        raise InvalidArgument(f"no default LoRA target modules for model_type {model_type!r}; pass "
                              f"--lora_target_modules (defaults exist for {sorted(LORA_DEFAULT_TARGETS)})") from None


class PeftMethod(TuningMethod):
    """A peft method: saved and loaded as a peft adapter beside the base checkpoint, merged for serving."""

    merges = True

    def save(self, model, directory):
        model.save_pretrained(directory)
        model.config.save_pretrained(directory)  # labels and pad token for the reload

    def load(self, base_path, directory):
        from peft import PeftModel

        base = AutoModelForSequenceClassification.from_pretrained(
            base_path, config=AutoConfig.from_pretrained(directory))
        return PeftModel.from_pretrained(base, directory)

    def for_inference(self, model):
        return model.merge_and_unload()


class LoRA(PeftMethod):
    name = "lora"

    def label(self, args):
        return f"lora-r{args.lora_r}"

    def parse_label(self, label):
        if label == self.name:
            return MethodArguments(tuning_method=self.name)
        if label.startswith("lora-r"):
            return MethodArguments(tuning_method=self.name, lora_r=int(label.removeprefix("lora-r")))
        return None

    def wrap(self, model, args):
        from peft import LoraConfig, TaskType, get_peft_model

        targets = lora_targets(model.config.model_type, args.lora_target_modules)
        if targets != "all-linear":
            modules_named(model, targets, "--lora_target_modules")
        config = LoraConfig(
            task_type=TaskType.SEQ_CLS, r=args.lora_r, lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout, target_modules=targets,
            # Saved with the adapter, so a reloaded model never has a random head (peft #310/#577).
            modules_to_save=new_modules(model, args.modules_to_save),
        )
        return get_peft_model(model, config)


def _module_list(names: str | None) -> list[str] | None:
    return [m.strip() for m in names.split(",") if m.strip()] if names else None


class IA3(PeftMethod):
    """(IA)^3 (Liu et al. 2022): learned vectors that rescale attention keys and values and the feed-forward
    activations; peft's default targets per architecture, or --ia3_target_modules."""

    name = "ia3"
    # Serving keeps the scaling vectors: they cost one elementwise product per layer, and peft 0.18.1's IA3
    # merge_and_unload fails on saved head modules without a .weight (RoBERTa's and MPNet's heads).
    merges = False

    def for_inference(self, model):
        return model

    def wrap(self, model, args):
        from peft import IA3Config, TaskType, get_peft_model

        config = IA3Config(task_type=TaskType.SEQ_CLS, target_modules=_module_list(args.ia3_target_modules),
                           feedforward_modules=_module_list(args.ia3_feedforward_modules),
                           modules_to_save=new_modules(model, args.modules_to_save))
        try:
            return get_peft_model(model, config)
        except ValueError as err:
            raise InvalidArgument(f"IA3 on model_type {model.config.model_type!r}: {err}; pass --ia3_target_modules "
                                  "and --ia3_feedforward_modules") from None


# --------------------------------------------------------------------------------------- adapter

def _adapter_supported_types() -> list[str]:
    import pkgutil

    import adapters.models
    from adapters.wrappers.interfaces import CUSTOM_INTERFACES

    built_in = {m.name for m in pkgutil.iter_modules(adapters.models.__path__) if m.ispkg and m.name != "auto"}
    return sorted(built_in | set(CUSTOM_INTERFACES) | set(_adapter_interfaces()))


def _adapter_interfaces():
    """Plugin interfaces for architectures the `adapters` library has no built-in support for."""
    from adapters import AdapterModelInterface

    return {
        "mpnet": AdapterModelInterface(
            adapter_methods=["bottleneck", "lora"], model_embeddings="embeddings", model_layers="encoder.layer",
            layer_self_attn="attention", layer_cross_attn=None, attn_q_proj="attn.q", attn_k_proj="attn.k",
            attn_v_proj="attn.v", attn_o_proj="attn.o", layer_intermediate_proj="intermediate.dense",
            # Post-LN like BERT: the adapter acts on each sublayer's output projection, and MPNet's own
            # residual add and LayerNorm follow, so the hooks must not add or normalise again.
            layer_output_proj="output.dense", layer_ln_1=None, layer_ln_2=None,
        ),
    }


class BottleneckAdapter(TuningMethod):
    name = "adapter"

    def _config(self, args: MethodArguments):
        from adapters import DoubleSeqBnConfig, SeqBnConfig

        layouts = {"houlsby": DoubleSeqBnConfig, "pfeiffer": SeqBnConfig}
        if args.adapter_config not in layouts:
            raise InvalidArgument(f"unknown adapter_config {args.adapter_config!r}; choose one of {sorted(layouts)}")
        return layouts[args.adapter_config](reduction_factor=args.adapter_reduction_factor)

    def _init(self, model):
        import adapters

        model_type = model.config.model_type
        try:
            adapters.init(model, interface=_adapter_interfaces().get(model_type))
        except ValueError as err:
            raise InvalidArgument(f"bottleneck adapters do not support model_type {model_type!r}; supported: "
                                  f"{', '.join(_adapter_supported_types())}") from err

    def wrap(self, model, args):
        self._init(model)
        model.add_adapter(ADAPTER_NAME, config=self._config(args))
        model.train_adapter(ADAPTER_NAME)  # freezes the base model, adapter weights train
        for param in head_parameters(model, args.modules_to_save).values():
            param.requires_grad_(True)
        return model

    def save(self, model, directory):
        directory.mkdir(parents=True, exist_ok=True)
        model.save_adapter(str(directory), ADAPTER_NAME, with_head=False)
        model.config.save_pretrained(directory)
        # what trained beside the adapter (the head, --modules_to_save), which save_adapter leaves out
        save_file({name: p.detach().contiguous() for name, p in model.named_parameters()
                   if p.requires_grad and f"adapters.{ADAPTER_NAME}." not in name}, directory / HEAD_FILE)

    def load(self, base_path, directory):
        config = AutoConfig.from_pretrained(directory)
        model = AutoModelForSequenceClassification.from_pretrained(base_path, config=config)
        self._init(model)
        model.load_adapter(str(directory), load_as=ADAPTER_NAME, with_head=False)
        model.set_active_adapters(ADAPTER_NAME)
        missing = model.load_state_dict(load_file(directory / HEAD_FILE), strict=False)
        if missing.unexpected_keys:
            raise ValueError(f"{directory / HEAD_FILE} has weights the model lacks: {missing.unexpected_keys}")
        return model


def method_sort_key(label: str) -> tuple:
    """Tables and legends list methods in registry order (full fine-tuning first), ranks in numeric order
    (``lora-r8`` before ``lora-r16``); labels no method claims go last, alphabetically."""
    try:
        index = list(METHODS).index(method_from_label(label).tuning_method)
    except ValueError:
        index = len(METHODS)
    return index, [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", label)]


def baseline_label() -> str:
    """The label of the method every other is compared with (the one that trains every weight)."""
    (baseline,) = (method for method in METHODS.values() if method.trains_everything)
    return baseline.label(MethodArguments(tuning_method=baseline.name))


def method_argument_fields() -> list[str]:
    """Every method's own ``MethodArguments`` fields, in declaration order."""
    return [name for method in METHODS.values() for name in method.argument_fields]


def meta_model(config) -> torch.nn.Module:
    """A sequence classifier of ``config`` on the meta device: exact parameter counts, nothing allocated."""
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config)


FROZEN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def frozen_weights_dtype(method: TuningMethod, requested: str, bf16: bool) -> torch.dtype:
    """The dtype to load the checkpoint in: that of the weights ``method`` freezes. ``auto``: bfloat16 with bf16
    autocast (it computes their matmuls in bf16 anyway; stored so, they take half the memory and need no cast
    per step), else float32. A method that trains every weight keeps float32 master weights."""
    if method.trains_everything:
        if requested == "bfloat16":
            raise InvalidArgument(f"--frozen_weights_dtype bfloat16: {method.name} freezes no weights (its fp32 "
                                  "master weights are what bf16 autocast keeps)")
        return torch.float32
    if requested == "auto":
        return torch.bfloat16 if bf16 else torch.float32
    if requested == "bfloat16" and not bf16:
        # without autocast the bf16 frozen layers would meet the fp32 trainable ones in one matmul
        raise InvalidArgument("--frozen_weights_dtype bfloat16 needs --bf16 True (bf16 autocast)")
    return FROZEN_DTYPES[requested]


def upcast_trainable(model: torch.nn.Module) -> torch.nn.Module:
    """Every trainable parameter (the method's, the head) in float32, whatever dtype the frozen weights were
    loaded in: the updates and AdamW states stay full precision.

    With frozen weights in bf16 (loaded so only under bf16 autocast), peft's LoRA layers also stop casting their
    bf16 inputs to their fp32 weights' dtype: autocast casts them back to bf16 for the matmul anyway, and those
    copies with their backward took 7% of an MPNet LoRA r=16 step on the AMX host. With ``CpuFastDropout`` on
    the LoRA input the losses are the same bit for bit (tests/test_methods.py)."""
    frozen_bf16 = False
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
        frozen_bf16 |= not param.requires_grad and param.dtype == torch.bfloat16
    if frozen_bf16:
        cast_lora_inputs(model, False)
    return model


def cast_lora_inputs(model: torch.nn.Module, enabled: bool) -> None:
    """peft's switch, on every LoRA (tuner) layer of ``model``: cast the layer's input to its weights' dtype."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = enabled


def wrap_on_meta(config, args: MethodArguments) -> torch.nn.Module:
    """The model ``args`` would train, on the meta device (the memory estimator counts what each method adds
    this way); the method's own modules are created there too."""
    with torch.device("meta"):
        return get_method(args.tuning_method).wrap(meta_model(config), args)


for _method in (FullFineTuning(), LoRA(), IA3(), BottleneckAdapter()):
    register_method(_method)


# Defined after the registry is filled: the command line offers the registered methods as choices.
@dataclass
class MethodArguments:
    tuning_method: str = field(
        default="full",
        metadata={"aliases": ["--method"], "choices": sorted(METHODS),
                  "help": "How to fine-tune: one of the registered methods. Short form: --method."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha (the update is scaled by alpha/r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={"help": "Comma-separated module names LoRA wraps, or 'all-linear'. Default: query,value for "
                          "BERT-like encoders, q,v for MPNet, q_proj,v_proj for Qwen2/Llama decoders."})
    adapter_config: str = field(
        default="houlsby",
        metadata={"help": "Bottleneck adapter layout: houlsby (after attention and after the feed-forward "
                          "block) or pfeiffer (after the feed-forward block only)."})
    adapter_reduction_factor: int = field(
        default=16, metadata={"help": "Bottleneck adapter reduction factor: hidden size / bottleneck size."})
    ia3_target_modules: str | None = field(
        default=None,
        metadata={"help": "Comma-separated module names whose outputs IA3 rescales. Default: peft's per "
                          "architecture (key, value and the feed-forward output for BERT-like encoders, k/q, v and "
                          "down_proj for Qwen2/Llama)."})
    ia3_feedforward_modules: str | None = field(
        default=None,
        metadata={"help": "Those of --ia3_target_modules that are feed-forward layers (IA3 scales their input "
                          "rather than their output). Default: peft's per architecture."})
    modules_to_save: str | None = field(
        default=None,
        metadata={"help": "Comma-separated modules that train in full beside a PEFT method's own weights and are "
                          "saved with them (peft's modules_to_save), in addition to the classification head and any "
                          "module the checkpoint lacks. E.g. pooler for a BERT checkpoint whose pooler never "
                          "trained (all-MiniLM-L6-v2's has an all-zero bias), which the classifier reads through."})

    def __post_init__(self):
        if self.tuning_method not in METHODS:
            raise ValueError(f"unknown tuning_method {self.tuning_method!r}; choose one of {sorted(METHODS)}")
        if self.lora_r <= 0 or self.adapter_reduction_factor <= 0:
            raise ValueError(f"lora_r and adapter_reduction_factor must be positive, got {self.lora_r} and "
                             f"{self.adapter_reduction_factor}")
        if not 0 <= self.lora_dropout < 1:  # else torch's Dropout refuses it once the model has loaded
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")

    @classmethod
    def from_record(cls, recorded: dict) -> MethodArguments:
        """The arguments a run recorded in run.json (fields added since then keep their defaults)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in recorded.items() if key in known})
