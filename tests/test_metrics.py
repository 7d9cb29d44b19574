import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score
from transformers import EvalPrediction

from peftlab.metrics import classification_metrics, collapsed, compute_metrics, per_class_f1


def test_hand_checked_example():
    # refs   0 0 1 1 2 2 ; preds 0 1 1 1 0 2
    # class 0: tp1 fp1 fn1 -> f1 .5 ; class 1: tp2 fp1 fn0 -> 2*2/(2*2+1) = .8 ; class 2: tp1 fp0 fn1 -> 2/3
    scores = classification_metrics([0, 1, 1, 1, 0, 2], [0, 0, 1, 1, 2, 2])
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert scores["micro_f1"] == pytest.approx(4 / 6)
    assert scores["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert scores["weighted_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)  # two of each class


def test_matches_scikit_learn_on_random_labels():
    rng = np.random.default_rng(0)
    refs, logits = rng.integers(0, 5, 300), rng.normal(size=(300, 5))
    preds = logits.argmax(-1)
    scores = compute_metrics(EvalPrediction(predictions=logits, label_ids=refs))
    assert set(scores) == {"accuracy", "micro_f1", "macro_f1", "weighted_f1"}
    assert scores["accuracy"] == pytest.approx(accuracy_score(refs, preds))
    for average in ("micro", "macro", "weighted"):
        assert scores[f"{average}_f1"] == pytest.approx(f1_score(refs, preds, average=average))


def test_tuple_predictions_use_logits():
    logits = np.array([[0.1, 0.9], [0.8, 0.2]])
    scores = compute_metrics(EvalPrediction(predictions=(logits, np.zeros((2, 4))), label_ids=np.array([1, 1])))
    assert scores["accuracy"] == 0.5


def test_per_class_f1_is_what_macro_f1_averages():
    # the hand-checked example above, plus a class that is neither predicted nor present
    scores = per_class_f1([0, 1, 1, 1, 0, 2], [0, 0, 1, 1, 2, 2], ["a", "b", "c", "rare"])
    assert scores == pytest.approx({"f1_a": 0.5, "f1_b": 0.8, "f1_c": 2 / 3, "f1_rare": 0.0})
    logits = np.eye(3)[[0, 1, 1, 1, 0, 2]]
    named = compute_metrics(EvalPrediction(predictions=logits, label_ids=np.array([0, 0, 1, 1, 2, 2])),
                            label_names=["a", "b", "c"])
    assert named["f1_b"] == pytest.approx(0.8) and named["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_a_run_collapsed_when_one_class_alone_is_ever_predicted_right():
    def validation(predictions, references):
        scores = per_class_f1(predictions, references, ["a", "b", "c"])
        return {f"validation_{key}": value for key, value in scores.items()} | {"validation_macro_f1": 0.3}

    assert collapsed(validation([0, 0, 0, 0], [0, 1, 2, 0]))  # the majority class for every row
    assert collapsed(validation([1, 1, 1, 1], [0, 0, 2, 0]))  # nothing right at all
    assert not collapsed(validation([0, 1, 1, 0], [0, 1, 2, 0]))
    assert not collapsed(validation([0, 1], [0, 1]), split="test")  # another split's scores: none to judge by
    assert not collapsed({"validation_macro_f1": 0.2})  # a run without per-class scores
