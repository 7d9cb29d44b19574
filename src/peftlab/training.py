"""The Trainer pipeline behind ``train.py``: arguments, data, model, method, train, record.

Each step is a small function; :func:`run` composes them in order and leaves in
``output_dir``: ``run.json`` (arguments, resolved checkpoint, versions, commit),
``metrics.json`` (final test metrics and costs), ``trainer_state.json`` (log history),
``train.log``, the trained weights under ``model/``, and ``predict_results.txt`` with
``--do_predict``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import netrc
import os
import platform
import resource
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers
from datasets import DatasetDict
from transformers import (
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

from .data import get_dataset
from .methods import MethodArguments, get_method, method_label, parameter_counts
from .metrics import compute_metrics
from .models import ResolvedModel, default_sep_token, get_model, resolve_model
from .results import training_throughput

logger = logging.getLogger("peftlab")

MODEL_SUBDIR = "model"
SLICE_SEED = 2025  # --max_*_samples take the same rows whatever the training seed


@dataclass
class DataArguments:
    dataset_name: str = field(
        default="restaurant_sup",
        metadata={"help": "Dataset name (restaurant_sup, laptop_sup, acl_sup, agnews_sup, or *_fs), or several "
                          "comma-separated to aggregate them."})
    data_dir: str | None = field(
        default=None, metadata={"help": "Folder holding the dataset folders; default $PEFTLAB_DATA_DIR, else ./data."})
    sep_token: str | None = field(
        default=None,
        metadata={"help": "Separator between aspect term and sentence; default: the tokenizer's sep_token "
                          "(EOS for decoders)."})
    max_seq_length: int = field(default=256, metadata={"help": "Truncate inputs to this many tokens."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on this many rows (a fixed random slice), for quick runs."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on this many test rows (a fixed random slice)."})


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "Hub id (bert-base-uncased, roberta-large, Qwen/Qwen2.5-0.5B), local folder, or an "
                          "offline packaged name: all-MiniLM-L6-v2, all-mpnet-base-v2, SmolLM2-135M-Instruct, "
                          "Qwen2.5-Coder-0.5B-Instruct, Qwen2.5-Coder-1.5B-Instruct."})


def cpu_has_amx_bf16() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and "amx_bf16" in cpuinfo.read_text()


def bf16_helps() -> bool:
    """True on a CUDA device with bf16 or a CPU with AMX tiles (where bf16 matmuls are ~3x fp32)."""
    return torch.cuda.is_bf16_supported() if torch.cuda.is_available() else cpu_has_amx_bf16()


@dataclass
class PeftlabTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with defaults for this task: small LR, 3 epochs, a test eval per epoch."""

    output_dir: str = field(default="runs/last", metadata={"help": "Where the run's files go."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak AdamW learning rate."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Training epochs."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Training batch size."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Evaluation batch size."})
    warmup_ratio: float = field(default=0.06, metadata={"help": "Linear warmup over this fraction of steps."})
    eval_strategy: str = field(default="epoch", metadata={"help": "Evaluate on the test split every epoch (curves)."})
    logging_steps: float = field(default=10, metadata={"help": "Log the training loss every N steps."})
    save_strategy: str = field(
        default="no", metadata={"help": "Checkpointing; the final model is saved under output_dir/model anyway."})
    report_to: None | str | list[str] = field(
        default="wandb", metadata={"help": "Trackers: wandb (offline unless logged in), or none."})
    bf16: bool = field(
        default=bf16_helps(),
        metadata={"help": "bf16 autocast (fp32 master weights). Default on where the hardware runs bf16 matmuls "
                          "natively (CUDA bf16, or a CPU with AMX); measured on MiniLM/restaurant_sup: 1.7x faster "
                          "on this CPU, same accuracy."})
    optim: str = field(
        default="adamw_torch_fused",
        metadata={"help": "Optimizer. Fused AdamW: the same update as PyTorch's default foreach AdamW in one kernel; "
                          "measured 1.7x faster full fine-tuning steps on the 0.5B decoder on this CPU."})
    use_cpu: bool = field(default=not torch.cuda.is_available(),
                          metadata={"help": "Train on the CPU (the default without CUDA; bf16 then autocasts on CPU)."})
    do_train: bool = field(default=True, metadata={"help": "Train."})
    do_eval: bool = field(default=True, metadata={"help": "Report final test metrics."})


PARSED_TYPES = (DataArguments, ModelArguments, MethodArguments, PeftlabTrainingArguments)


def parse_args(argv: list[str] | None = None):
    """Command line, or one JSON/YAML file holding the same keys."""
    parser = HfArgumentParser(PARSED_TYPES)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0])
    return parser.parse_args_into_dataclasses(argv)


def setup_logging(training_args: TrainingArguments) -> None:
    """Log to stdout and ``output_dir/train.log``; transformers and datasets at the same level."""
    Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
    handlers = [logging.StreamHandler(sys.stdout), logging.FileHandler(Path(training_args.output_dir) / "train.log")]
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


def load_data(dataset_name: str, sep_token: str = "<SEP>", data_dir: str | None = None) -> tuple[DatasetDict, int]:
    dataset = get_dataset(dataset_name, sep_token, data_dir=data_dir)
    return dataset, dataset["train"].features["label"].num_classes


def take_slice(dataset, size: int | None):
    if size is None or size >= len(dataset):
        return dataset
    return dataset.shuffle(seed=SLICE_SEED).select(range(size))


def tokenize(dataset, tokenizer, max_seq_length: int):
    """Token ids without padding: ``DataCollatorWithPadding`` pads each batch to its own longest row."""
    return dataset.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_seq_length),
                       batched=True, remove_columns=["text"], desc="Tokenizing")


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
    method = method_label(method_args.tuning_method, method_args.lora_r)
    model = Path(model_args.model_name_or_path.rstrip("/")).name
    return f"{model}__{data_args.dataset_name.replace(',', '+')}__{method}__seed{seed}"


