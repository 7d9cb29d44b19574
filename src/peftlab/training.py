"""The Trainer pipeline behind ``train.py``: arguments, data, model, method, train, record.

Each step is a small function; :func:`run` composes them in order and leaves in ``output_dir``
the files :mod:`peftlab.runrecord` defines (``run.json`` first, ``metrics.json`` last).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import netrc
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers
from accelerate import PartialState
from datasets import DatasetDict
from peft import PeftModel
from transformers import (
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.trainer_callback import ExportableState, TrainerState
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import IntervalStrategy

from .cli import parse_dataclasses
from .data import (
    VALIDATION_SEED,
    check_validation_ratio,
    hold_out_validation,
    load_data,
    parse_dataset_names,
    take_slice,
    tokenize,
)
from .errors import InvalidArgument, TrainingDiverged, exit_on_user_error
from .hardware import (
    MATH_ATTENTION_MAX_LENGTH,
    attention_kernels,
    bf16_helps,
    bf16_matmuls_in_fp32,
    bf16_matmuls_in_fp32_applies,
    cpu_compile_applies,
    reuse_freed_memory,
    use_cpu_module_options,
)
from .methods import (
    MethodArguments,
    frozen_weights_dtype,
    get_method,
    method_label,
    parameter_counts,
    upcast_trainable,
)
from .metrics import compute_metrics
from .models import default_sep_token, dtype_name, load_classifier, load_tokenizer, resolve_model
from .results import training_throughput
from .runrecord import LOG_FILE, STATE_FILE, RunDirectory, environment, peak_memory_mb, predicted_ids

logger = logging.getLogger("peftlab")


@dataclass
class DataArguments:
    dataset_name: str = field(
        default="restaurant_sup",
        metadata={"aliases": ["--dataset"],
                  "help": "Dataset name (restaurant_sup, laptop_sup, acl_sup, agnews_sup, or *_fs), or several "
                          "comma-separated to aggregate them. Short form: --dataset."})
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of the dataset folders; default $PEFTLAB_DATA_DIR, else the repository's data/."})
    sep_token: str | None = field(
        default=None,
        metadata={"help": "Separator between aspect term and sentence; default: the tokenizer's sep_token "
                          "(EOS for decoders)."})
    max_seq_length: int = field(default=256, metadata={"help": "Truncate inputs to this many tokens."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on this many rows (a fixed random slice), for quick runs."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on this many test (and validation) rows (a fixed random slice)."})
    validation_split: float = field(
        default=0.1,
        metadata={"help": "Fraction of the training rows held out, stratified by label, as the validation split: "
                          "per-epoch evaluation, curves, best-checkpoint choice and sweeps use it; the test split is "
                          "evaluated once, after training. 0 turns it off (and the per-epoch evaluation with it)."})
    validation_split_seed: int = field(
        default=VALIDATION_SEED,
        metadata={"help": "Seed of the held-out rows; independent of --seed, so every seed and method of a cell "
                          "holds out the same rows."})

    def __post_init__(self):
        parse_dataset_names(self.dataset_name)  # a misspelt name fails here, before the output folder is touched
        if self.max_seq_length <= 0:
            raise InvalidArgument(f"--max_seq_length must be positive, got {self.max_seq_length}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise InvalidArgument(f"--{name} must be positive (or left out for every row), got {value}")
        check_validation_ratio(self.validation_split)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "Hub id (bert-base-uncased, roberta-large, Qwen/Qwen2.5-0.5B), local folder, or an "
                          "offline packaged name: all-MiniLM-L6-v2, all-mpnet-base-v2, SmolLM2-135M-Instruct, "
                          "Qwen2.5-Coder-0.5B-Instruct, Qwen2.5-Coder-1.5B-Instruct."})
    attn_implementation: str | None = field(
        default=None,
        metadata={"choices": ["eager", "sdpa"],
                  "help": "Attention kernel (transformers' attn_implementation); default: the model's (SDPA). On a "
                          "2-core AMD EPYC with MiniLM in bf16, eager steps were 1.06x (full) and 1.14x (LoRA r=16) "
                          "faster in the benchmark, but whole runs took the same time with the same scores "
                          "(the stock-recipe check, benchmarks/stock_recipe.py), so SDPA stays the default."})
    cpu_math_attention_max_length: int = field(
        default=MATH_ATTENTION_MAX_LENGTH,
        metadata={"help": "On CPU, training batches of at most this many tokens per row run SDPA's math kernel instead "
                          "of its flash kernel, whose backward pass is slow at short rows: attention forward + "
                          "backward 2.2x faster at 27 tokens, a 0.5B decoder LoRA r=16 step 1.07x on restaurant "
                          "batches (one AMD EPYC thread; flash wins from ~190 tokens). Evaluation always runs "
                          "PyTorch's choice (flash: its forward alone is 2-10x faster). 0: PyTorch's choice. No effect "
                          "on CUDA, on eager attention, or where attention dropout already rules flash out (BERT's "
                          "training steps)."})
    frozen_weights_dtype: str = field(
        default="auto",
        metadata={"choices": ["auto", "float32", "bfloat16"],
                  "help": "dtype the checkpoint loads in for a method that freezes weights (LoRA, IA3, adapters); "
                          "trainable parameters, the head and AdamW states are float32 whatever it is. auto: "
                          "bfloat16 with --bf16 (autocast computes the frozen matmuls in bf16 anyway), else "
                          "float32; bfloat16 needs --bf16. Full fine-tuning always loads float32."})
    cpu_fast_dropout: bool = field(
        default=True,
        metadata={"help": "On CPU, dropout modules (the model's, LoRA's, an adapter's) draw their masks four elements "
                          "per 64-bit random word instead of one random number per element (PyTorch's bernoulli_): "
                          "same distribution (p rounded to a multiple of 2^-15), other random numbers. An MPNet "
                          "LoRA r=16 step 1.12x faster on the AMX Xeon. False: torch.nn.Dropout."})
    cpu_compile_rms_norm: bool = field(
        default=False,
        metadata={"help": "On CPU, compile (torch.compile, inductor, dynamic shapes) the decoders' RMSNorm modules "
                          "(Llama, Qwen2) into fused kernels: ~10 s of compilation per process, then a 0.5B decoder "
                          "LoRA r=16 step 1.10x faster on the AMX Xeon. Needs a C++ compiler."})
    cpu_compile_mlp: bool = field(
        default=False,
        metadata={"help": "On CPU, compile the decoders' gated MLP modules (Llama, Qwen2) likewise, so SiLU(gate) * "
                          "up and its gradient run as fused kernels: ~10 s of compilation per process, then the "
                          "1.5B decoder's LoRA r=16 layers 1.09-1.13x faster at 24-109 tokens per row and 1.29x at "
                          "256, beside compiled RMSNorm, on one thread of the AMX Xeon "
                          "(benchmarks/results/compiled_mlp_amx.md). Needs a C++ compiler."})
    cpu_compile_attention: bool = field(
        default=False,
        metadata={"help": "On CPU, the decoders' training steps (Llama, Qwen2, on SDPA) compute attention with a "
                          "compiled function registered in transformers' AttentionInterface: the query heads that "
                          "share a key/value head stacked into one matrix (no copies of keys and values per query "
                          "head), scaling, mask and float32 softmax fused around the two matrix products, forward "
                          "and backward. Evaluation keeps SDPA. ~10 s of compilation per process, then 4 of the 1.5B "
                          "decoder's layers' LoRA r=16 step 1.08-1.12x faster at 24-109 tokens per row against an A/A "
                          "control of 1.03-1.07x, one thread of the AMX Xeon (benchmarks/results/"
                          "compiled_attention_amx_qwen-1.5b.md). Needs a C++ compiler."})
    cpu_bf16_matmuls_in_fp32: bool | None = field(
        default=None,
        metadata={"help": "Under --bf16 on CPU, compute bf16 matrix products (linear layers, attention; forward and "
                          "backward) with fp32 kernels on their bf16 operands, rounding the results to bf16: what a "
                          "native bf16 kernel computes, up to the order of summation. For CPUs without native bf16 "
                          "products (AMX or AVX512-BF16): LoRA r=16 on the 0.5B decoder's first 2 layers trained 43x "
                          "faster (3 -> 128 tokens/s) on an AVX2-only AMD EPYC, where PyTorch's bf16 products run a "
                          "scalar fallback, and its steps took 2.6x less time on an AVX-512 Xeon without them, where "
                          "oneDNN converts. Not given: on exactly there. Modules are not compiled under it (the "
                          "--cpu_compile_* options are skipped)."})

    def __post_init__(self):
        if self.cpu_math_attention_max_length < 0:
            raise InvalidArgument(f"--cpu_math_attention_max_length must be 0 or more, got "
                                  f"{self.cpu_math_attention_max_length}")


@dataclass
class PeftlabTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with defaults for this task: small LR, 3 epochs, a validation eval per epoch."""

    output_dir: str = field(default="runs/last", metadata={"help": "Where the run's files go."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak AdamW learning rate."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Training epochs."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Training batch size."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Evaluation batch size."})
    warmup_ratio: float = field(default=0.06, metadata={"help": "Linear warmup over this fraction of steps."})
    eval_strategy: str = field(
        default="epoch", metadata={"help": "When to evaluate on the validation split (curves, best checkpoint)."})
    min_evaluations: int = field(
        default=4,
        metadata={"help": "Evaluate at least this many times: with --eval_strategy epoch, a run of fewer epochs "
                          "evaluates every 1/N of its steps instead, so its curves can show convergence (0: off)."})
    load_best_model_at_end: bool = field(
        default=False,
        metadata={"help": "Test the checkpoint with the best validation --metric_for_best_model (default macro_f1) "
                          "instead of the final one; checkpoints are then saved at every evaluation, and removed "
                          "after training."})
    logging_steps: float = field(default=10, metadata={"help": "Log the training loss every N steps."})
    save_strategy: str = field(
        default="no",
        metadata={"help": "Checkpointing (epoch, with --save_total_limit 1, is what grids and sweeps use): a run "
                          "killed midway and started again with the same output_dir resumes from its newest "
                          "checkpoint, which is removed when the run finishes. The final model is saved under "
                          "output_dir/model anyway."})
    save_every_minutes: float = field(
        default=0,
        metadata={"help": "Also save a checkpoint whenever this many minutes of training have passed since the last "
                          "one, mid-epoch too (0: off), so a run killed midway loses at most that much; a run resumed "
                          "from a mid-epoch checkpoint skips the batches it has seen and ends as if never killed. "
                          "Grids and sweeps save every 15 minutes beside each epoch's end."})
    report_to: None | str | list[str] = field(
        default="wandb", metadata={"help": "Trackers: wandb (offline unless logged in), or none."})
    bf16: bool = field(
        default=bf16_helps(),
        metadata={"help": "bf16 autocast (fp32 master weights). Default on where the hardware runs bf16 matmuls "
                          "natively (CUDA bf16, or a CPU with AMX or AVX512-BF16; run.json records which). "
                          "MiniLM/restaurant_sup, one epoch: 1.7x faster with AMX, 1.8x (85 -> 48 s) on an AMD EPYC "
                          "with AVX512-BF16, same accuracy."})
    optim: str = field(
        default="adamw_torch_fused",
        metadata={"help": "Optimizer. Fused AdamW: the same update as PyTorch's default foreach AdamW in one kernel; "
                          "measured 1.7x faster full fine-tuning steps on the 0.5B decoder on this CPU."})
    use_cpu: bool = field(default=not torch.cuda.is_available(),
                          metadata={"help": "Train on the CPU (the default without CUDA; bf16 then autocasts on CPU)."})
    do_train: bool = field(default=True, metadata={"help": "Train."})
    do_eval: bool = field(default=True, metadata={"help": "Evaluate on the validation split (on whenever "
                                                          "--eval_strategy is not 'no')."})
    save_model: bool = field(
        default=True, metadata={"help": "Save what trained (and the tokenizer) under output_dir/model; sweep trials "
                                        "turn it off."})
    do_test: bool = field(
        default=True, metadata={"help": "Evaluate the chosen model on the test split, once, after training (sweep "
                                        "trials turn it off: nothing is chosen on test)."})
    group_by_length: bool = field(
        default=True,
        metadata={"help": "Batch rows of similar length together, so batches pad little (Trainer's length-grouped "
                          "sampler; see --shuffle_length_groups). False: random batches."})
    shuffle_length_groups: bool = field(
        default=True,
        metadata={"help": "Under --group_by_length, train on the length-grouped batches in a random order. False: "
                          "Trainer's own order, which runs each mega-batch of ~50 batches from longest to shortest, "
                          "so every epoch ends on a run of the shortest rows; after one epoch on restaurant_sup that "
                          "cost two seeds of three about 5 points of accuracy and 10 of macro-F1 against random "
                          "batches, which shuffled groups matched (benchmarks/results/stock_recipe.md)."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace a finished or failed run in output_dir (its files are removed first); "
                          "without it, a folder holding a run's files is refused."})
    gradient_checkpointing_token_budget: int = field(
        default=0,
        metadata={"help": "With --gradient_checkpointing: recompute activations in only as many layers as a batch "
                          "needs for the layers that keep theirs to hold no more than a batch of this many tokens "
                          "(padded rows x length) holds without recomputation; a batch within it recomputes nothing. "
                          "Same results up to float rounding. The 1.5B decoder's LoRA step at 1 thread on the AMX "
                          "host: 1.28x faster without recomputation "
                          "(benchmarks/results/checkpointing_amx_qwen-1.5b.md). 0: every layer recomputes in every "
                          "batch."})
    cpu_reuse_freed_memory: bool = field(
        default=True,
        metadata={"help": "On CPU with glibc, keep freed memory in malloc's heap for reuse (no mmap() for large "
                          "blocks, no trimming), so a step's gradients and activations do not fault their pages in "
                          "anew: full fine-tuning steps of the 0.5B decoder's first 12 layers 1.19-1.28x faster on "
                          "the AMX host, LoRA on the 1.5B decoder unchanged. "
                          "Same results; applies to the whole process from the run's start on."})

    def __post_init__(self):
        if self.num_train_epochs <= 0 and self.max_steps <= 0 and self.do_train:
            raise InvalidArgument(f"--num_train_epochs must be positive (or set --max_steps), "
                                  f"got {self.num_train_epochs}")
        if self.save_every_minutes < 0:
            raise InvalidArgument(f"--save_every_minutes must be 0 (off) or more, got {self.save_every_minutes}")
        if self.learning_rate < 0:  # AdamW would refuse it only once training starts
            raise InvalidArgument(f"--learning_rate must be 0 or more, got {self.learning_rate}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:  # else a DataLoader traceback after the model has loaded
                raise InvalidArgument(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.gradient_checkpointing_token_budget < 0:
            raise InvalidArgument(f"--gradient_checkpointing_token_budget must be 0 or more, "
                                  f"got {self.gradient_checkpointing_token_budget}")
        if self.gradient_checkpointing_token_budget and not self.gradient_checkpointing:
            raise InvalidArgument("--gradient_checkpointing_token_budget needs --gradient_checkpointing True")
        if self.eval_strategy == "epoch" and 0 < self.num_train_epochs < self.min_evaluations and self.max_steps <= 0:
            self.eval_strategy, self.eval_steps = "steps", 1 / self.min_evaluations  # a fraction of all steps
        if self.load_best_model_at_end:
            # Trainer needs a checkpoint at every evaluation to go back to the best one.
            self.metric_for_best_model = self.metric_for_best_model or "macro_f1"
            self.save_strategy, self.save_steps, self.save_total_limit = self.eval_strategy, self.eval_steps, 1
        super().__post_init__()


PARSED_TYPES = (DataArguments, ModelArguments, MethodArguments, PeftlabTrainingArguments)


def parse_args(argv: list[str] | None = None):
    """Command line, or one JSON/YAML file holding the same keys."""
    return parse_dataclasses(PARSED_TYPES, argv)


def setup_logging(training_args: TrainingArguments) -> None:
    """Log to stdout and (the main process) ``output_dir/train.log``; transformers and datasets at the same level."""
    handlers = [logging.StreamHandler(sys.stdout)]
    if training_args.should_save:
        handlers.append(logging.FileHandler(Path(training_args.output_dir) / LOG_FILE))
    formatter = logging.Formatter("%(asctime)s - %(levelname)s - %(name)s - %(message)s", "%m/%d/%Y %H:%M:%S")
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(handlers=handlers, force=True)
    level = training_args.get_process_log_level()  # WARNING unless --log_level says otherwise
    logger.setLevel(min(level, logging.INFO) if training_args.should_log else level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()  # through the root handlers, file included


def wandb_enabled(training_args: TrainingArguments) -> bool:
    return "wandb" in (training_args.report_to or [])


def configure_wandb(training_args: TrainingArguments) -> None:
    """Offline unless a login is configured; the run's wandb files go to its output_dir."""
    if not wandb_enabled(training_args):
        return
    logged_in = bool(os.environ.get("WANDB_API_KEY"))
    with contextlib.suppress(FileNotFoundError, netrc.NetrcParseError):
        logged_in = logged_in or netrc.netrc().authenticators("api.wandb.ai") is not None
    if not logged_in:
        os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_PROJECT", "peftlab")
    os.environ["WANDB_DIR"] = str(Path(training_args.output_dir).resolve())  # each run's files in its own folder


def default_run_name(model_args: ModelArguments, data_args: DataArguments, method_args: MethodArguments,
                     seed: int) -> str:
    method = method_label(method_args)
    model = Path(model_args.model_name_or_path.rstrip("/")).name
    return f"{model}__{data_args.dataset_name.replace(',', '+')}__{method}__seed{seed}"


class ShuffledLengthGroupedSampler(LengthGroupedSampler):
    """``LengthGroupedSampler``'s batches (rows of similar length, so little padding), in a random order: its own
    order sorts each mega-batch from longest to shortest, a length curriculum repeated every ~50 batches."""

    def __iter__(self):
        rows = list(super().__iter__())
        whole = len(rows) // self.batch_size  # a short last batch stays last: the DataLoader cuts batches in order
        batches = [rows[start:start + self.batch_size] for start in range(0, len(rows), self.batch_size)]
        # the global torch RNG, as the parent's permutation: seeded by --seed, restored on resume
        order = [*torch.randperm(whole, generator=self.generator).tolist(), *range(whole, len(batches))]
        return (row for batch in order for row in batches[batch])


def eval_order(dataset) -> list[int] | None:
    """Row indices, longest first (ties in row order): evaluation batches in this order pad little. None for a
    dataset without token ids."""
    if "input_ids" not in getattr(dataset, "column_names", ()):
        return None
    lengths = [len(ids) for ids in dataset["input_ids"]]
    return sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)


def layers_to_recompute(tokens: int, budget: int, layers: int) -> int:
    """How many of ``layers`` recompute their activations in the backward pass for a batch of ``tokens`` (padded)
    tokens, so that the layers keeping theirs hold no more than a ``budget``-token batch holds in all of them: every
    layer without a budget (0), none for a batch within it."""
    return math.ceil(layers * max(0.0, 1 - budget / tokens))


class WholeRunTotals(TrainerCallback, ExportableState):
    """Training seconds and summed training loss of the whole run, across resumes. ``Trainer.train()`` counts
    both for its own process only (its ``train_loss`` divides this process's summed loss by every step of the
    run). Each checkpoint stores the totals so far (in its ``trainer_state.json``, where Trainer keeps every
    ``ExportableState`` callback's state), and a resumed run counts on from them; the work lost after the last
    checkpoint is not counted."""

    def __init__(self):
        self.before = {"seconds": 0.0, "loss_sum": 0.0}  # earlier processes', up to the checkpoint resumed from
        self.started: float | None = None
        self.loss_sum = 0.0  # this process's; becomes a tensor: adding a step's loss does not synchronize a GPU

    def on_train_begin(self, args, state, control, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__)  # a resumed run's state is the checkpoint's
        self.before = dict(saved["attributes"]) if saved else {"seconds": 0.0, "loss_sum": 0.0}
        self.started, self.loss_sum = time.perf_counter(), 0.0

    def add_loss(self, loss: torch.Tensor) -> None:
        self.loss_sum = self.loss_sum + loss.detach()

    def totals(self) -> dict[str, float]:
        elapsed = 0.0 if self.started is None else time.perf_counter() - self.started
        return {"seconds": self.before["seconds"] + elapsed, "loss_sum": self.before["loss_sum"] + float(self.loss_sum)}

    def state(self) -> dict:
        return {"args": {}, "attributes": self.totals()}

    def whole_run(self, train_metrics: dict, global_step: int) -> dict:
        """``Trainer.train()``'s metrics with the runtime, rates and mean loss of the whole run."""
        if not self.before["seconds"]:  # not resumed: the Trainer's own numbers are the whole run's
            return train_metrics
        this_process = train_metrics["train_runtime"]
        whole = this_process + self.before["seconds"]
        return {key: value * this_process / whole if key.endswith("_per_second") else value
                for key, value in train_metrics.items()} | {
            "train_runtime": whole, "train_loss": self.totals()["loss_sum"] / global_step}


class PeftlabTrainer(Trainer):
    """``Trainer`` that trains on its length groups in a random order (:class:`ShuffledLengthGroupedSampler`,
    under ``--shuffle_length_groups``), evaluates in length order, stops at the first non-finite training loss
    (instead of training on to NaN weights and a majority-class "result"), reports a resumed run's training
    time and loss over the whole run (:class:`WholeRunTotals`), and on CPU trains short batches' attention on SDPA's
    math kernel (:func:`peftlab.hardware.attention_kernels`; evaluation keeps PyTorch's choice, flash).

    The stock ``Trainer`` evaluates rows in order, or under ``--group_by_length`` in shuffled length groups,
    which detached ``predict()``'s rows from the dataset's; here evaluation batches run longest first, and
    ``predict()`` returns its rows in the dataset's order."""

    def __init__(self, *args, math_attention_max_length: int = MATH_ATTENTION_MAX_LENGTH,
                 bf16_matmuls_in_fp32: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.math_attention_max_length = math_attention_max_length
        self.bf16_matmuls_in_fp32 = bf16_matmuls_in_fp32
        self.totals = WholeRunTotals()
        self.add_callback(self.totals)
        # a plain TrainingArguments (predicting with this Trainer) has no budget
        self.token_budget = getattr(self.args, "gradient_checkpointing_token_budget", 0)
        self.checkpointing_layers = [module for module in self.model.modules()  # only a budget toggles them
                                     if isinstance(module, GradientCheckpointingLayer)] if self.token_budget else []

    def train(self, resume_from_checkpoint=None, **kwargs):
        if self.token_budget and not self.checkpointing_layers:
            raise InvalidArgument("--gradient_checkpointing_token_budget: this model has no layers that checkpoint "
                                  "one by one (transformers' GradientCheckpointingLayer)")
        output = super().train(resume_from_checkpoint, **kwargs)
        metrics = self.totals.whole_run(output.metrics, self.state.global_step)
        summary = self.state.log_history[-1]  # the Trainer logged its own metrics last
        summary.update({key: value for key, value in metrics.items() if key in summary})
        return output._replace(training_loss=metrics["train_loss"], metrics=metrics)

    def _save(self, output_dir=None, state_dict=None):
        # A checkpoint holds the weights that train (and the buffers): the frozen ones are the pretrained
        # checkpoint's, which the resumed run loads anyway (the 1.5B decoder's adapter run: 66 MB of weights, not
        # 3.1 GB). The Trainer loads a checkpoint non-strictly; peft models save only their adapter.
        frozen = self.frozen_parameters()
        if state_dict is None and frozen and not isinstance(self.model, PeftModel):
            state_dict = {name: tensor for name, tensor in self.model.state_dict().items() if name not in frozen}
        super()._save(output_dir, state_dict)

    def compare_trainer_and_checkpoint_args(self, training_args, trainer_state):
        # A checkpoint stores a fraction of all steps (the eval_steps of --min_evaluations) as the count it stands
        # for; compare that count, so that resuming with the same arguments warns of no difference.
        meant = TrainerState()
        meant.compute_steps(training_args, trainer_state.max_steps)
        stored = copy.copy(trainer_state)
        for name in ("logging_steps", "eval_steps", "save_steps"):
            if getattr(meant, name) == getattr(trainer_state, name):
                setattr(stored, name, getattr(training_args, name))
        super().compare_trainer_and_checkpoint_args(training_args, stored)

    def _issue_warnings_after_load(self, load_result):
        frozen = self.frozen_parameters()  # left out of checkpoints on purpose (``_save``)
        super()._issue_warnings_after_load(load_result._replace(
            missing_keys=[key for key in load_result.missing_keys if key not in frozen]))

    def frozen_parameters(self) -> set[str]:
        return {name for name, param in self.model.named_parameters() if not param.requires_grad}

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler) and self.args.shuffle_length_groups:
            # grouped and shuffled by the global batch, so that processes training together each take their
            # share of the batch one process would train on (every process draws the same order from --seed)
            global_batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            return ShuffledLengthGroupedSampler(global_batch, lengths=sampler.lengths, generator=sampler.generator)
        return sampler

    def _get_eval_sampler(self, eval_dataset):
        order = eval_order(eval_dataset)
        return super()._get_eval_sampler(eval_dataset) if order is None else order

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        output = super().predict(test_dataset, ignore_keys, metric_key_prefix)
        order = eval_order(test_dataset)
        if order is None:
            return output

        def in_row_order(values):
            if isinstance(values, tuple | list):
                return type(values)(in_row_order(v) for v in values)
            restored = np.empty_like(values)
            restored[order] = values
            return restored

        return output._replace(predictions=in_row_order(output.predictions),
                               label_ids=None if output.label_ids is None else in_row_order(output.label_ids))

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with bf16_matmuls_in_fp32(self.bf16_matmuls_in_fp32):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def _attention_kernels(self, inputs):
        """The SDPA kernels for this batch (:func:`peftlab.hardware.attention_kernels`); the backward pass runs
        the kernel its forward chose. A batch without token ids (embeddings given) has no width to go by."""
        width = inputs["input_ids"].shape[-1] if "input_ids" in inputs else None
        return attention_kernels(width, self.args.device.type, self.math_attention_max_length)

    def _recompute_within_budget(self, inputs) -> None:
        """Under --gradient_checkpointing_token_budget, the first layers recompute their activations, as many as
        this batch needs (:func:`layers_to_recompute`); the rest keep theirs."""
        if not (self.token_budget and "input_ids" in inputs):  # a budget is set only with --gradient_checkpointing
            return
        count = layers_to_recompute(inputs["input_ids"].numel(), self.token_budget, len(self.checkpointing_layers))
        for index, layer in enumerate(self.checkpointing_layers):
            layer.gradient_checkpointing = index < count

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._recompute_within_budget(inputs)
        with self._attention_kernels(inputs), bf16_matmuls_in_fp32(self.bf16_matmuls_in_fp32):
            loss = super().training_step(model, inputs, num_items_in_batch)
        self.totals.add_loss(loss)
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"the training loss is {loss.item()} at step {self.state.global_step + 1}: lower the learning "
                "rate, or check the checkpoint's weights for inf/NaN; the run is left unfinished")
        return loss


class EvaluateLastStep(TrainerCallback):
    """Step-based evaluation (``--min_evaluations``) need not fall on the last step; evaluate there as well,
    so every curve ends at the final weights and their validation metrics need no extra pass."""

    def on_step_end(self, args, state, control, **kwargs):
        if (args.eval_strategy == IntervalStrategy.STEPS and state.global_step >= state.max_steps
                and state.global_step % state.eval_steps):
            control.should_evaluate = True


class ResumableCheckpoints(TrainerCallback):
    """Checkpoints a resumed run continues from as if never stopped. Every checkpoint closes the training loss's
    logging window first (a log entry at its step): the Trainer keeps a window's partial loss sum in no checkpoint,
    so a run resumed mid-window would log that window's mean over its own steps only. With ``minutes``
    (``--save_every_minutes``), a checkpoint also at the first step's end after that long since the last one (or
    the start), whatever ``--save_strategy`` says, so a run stopped by a session's end loses at most that much."""

    def __init__(self, minutes: float = 0):
        self.seconds = minutes * 60
        self.last_save = time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_save = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if self.seconds:
            due = time.monotonic() - self.last_save >= self.seconds
            if args.world_size > 1:  # every process saves at the same step: the main process's clock decides
                flag = torch.tensor(float(due), device=args.device)
                torch.distributed.broadcast(flag, src=0)
                due = bool(flag.item())
            control.should_save = control.should_save or due
        self.close_log_window(args, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.close_log_window(args, control)

    @staticmethod
    def close_log_window(args, control) -> None:
        if control.should_save and args.logging_strategy != IntervalStrategy.NO:
            control.should_log = True

    def on_save(self, args, state, control, **kwargs):
        self.last_save = time.monotonic()


def prepare_output_dir(training_args: TrainingArguments) -> tuple[RunDirectory, Path | None]:
    """The run's folder, and the checkpoint training resumes from (None: from the start).

    As in the Hugging Face example scripts, a run killed after saving a checkpoint (``--save_strategy``) resumes
    from its newest one when started again with the same ``output_dir``; ``--resume_from_checkpoint`` names one.
    Otherwise a folder holding another run's files is refused (Trainer's convention) unless
    ``--overwrite_output_dir``, which removes them first: a folder never mixes two runs. Under torchrun or
    accelerate every process looks before the main process writes anything, and only the main process writes."""
    run_dir = RunDirectory(Path(training_args.output_dir))
    state = PartialState()
    if training_args.overwrite_output_dir:
        checkpoint = None
    elif training_args.resume_from_checkpoint:
        checkpoint = Path(training_args.resume_from_checkpoint)
        if not (checkpoint / STATE_FILE).is_file():
            raise InvalidArgument(f"--resume_from_checkpoint {str(checkpoint)!r} is not a Trainer checkpoint "
                                  f"(no {STATE_FILE} in it)")
    else:
        checkpoint = run_dir.last_checkpoint()
    in_use = run_dir.has_outputs()
    state.wait_for_everyone()
    if in_use and checkpoint is None and not training_args.overwrite_output_dir:
        raise InvalidArgument(f"output_dir {str(run_dir.path)!r} already holds a run ({run_dir.state()}); pass "
                              "--overwrite_output_dir to replace it, or choose another --output_dir")
    if training_args.should_save:
        if checkpoint is None and in_use:
            run_dir.clear()
        run_dir.path.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    return run_dir, checkpoint


def run(data_args: DataArguments, model_args: ModelArguments, method_args: MethodArguments,
        training_args: TrainingArguments, callbacks: list | None = None) -> dict:
    """One run, start to finish; ``callbacks`` (``TrainerCallback``) join the Trainer's (a sweep's pruning)."""
    run_dir, checkpoint = prepare_output_dir(training_args)
    setup_logging(training_args)
    set_seed(training_args.seed)
    configure_wandb(training_args)
    if training_args.run_name in (None, training_args.output_dir):
        training_args.run_name = default_run_name(model_args, data_args, method_args, training_args.seed)
    logger.info("Run %s -> %s", training_args.run_name, run_dir.path)
    if checkpoint is not None:
        logger.info("Resuming training from %s", checkpoint)
    in_fp32 = bf16_matmuls_in_fp32_applies(model_args.cpu_bf16_matmuls_in_fp32, training_args.bf16,
                                           training_args.device.type)
    if model_args.cpu_bf16_matmuls_in_fp32 is None:  # resolved here, so run.json records what ran
        model_args.cpu_bf16_matmuls_in_fp32 = in_fp32
    if training_args.bf16 and not bf16_helps():
        logger.warning("bf16 on hardware without native bf16 matmuls (CUDA bf16, AMX or AVX512-BF16): it is "
                       "emulated there and slower than fp32 (measured 0.16 against 0.27 TFLOP/s)%s",
                       "; its matrix products run in fp32 (--cpu_bf16_matmuls_in_fp32)" if in_fp32 else "")

    if training_args.cpu_reuse_freed_memory and training_args.device.type == "cpu" and reuse_freed_memory():
        logger.info("malloc keeps freed memory for reuse (no mmap() for large blocks, no trimming)")
    method = get_method(method_args.tuning_method)
    frozen_dtype = frozen_weights_dtype(method, model_args.frozen_weights_dtype, training_args.bf16)
    resolved = resolve_model(model_args.model_name_or_path, frozen_dtype)
    logger.info("Model %r resolves to %s (%s: %s)", resolved.requested, resolved.checkpoint, resolved.source,
                resolved.path)
    tokenizer = load_tokenizer(resolved)
    sep_token = data_args.sep_token or default_sep_token(tokenizer)
    dataset, split_record = prepare_splits(data_args, sep_token)
    label_names = dataset["train"].features["label"].names
    num_labels = len(label_names)
    if "validation" not in dataset and training_args.eval_strategy != "no":
        logger.info("No validation split (--validation_split 0): no evaluation during training")
        training_args.eval_strategy = IntervalStrategy.NO
    logger.info("Dataset %s: %s rows, %d classes, sep_token %r", data_args.dataset_name,
                " / ".join(f"{len(rows)} {split}" for split, rows in dataset.items()), num_labels, sep_token)

    model = load_classifier(resolved, tokenizer, num_labels, dict(enumerate(label_names)), dtype=frozen_dtype,
                            **({"attn_implementation": model_args.attn_implementation}
                               if model_args.attn_implementation else {}))
    model = upcast_trainable(method.wrap(model, method_args))
    compiles = cpu_compile_applies(training_args.device.type, in_fp32)
    if in_fp32 and (model_args.cpu_compile_rms_norm or model_args.cpu_compile_mlp or model_args.cpu_compile_attention):
        logger.info("bf16 matrix products in fp32: no module compiled (--cpu_compile_* skipped)")
    model = use_cpu_module_options(model, fast_dropout=model_args.cpu_fast_dropout,
                                   compile_rms_norm=model_args.cpu_compile_rms_norm and compiles,
                                   compile_mlp=model_args.cpu_compile_mlp and compiles,
                                   compile_attention=model_args.cpu_compile_attention and compiles)
    counts = parameter_counts(model)
    logger.info("Method %s: %d of %d parameters train (%.4f%%)", method.name, counts["trainable_params"],
                counts["total_params"], counts["trainable_percent"])

    encoded = tokenize(dataset, tokenizer, data_args.max_seq_length)
    train_tokens = int(sum(len(ids) for ids in encoded["train"]["input_ids"]))
    record = {
        "data_args": asdict(data_args), "model_args": asdict(model_args), "method_args": asdict(method_args),
        "training_args": training_args.to_dict(), "resolved_model": asdict(resolved), "sep_token": sep_token,
        "label_names": label_names, "num_train_rows": len(dataset["train"]), "num_test_rows": len(dataset["test"]),
        "frozen_weights_dtype": dtype_name(frozen_dtype),
        "validation_split": split_record, "train_tokens_per_epoch": train_tokens,
        "resumed_from_checkpoint": None if checkpoint is None else str(checkpoint),
        "distributed": {"world_size": training_args.world_size, "parallel_mode": training_args.parallel_mode.value,
                        "effective_train_batch_size": training_args.per_device_train_batch_size
                        * training_args.world_size * training_args.gradient_accumulation_steps},
        **environment()}
    run_id = run_dir.start(record) if training_args.should_save else None

    trainer = PeftlabTrainer(
        model=model, args=training_args, train_dataset=encoded["train"], eval_dataset=encoded.get("validation"),
        processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=partial(compute_metrics, label_names=label_names),
        callbacks=[EvaluateLastStep(), ResumableCheckpoints(training_args.save_every_minutes), *(callbacks or [])],
        math_attention_max_length=model_args.cpu_math_attention_max_length, bf16_matmuls_in_fp32=in_fp32)
    metrics: dict = dict(counts)
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=None if checkpoint is None else str(checkpoint))
        metrics.update(result.metrics)
        metrics["train_tokens_per_second"], metrics["eval_seconds_during_training"] = training_throughput(
            train_tokens, trainer.state.epoch, result.metrics["train_runtime"], trainer.state.log_history)
        if "validation" in encoded:
            metrics.update(selected_validation_metrics(trainer, encoded["validation"]))
        if training_args.should_save:
            run_dir.write_state(trainer.state)  # the log history the curves come from
            run_dir.remove_checkpoints()  # load_best_model_at_end's; the chosen weights go to model/
            if training_args.save_model:
                method.save(trainer.model, run_dir.model_dir)
                tokenizer.save_pretrained(run_dir.model_dir)
    if training_args.do_test or training_args.do_predict:
        metrics.update(final_test_metrics(trainer, encoded["test"], label_names, run_dir,
                                          training_args.do_predict and training_args.should_save))
    metrics.update(peak_memory_mb())
    if training_args.should_save:
        metrics = run_dir.finish(run_id, metrics)
    logger.info("Final test metrics: %s", {k: metrics[k] for k in ("accuracy", "macro_f1") if k in metrics})
    if wandb_enabled(training_args):
        import wandb

        wandb.finish()
    return metrics


def prepare_splits(data_args: DataArguments, sep_token: str) -> tuple[DatasetDict, dict]:
    """train / validation / test: the validation rows are held out of the whole training split first (so a
    row cap never changes them), then the --max_*_samples caps apply."""
    dataset, _ = load_data(data_args.dataset_name, sep_token, data_args.data_dir)
    train, validation, split_record = hold_out_validation(dataset["train"], data_args.validation_split,
                                                          data_args.validation_split_seed)
    splits = {"train": take_slice(train, data_args.max_train_samples),
              "test": take_slice(dataset["test"], data_args.max_eval_samples)}
    if validation is not None:
        splits["validation"] = take_slice(validation, data_args.max_eval_samples)
    return DatasetDict(splits), split_record


def selected_validation_metrics(trainer: Trainer, validation_dataset) -> dict[str, float]:
    """``validation_*`` metrics of the weights the protocol picked (the best checkpoint with
    load_best_model_at_end, else the final one), and the step they come from."""
    state = trainer.state
    step = state.best_global_step if trainer.args.load_best_model_at_end else state.global_step
    chosen = next((e for e in state.log_history if e.get("step") == step and "eval_accuracy" in e), None)
    chosen = chosen or trainer.evaluate(validation_dataset)  # no evaluation fell on the final step
    return {"selected_step": step} | {f"validation_{key.removeprefix('eval_')}": value
                                      for key, value in chosen.items() if key.startswith("eval_")}


def final_test_metrics(trainer: Trainer, test_dataset, label_names: list[str], run_dir: RunDirectory,
                       save_predictions: bool) -> dict[str, float]:
    """Metrics of the chosen model on the test split, evaluated once, here, after training."""
    output = trainer.predict(test_dataset, metric_key_prefix="test")
    if save_predictions:
        run_dir.write_predictions(predicted_ids(output.predictions), label_names)
    return {key.removeprefix("test_"): value for key, value in output.metrics.items()}


def main(argv: list[str] | None = None) -> dict:
    return exit_on_user_error(lambda: run(*parse_args(argv)))


if __name__ == "__main__":
    main()
