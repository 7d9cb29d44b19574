"""F1 as an `evaluate` module kept in the package (see accuracy.py for why)."""

import datasets
import evaluate
from sklearn.metrics import f1_score


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="F1 score, averaged 'micro', 'macro' or 'weighted' over classes.",
            citation="",
            inputs_description="predictions, references: lists of int class ids; average: str",
            features=datasets.Features({"predictions": datasets.Value("int32"),
                                        "references": datasets.Value("int32")}),
        )

    def _compute(self, predictions, references, average="macro", labels=None):
        return {"f1": float(f1_score(references, predictions, average=average, labels=labels, zero_division=0))}
