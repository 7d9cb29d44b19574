"""Resuming a killed run from its last checkpoint: train.py, the grid runner and sweep trials."""

import pytest
from safetensors import safe_open
from transformers import TrainerCallback

from peftlab.runrecord import LOG_FILE, STARTED, RunDirectory, read_json
from peftlab.training import main, parse_args, run


class Killed(Exception):
    pass


class KillAfterFirstCheckpoint(TrainerCallback):
    """The process dies right after its first checkpoint is saved."""

    def on_save(self, args, state, control, **kwargs):
        raise Killed


def tiny_run_args(model: str, data_dir, method: str, output_dir) -> list[str]:
    return ["--model_name_or_path", model, "--dataset_name", "restaurant_sup", "--data_dir", str(data_dir),
            "--tuning_method", method, "--num_train_epochs", "4", "--per_device_train_batch_size", "8",
            "--learning_rate", "1e-3", "--logging_steps", "3", "--report_to", "none", "--seed", "3",
            "--save_strategy", "epoch", "--save_total_limit", "1", "--output_dir", str(output_dir)]


def curve(run_dir: RunDirectory) -> list[dict]:
    """The log history without wall-clock entries."""
    return [{k: v for k, v in entry.items() if "runtime" not in k and "per_second" not in k}
            for entry in run_dir.log_history()]


@pytest.mark.parametrize(("arch", "method", "precision", "batches", "saved"), [
    ("bert", "full", "fp32", "random", "epoch"), ("bert", "lora", "fp32", "random", "epoch"),
    ("bert", "adapter", "fp32", "random", "epoch"), ("bert", "full", "fp32", "length groups, shuffled", "epoch"),
    ("qwen2", "lora", "bf16", "random", "epoch"), ("qwen2", "adapter", "bf16", "random", "epoch"),  # bf16 frozen
    # --save_every_minutes: killed after the first step's checkpoint, mid-epoch; the resumed run skips that batch
    ("bert", "full", "fp32", "length groups, shuffled", "timed"), ("qwen2", "lora", "bf16", "random", "timed"),
])
def test_a_killed_run_resumes_from_its_last_checkpoint_and_ends_as_if_never_killed(arch, method, precision, batches,
                                                                                    saved, tmp_path, tiny_models,
                                                                                    fixture_data_dir):
    grouped = batches != "random"
    first_checkpoint = "checkpoint-1" if saved == "timed" else "checkpoint-4"  # 4 steps an epoch

    def args_for(output_dir):
        return [*tiny_run_args(tiny_models[arch], fixture_data_dir, method, output_dir),
                "--bf16", str(precision == "bf16"), "--group_by_length", str(grouped),
                "--shuffle_length_groups", str(grouped),
                *(["--save_every_minutes", "1e-9"] if saved == "timed" else [])]  # due at every step

    whole = main(args_for(tmp_path / "whole"))

    killed = RunDirectory(tmp_path / "killed")
    args = args_for(killed.path)
    with pytest.raises(Killed):
        run(*parse_args(args), callbacks=[KillAfterFirstCheckpoint()])
    assert killed.state() == STARTED and killed.last_checkpoint().name == first_checkpoint
    totals = read_json(killed.last_checkpoint() / "trainer_state.json")["stateful_callbacks"]["WholeRunTotals"]
    if method == "adapter":  # the checkpoint holds what trains (the adapters, the head), not the frozen weights
        with safe_open(killed.last_checkpoint() / "model.safetensors", "pt") as weights:
            names = list(weights.keys())
        assert any(".adapters." in name for name in names)
        frozen = ("query.weight", "q_proj.weight", "word_embeddings.weight", "embed_tokens.weight")
        assert not any(name.endswith(frozen) for name in names)

    resumed = main(args)  # the same command again, as the grid runner or a user would
    assert killed.record()["resumed_from_checkpoint"] == str(killed.path / first_checkpoint)
    assert not list(killed.path.glob("checkpoint-*"))  # removed once finished
    expected = curve(RunDirectory(tmp_path / "whole"))
    assert len(curve(killed)) == len(expected)
    for entry, wanted in zip(curve(killed), expected, strict=True):
        assert entry == pytest.approx(wanted)
    for key in ("accuracy", "macro_f1", "validation_macro_f1", "train_loss"):
        assert resumed[key] == pytest.approx(whole[key])
    # the time of the whole run: the first process's steps (recorded in the checkpoint) and the resumed ones
    assert 0 < totals["attributes"]["seconds"] < resumed["train_runtime"]
    assert resumed["train_samples_per_second"] == pytest.approx(4 * 27 / resumed["train_runtime"], rel=0.01)


def test_resume_from_checkpoint_must_name_a_checkpoint(tmp_path, tiny_models, fixture_data_dir, capsys):
    with pytest.raises(SystemExit) as exited:
        main([*tiny_run_args(tiny_models["bert"], fixture_data_dir, "full", tmp_path / "run"),
              "--resume_from_checkpoint", str(tmp_path)])
    assert exited.value.code != 0 and "is not a Trainer checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(("changed", "warning"), [
    ([], None), (["--logging_steps", "5"], "logging_steps: 5 (from args) != 3"),
])
def test_resuming_warns_only_of_arguments_that_changed(changed, warning, tmp_path, tiny_models, fixture_data_dir):
    """Two epochs are fewer than --min_evaluations: eval_steps is a fraction of all steps, which the checkpoint
    stores as the step count it stands for (the Trainer warned that the two differ on every resume)."""
    killed = RunDirectory(tmp_path / "killed")
    args = [*tiny_run_args(tiny_models["bert"], fixture_data_dir, "full", killed.path), "--num_train_epochs", "2",
            "--save_every_minutes", "1e-9"]  # a checkpoint at every step
    with pytest.raises(Killed):
        run(*parse_args(args), callbacks=[KillAfterFirstCheckpoint()])
    assert read_json(killed.last_checkpoint() / "trainer_state.json")["eval_steps"] == 2  # a quarter of 8 steps
    main([*args, *changed])
    assert killed.record()["resumed_from_checkpoint"]
    log = (killed.path / LOG_FILE).read_text()
    assert "eval_steps" not in log.partition("do not match")[2]
    assert (warning in log) if warning else ("do not match" not in log)
