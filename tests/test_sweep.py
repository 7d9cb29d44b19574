"""Sweeps: Optuna studies over train.py runs, tuned on validation, resumable, shared between processes."""

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import yaml
from optuna.trial import TrialState

from peftlab.errors import InvalidArgument
from peftlab.experiments import estimate_time, expand, load_grid, run_grid
from peftlab.report import load_studies, plot_sweeps, sweep_section
from peftlab.runrecord import FINISHED, RunDirectory, write_json
from peftlab.selection import read_selection
from peftlab.sweep import RetryKilledTrial, load_sweep, open_study, run_sweep


def sweep_file(tmp_path, model: str, data_dir, **changes) -> str:
    spec = {
        "study_name": "tiny-restaurant-full",
        "cell": {"model": "tiny", "dataset": "restaurant_sup", "method": "full"},
        "n_trials": 3,
        "storage": f"sqlite:///{tmp_path}/studies.db",
        "output_root": str(tmp_path / "sweeps"),
        "selection_file": str(tmp_path / "selected.yaml"),
        "sampler": {"seed": 0, "n_startup_trials": 2},
        "pruner": {"n_startup_trials": 1, "n_warmup_steps": 0},
        "heartbeat_seconds": 1,
        "base": {"model_name_or_path": model, "dataset_name": "restaurant_sup", "data_dir": str(data_dir),
                 "tuning_method": "full", "bf16": False, "seed": 1, "logging_steps": 1, "disable_tqdm": True},
        "space": {"learning_rate": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
                  "num_train_epochs": {"low": 2, "high": 4}},
        **changes,
    }
    path = tmp_path / f"{spec['study_name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.mark.parametrize(("base", "pattern"), [
    ({"num_train_epoch": 2}, r"Some keys are not used .*'num_train_epoch'"),
    ({"dataset_name": "restaurnt_sup"}, r"unknown dataset 'restaurnt_sup'"),
])
def test_a_sweep_whose_trials_train_py_would_refuse_fails_as_it_loads(tmp_path, base, pattern):
    spec = yaml.safe_load(Path(sweep_file(tmp_path, "m", "d")).read_text())
    path = sweep_file(tmp_path, "m", "d", base={**spec["base"], **base})
    with pytest.raises(InvalidArgument, match=r"tiny-restaurant-full\.yaml: " + pattern):
        load_sweep(path)


def test_a_sweep_whose_bounds_or_storage_make_no_sense_fails_as_it_loads(tmp_path):
    with pytest.raises(InvalidArgument, match="warmup_ratio"):  # the space's bounds too: a trial may take them
        load_sweep(sweep_file(tmp_path, "m", "d", space={"warmup_ratio": {"low": 0.0, "high": 1.5}}))
    with pytest.raises(InvalidArgument, match="storage 'studies.db': Could not parse"):  # a path, not a URL
        open_study(load_sweep(sweep_file(tmp_path, "m", "d", storage="studies.db")))


def study_of(path: str):
    sweep = load_sweep(path)
    return optuna.load_study(study_name=sweep.study_name, storage=sweep.storage)


