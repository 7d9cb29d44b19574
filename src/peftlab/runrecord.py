"""The run directory: what a run writes, written atomically, and read back by everything else.

A run directory holds

* ``run.json``: every argument, the checkpoint that actually ran, versions, commit, hardware and a
  ``run_id``; written when the run starts;
* ``metrics.json``: final metrics and costs, carrying the same ``run_id``; written last;
* ``trainer_state.json`` (the Trainer's log history), ``train.log``, ``model/`` (what trained),
  ``predict_results.txt`` (with ``--do_predict``) and ``wandb/``;
* while it trains, the Trainer's ``checkpoint-<step>/`` folders (with ``--save_strategy``), which a
  run that was killed resumes from; removed when the run finishes;
* for grid runs, ``grid_args.json`` and ``grid_coordinates.json``, written by the grid before the run.

Every file is written to a temporary name and renamed, so a reader sees a whole file or none. A
run is *finished* only when its metrics parse and carry its ``run.json``'s ``run_id``; a folder with
``run.json`` and no such metrics is a run that *started* and never finished (killed, failed, or a
disk that filled up).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # checkpoint-<step>

from .hardware import cpu_has_amx_bf16, cpu_model, native_bf16

RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
STATE_FILE = "trainer_state.json"
LOG_FILE = "train.log"
PREDICTIONS_FILE = "predict_results.txt"
PREDICT_OUTPUT_FILE = "predictions.txt"  # predict.py's default output, beside the run's own files
MODEL_DIR = "model"
WANDB_DIR = "wandb"
# What a run writes into its output_dir; anything else there (a grid's files) belongs to the caller.
RUN_OUTPUTS = (RUN_FILE, METRICS_FILE, STATE_FILE, LOG_FILE, PREDICTIONS_FILE, MODEL_DIR, WANDB_DIR)

GRID_ARGS_FILE = "grid_args.json"
GRID_COORDINATES_FILE = "grid_coordinates.json"
GRID_LOG_FILE = "stdout.log"  # the grid run's stdout and stderr

EMPTY, STARTED, FINISHED = "empty", "started", "finished"

# What grids and sweeps train with so that a run killed midway (a session's end, an out-of-memory kill) resumes
# from its last checkpoint, not from the start: one at each epoch's end and one every 15 minutes within an epoch
# (a 0.5B decoder's full fine-tuning epoch takes about an hour on a 2-core CPU, its 5.6 GB checkpoint 16 s to
# write), only the newest kept, removed when the run finishes. It changes nothing a run computes.
RESUMABLE = {"save_strategy": "epoch", "save_total_limit": 1, "save_every_minutes": 15}

# Arguments that train.py gained after grids and sweeps had recorded runs, each with the value that computes what
# the code did before: an argument a record lacks counts at that value. The grids and sweeps whose runs predate
# one set it to that value explicitly, so their later runs compute what their earlier ones did.
ADDED_ARGUMENTS = {"shuffle_length_groups": False}

# Settings that change how a run executes, not what it computes: the memory it holds (activations recomputed, freed
# memory kept) or the kernels it runs (the same operations fused by compilation, or bf16 products by fp32 kernels,
# float rounding aside; quality checked in benchmarks/results/compiled_*_quality.md). A grid may change them while
# its runs are under way: a finished run stays done, and a run in flight resumes from its checkpoint under the new
# value.
EXECUTION_ONLY = ("gradient_checkpointing_token_budget", "cpu_compile_rms_norm", "cpu_compile_mlp",
                  "cpu_compile_attention", "cpu_reuse_freed_memory", "cpu_bf16_matmuls_in_fp32")


def same_computation(recorded: dict, args: dict) -> bool:
    """Whether a run recorded with the arguments ``recorded`` computes what ``args`` do: checkpoint settings
    (:data:`RESUMABLE`) and :data:`EXECUTION_ONLY` ones aside, and :data:`ADDED_ARGUMENTS` counted at their old value
    where either lacks them."""
    def computed(arguments: dict) -> dict:
        return {key: value for key, value in (ADDED_ARGUMENTS | arguments).items()
                if key not in RESUMABLE and key not in EXECUTION_ONLY}
    return computed(recorded) == computed(args)


def same_execution(recorded: dict, args: dict) -> bool:
    """Whether a run recorded with the arguments ``recorded`` executes as ``args`` do (:data:`EXECUTION_ONLY`
    equal, an argument the record predates counting as different): such runs take the same time."""
    return all(recorded.get(key) == args.get(key) for key in EXECUTION_ONLY)


# ----------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path``; renamed onto ``path`` only if the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(scratch)
        os.replace(scratch, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(scratch)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as scratch, open(scratch, "w", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())


def write_json(path: str | os.PathLike, payload: dict) -> None:
    write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


def read_json(path: str | os.PathLike) -> dict | None:
    """The object in ``path``, or None when the file is missing, empty, cut short or not an object."""
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


# ----------------------------------------------------------------------------- predictions


def predicted_ids(logits) -> np.ndarray:
    """Label ids from a model's logits (or a tuple whose first item is the logits)."""
    return np.argmax(logits[0] if isinstance(logits, tuple) else logits, axis=-1)


def write_predictions(path: str | os.PathLike, ids: Sequence[int], label_names: Sequence[str]) -> None:
    """``index<TAB>prediction`` (class names), one row per example."""
    write_text(path, "index\tprediction\n" + "".join(f"{i}\t{label_names[p]}\n" for i, p in enumerate(ids)))


# ----------------------------------------------------------------------------- environment


