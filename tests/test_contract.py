"""The course's contract and the failures that must never pass silently (issue 20).

The course checks a submission by placing its test files beside ``dataHelper.py`` and ``train.py`` in
one package folder and importing them relatively; ``test_course_imports_relative_to_a_package`` does
exactly that. The other tests each pin one class of silent failure found by an adversarial pass.
"""

import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from peftlab.data import REPO_DATA_DIR
from peftlab.experiments import GridRun, run_grid
from peftlab.results import collect
from peftlab.runrecord import (
    FINISHED,
    LOG_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    RUN_FILE,
    STARTED,
    RunDirectory,
    atomic_path,
)
from peftlab.training import main

ROOT = Path(__file__).resolve().parents[1]

COURSE_TEST = '''
from .dataHelper import get_dataset, get_fs
from .train import load_data, get_model, compute_metrics
'''


@pytest.fixture
def course_package(tmp_path, monkeypatch):
    """The two root files in a fresh package folder, as the course's checker lays them out."""
    package = tmp_path / "hw2_submission"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("dataHelper.py", "train.py"):
        shutil.copy(ROOT / name, package / name)
    (package / "test_course.py").write_text(COURSE_TEST)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("PEFTLAB_DATA_DIR", raising=False)  # the vendored data, with no set-up
    monkeypatch.chdir(tmp_path)  # started away from the repository
    return importlib.import_module("hw2_submission.test_course")


def test_course_imports_relative_to_a_package(course_package, tiny_models, monkeypatch):
    course = course_package
    restaurant = course.get_dataset("restaurant_sup", "[SEP]")
    assert (len(restaurant["train"]), len(restaurant["test"])) == (3452, 1120)
    assert len(course.get_fs("acl", "[SEP]")["train"]) == 32
    dataset, num_labels = course.load_data("acl_sup")
    assert num_labels == 6 and len(dataset["test"]) == 139
    for name in ("all-MiniLM-L6-v2", tiny_models["bert"]):
        tokenizer, model = course.get_model(name, num_labels)
        assert model.config.num_labels == 6 and tokenizer("a citation")["input_ids"]
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 2.0]])
    scores = course.compute_metrics(EvalPrediction(predictions=logits, label_ids=np.array([0, 1, 1, 1])))
    assert scores == pytest.approx(
        {"accuracy": 0.75, "micro_f1": 0.75, "macro_f1": 0.7333333, "weighted_f1": 0.7666666})
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no network retries
    with pytest.raises(OSError, match=r"'no-such-org/model'.*packaged checkpoints: .*all-MiniLM-L6-v2"):
        course.get_model("no-such-org/model", 2)


# ---------------------------------------------------------------- the command line


def train_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=cwd,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "WANDB_MODE": "disabled"})


def assert_one_line_error(code: int, stderr: str, pattern: str) -> None:
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and re.search(pattern, errors[0]), stderr[-2000:]


@pytest.mark.parametrize(("flags", "pattern"), [
    (["--num_train_epochs", "0"], "--num_train_epochs must be positive"),
    (["--max_seq_length", "0"], "--max_seq_length must be positive"),
    (["--max_train_samples", "0"], "--max_train_samples must be positive"),
    (["--save_every_minutes", "-5"], "--save_every_minutes must be 0 .off. or more, got -5"),
    (["--learning_rate", "-1"], "--learning_rate must be 0 or more, got -1"),
    (["--tuning_method", "lora", "--lora_dropout", "1.5"], "lora_dropout must be in .0, 1., got 1.5"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1, got 0"),
    (["--tuning_method", "ia4"], "invalid choice: .ia4."),
    (["--dataset", "restaurant_sup,restaurant"], "names restaurant more than once"),
    (["--dataset", "imdb_sup"], "unknown dataset 'imdb_sup'"),
    (["--model_name_or_path", str(ROOT / "tests")], "tests' is not a model folder .no config.json in it."),
    (["--tuning_method", "lora", "--modules_to_save", "pooler,poolr"],
     "--modules_to_save names modules BertForSequenceClassification lacks: poolr"),
    (["--tuning_method", "lora", "--lora_target_modules", "query,vlaue"],
     "--lora_target_modules names modules BertForSequenceClassification lacks: vlaue"),
])
def test_bad_arguments_fail_at_once_in_one_line(flags, pattern, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--model_name_or_path", "all-MiniLM-L6-v2", "--output_dir", str(tmp_path / "run"), "--report_to", "none",
              *flags])
    assert_one_line_error(stop.value.code, capsys.readouterr().err, pattern)
    assert not (tmp_path / "run" / RUN_FILE).exists()


