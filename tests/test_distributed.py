"""Several processes through torchrun (gloo on the CPU): the same training as one process, one set of run files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import build_tiny_model

from peftlab.runrecord import FINISHED, PREDICTIONS_FILE, RunDirectory

ROOT = Path(__file__).resolve().parents[1]
# Per logged step: two processes average their gradients and losses over the same 16 rows one process takes;
# only the order of floating-point sums differs (bf16 autocast included).
LOSS_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def dropout_free_bert(tmp_path_factory):
    """Dropout draws differ between processes; without it the two runs compute the same function."""
    folder = build_tiny_model(tmp_path_factory.mktemp("ddp") / "bert", "bert")
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def train(launcher: list[str], model: Path, data_dir: Path, out: Path, batch_size: int) -> RunDirectory:
    args = ["--model_name_or_path", str(model), "--dataset", "acl_sup", "--data_dir", str(data_dir),
            "--max_train_samples", "160", "--max_eval_samples", "32", "--output_dir", str(out),
            "--per_device_train_batch_size", str(batch_size), "--num_train_epochs", "1", "--logging_steps", "1",
            "--learning_rate", "1e-3", "--report_to", "none", "--disable_tqdm", "true", "--do_predict", "true",
            "--save_every_minutes", "1e-9"]  # a checkpoint at every step: the processes must agree on when
    done = subprocess.run([*launcher, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return RunDirectory(out)


def losses(run: RunDirectory) -> list[float]:
    return [entry["loss"] for entry in run.log_history() if "loss" in entry]


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, dropout_free_bert, real_data_dir):
    one = train([sys.executable], dropout_free_bert, real_data_dir, tmp_path / "one", 16)
    two = train([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"], dropout_free_bert,
                real_data_dir, tmp_path / "two", 8)
    assert one.state() == two.state() == FINISHED
    assert len(losses(two)) == len(losses(one)) == 10  # 160 rows, a global batch of 16
    assert losses(two) == pytest.approx(losses(one), abs=LOSS_TOLERANCE)
    assert two.record()["distributed"] == {"world_size": 2, "parallel_mode": "distributed",
                                           "effective_train_batch_size": 16}
    assert one.record()["distributed"]["world_size"] == 1
    # one set of files, written by the main process: the same layout, every test row predicted once
    assert sorted(p.name for p in two.path.iterdir()) == sorted(p.name for p in one.path.iterdir())
    assert set(two.metrics()) == set(one.metrics())
    assert len(two.file(PREDICTIONS_FILE).read_text().splitlines()) == 1 + 32
    assert two.file("train.log").read_text().count("Final test metrics") == 1