def version(package: str) -> str | None:
    """The installed version, or None (wandb, say, is only needed when a run reports to it)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Package versions, commit and hardware, for ``run.json``."""
    packages = ["torch", "transformers", "peft", "adapters", "datasets", "evaluate", "accelerate", "wandb"]
    here = Path(__file__).resolve().parent

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    return {
        "versions": {name: version(name) for name in packages} | {"python": platform.python_version()},
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "hardware": {
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "cpu_amx_bf16": cpu_has_amx_bf16(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
    }


def peak_memory_mb() -> dict[str, float | None]:
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"peak_rss_mb": rss_kb / 1024, "cuda_max_allocated_mb": cuda}


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def final_test_metrics(trainer: Trainer, test_dataset, label_names: list[str], output_dir: Path,
                       do_predict: bool) -> dict[str, float]:
    """Metrics of the final model on the test split (never a best epoch picked on it)."""
    if do_predict:
        output = trainer.predict(test_dataset, metric_key_prefix="eval")
        predictions = np.argmax(output.predictions, axis=-1)
        with (output_dir / "predict_results.txt").open("w") as out:
            out.write("index\tprediction\n")
            out.writelines(f"{i}\t{label_names[p]}\n" for i, p in enumerate(predictions))
        return output.metrics
    last_eval = next((e for e in reversed(trainer.state.log_history) if "eval_accuracy" in e), None)
    if last_eval is not None and last_eval.get("step") == trainer.state.global_step:
        return last_eval  # the per-epoch evaluation already scored the final weights
    return trainer.evaluate()


def run(data_args: DataArguments, model_args: ModelArguments, method_args: MethodArguments,
        training_args: TrainingArguments) -> dict:
    output_dir = Path(training_args.output_dir)
    setup_logging(training_args)
    set_seed(training_args.seed)
    configure_wandb(training_args)
    if training_args.run_name in (None, training_args.output_dir):
        training_args.run_name = default_run_name(model_args, data_args, method_args, training_args.seed)
    logger.info("Run %s -> %s", training_args.run_name, output_dir)
    if training_args.bf16 and not bf16_helps():
        logger.warning("bf16 without AMX or CUDA bf16: slower than fp32 on such a CPU "
                       "(measured 0.16 against 0.27 TFLOP/s)")

    resolved: ResolvedModel = resolve_model(model_args.model_name_or_path)
    logger.info("Model %r resolves to %s (%s: %s)", resolved.requested, resolved.checkpoint, resolved.source,
                resolved.path)
    sep_token = data_args.sep_token or default_sep_token(AutoTokenizer.from_pretrained(resolved.path))
    dataset, num_labels = load_data(data_args.dataset_name, sep_token, data_args.data_dir)
    dataset = DatasetDict({"train": take_slice(dataset["train"], data_args.max_train_samples),
                           "test": take_slice(dataset["test"], data_args.max_eval_samples)})
    label_names = dataset["train"].features["label"].names
    logger.info("Dataset %s: %d train / %d test rows, %d classes, sep_token %r", data_args.dataset_name,
                len(dataset["train"]), len(dataset["test"]), num_labels, sep_token)

    tokenizer, model = get_model(resolved.path, num_labels, dict(enumerate(label_names)))
    method = get_method(method_args.tuning_method)
    model = method.wrap(model, method_args)
    counts = parameter_counts(model)
    logger.info("Method %s: %d of %d parameters train (%.4f%%)", method.name, counts["trainable_params"],
                counts["total_params"], counts["trainable_percent"])

    encoded = tokenize(dataset, tokenizer, data_args.max_seq_length)
    train_tokens = int(sum(len(ids) for ids in encoded["train"]["input_ids"]))
    record = {"data_args": asdict(data_args), "model_args": asdict(model_args), "method_args": asdict(method_args),
              "training_args": training_args.to_dict(), "resolved_model": asdict(resolved), "sep_token": sep_token,
              "label_names": label_names, "num_train_rows": len(dataset["train"]),
              "num_test_rows": len(dataset["test"]), "train_tokens_per_epoch": train_tokens, **environment()}
    write_json(output_dir / "run.json", record)

    trainer = Trainer(model=model, args=training_args, train_dataset=encoded["train"], eval_dataset=encoded["test"],
                      processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                      compute_metrics=partial(compute_metrics, label_names=label_names))
    metrics: dict = dict(counts)
    if training_args.do_train:
        result = trainer.train()
        trainer.save_state()  # trainer_state.json: the log history the curves come from
        metrics.update(result.metrics)
        metrics["train_tokens_per_second"], metrics["eval_seconds_during_training"] = training_throughput(
            train_tokens, trainer.state.epoch, result.metrics["train_runtime"], trainer.state.log_history)
        method.save(trainer.model, output_dir / MODEL_SUBDIR)
        tokenizer.save_pretrained(output_dir / MODEL_SUBDIR)
    if training_args.do_eval or training_args.do_predict:
        final = final_test_metrics(trainer, encoded["test"], label_names, output_dir, training_args.do_predict)
        metrics.update({key.removeprefix("eval_"): value for key, value in final.items()
                        if key.startswith("eval_")})
    metrics.update(peak_memory_mb())
    write_json(output_dir / "metrics.json", metrics)
    logger.info("Final test metrics: %s", {k: metrics[k] for k in ("accuracy", "macro_f1") if k in metrics})
    if wandb_enabled(training_args):
        import wandb

        wandb.finish()
    return metrics


def main(argv: list[str] | None = None) -> dict:
    return run(*parse_args(argv))


if __name__ == "__main__":
    main()
