"""The validation protocol: tune and draw curves on rows held out of train, test once after training."""

import json
from collections import Counter

import pytest

from peftlab.data import get_dataset, hold_out_validation
from peftlab.runrecord import RunDirectory
from peftlab.training import main


def test_held_out_rows_are_stratified_fixed_and_recorded(real_data_dir):
    train = get_dataset("acl_sup", " ", data_dir=real_data_dir)["train"]
    kept, validation, record = hold_out_validation(train, 0.1)
    assert len(kept) + len(validation) == len(train) == 1688 and record["validation_rows"] == len(validation) == 169
    whole, held = Counter(train["label"]), Counter(validation["label"])
    for label, count in whole.items():  # every intent, the rare ones (60-76 rows) too, in proportion
        assert abs(held[label] - count * 0.1) <= 1
    again = hold_out_validation(train, 0.1)
    assert again[2]["held_out_sha256"] == record["held_out_sha256"] and again[1]["text"] == validation["text"]
    assert hold_out_validation(train, 0.1, seed=7)[2]["held_out_sha256"] != record["held_out_sha256"]
    unchanged, none, off = hold_out_validation(train, 0.0)
    assert unchanged is train and none is None and off["validation_rows"] == 0


def test_too_small_a_split_says_what_to_do(fixture_data_dir):
    acl = get_dataset("acl_sup", " ", data_dir=fixture_data_dir)["train"]  # 12 rows, 6 classes
    with pytest.raises(ValueError, match=r"cannot hold out a stratified 10% of 12 training rows.*--validation_split"):
        hold_out_validation(acl, 0.1)


def run_tiny(tmp_path, tiny_models, fixture_data_dir, *extra):
    out = tmp_path / "run"
    metrics = main(["--model_name_or_path", tiny_models["bert"], "--dataset_name", "restaurant_sup",
                    "--data_dir", str(fixture_data_dir), "--output_dir", str(out), "--num_train_epochs", "3",
                    "--learning_rate", "1e-3", "--report_to", "none", "--logging_steps", "1", "--seed", "3", *extra])
    return RunDirectory(out), metrics


def test_epochs_evaluate_on_validation_and_test_is_scored_once(tmp_path, tiny_models, fixture_data_dir):
    run, metrics = run_tiny(tmp_path, tiny_models, fixture_data_dir)
    record = run.record()
    assert record["validation_split"]["validation_rows"] == 3 and record["num_train_rows"] == 27
    assert record["validation_split"]["seed"] == 2025 and len(record["validation_split"]["held_out_sha256"]) == 64
    history = run.log_history()
    evals = [entry for entry in history if "eval_accuracy" in entry]
    assert [entry["epoch"] for entry in evals] == [1.0, 2.0, 3.0]
    assert not any(key.startswith("test_") for entry in history for key in entry)  # test stays out of the curves
    # validation_* are the final evaluation's, the test metrics keep their names
    assert metrics["validation_macro_f1"] == evals[-1]["eval_macro_f1"]
    assert metrics["selected_step"] == evals[-1]["step"]
    assert {"accuracy", "macro_f1", "micro_f1", "weighted_f1", "f1_neutral"} <= set(metrics)
    assert json.loads(run.file("metrics.json").read_text())["accuracy"] == metrics["accuracy"]


def test_best_checkpoint_is_chosen_on_validation(tmp_path, tiny_models, fixture_data_dir):
    run, metrics = run_tiny(tmp_path, tiny_models, fixture_data_dir, "--load_best_model_at_end", "true")
    evals = [entry for entry in run.log_history() if "eval_macro_f1" in entry]
    best = max(evals, key=lambda entry: entry["eval_macro_f1"])  # ties: Trainer keeps the first
    assert metrics["selected_step"] == best["step"] and metrics["validation_macro_f1"] == best["eval_macro_f1"]
    assert run.record()["training_args"]["metric_for_best_model"] == "macro_f1"
    assert not list(run.path.glob("checkpoint-*")) and run.model_dir.is_dir()


def test_no_validation_split_means_no_evaluation_during_training(tmp_path, tiny_models, fixture_data_dir):
    run, metrics = run_tiny(tmp_path, tiny_models, fixture_data_dir, "--validation_split", "0")
    assert not any("eval_accuracy" in entry for entry in run.log_history())
    assert run.record()["num_train_rows"] == 30 and "validation_accuracy" not in metrics and "accuracy" in metrics


@pytest.mark.parametrize(("epochs", "batch", "expected"), [
    (2, "8", [0.5, 1.0, 1.5, 2.0]),     # 8 steps: every 2nd, a quarter of the run
    (3, "8", [0.75, 1.5, 2.25, 3.0]),   # 12 steps: every 3rd
    (3, "4", [0.86, 1.71, 2.57, 3.0]),  # 21 steps: every 6th (ceil of 5.25), and the last step too
])
def test_short_runs_evaluate_at_least_four_times(epochs, batch, expected, tmp_path, tiny_models, fixture_data_dir):
    run, metrics = run_tiny(tmp_path, tiny_models, fixture_data_dir, "--num_train_epochs", str(epochs),
                            "--per_device_train_batch_size", batch)
    evals = [entry for entry in run.log_history() if "eval_accuracy" in entry]
    assert [round(entry["epoch"], 2) for entry in evals] == expected  # ending at the final weights
    assert run.record()["training_args"]["eval_strategy"] == "steps"
    assert metrics["validation_macro_f1"] == evals[-1]["eval_macro_f1"]
