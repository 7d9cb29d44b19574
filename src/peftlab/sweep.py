"""Hyperparameter search with Optuna: tune on the validation split, each trial a normal run directory.

    python -m peftlab.sweep configs/sweeps/minilm-acl_sup-full.yaml

A sweep file names one grid cell, the train.py arguments its trials share, and a search space::

    study_name: minilm-acl_sup-full
    cell: {model: minilm, dataset: acl_sup, method: full}   # whose settings the selection file will hold
    n_trials: 16                                           # finished (complete or pruned) trials wanted
    base: {model_name_or_path: all-MiniLM-L6-v2, dataset_name: acl_sup, tuning_method: full, bf16: true}
    space:
      learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}
      num_train_epochs: {low: 2, high: 20}                 # two ints: an int parameter
      warmup_ratio: {low: 0.0, high: 0.2}
      lora_alpha_per_r: {choices: [1, 2]}                  # sets lora_alpha = value * lora_r
    # optional, with these defaults:
    storage: sqlite:///results/sweeps/studies.db           # any Optuna database URL (PostgreSQL, MySQL)
    output_root: results/sweeps                            # trial k runs in <output_root>/<study_name>/trial<k>
    selection_file: configs/selected.yaml                  # the winners, read by the grids
    sampler: {seed: 0, n_startup_trials: 5}                # TPE
    pruner: {n_startup_trials: 4, n_warmup_steps: 2}       # median pruner over per-epoch validation scores;
                                                           # {type: threshold, lower: 0.3} and percentile too
    heartbeat_seconds: 60                                  # a trial silent for two heartbeats was killed

Each trial trains through :func:`peftlab.training.run` with the validation split on, the per-epoch
validation macro-F1 reported to Optuna (bad trials are pruned early), and the test split never
evaluated. The objective is the validation macro-F1 of the final epoch, the model the grid's runs test.
Why not ``Trainer.hyperparameter_search(backend="optuna")``: it sets only ``TrainingArguments`` fields,
on one shared Trainer writing to one ``output_dir``; a trial here also sets the method's arguments (LoRA's
alpha/r) and must leave a normal run directory, so each trial runs the training recipe itself under
Optuna's ``study.optimize``, with the pruning report that Trainer would make (:class:`PruningCallback`).

The study lives in the storage, so a killed sweep resumes where it stopped: a trial killed midway
is retried with the same settings, from the last epoch it finished (its folder becomes the retry's,
checkpoint included), as often as it is killed while its checkpoints advance (:class:`RetryKilledTrial`).
Several processes or machines pointed at one database URL share the work.
When the study has its trials, the best one's settings go to the selection file.
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import math
import os
import shutil
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import sqlalchemy
import yaml
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from transformers import TrainerCallback

from .cli import non_negative_int, parse_dict, positive_int
from .errors import InvalidArgument, MissingFile, TrainingDiverged, exit_on_user_error
from .runrecord import RESUMABLE, RunDirectory, same_computation, write_text
from .selection import DEFAULT_SELECTION_FILE, apply_params, cell_key, read_selection
from .training import PARSED_TYPES, run

OBJECTIVE = "validation_macro_f1"
EVAL_OBJECTIVE = "eval_macro_f1"  # the same score in the Trainer's per-epoch evaluation log
RESUMED_FROM_STEP = "resumed_from_step"  # trial user attribute: the checkpoint step its run resumed from (0: none)
TRIES_WITHOUT_PROGRESS = "tries_without_progress"  # system attribute of a retry: killed tries in a row, no checkpoint
DEFAULT_STORAGE = "sqlite:///results/sweeps/studies.db"
# Heartbeats and failed-trial retries are marked experimental in Optuna; they are what makes resuming work.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
PRUNERS = {"median": optuna.pruners.MedianPruner, "percentile": optuna.pruners.PercentilePruner,
           "threshold": optuna.pruners.ThresholdPruner}


@dataclass
class Sweep:
    study_name: str
    cell: dict
    base: dict
    space: dict
    n_trials: int = 16
    storage: str = DEFAULT_STORAGE
    output_root: str = "results/sweeps"
    selection_file: str = DEFAULT_SELECTION_FILE
    sampler: dict = field(default_factory=lambda: {"seed": 0, "n_startup_trials": 5})
    pruner: dict = field(default_factory=lambda: {"n_startup_trials": 4, "n_warmup_steps": 2})
    heartbeat_seconds: int = 60

    @property
    def cell_key(self) -> str:
        return cell_key(self.cell)

    def trial_dir(self, number: int) -> Path:
        return Path(self.output_root) / self.study_name / f"trial{number}"


def load_sweep(path: str | Path) -> Sweep:
    if not Path(path).is_file():
        raise MissingFile(f"no sweep file {path}")
    spec = yaml.safe_load(Path(path).read_text()) or {}
    try:
        sweep = Sweep(**spec)
    except TypeError as err:
        raise InvalidArgument(f"{path}: {err}") from None
    if set(sweep.cell) != {"model", "dataset", "method"}:
        raise InvalidArgument(f"{path}: cell must name model, dataset and method, got {sweep.cell}")
    if sweep.n_trials <= 0:
        raise InvalidArgument(f"{path}: n_trials must be positive")
    if sweep.base.get("validation_split", 0.1) == 0:
        raise InvalidArgument(f"{path}: a sweep tunes on the validation split: do not set validation_split to 0")
    if sweep.pruner.get("type", "median") not in PRUNERS:
        raise InvalidArgument(f"{path}: pruner type must be one of {sorted(PRUNERS)}")
    for name, bounds in sweep.space.items():
        if not ({"low", "high"} <= set(bounds) or "choices" in bounds):
            raise InvalidArgument(f"{path}: space.{name} needs low and high (and log: true), or choices")
    # A trial's arguments at each end of the space, parsed as its run will parse them: a misspelt key, dataset or
    # bound fails here, not as failed trials.
    for end, choice in (("low", 0), ("high", -1)):
        params = {name: bounds["choices"][choice] if "choices" in bounds else bounds[end]
                  for name, bounds in sweep.space.items()}
        try:
            parse_dict(PARSED_TYPES, trial_arguments(sweep, params) | {"output_dir": str(sweep.trial_dir(0))})
        except InvalidArgument as err:
            raise InvalidArgument(f"{path}: {err}") from None
    return sweep


def suggest(trial, space: dict) -> dict:
    """One value per space entry: ints when both bounds are ints, log scale with ``log: true``."""
    params = {}
    for name, bounds in space.items():
        if "choices" in bounds:
            params[name] = trial.suggest_categorical(name, bounds["choices"])
        elif isinstance(bounds["low"], int) and isinstance(bounds["high"], int):
            params[name] = trial.suggest_int(name, bounds["low"], bounds["high"], log=bounds.get("log", False))
        else:
            params[name] = trial.suggest_float(name, float(bounds["low"]), float(bounds["high"]),
                                               log=bounds.get("log", False))
    return params


class PruningCallback(TrainerCallback):
    """Reports each end-of-epoch validation evaluation to the trial (step = epoch: trials of different
    lengths compare at the same epochs) and stops a trial Optuna prunes. Evaluations between epochs (short
    runs evaluate more often, --min_evaluations) only draw curves. A trial resumed from a checkpoint reports
    the epochs before it first, from the checkpoint's log history."""

    def __init__(self, trial: optuna.Trial):
        self.trial = trial

    def on_train_begin(self, args, state, control, **kwargs):
        for entry in state.log_history:
            self.report(entry)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.report({**(metrics or {}), "epoch": state.epoch or 0})

    def report(self, log_entry: dict) -> None:
        epoch = round(log_entry.get("epoch", 0))
        if EVAL_OBJECTIVE in log_entry and abs(log_entry["epoch"] - epoch) < 1e-6:
            self.trial.report(log_entry[EVAL_OBJECTIVE], step=epoch)
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch}")