def test_sweep_tunes_on_validation_and_writes_the_selection(tmp_path, tiny_models, fixture_data_dir, capsys):
    path = sweep_file(tmp_path, tiny_models["bert"], fixture_data_dir)
    entry = run_sweep(load_sweep(path))
    study = study_of(path)
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == 3
    best = study.best_trial
    assert entry["trial"] == best.number and entry["params"] == best.params and entry["study"] == study.study_name
    assert read_selection(tmp_path / "selected.yaml") == {"tiny/restaurant_sup/full": entry}
    run = RunDirectory(best.user_attrs["output_dir"])
    assert run.state() == FINISHED
    metrics, record = run.metrics(), run.record()
    assert metrics["validation_macro_f1"] == best.value
    assert "accuracy" not in metrics  # no trial ever sees the test split
    assert record["training_args"]["learning_rate"] == pytest.approx(best.params["learning_rate"])
    assert record["training_args"]["num_train_epochs"] == best.params["num_train_epochs"]
    # the report's sweep section and picture come from the study
    section = sweep_section(load_studies(load_sweep(path).storage), read_selection(tmp_path / "selected.yaml"),
                            plot_sweeps([study], tmp_path / "sweeps.png"))
    states = Counter(trial.state.name.lower() for trial in study.trials)
    counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
    assert (f"| tiny/restaurant_sup/full (study tiny-restaurant-full) | {counts} | {100 * best.value:.1f} "
            f"(trial {best.number}: learning_rate ") in section and section.splitlines()[2].endswith(
        f"| trial {best.number} | – |")  # no grid run of the cell yet
    assert (tmp_path / "sweeps.png").stat().st_size > 0
    # per-epoch validation scores are the trial's intermediate values (what the pruner compares)
    # (at epoch ends: a short trial also evaluates between them, for its curves)
    evals = [e["eval_macro_f1"] for e in run.log_history() if "eval_macro_f1" in e and e["epoch"] == int(e["epoch"])]
    assert list(best.intermediate_values.values()) == evals
    # the grid reads the selection file: the cell's runs take the chosen settings
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "output_root": str(tmp_path / "results"), "selection": str(tmp_path / "selected.yaml"),
        "defaults": {"bf16": False, "learning_rate": 5e-5}, "models": {"tiny": {"model_name_or_path": "m"}},
        "datasets": ["restaurant_sup"], "methods": {"full": {"tuning_method": "full"}}, "seeds": [1, 2]}))
    runs = expand(load_grid(grid))
    assert all(r.args["learning_rate"] == best.params["learning_rate"] for r in runs)
    assert all(r.settings == {"from": "tiny/restaurant_sup/full", "study": study.study_name, "trial": best.number,
                              "run_dir": entry["run_dir"]} for r in runs)
    # before any grid run finished, time estimates come from the trial the settings came from (same rows, epochs)
    assert estimate_time(runs[0], runs).seconds == pytest.approx(metrics["train_runtime"])
    # a cell that was not swept waits for its sweep (require_selection), or takes a transfer's settings
    spec = yaml.safe_load(grid.read_text())
    spec |= {"require_selection": True, "datasets": ["restaurant_sup", "acl_sup"],
             "seeds_by_dataset": {"acl_sup": [1, 2, 3]}}
    grid.write_text(yaml.safe_dump(spec))
    acl = [r for r in expand(load_grid(grid)) if r.dataset == "acl_sup"]
    assert [r.seed for r in acl] == [1, 2, 3] and all(r.settings is None for r in acl)
    assert all(r.args["learning_rate"] == 5e-5 for r in acl)
    assert run_grid(str(grid), dry_run=True) == 0
    assert "3 runs wait for selected settings (no sweep yet): tiny/acl_sup/full" in capsys.readouterr().out
    grid.write_text(yaml.safe_dump(spec | {"transfers": [{"match": {"dataset": "acl_sup"},
                                                          "from": {"dataset": "restaurant_sup"}}]}))
    acl = [r for r in expand(load_grid(grid)) if r.dataset == "acl_sup"]
    assert all(r.settings["from"] == "tiny/restaurant_sup/full" for r in acl)


def test_bad_trials_are_pruned_from_their_epoch_scores(tmp_path, tiny_models, fixture_data_dir):
    path = sweep_file(tmp_path, tiny_models["bert"], fixture_data_dir, n_trials=2,  # no trial can reach it
                      pruner={"type": "threshold", "lower": 1.01, "n_warmup_steps": 2})  # at epoch 2: all pruned
    assert run_sweep(load_sweep(path)) is None  # nothing completed, nothing selected
    trials = study_of(path).get_trials()
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    assert all(list(t.intermediate_values) == [1, 2] for t in trials)  # stopped after its second epoch
    assert not (tmp_path / "selected.yaml").exists()
    # the first epoch's checkpoint is gone with the trial: a pruned trial is never resumed
    assert not list((tmp_path / "sweeps").rglob("checkpoint-*"))


