"""Predict with a finished run: reload its weights in a fresh process and label a dataset split."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from transformers import DataCollatorWithPadding, TrainingArguments

from .cli import parse_dataclasses
from .data import load_data, parse_dataset_names, take_slice, tokenize
from .errors import InvalidArgument, MissingFile, exit_on_user_error
from .methods import get_method
from .metrics import classification_metrics
from .models import pretrained_tokenizer, resolve_model
from .runrecord import FINISHED, PREDICT_OUTPUT_FILE, RunDirectory, predicted_ids, write_predictions
from .training import PeftlabTrainer


@dataclass
class PredictArguments:
    run_dir: str = field(metadata={"help": "A train.py output_dir (holding run.json and model/)."})
    dataset_name: str | None = field(default=None, metadata={"help": "Dataset to label; default: the run's own."})
    split: str = field(default="test", metadata={"help": "Split to label: train or test."})
    data_dir: str | None = field(default=None, metadata={"help": "Data folder; default as in train.py."})
    merge_lora: bool = field(default=True, metadata={"help": "Merge LoRA into the base weights before predicting."})
    output_file: str | None = field(
        default=None,
        metadata={"help": f"Where to write index<TAB>prediction; default run_dir/{PREDICT_OUTPUT_FILE}."})

    def __post_init__(self):
        if self.dataset_name is not None:
            parse_dataset_names(self.dataset_name)  # a misspelt name fails before the model loads
        if self.split not in ("train", "test"):
            raise InvalidArgument(f"--split must be train or test, got {self.split!r}")


def load_trained(run_dir: str | Path, for_inference: bool = True):
    """(tokenizer, model, run record) of a finished run, its base checkpoint resolved anew."""
    run = RunDirectory(Path(run_dir))
    if run.state() != FINISHED:
        raise MissingFile(f"{run.path} holds no finished run (state: {run.state()})")
    if not run.model_dir.is_dir():
        raise MissingFile(f"the run in {run.path} kept no weights (no {run.model_dir.name}/: trained with --save_model "
                          "false, or a copy without its weights, which git does not track); rerun it to predict")
    record = run.record()
    method = get_method(record["method_args"]["tuning_method"])
    base = resolve_model(record["model_args"]["model_name_or_path"]).path
    model = method.load(base, run.model_dir)
    if for_inference:
        model = method.for_inference(model)
    return pretrained_tokenizer(run.model_dir), model.eval(), record


def rows_to_label(record: dict, dataset_name: str | None = None, split: str = "test", data_dir: str | None = None):
    """The rows a finished run labels: ``split`` of ``dataset_name`` (default: the run's own dataset, whose test
    split is cut to the rows the run itself scored), checked to have the run's classes."""
    data_args = record["data_args"]
    name = dataset_name or data_args["dataset_name"]
    rows = load_data(name, record["sep_token"], data_dir or data_args["data_dir"])[0][split]
    if rows.features["label"].names != record["label_names"]:
        raise InvalidArgument(f"{name} has the classes {rows.features['label'].names}, but the run was "
                              f"trained on {record['label_names']}; predict on a dataset with the run's classes")
    if dataset_name is None and split == "test":
        rows = take_slice(rows, data_args["max_eval_samples"])  # the rows the run itself scored
    return rows


def prediction_trainer(model, tokenizer, record: dict, scratch: str) -> PeftlabTrainer:
    """A Trainer that predicts as the run evaluated: its precision, device and evaluation batch size."""
    training = record["training_args"]
    return PeftlabTrainer(
        model=model, data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
        args=TrainingArguments(output_dir=scratch, report_to=[], bf16=training["bf16"], use_cpu=training["use_cpu"],
                               per_device_eval_batch_size=training["per_device_eval_batch_size"]))


def predict(args: PredictArguments) -> dict:
    tokenizer, model, record = load_trained(args.run_dir, for_inference=args.merge_lora)
    rows = rows_to_label(record, args.dataset_name, args.split, args.data_dir)
    encoded = tokenize(rows, tokenizer, record["data_args"]["max_seq_length"])
    with tempfile.TemporaryDirectory() as scratch:
        predictions = predicted_ids(prediction_trainer(model, tokenizer, record, scratch).predict(encoded).predictions)
    output = Path(args.output_file or Path(args.run_dir) / PREDICT_OUTPUT_FILE)
    names = rows.features["label"].names
    write_predictions(output, predictions, names)  # only now: a failed prediction leaves an earlier file whole
    metrics = classification_metrics(predictions, rows["label"])
    print(json.dumps({"output_file": str(output), "rows": len(rows), **metrics}, indent=2))
    return {"predictions": predictions.tolist(), **metrics}


def main(argv: list[str] | None = None) -> dict:
    return exit_on_user_error(lambda: predict(*parse_dataclasses((PredictArguments,), argv)))


if __name__ == "__main__":
    main()