def test_unknown_model_id_names_the_offline_checkpoints(tmp_path):
    """In a fresh process, as a user meets it: one line, no traceback (the tokenizer used to load first)."""
    done = train_cli("--model_name_or_path", "bert-base-uncsed", "--output_dir", str(tmp_path / "run"),
                     "--report_to", "none", "--dataset", "acl_sup")
    assert_one_line_error(done.returncode, done.stderr,
                          r"cannot load 'bert-base-uncsed'.*packaged checkpoints: .*all-MiniLM-L6-v2")


@pytest.mark.parametrize(("flags", "pattern"), [
    (["--batch_size", "-4"], "must be at least 1, got -4"),
    (["--lora_r", "0"], "must be positive, got 0 and 16"),
    (["--method", "adapter", "--adapter_reduction_factor", "0"], "must be positive, got 8 and 0"),
    (["--check", "unused.md", "--check_methods", "lora-r8", "lorra"], "unknown tuning_method 'lorra'"),
])
def test_memory_cli_refuses_values_that_make_no_sense(flags, pattern, capsys):
    from peftlab.errors import exit_on_user_error
    from peftlab.memory import main as memory_main

    with pytest.raises(SystemExit) as stop:
        exit_on_user_error(lambda: memory_main(["--model", "Qwen2.5-3B", *flags]))
    assert_one_line_error(stop.value.code, capsys.readouterr().err, pattern)


@pytest.mark.parametrize(("flags", "pattern"), [
    (["--n_trials", "0"], "--n_trials: must be at least 1, got 0"),
    (["--worker", "-1"], "--worker: must be at least 0, got -1"),
])
def test_sweep_cli_refuses_counts_that_make_no_sense(flags, pattern, capsys):
    from peftlab.sweep import main as sweep_main

    with pytest.raises(SystemExit) as stop:
        sweep_main(["configs/sweeps/minilm-acl_sup-full.yaml", *flags])
    assert_one_line_error(stop.value.code, capsys.readouterr().err, pattern)


def test_benchmark_cli_refuses_a_misspelt_method_before_loading_a_model(capsys):
    from peftlab.benchmark import main as benchmark_main

    with pytest.raises(SystemExit) as stop:
        benchmark_main(["--models", "no-such-model", "--methods", "full", "lora-x"])
    assert_one_line_error(stop.value.code, capsys.readouterr().err, "unknown tuning_method 'lora-x'")


def test_dataset_is_a_short_form_of_dataset_name():
    from peftlab.training import parse_args

    data_args = parse_args(["--model_name_or_path", "m", "--dataset", "acl_sup"])[0]
    assert data_args.dataset_name == "acl_sup"
    help_text = train_cli("--help").stdout
    assert "--dataset_name DATASET_NAME, --dataset-name DATASET_NAME, --dataset DATASET_NAME" in help_text


# ---------------------------------------------------------------- runs: never lost, never mixed


def tiny_run(model: str, data_dir: Path, out: Path, *extra: str) -> dict:
    return main(["--model_name_or_path", model, "--dataset_name", "restaurant_sup", "--data_dir", str(data_dir),
                 "--output_dir", str(out), "--num_train_epochs", "1", "--learning_rate", "1e-3",
                 "--report_to", "none", "--logging_steps", "1", *extra])