def checkpoint_step(run_dir: str | Path | None) -> int:
    """The step of a run folder's newest checkpoint to resume from; 0 for none."""
    checkpoint = RunDirectory(Path(run_dir)).last_checkpoint() if run_dir else None
    return int(checkpoint.name.rsplit("-", 1)[1]) if checkpoint else 0


class RetryKilledTrial(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a killed (heartbeat-stale) trial with the same settings, for as long as its tries make
    progress. A try that saved a newer checkpoint than it started from is always retried: a 10-epoch MPNet trial
    outlives a 3-hour session, and each session's end kills it mid-epoch (Optuna's ``max_retry`` counts every try,
    and dropped such a trial, checkpoints and all, at its third kill). At most ``max_retry`` tries in a row that
    saved none are retried: a trial that dies before its next checkpoint every time (a crash, the kernel's OOM
    killer) stops there. A worker that cannot see the trial's folder (another machine's disk) counts no progress."""

    def __init__(self, max_retry: int = 2):
        super().__init__(max_retry=None)
        self.max_tries_without_progress = max_retry

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        progressed = checkpoint_step(trial.user_attrs.get("output_dir")) > trial.user_attrs.get(RESUMED_FROM_STEP, 0)
        stalled = 0 if progressed else trial.system_attrs.get(TRIES_WITHOUT_PROGRESS, 0) + 1
        if stalled > self.max_tries_without_progress:
            return
        retried = copy.copy(trial)  # the retry inherits the stale trial's system attributes, this count included
        # a copy: Optuna appends to the retry history in place, which would change the caller's trial
        retried.system_attrs = {**copy.deepcopy(trial.system_attrs), TRIES_WITHOUT_PROGRESS: stalled}
        super().__call__(study, retried)


def resume_from_retried(sweep: Sweep, trial: optuna.Trial, args: dict) -> int:
    """For a retry of a killed trial whose folder holds a checkpoint of these same arguments: move that folder to
    this trial's, so its run resumes there; the step it resumes from (0: it starts afresh)."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    earlier = RetryHeartbeatStaleTrialCallback.retry_history(frozen)  # the tries before this one, oldest first
    # user attributes carry over to a retry
    if not earlier or not same_computation(trial.user_attrs.get("args", {}), args):
        return 0
    killed = sweep.trial_dir(earlier[-1])
    step = checkpoint_step(killed)
    if not step:
        return 0
    target = sweep.trial_dir(trial.number)
    if target.exists():
        shutil.rmtree(target)
    killed.rename(target)
    print(f"  trial {trial.number} resumes trial {earlier[-1]}'s run from its last checkpoint", flush=True)
    return step


