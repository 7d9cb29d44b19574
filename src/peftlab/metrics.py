"""Classification metrics through the `evaluate` library, working offline."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import evaluate
import numpy as np

METRIC_MODULES = Path(__file__).parent / "metric_modules"
F1_AVERAGES = ("micro", "macro", "weighted")


@cache
def _metric(name: str) -> evaluate.EvaluationModule:
    # A local module path: `evaluate.load("accuracy")` would need the Hub.
    return evaluate.load(str(METRIC_MODULES / name))


def classification_metrics(predictions, references) -> dict[str, float]:
    """accuracy, micro_f1, macro_f1, weighted_f1 for integer class ids.

    Macro F1 averages over the classes that occur in predictions or references (scikit-learn's rule).
    """
    predictions = np.asarray(predictions).tolist()
    references = np.asarray(references).tolist()
    scores = _metric("accuracy").compute(predictions=predictions, references=references)
    for average in F1_AVERAGES:
        f1 = _metric("f1").compute(predictions=predictions, references=references, average=average)
        scores[f"{average}_f1"] = f1["f1"]
    return scores


def per_class_f1(predictions, references, label_names: list[str]) -> dict[str, float]:
    """``f1_<label name>`` for every class (0 for a class never predicted nor present): on small,
    skewed test sets (ACL-ARC) this is what a macro-F1 is made of."""
    f1 = _metric("f1").compute(predictions=np.asarray(predictions).tolist(),
                               references=np.asarray(references).tolist(),
                               average=None, labels=list(range(len(label_names))))["f1"]
    return {f"f1_{name}": score for name, score in zip(label_names, f1, strict=True)}


def collapsed(metrics: dict, split: str = "validation") -> bool:
    """Whether a run's final model predicts one class: on ``split``, per-class F1 (``<split>_f1_<label>``) of 0 for
    every class but at most one, so no row outside one class is predicted right (a diverged run, typically)."""
    per_class = [value for key, value in metrics.items() if key.startswith(f"{split}_f1_")]
    return bool(per_class) and sum(value > 0 for value in per_class) <= 1


def compute_metrics(eval_pred, label_names: list[str] | None = None) -> dict[str, float]:
    """`Trainer`'s hook: logits (or a tuple whose first item is logits) and label ids; with
    ``label_names`` (bind it with functools.partial) the per-class F1 as well."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    predictions = np.argmax(logits, axis=-1)
    scores = classification_metrics(predictions, labels)
    if label_names is not None:
        scores.update(per_class_f1(predictions, labels, label_names))
    return scores