def test_reused_output_dir_is_refused_then_replaced_whole(tmp_path, tiny_models, fixture_data_dir, capsys):
    out = tmp_path / "run"
    first = tiny_run(tiny_models["bert"], fixture_data_dir, out, "--do_predict", "true")
    first_id = json.loads((out / RUN_FILE).read_text())["run_id"]
    assert first["run_id"] == first_id and (out / PREDICTIONS_FILE).is_file()
    with pytest.raises(SystemExit) as stop:
        tiny_run(tiny_models["bert"], fixture_data_dir, out, "--seed", "7")
    assert stop.value.code == 2 and "already holds a run (finished)" in capsys.readouterr().err
    assert json.loads((out / RUN_FILE).read_text())["run_id"] == first_id  # untouched
    second = tiny_run(tiny_models["bert"], fixture_data_dir, out, "--seed", "7", "--overwrite_output_dir", "true")
    assert second["run_id"] == json.loads((out / RUN_FILE).read_text())["run_id"] != first_id
    assert not (out / PREDICTIONS_FILE).exists()  # the first run's files went with it
    (result,) = collect(tmp_path)
    assert result.record["training_args"]["seed"] == 7


def test_a_run_stopped_by_a_bad_argument_leaves_its_folder_to_the_corrected_command(
        tmp_path, tiny_models, fixture_data_dir, capsys):
    """Run again into the same folder after fixing a typo: the log of a run that never began (no run.json) is no
    run, and the next run's log continues it. Names checked at parse time leave no folder at all."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        tiny_run(tiny_models["bert"], fixture_data_dir, out, "--dataset_name", "restaurnt_sup")
    assert stop.value.code == 2 and not out.exists()
    with pytest.raises(SystemExit) as stop:  # known only once the model has loaded
        tiny_run(tiny_models["bert"], fixture_data_dir, out, "--tuning_method", "lora", "--modules_to_save", "poolr")
    assert stop.value.code == 2 and (out / LOG_FILE).is_file() and not (out / RUN_FILE).exists()
    capsys.readouterr()
    tiny_run(tiny_models["bert"], fixture_data_dir, out, "--tuning_method", "lora", "--modules_to_save", "pooler")
    assert RunDirectory(out).state() == FINISHED
    assert (out / LOG_FILE).read_text().count(f"-> {out}") == 2  # both attempts' "Run NAME -> FOLDER" lines


def test_partial_files_never_count_as_finished(tmp_path, tiny_models, fixture_data_dir):
    """A full disk left a 0-byte metrics.json: the grid reran nothing and report crashed on it."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"output_root: {tmp_path / 'results'}\n"
                    f"defaults: {{data_dir: {fixture_data_dir}, num_train_epochs: 1, report_to: none, bf16: false}}\n"
                    f"models: {{tiny: {{model_name_or_path: {tiny_models['bert']}}}}}\n"
                    "datasets: [restaurant_sup]\nmethods: {full: {tuning_method: full}}\nseeds: [1, 2]\n")
    assert run_grid(str(grid)) == 0
    first = RunDirectory(tmp_path / "results/tiny/restaurant_sup/full/seed1")
    (first.path / METRICS_FILE).write_bytes(b"")
    assert first.state() == STARTED
    assert [r.seed for r in collect(tmp_path / "results")] == [2]  # report and tables skip it
    assert run_grid(str(grid), dry_run=True) == 0
    assert run_grid(str(grid)) == 0  # reruns only the broken one
    assert first.state() == "finished" and [r.seed for r in collect(tmp_path / "results")] == [1, 2]
    # metrics from another run (an old file beside a new run.json) do not count either
    record = json.loads((first.path / RUN_FILE).read_text())
    (first.path / RUN_FILE).write_text(json.dumps({**record, "run_id": "another"}))
    assert GridRun("tiny", "restaurant_sup", "full", 1, {"output_dir": str(first.path)}).directory.state() == STARTED


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / METRICS_FILE
    target.write_text('{"accuracy": 0.5}')
    with pytest.raises(OSError), atomic_path(target) as scratch:
        scratch.write_text('{"accura')
        raise OSError("No space left on device")
    assert json.loads(target.read_text()) == {"accuracy": 0.5}
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left behind