def trial_arguments(sweep: Sweep, params: dict) -> dict:
    """train.py arguments of a trial with these parameters, but for its output_dir: the test split never evaluated,
    no weights saved."""
    return apply_params({"report_to": "none", **RESUMABLE, **sweep.base}, params) | {
        "do_test": False, "do_predict": False, "save_model": False}


def objective(sweep: Sweep, trial: optuna.Trial) -> float:
    params = suggest(trial, sweep.space)
    args = trial_arguments(sweep, params)
    resumed_from = resume_from_retried(sweep, trial, args)
    output_dir = sweep.trial_dir(trial.number)
    trial.set_user_attr("output_dir", str(output_dir))
    trial.set_user_attr(RESUMED_FROM_STEP, resumed_from)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    trial.set_user_attr("args", args)
    args |= {"output_dir": str(output_dir), "overwrite_output_dir": not resumed_from}
    try:
        value = run(*parse_dict(PARSED_TYPES, args), callbacks=[PruningCallback(trial)])[OBJECTIVE]
    except TrainingDiverged as err:
        value, reason = math.nan, str(err)
    else:
        reason = f"{OBJECTIVE} is {value}"
    finally:
        # A pruned or failed trial is never resumed: its checkpoint goes (6 GB for the 0.5B decoder's full
        # fine-tuning). A killed one never gets here, and keeps its checkpoint for its retry.
        RunDirectory(output_dir).remove_checkpoints()
    if not math.isfinite(value):
        # A setting that diverges (too high a learning rate) is a bad trial, not a broken sweep: it ends as
        # pruned, counts towards n_trials, and the study goes on.
        trial.set_user_attr("diverged", reason)
        raise optuna.TrialPruned(f"diverged: {reason}")
    return value


