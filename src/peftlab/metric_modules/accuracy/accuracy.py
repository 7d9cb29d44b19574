"""Accuracy as an `evaluate` module kept in the package: the PyPI wheel ships no metric scripts
and the Hub is out of reach offline, so `evaluate.load` gets this file's folder."""

import datasets
import evaluate
from sklearn.metrics import accuracy_score


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Proportion of correct predictions.",
            citation="",
            inputs_description="predictions, references: lists of int class ids",
            features=datasets.Features({"predictions": datasets.Value("int32"),
                                        "references": datasets.Value("int32")}),
        )

    def _compute(self, predictions, references):
        return {"accuracy": float(accuracy_score(references, predictions))}