def test_non_finite_weights_stop_the_run_with_a_clear_error(tmp_path, tiny_models, fixture_data_dir, capsys):
    from transformers import AutoModelForMaskedLM

    broken = tmp_path / "nan-bert"
    shutil.copytree(tiny_models["bert"], broken)
    model = AutoModelForMaskedLM.from_pretrained(broken)
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    with pytest.raises(SystemExit) as stop:
        tiny_run(str(broken), fixture_data_dir, tmp_path / "run")
    assert stop.value.code == 2
    assert "the training loss is nan at step 1" in capsys.readouterr().err
    assert RunDirectory(tmp_path / "run").state() == STARTED  # never counted as a result


def test_predict_refuses_another_label_set(tmp_path, tiny_models, fixture_data_dir, capsys):
    from peftlab.predict import main as predict_main

    out = tmp_path / "run"
    tiny_run(tiny_models["bert"], fixture_data_dir, out)
    earlier = out / "labels.txt"
    earlier.write_text("index\tprediction\n0\tpositive\n")
    with pytest.raises(SystemExit) as stop:
        predict_main(["--run_dir", str(out), "--dataset_name", "acl_sup", "--data_dir", str(fixture_data_dir),
                      "--output_file", str(earlier)])
    error = capsys.readouterr().err
    assert stop.value.code == 2
    assert "acl_sup has the classes ['Background'" in error
    assert "trained on ['positive', 'neutral', 'negative']" in error
    assert earlier.read_text() == "index\tprediction\n0\tpositive\n"  # opened only after predicting
    with pytest.raises(SystemExit) as stop:  # a misspelt name fails as the arguments parse
        predict_main(["--run_dir", str(out), "--dataset_name", "laptp_sup"])
    assert stop.value.code == 2 and "unknown dataset 'laptp_sup'. Did you mean 'laptop_sup'?" in capsys.readouterr().err
    laptop = predict_main(["--run_dir", str(out), "--dataset_name", "laptop_sup", "--data_dir", str(fixture_data_dir),
                           "--output_file", str(earlier)])
    assert len(earlier.read_text().splitlines()) == 1 + len(laptop["predictions"])
    shutil.rmtree(RunDirectory(out).model_dir)  # as in a clone: git tracks no weights
    with pytest.raises(SystemExit) as stop:
        predict_main(["--run_dir", str(out)])
    assert stop.value.code == 2 and "kept no weights (no model/" in capsys.readouterr().err


def test_cached_conversion_is_rechecked_before_reuse(tmp_path, monkeypatch):
    """A converted folder whose files changed size (a killed copy, a full disk) is rebuilt, not loaded."""
    from peftlab import models

    calls = []

    def convert(joined, out):
        calls.append(joined)
        out.mkdir()
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"x" * 100)

    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_convert_gguf", convert)
    part = tmp_path / "part"
    part.write_bytes(b"gguf")
    monkeypatch.setattr(models.PackagedCheckpoint, "part_paths", lambda self: [part])
    import hashlib

    entry = models.PackagedCheckpoint("fake", "org/fake", "gguf", (), sha256=hashlib.sha256(b"gguf").hexdigest())
    folder = entry.materialize()
    assert entry.materialize() == folder and len(calls) == 1
    (folder / "model.safetensors").write_bytes(b"x" * 10)  # cut short
    assert entry.materialize() == folder and len(calls) == 2
    assert (folder / "model.safetensors").stat().st_size == 100


def test_packaged_minilm_weights_are_pinned(tmp_path, monkeypatch):
    from peftlab import models

    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    minilm = models.OFFLINE_CHECKPOINTS["minilm"]
    assert minilm.sha256 == "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    folder = minilm.materialize()  # hashes once, then remembers the file it checked
    assert (folder / "config.json").is_file() and list((tmp_path / "verified").iterdir())
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(b"not the weights")
    with pytest.raises(models.CorruptCheckpoint, match="does not match the pinned"):
        models._verify_once(fake, minilm.sha256)


def test_repo_data_is_the_default_everywhere():
    assert (REPO_DATA_DIR / "restaurant_sup" / "train.json").is_file()
    assert "PEFTLAB_DATA_DIR" not in (ROOT / ".ci" / "run").read_text()