def open_study(sweep: Sweep, worker: int = 0):
    """Create or load the study: TPE sampler, median pruner, heartbeats so a killed trial is retried. The
    sampler's seed is the file's, offset by the worker's index and by the trials the study already holds
    (:func:`sampler_args`)."""
    if sweep.storage.startswith("sqlite:///"):
        Path(sweep.storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    pruner = dict(sweep.pruner)
    pruner_class = PRUNERS[pruner.pop("type", "median")]
    for attempt in range(3):
        try:
            storage = RDBStorage(sweep.storage, heartbeat_interval=sweep.heartbeat_seconds,
                                 grace_period=2 * sweep.heartbeat_seconds,
                                 heartbeat_stale_trial_callback=RetryKilledTrial(max_retry=2),
                                 engine_kwargs={"connect_args": {"timeout": 60}}
                                 if sweep.storage.startswith("sqlite") else {})
            break
        except sqlalchemy.exc.ArgumentError as err:  # not a database URL
            raise InvalidArgument(f"storage {sweep.storage!r}: {err}") from None
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):
            # another process is creating a new database's tables (or stamping its version) at the same time
            if attempt == 2:
                raise
            time.sleep(1 + attempt)
    try:
        existing = len(storage.get_all_trials(storage.get_study_id_from_name(sweep.study_name), deepcopy=False))
    except KeyError:  # a new study
        existing = 0
    study = optuna.create_study(
        study_name=sweep.study_name, storage=storage, load_if_exists=True, direction="maximize",
        sampler=optuna.samplers.TPESampler(**sampler_args(sweep.sampler, worker, existing)),
        pruner=pruner_class(**pruner))
    study.set_user_attr("cell", sweep.cell_key)  # for readers of the storage alone (the report)
    return study


def sampler_args(sampler: dict, worker: int, existing_trials: int = 0) -> dict:
    """The sweep file's TPE arguments, the seed offset by the worker's index and by 1000 per trial the study
    already holds: with one seed, concurrent workers drew the same random startup trials, and a restarted
    worker drew again what it drew before its restart (a duplicate, once that trial's retry had run). Worker 0
    of a new study keeps the file's seed."""
    if sampler.get("seed") is None:
        return sampler
    return sampler | {"seed": sampler["seed"] + worker + 1000 * existing_trials}


def counted_trials(study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def run_sweep(sweep: Sweep, n_trials: int | None = None, worker: int = 0) -> dict | None:
    """Run trials until the study holds ``n_trials`` finished ones (shared with any other worker, ``worker``
    being this one's index), then write the best trial to the selection file; returns that entry (None while
    no trial completed)."""
    target = n_trials or sweep.n_trials
    study = open_study(sweep, worker)
    done = counted_trials(study)
    print(f"study {sweep.study_name}: {done} of {target} trials finished", flush=True)
    while counted_trials(study) < target:
        try:
            study.optimize(
                lambda trial: objective(sweep, trial), gc_after_trial=True,
                callbacks=[optuna.study.MaxTrialsCallback(target, states=(TrialState.COMPLETE, TrialState.PRUNED)),
                           _print_trial])
        except ValueError as err:
            if "Cannot tell a FAIL trial" not in str(err):
                raise
            # This worker's trial was failed under it: the worker stalled past the heartbeat's grace period (a
            # paused process, a suspended machine) and another worker, taking it for killed, queued its retry.
            print("  this worker's trial was taken for killed and is retried; the worker goes on", flush=True)
    return write_selection(sweep, study)


def _print_trial(study, trial) -> None:
    value = "pruned" if trial.value is None else f"{OBJECTIVE} {trial.value:.4f}"
    print(f"  trial {trial.number} {trial.state.name.lower()}: {trial.params} -> {value}", flush=True)


def write_selection(sweep: Sweep, study) -> dict | None:
    """The best complete trial's parameters, under the cell's key, in the selection file (other cells kept)."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trial
    entry = {"study": sweep.study_name, "storage": sweep.storage, "trial": best.number, OBJECTIVE: best.value,
             "trials_finished": counted_trials(study), "run_dir": best.user_attrs.get("output_dir"),
             "params": dict(best.params)}
    path = Path(sweep.selection_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:  # several sweeps may finish at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        selection = read_selection(path)
        selection[sweep.cell_key] = entry
        write_text(path, "# Written by python -m peftlab.sweep: the best validation trial of each swept cell.\n"
                         + yaml.safe_dump(dict(sorted(selection.items())), sort_keys=False))
    print(f"selected for {sweep.cell_key}: trial {best.number}, {OBJECTIVE} {best.value:.4f}, {best.params}")
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="sweep YAML file")
    parser.add_argument("--n_trials", type=positive_int,
                        help="finished trials wanted in the study (default: the file's)")
    parser.add_argument("--storage", help="Optuna database URL, overriding the file's (share a study across machines)")
    parser.add_argument("--worker", type=non_negative_int, default=0,
                        help="this worker's index among several sharing the study (0, 1, ...): offsets the sampler's "
                             "seed, so concurrent workers do not draw the same trials")
    args = parser.parse_args(argv)
    sweep = load_sweep(args.sweep)
    if args.storage:
        sweep.storage = args.storage
    run_sweep(sweep, args.n_trials, args.worker)
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
