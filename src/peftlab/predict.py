"""Predict with a finished run: reload its weights in a fresh process and label a dataset split."""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer, DataCollatorWithPadding, HfArgumentParser, Trainer

from .methods import get_method
from .metrics import classification_metrics
from .models import resolve_model
from .training import MODEL_SUBDIR, PeftlabTrainingArguments, load_data, take_slice, tokenize


@dataclass
class PredictArguments:
    run_dir: str = field(metadata={"help": "A train.py output_dir (holding run.json and model/)."})
    dataset_name: str | None = field(default=None, metadata={"help": "Dataset to label; default: the run's own."})
    split: str = field(default="test", metadata={"help": "Split to label: train or test."})
    data_dir: str | None = field(default=None, metadata={"help": "Data folder; default as in train.py."})
    merge_lora: bool = field(default=True, metadata={"help": "Merge LoRA into the base weights before predicting."})
    output_file: str | None = field(
        default=None, metadata={"help": "Where to write index<TAB>prediction; default run_dir/predictions.txt."})


def load_trained(run_dir: str | Path, for_inference: bool = True):
    """(tokenizer, model, run record) of a finished run, its base checkpoint resolved anew."""
    run_dir = Path(run_dir)
    record = json.loads((run_dir / "run.json").read_text())
    method = get_method(record["method_args"]["tuning_method"])
    base = resolve_model(record["model_args"]["model_name_or_path"]).path
    model = method.load(base, run_dir / MODEL_SUBDIR)
    if for_inference:
        model = method.for_inference(model)
    return AutoTokenizer.from_pretrained(run_dir / MODEL_SUBDIR), model.eval(), record


def predict(args: PredictArguments) -> dict:
    tokenizer, model, record = load_trained(args.run_dir, for_inference=args.merge_lora)
    data_args = record["data_args"]
    dataset_name = args.dataset_name or data_args["dataset_name"]
    dataset, _ = load_data(dataset_name, record["sep_token"], args.data_dir or data_args["data_dir"])
    rows = dataset[args.split]
    if args.dataset_name is None and args.split == "test":
        rows = take_slice(rows, data_args["max_eval_samples"])  # the rows the run itself scored
    encoded = tokenize(rows, tokenizer, data_args["max_seq_length"])
    training = record["training_args"]
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(model=model, data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
                          args=PeftlabTrainingArguments(
                              output_dir=scratch, report_to=[], bf16=training["bf16"], eval_strategy="no",
                              per_device_eval_batch_size=training["per_device_eval_batch_size"]))
        logits = trainer.predict(encoded).predictions
    predictions = np.argmax(logits[0] if isinstance(logits, tuple) else logits, axis=-1)
    names = rows.features["label"].names
    output = Path(args.output_file or Path(args.run_dir) / "predictions.txt")
    with output.open("w") as out:
        out.write("index\tprediction\n")
        out.writelines(f"{i}\t{names[p]}\n" for i, p in enumerate(predictions))
    metrics = classification_metrics(predictions, rows["label"])
    print(json.dumps({"output_file": str(output), "rows": len(rows), **metrics}, indent=2))
    return {"predictions": predictions.tolist(), **metrics}


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(PredictArguments).parse_args_into_dataclasses(sys.argv[1:] if argv is None else argv)
    return predict(args)