def sweep_process(path: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "peftlab.sweep", path], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_a_killed_sweep_resumes_its_study(tmp_path, tiny_models, fixture_data_dir):
    # long enough trials (tens of epochs of the tiny model) that the kill lands inside one
    path = sweep_file(tmp_path, tiny_models["bert"], fixture_data_dir, n_trials=3,
                      space={"learning_rate": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
                             "num_train_epochs": {"low": 15, "high": 20}})
    worker = sweep_process(path)
    deadline = time.time() + 240
    study = None
    while time.time() < deadline and worker.poll() is None:
        time.sleep(0.2)
        if not os.path.exists(tmp_path / "studies.db"):
            continue
        # the database may exist a moment before its tables and the study do
        with contextlib.suppress(KeyError, sqlalchemy.exc.OperationalError):
            study = study_of(path)
        trials = study.get_trials() if study else []
        running = [t for t in trials if t.state == TrialState.RUNNING and "output_dir" in t.user_attrs]
        if (any(t.state == TrialState.COMPLETE for t in trials) and running
                and RunDirectory(running[0].user_attrs["output_dir"]).last_checkpoint()):
            break
    assert worker.poll() is None, worker.communicate()[0][-3000:]  # inside its second trial, past an epoch
    os.killpg(worker.pid, signal.SIGKILL)  # mid-trial, as a stopped session or a lost machine would
    worker.wait()
    before = {t.number: t for t in study.get_trials()}
    complete = [n for n, t in before.items() if t.state == TrialState.COMPLETE]
    killed = [n for n, t in before.items() if t.state == TrialState.RUNNING]
    assert complete and len(killed) == 1
    stamps = {n: os.stat(before[n].user_attrs["output_dir"] + "/metrics.json").st_mtime_ns for n in complete}
    time.sleep(2.5)  # past the heartbeat's grace period: the killed trial is stale
    entry = run_sweep(load_sweep(path))
    after = study_of(path).get_trials()
    assert len([t for t in after if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == 3
    assert after[killed[0]].state == TrialState.FAIL  # and retried with the same settings
    retried = [t for t in after if t.system_attrs.get("failed_trial") == killed[0]]
    assert retried and retried[0].params == before[killed[0]].params
    # ... from the killed trial's last checkpoint: its folder became the retry's, and the epochs before the
    # checkpoint were reported to the retry, so the pruner saw every epoch
    resumed = RunDirectory(retried[0].user_attrs["output_dir"])
    assert resumed.record()["resumed_from_checkpoint"].startswith(str(resumed.path / "checkpoint-"))
    assert not os.path.exists(before[killed[0]].user_attrs["output_dir"])
    if retried[0].state == TrialState.COMPLETE:
        assert sorted(retried[0].intermediate_values) == list(range(1, retried[0].params["num_train_epochs"] + 1))
    for number, stamp in stamps.items():  # finished trials are not run again
        assert os.stat(before[number].user_attrs["output_dir"] + "/metrics.json").st_mtime_ns == stamp
    assert entry is not None and read_selection(tmp_path / "selected.yaml")


def test_a_killed_trial_is_retried_while_its_checkpoints_advance(tmp_path):
    """Every session's end kills a long trial mid-epoch: it is retried as often as its tries save a newer
    checkpoint than they started from, and gives up after two tries in a row that saved none."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/studies.db")
    folder = tmp_path / "trial"
    RunDirectory(folder).start({})  # a started run: its checkpoints are there to resume from
    retry = RetryKilledTrial(max_retry=2)
    distribution = optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)

    def kill(resumed_from: int, saved: int | None, system_attrs: dict) -> dict | None:
        """A try of the trial, resumed from ``resumed_from``, killed after saving ``saved`` (None: nothing):
        the system attributes of the retry the callback queued, or None."""
        if saved is not None:
            write_json(folder / f"checkpoint-{saved}" / "trainer_state.json", {"global_step": saved})
        killed = optuna.create_trial(state=TrialState.FAIL, params={"learning_rate": 1e-4},
                                     distributions={"learning_rate": distribution}, system_attrs=system_attrs,
                                     user_attrs={"output_dir": str(folder), "resumed_from_step": resumed_from})
        before = len(study.get_trials(states=(TrialState.WAITING,)))
        retry(study, killed)
        waiting = study.get_trials(states=(TrialState.WAITING,))
        assert len(waiting) in (before, before + 1)
        return waiting[-1].system_attrs if len(waiting) > before else None

    tries = kill(0, 10, {})  # the first try saved a checkpoint: retried
    for saved in (20, 30, 40):  # each session's end, after another epoch: always retried
        tries = kill(saved - 10, saved, tries)
        assert tries["tries_without_progress"] == 0
    assert len(tries["retry_history"]) == 4  # four retries of one trial (Optuna's max_retry=2 stopped at two)
    tries = kill(40, None, tries)  # killed before its next checkpoint: retried, counted
    assert tries["tries_without_progress"] == 1
    tries = kill(40, 50, tries)  # progress again: the count starts over
    assert tries["tries_without_progress"] == 0
    tries = kill(50, None, kill(50, None, tries))  # two tries in a row without a checkpoint: still retried
    assert tries["tries_without_progress"] == 2
    assert kill(50, None, tries) is None  # the third: the trial stays failed


def test_two_processes_share_one_sqlite_study(tmp_path, tiny_models, fixture_data_dir):
    path = sweep_file(tmp_path, tiny_models["bert"], fixture_data_dir, n_trials=4,
                      space={"learning_rate": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
                             "num_train_epochs": {"low": 4, "high": 5}})
    open_study(load_sweep(path))  # created once, as a user does before starting workers elsewhere
    workers = [sweep_process(path) for _ in range(2)]
    outputs = [worker.communicate(timeout=400)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    trials = study_of(path).get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert 4 <= len(finished) <= 5  # each worker stops once the study has its trials (one may be in flight)
    assert len({t.user_attrs["output_dir"] for t in trials}) == len(trials)  # one run directory per trial
    assert len({t.user_attrs["worker"] for t in finished}) == 2  # both did work


def test_a_diverging_trial_is_pruned_and_the_sweep_goes_on(tmp_path, tiny_models, fixture_data_dir):
    """A learning rate that blows the loss up to inf/NaN ends its trial, not the study."""
    path = sweep_file(tmp_path, tiny_models["bert"], fixture_data_dir, n_trials=2,
                      space={"learning_rate": {"low": 1.0e6, "high": 1.0e7, "log": True},
                             "num_train_epochs": {"low": 2, "high": 3}})
    assert run_sweep(load_sweep(path)) is None
    trials = study_of(path).get_trials()
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    assert all("training loss is" in t.user_attrs["diverged"] for t in trials)


def test_concurrent_workers_draw_different_trials(tmp_path, tiny_models, fixture_data_dir):
    """Workers sharing a study seed their samplers apart (the file's seed plus their index): one seed made two
    workers start the same random trials."""
    from peftlab.sweep import suggest

    path = sweep_file(tmp_path, tiny_models["bert"], fixture_data_dir)
    sweep = load_sweep(path)
    drawn = {}
    for worker in (0, 1):
        study = open_study(sweep, worker)
        trial = study.ask()
        drawn[worker] = suggest(trial, sweep.space)
        study.tell(trial, 0.5)
    assert drawn[0] != drawn[1]
    # worker 0 keeps the file's seed: a single-worker sweep draws what it always drew
    again = load_sweep(path)
    again.storage = f"sqlite:///{tmp_path / 'other.db'}"
    study = open_study(again)
    assert suggest(study.ask(), again.space) == drawn[0]
    # a restarted worker draws anew: drawing its first trial again duplicated a trial already run
    study = open_study(sweep, 0)
    assert suggest(study.ask(), sweep.space) not in drawn.values()


def stop_outside_a_write(process: subprocess.Popen, database) -> None:
    """SIGSTOP a worker at a moment it holds no write lock on the SQLite file (else the other worker would wait
    for the lock, not for the trial)."""
    while True:
        os.killpg(process.pid, signal.SIGSTOP)
        try:
            with contextlib.closing(sqlite3.connect(database, timeout=0.2)) as db:
                db.execute("BEGIN IMMEDIATE")
                db.rollback()
            return
        except sqlite3.OperationalError:
            os.killpg(process.pid, signal.SIGCONT)
            time.sleep(0.05)


def test_a_worker_paused_past_the_grace_period_goes_on(tmp_path, tiny_models, fixture_data_dir):
    """A worker stopped longer than the heartbeat's grace period finds its trial failed and retried by
    another worker when it resumes; it goes on (it crashed before) and ends with the study."""
    path = sweep_file(tmp_path, tiny_models["bert"], fixture_data_dir, n_trials=2,
                      space={"learning_rate": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
                             "num_train_epochs": {"low": 15, "high": 20}})
    open_study(load_sweep(path))
    paused = sweep_process(path)
    deadline = time.time() + 240
    while time.time() < deadline and paused.poll() is None:
        time.sleep(0.2)
        if any(t.state == TrialState.RUNNING and t.intermediate_values for t in study_of(path).get_trials()):
            break
    stop_outside_a_write(paused, tmp_path / "studies.db")
    time.sleep(2.5)  # past the grace period: the next worker fails the silent trial and retries it
    run_sweep(load_sweep(path), worker=1)
    os.killpg(paused.pid, signal.SIGCONT)
    output = paused.communicate(timeout=240)[0]
    assert paused.returncode == 0, output[-3000:]
    assert "taken for killed and is retried" in output
    trials = study_of(path).get_trials()
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["worker"].endswith(f":{paused.pid}")
    assert any(t.system_attrs.get("failed_trial") == 0 for t in trials)
