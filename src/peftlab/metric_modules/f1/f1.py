"""F1 as an `evaluate` module kept in the package (see accuracy.py for why)."""

import datasets
import evaluate
from sklearn.metrics import f1_score


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="F1 score, averaged 'micro', 'macro' or 'weighted' over classes, or per class.",
            citation="",
            inputs_description="predictions, references: lists of int class ids; average: str, or None for "
                               "a list of per-class scores in the order of `labels`",
            features=datasets.Features({"predictions": datasets.Value("int32"),
                                        "references": datasets.Value("int32")}),
        )

    def _compute(self, predictions, references, average="macro", labels=None):
        f1 = f1_score(references, predictions, average=average, labels=labels, zero_division=0)
        return {"f1": f1.tolist() if average is None else float(f1)}