def version(package: str) -> str | None:
    """The installed version, or None (wandb, say, is only needed when a run reports to it)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Package versions, commit and hardware, for ``run.json``."""
    packages = ["torch", "transformers", "peft", "adapters", "datasets", "evaluate", "accelerate", "wandb"]
    here = Path(__file__).resolve().parent

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    return {
        "versions": {name: version(name) for name in packages} | {"python": platform.python_version()},
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "hardware": {
            "machine": platform.machine(), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "cpu_amx_bf16": cpu_has_amx_bf16(), "native_bf16": native_bf16(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
    }


def host_label(hardware: dict) -> str:
    """A run's host in a few words, from run.json's ``hardware``: the GPU, or the CPU's model and what runs its bf16
    matrix products natively (runs' times compare only on one host: the guide's rule, a time names its host)."""
    if hardware.get("cuda"):
        return hardware["cuda"]
    native = hardware.get("native_bf16") or ("amx_bf16" if hardware.get("cpu_amx_bf16") else None)
    if native is None and "native_bf16" not in hardware:
        native = "bf16 support unrecorded"
    return f"{hardware.get('cpu_model') or 'CPU model unrecorded'} ({native or 'no native bf16'})"


def peak_memory_mb() -> dict[str, float | None]:
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"peak_rss_mb": rss_kb / 1024, "cuda_max_allocated_mb": cuda}


# ----------------------------------------------------------------------------- the directory


@dataclass(frozen=True)
class RunDirectory:
    """One run's folder; the only reader and writer of the files above."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def model_dir(self) -> Path:
        return self.path / MODEL_DIR

    def _outputs(self) -> list[Path]:
        return [self.file(name) for name in RUN_OUTPUTS if self.file(name).exists()] + self._checkpoints()

    def _checkpoints(self) -> list[Path]:
        return sorted(self.path.glob(f"{PREFIX_CHECKPOINT_DIR}-*"))

    def has_outputs(self) -> bool:
        """Whether a run already wrote into this folder. A grid's own files do not count, nor the log of a run
        that stopped before it began (a bad argument, a model that did not load): the next run's log continues it."""
        return any(target.name != LOG_FILE for target in self._outputs())

    def clear(self) -> None:
        """Remove every run output, so a new run never sits beside an old one's files."""
        for target in self._outputs():
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()

    def last_checkpoint(self) -> Path | None:
        """The newest whole ``checkpoint-<step>`` folder of a started, unfinished run, to resume from; None if the
        run finished or left none. The Trainer writes a checkpoint's ``trainer_state.json`` last, so a folder
        whose state does not parse was cut short while saving (the one before it is still there)."""
        if self.state() != STARTED:
            return None
        whole = [c for c in self._checkpoints() if c.name.split("-")[-1].isdigit() and read_json(c / STATE_FILE)]
        return max(whole, key=lambda c: int(c.name.split("-")[-1]), default=None)

    def remove_checkpoints(self) -> None:
        """The Trainer's intermediate checkpoints; the weights that count are saved under ``model/``."""
        for checkpoint in self._checkpoints():
            shutil.rmtree(checkpoint)

    # -- writing (training)

    def start(self, record: dict) -> str:
        """Write ``run.json`` with a new ``run_id``; returns the id ``finish`` must carry."""
        run_id = uuid.uuid4().hex
        write_json(self.file(RUN_FILE), {"run_id": run_id, **record})
        return run_id

    def finish(self, run_id: str, metrics: dict) -> dict:
        """Write ``metrics.json``, the file that makes the run finished; returns what it holds."""
        metrics = {**metrics, "run_id": run_id}
        write_json(self.file(METRICS_FILE), metrics)
        return metrics

    def write_state(self, state) -> None:
        """The Trainer's ``TrainerState`` (log history) as ``trainer_state.json``."""
        with atomic_path(self.file(STATE_FILE)) as scratch:
            state.save_to_json(str(scratch))

    def write_predictions(self, ids: Sequence[int], label_names: Sequence[str]) -> None:
        write_predictions(self.file(PREDICTIONS_FILE), ids, label_names)

    # -- reading

    def record(self) -> dict:
        record = read_json(self.file(RUN_FILE))
        if record is None:
            raise FileNotFoundError(f"{self.file(RUN_FILE)} is missing or unreadable: not a run directory")
        return record

    def metrics(self) -> dict:
        if self.state() != FINISHED:
            raise FileNotFoundError(f"{self.path} holds no finished run (state: {self.state()})")
        return read_json(self.file(METRICS_FILE))

    def state(self) -> str:
        """``finished`` (metrics parse and carry run.json's run_id), ``started`` (run.json without such
        metrics: killed, failed or cut short) or ``empty`` (no run.json)."""
        record = read_json(self.file(RUN_FILE))
        if record is None:
            return EMPTY
        metrics = read_json(self.file(METRICS_FILE))
        if metrics is None or metrics.get("run_id") != record.get("run_id"):
            return STARTED  # runs from before run_id carry none in either file: None == None
        return FINISHED

    def log_history(self) -> list[dict]:
        state = read_json(self.file(STATE_FILE))
        return state["log_history"] if state else []

    def grid_args(self) -> dict | None:
        return read_json(self.file(GRID_ARGS_FILE))

    def grid_coordinates(self) -> dict | None:
        return read_json(self.file(GRID_COORDINATES_FILE))


def finished_runs(root: str | os.PathLike) -> list[RunDirectory]:
    """Every finished run directory under ``root``, in path order."""
    return [run for run in (RunDirectory(p.parent) for p in sorted(Path(root).rglob(RUN_FILE)))
            if run.state() == FINISHED]
