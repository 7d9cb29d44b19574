"""Experiment grids: models x datasets x methods x seeds from one YAML file, run through train.py's code.

A grid file looks like::

    output_root: runs/task2
    defaults: {num_train_epochs: 3, bf16: true, report_to: none}
    models:
      minilm: {slot: bert-base-uncased, model_name_or_path: all-MiniLM-L6-v2, learning_rate: 1.0e-4}
      qwen: {model_name_or_path: Qwen2.5-Coder-0.5B-Instruct, methods: [lora-r8], datasets: [acl_sup]}
    datasets: [restaurant_sup, acl_sup]
    methods:
      full: {tuning_method: full}
      lora-r8: {tuning_method: lora, lora_r: 8, lora_alpha: 16, learning_rate: 5.0e-4}
    seeds: [1, 2, 3]
    seeds_by_dataset: {acl_sup: [1, 2, 3, 4, 5]}  # more seeds where the test split is small (a model's own
                                                  # seeds: [...] wins over both)
    overrides:                      # cuts for single cells, stated in the report
      - match: {model: minilm, dataset: agnews_sup}
        set: {max_train_samples: 2000}
      - match: {model: minilm, method: [lora-r8, adapter]}   # a list: any of its values
        set: {modules_to_save: pooler}
    selection: configs/selected.yaml  # settings chosen by sweeps (peftlab.sweep), per model/dataset/method
    require_selection: true           # run only cells with selected settings (the others wait for their sweep)
    transfers:                        # cells that were not swept take a swept cell's settings
      - match: {model: minilm, method: lora-r8}
        from: {method: lora-r16}
    collapse_retry:                   # a transferred cell whose first finished run collapsed (one class predicted
      learning_rate_factor: 0.5       # on validation) runs again at learning_rate x factor, at most max_retries
      max_retries: 2                  # times; each collapsed run is kept in kept_in/<model>/<dataset>/<method>/
      kept_in: runs/collapsed

Arguments merge in this order: defaults, the model's, the method's, the cell's selected settings
(its own, or those of the cell its transfer names), overrides; then a transferred cell's learning rate
takes the collapse rule's factor once per run of the cell it set aside (:func:`learning_rate_factor`).

A grid can build on another: ``extends: configs/grids/assignment.yaml`` takes that file's keys, each
replaced by this file's where it sets one, except ``defaults``, which merge key by key (this file's win).

Each run gets ``output_root/<model>/<dataset>/<method>/seed<k>/`` with its arguments in
``grid_args.json``; ``python train.py that/grid_args.json`` reproduces it alone. A finished run
whose arguments are unchanged is skipped. Every run saves a checkpoint at each epoch's end and every 15
minutes (``runrecord.RESUMABLE``, under the defaults), and a run that was killed resumes from the last, so a
killed grid loses at most 15 minutes of the run in flight. Several workers may run the same grid
command at once (on one machine, or machines sharing the folder): each takes the next run no other
live worker holds (:func:`claim`); ``--shard i/n`` splits the grid between them statically instead.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from .cli import parse_dict
from .errors import (
    USER_ERROR_EXIT_CODE,
    USER_ERROR_PREFIX,
    InvalidArgument,
    MissingFile,
    exit_on_user_error,
    user_error_message,
)
from .metrics import collapsed
from .runrecord import (
    FINISHED,
    GRID_ARGS_FILE,
    GRID_COORDINATES_FILE,
    GRID_LOG_FILE,
    RESUMABLE,
    RunDirectory,
    host_label,
    same_computation,
    same_execution,
    write_json,
)
from .selection import apply_params, cell_key, read_selection
from .training import PARSED_TYPES

# Keys of a model entry that describe the grid, not train.py: the assignment's model it stands in for,
# the subsets of datasets and methods it runs (default: all of the grid's), and its own seeds.
MODEL_METADATA = ("slot", "datasets", "methods", "seeds")
# train.py arguments whose default follows the host (bf16: on where bf16 matmuls are native). A grid
# must set them, or the seeds of one cell could train in different precisions on different machines.
HOST_DEPENDENT_ARGS = ("bf16",)
CLAIMS_DIR = ".claims"  # under output_root: one lock file per run (:func:`claim`)


@dataclass(frozen=True, eq=False)  # hashed by identity: a run is one place in one grid
class GridRun:
    model: str
    dataset: str
    method: str
    seed: int
    args: dict  # every train.py argument of this run, output_dir included
    settings: dict | None = None  # where selected settings came from: {from: cell key, study, trial, run_dir}

    @property
    def output_dir(self) -> Path:
        return Path(self.args["output_dir"])

    @property
    def directory(self) -> RunDirectory:
        return RunDirectory(self.output_dir)

    @property
    def label(self) -> str:
        return f"{self.model} {self.dataset} {self.method} seed{self.seed}"

    def status(self) -> str:
        """``done``, ``todo``, ``incomplete`` (started, not finished: killed, failed, or files cut short) or
        ``changed`` (finished with other arguments)."""
        grid_args = self.directory.grid_args()
        if grid_args is None:
            return "incomplete" if self.output_dir.exists() and any(self.output_dir.iterdir()) else "todo"
        if self.directory.state() != FINISHED:
            return "incomplete"
        return "done" if self.same_arguments(grid_args) else "changed"

    def same_arguments(self, grid_args: dict) -> bool:
        """Whether a run with ``grid_args`` computes what this one does (:func:`runrecord.same_computation`)."""
        return same_computation(grid_args, self.args)

    def checkpoint(self) -> Path | None:
        """The newest checkpoint that a killed run of these same arguments left, to resume from."""
        grid_args = self.directory.grid_args()
        return self.directory.last_checkpoint() if grid_args and self.same_arguments(grid_args) else None

    @property
    def cell(self) -> dict:
        return {"model": self.model, "dataset": self.dataset, "method": self.method}

    @property
    def swept(self) -> bool:
        """Whether the run's settings come from its own cell's sweep (not transferred from another cell's)."""
        return self.settings is not None and self.settings["from"] == cell_key(self.cell)


def read_grid_file(path: str | Path) -> dict:
    """A grid file's keys, over those of the file it ``extends`` (defaults merged key by key)."""
    if not Path(path).is_file():
        raise MissingFile(f"no grid file {path}")
    grid = yaml.safe_load(Path(path).read_text()) or {}
    if "extends" not in grid:
        return grid
    parent = read_grid_file(grid.pop("extends"))
    return {**parent, **grid, "defaults": {**parent.get("defaults", {}), **grid.get("defaults", {})}}


def valid_collapse_rule(rule) -> bool:
    return (isinstance(rule, dict) and set(rule) == {"learning_rate_factor", "max_retries", "kept_in"}
            and isinstance(rule["learning_rate_factor"], float) and 0 < rule["learning_rate_factor"] < 1
            and isinstance(rule["max_retries"], int) and rule["max_retries"] >= 1)


def load_grid(path: str | Path) -> dict:
    grid = read_grid_file(path)
    missing = {"output_root", "models", "datasets", "methods", "seeds"} - set(grid or {})
    if missing:
        raise InvalidArgument(f"{path}: grid file lacks {sorted(missing)}")
    rule = grid.get("collapse_retry")
    if rule is not None and not valid_collapse_rule(rule):
        raise InvalidArgument(f"{path}: collapse_retry needs learning_rate_factor in (0, 1), max_retries >= 1 and "
                              f"kept_in, got {rule}")
    runs = expand(grid)
    unpinned = sorted({key for run in runs for key in HOST_DEPENDENT_ARGS if key not in run.args})
    if unpinned:
        raise InvalidArgument(f"{path}: set {unpinned} (e.g. under defaults): their default depends on the host")
    for run in runs:  # as train.py will parse them: a misspelt key, dataset or value fails now, not in every run
        try:
            parse_dict(PARSED_TYPES, run.args)
        except InvalidArgument as err:
            raise InvalidArgument(f"{path}: {run.label}: {err}") from None
    return grid


def matches(coords: dict, match: dict) -> bool:
    """Whether a run's coordinates fit a transfer's or override's ``match``: each key equal to its value, or
    to one of them where the value is a list."""
    return all(coords.get(key) in (value if isinstance(value, list) else [value]) for key, value in match.items())


def selected_settings(grid: dict, selection: dict, coords: dict) -> tuple[dict, dict | None]:
    """(search-space parameters, their provenance) for a cell: its own sweep's, else a transfer's."""
    sources = [coords] + [{**coords, **transfer["from"]} for transfer in grid.get("transfers", [])
                          if matches(coords, transfer["match"])]
    for source in sources:
        entry = selection.get(cell_key(source))
        if entry is not None:
            return entry["params"], {"from": cell_key(source), "study": entry["study"], "trial": entry["trial"],
                                     "run_dir": entry.get("run_dir")}
    return {}, None


def set_aside_folder(grid: dict, cell: dict) -> Path:
    """Where the collapse rule keeps a cell's collapsed runs."""
    return Path(grid["collapse_retry"]["kept_in"]) / cell["model"] / cell["dataset"] / cell["method"]


def runs_set_aside(grid: dict, cell: dict) -> int:
    folder = set_aside_folder(grid, cell)
    return sum(1 for _ in folder.iterdir()) if folder.is_dir() else 0


def collapse_rule_applies(grid: dict, cell: dict, settings: dict | None) -> bool:
    """Whether the grid has the collapse rule and the cell's settings were transferred: a cell swept itself keeps
    the learning rate its sweep chose on validation."""
    return "collapse_retry" in grid and settings is not None and settings["from"] != cell_key(cell)


def learning_rate_factor(grid: dict, cell: dict, settings: dict | None) -> float:
    """The collapse rule's factor on a cell's learning rate: ``learning_rate_factor`` to the power of the runs the
    rule set aside for the cell (1 where the rule does not apply)."""
    if not collapse_rule_applies(grid, cell, settings):
        return 1.0
    return grid["collapse_retry"]["learning_rate_factor"] ** runs_set_aside(grid, cell)


def default_learning_rate() -> float:
    from transformers import TrainingArguments

    return TrainingArguments.__dataclass_fields__["learning_rate"].default


def expand(grid: dict) -> list[GridRun]:
    """Every run of the grid in a fixed order, with its merged arguments."""
    selection = read_selection(grid["selection"]) if grid.get("selection") else {}
    runs = []
    for model, model_entry in grid["models"].items():
        model_args = {k: v for k, v in model_entry.items() if k not in MODEL_METADATA}
        for dataset in model_entry.get("datasets", grid["datasets"]):
            for method in model_entry.get("methods", list(grid["methods"])):
                method_args = grid["methods"][method]
                cell = {"model": model, "dataset": dataset, "method": method}
                params, settings = selected_settings(grid, selection, cell)  # one cell, one setting
                factor = learning_rate_factor(grid, cell, settings)
                if factor != 1:
                    settings = {**settings, "learning_rate_factor": factor}
                seeds = model_entry.get("seeds") or grid.get("seeds_by_dataset", {}).get(dataset, grid["seeds"])
                for seed in seeds:
                    coords = {**cell, "seed": seed}
                    args = apply_params({**RESUMABLE, **grid.get("defaults", {}), **model_args, **method_args},
                                        params)
                    for override in grid.get("overrides", []):
                        if matches(coords, override["match"]):
                            args.update(override["set"])
                    if factor != 1:
                        args["learning_rate"] = args.get("learning_rate", default_learning_rate()) * factor
                    args.update(dataset_name=dataset, seed=seed,
                                output_dir=str(Path(grid["output_root"]) / model / dataset / method / f"seed{seed}"))
                    runs.append(GridRun(model, dataset, method, seed, args, settings))
    return runs


def shard(runs: list[GridRun], spec: str | None) -> list[GridRun]:
    """``i/n``: every n-th run of the whole grid starting at i (0-based), so shards 0..n-1 cover the grid once,
    and a run's shard does not depend on ``--only`` filters: workers that filter differently never share a run."""
    if not spec:
        return runs
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:  # not two integers
        raise InvalidArgument(f"--shard {spec}: expected i/n, e.g. 0/2") from None
    if not 0 <= index < count:
        raise InvalidArgument(f"--shard {spec}: need 0 <= i < n")
    return runs[index::count]


def tokens_per_row(records: list[dict], dataset: str, model: str | None) -> float | None:
    """Mean training tokens per row on ``dataset`` in these run records: the same model's (its tokenizer) where it
    ran there, else any model's; None where none did."""
    there = [r for r in records if r["data_args"]["dataset_name"] == dataset and r.get("train_tokens_per_epoch")]
    same = [r for r in there if r["model_args"]["model_name_or_path"] == model] or there
    return sum(r["train_tokens_per_epoch"] / r["num_train_rows"] for r in same) / len(same) if same else None


@dataclass(frozen=True)
class Estimate:
    seconds: float
    hosts: frozenset[str]  # where the runs it comes from ran (:func:`host_label`): times differ ~5x between hosts

    @property
    def host_names(self) -> str:
        return " and ".join(sorted(self.hosts))


def estimate_time(run: GridRun, runs: list[GridRun]) -> Estimate | None:
    """Training seconds (per-epoch validation included), from finished runs (those that executed as this run will,
    where any did): the same cell's mean if it has any, else the seconds per trained token of the grid's runs of
    the same model and method (while the grid has none, of its runs at the same selected settings, the swept
    cell's; else of the sweep trial they came from) times this run's rows, tokens per row and epochs (rows and
    tokens per row known from a finished run or trial on the same dataset; per row where tokens per row are not
    known: ACL-ARC's rows are about twice restaurants')."""
    done = [other for other in runs if other.status() == "done"]

    def alike(members: list[GridRun]) -> list[RunDirectory]:
        # runs under other execution settings (compiled kernels, memory reuse) ran at other speeds: they time this
        # one only where none ran as it will
        same = [o for o in members if same_execution(o.directory.grid_args(), run.args)]
        return [o.directory for o in same or members]
    same_cell = alike([o for o in done if o.cell == run.cell])
    if same_cell:
        return Estimate(sum(d.metrics()["train_runtime"] for d in same_cell) / len(same_cell),
                        frozenset(host_label(d.record().get("hardware", {})) for d in same_cell))
    peers = alike([o for o in done if (o.model, o.method) == (run.model, run.method)])
    source = run.settings.get("run_dir") if run.settings else None
    if not peers and source:  # sweep trials ran beside other loads: the grid's own runs time it better
        peers = [o.directory for o in done if o.settings and o.settings.get("run_dir") == source]
        if not peers and RunDirectory(source).state() == FINISHED:
            peers = [RunDirectory(source)]
    records = {d: d.record() for d in {*(o.directory for o in done), *peers}}
    full_rows = [record["num_train_rows"] for record in records.values()
                 if record["data_args"]["dataset_name"] == run.dataset
                 and not record["data_args"].get("max_train_samples")]
    if not peers or not (full_rows or run.args.get("max_train_samples")):
        return None
    rows = min([*full_rows, run.args.get("max_train_samples") or float("inf")])
    length = tokens_per_row(list(records.values()), run.dataset, run.args.get("model_name_or_path"))
    by_token = length is not None and all(records[d].get("train_tokens_per_epoch") for d in peers)
    rates = [metrics["train_runtime"] / metrics["epoch"]
             / (records[d]["train_tokens_per_epoch"] if by_token else records[d]["num_train_rows"])
             for d, metrics in ((d, d.metrics()) for d in peers)]
    return Estimate(sum(rates) / len(rates) * rows * (length if by_token else 1) * run.args.get("num_train_epochs", 3),
                    frozenset(host_label(records[d].get("hardware", {})) for d in peers))


@contextlib.contextmanager
def claim(run: GridRun, output_root: str | Path) -> Iterator[int | None]:
    """This worker's hold on ``run``: an exclusive ``flock`` on ``<output_root>/.claims/<run>``, yielding the locked
    file descriptor, or None while another live worker holds the run. The lock ends with the last process holding
    it (the run's training process inherits it), killed or not, so a killed worker's run is free to be taken over
    (and resumed) at once; several workers can run one grid command side by side, each taking the next free run."""
    path = Path(output_root) / CLAIMS_DIR / f"{run.model}__{run.dataset}__{run.method}__seed{run.seed}"
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_CREAT | os.O_RDWR)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
        else:
            yield descriptor
    finally:
        os.close(descriptor)


def execute(run: GridRun, python: str = sys.executable, lock: int | None = None) -> int:
    """One run in a fresh process through train.py's code, which resumes from the checkpoint a killed run of the
    same arguments left (:meth:`GridRun.checkpoint`); its output goes to ``stdout.log``. The process inherits
    ``lock`` (:func:`claim`), so the run stays claimed while it trains, even if this process is killed."""
    resume = run.checkpoint() is not None
    if run.output_dir.exists() and not resume:
        shutil.rmtree(run.output_dir)  # an incomplete run: only status() decides we may get here
    run.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(run.output_dir / GRID_ARGS_FILE, run.args)
    write_json(run.output_dir / GRID_COORDINATES_FILE,
               {"model": run.model, "dataset": run.dataset, "method": run.method, "seed": run.seed,
                **({"settings": run.settings} if run.settings else {})})
    with (run.output_dir / GRID_LOG_FILE).open("a" if resume else "w") as log:
        return subprocess.run([python, "-m", "peftlab.training", str(run.output_dir / GRID_ARGS_FILE)],
                              stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(),
                              pass_fds=() if lock is None else (lock,)).returncode


def user_error(run: GridRun) -> str:
    """The one ``error:`` line a run that stopped on a user error printed last (:func:`errors.exit_on_user_error`)."""
    message = user_error_message((run.output_dir / GRID_LOG_FILE).read_text(errors="replace"))
    return "no error line" if message is None else USER_ERROR_PREFIX + message


def collapse_retry_due(grid: dict, run: GridRun, runs: list[GridRun]) -> bool:
    """Whether the collapse rule sets ``run`` aside: the grid has the rule, the run's settings were transferred, it
    finished collapsed on validation (:func:`metrics.collapsed`), no other run of its cell finished (the rule
    acts on a cell's first run, and so never leaves seeds at two learning rates), and retries are left."""
    if not collapse_rule_applies(grid, run.cell, run.settings):
        return False
    return (runs_set_aside(grid, run.cell) < grid["collapse_retry"]["max_retries"] and run.directory.state() == FINISHED
            and collapsed(run.directory.metrics())
            and not any(other.directory.state() == FINISHED for other in runs
                        if other.cell == run.cell and other.seed != run.seed))


def current(grid: dict, run: GridRun) -> GridRun:
    """The run as the grid gives it now: another worker's set-aside run may have lowered its cell's learning rate
    since the grid command expanded it."""
    return next(other for other in expand(grid) if other.label == run.label)


def set_aside(grid: dict, run: GridRun) -> GridRun:
    """Move a collapsed run into the rule's folder (kept, named by its seed and learning rate); returns the run
    anew, at the lower learning rate that the set-aside run now gives its cell."""
    target = set_aside_folder(grid, run.cell) / f"seed{run.seed}-lr{run.args['learning_rate']:.3g}"
    target.parent.mkdir(parents=True, exist_ok=True)
    run.output_dir.rename(target)
    coordinates = RunDirectory(target).grid_coordinates()  # marked, so that reports leave it out of its cell
    write_json(target / GRID_COORDINATES_FILE, {**coordinates, "set_aside": "collapsed"})
    again = current(grid, run)
    print(f"    {run.label} COLLAPSED (one class predicted on validation) at learning rate "
          f"{run.args['learning_rate']:.3g}: kept in {target}; runs again at {again.args['learning_rate']:.3g}",
          flush=True)
    return again


def run_order(runs: list[GridRun], seconds: dict[GridRun, float | None] | None = None) -> list[GridRun]:
    """The order a grid command takes its runs in: first the cells that were swept themselves (the validation
    protocol's evidence: their selected settings over seeds), then the others; each part seed by seed, seed 1 of
    every cell before seed 2 of any, so that a grid stopped early leaves every cell with results before any has its
    last seed; within that, longest first by ``seconds`` (:func:`estimate_time`; a run without an estimate
    counts as longest), so that a pass ends on short runs and the workers that find none left wait little for the
    last one (scripts/sweeps.sh waits for every worker between passes); ties in the grid file's order. One command's
    workers share the order with no wait between seeds: a worker done with the last run of seed 1 takes a run of
    seed 2 while another still trains."""
    seconds = seconds or {}
    return sorted(runs, key=lambda run: (not run.swept, run.seed, -(seconds.get(run) or math.inf)))


def select(runs: list[GridRun], filters: list[str] | None) -> list[GridRun]:
    """Keep runs matching every ``coordinate=value[,value...]`` filter (e.g. ``model=minilm``, ``seed=4,5``,
    ``swept=true``: the cells whose settings their own sweep selected): equal to one of its values. A value
    that no run of ``runs`` has is a typo, not an empty selection."""
    selected = runs
    for spec in filters or []:
        key, _, value = spec.partition("=")
        if key not in ("model", "dataset", "method", "seed", "swept") or not value:
            raise InvalidArgument(f"--only {spec}: expected KEY=VALUE, KEY one of model, dataset, method, seed, swept")
        wanted = value.lower().split(",")
        if key == "swept":  # true may match no run (a model without sweeps): only the value can be a typo
            if value.lower() not in ("true", "false"):
                raise InvalidArgument(f"--only {spec}: swept is true or false")
        else:
            known = [str(v).lower() for v in sorted({getattr(run, key) for run in runs})]
            unknown = [v for v in wanted if v not in known]
            if unknown:
                raise InvalidArgument(f"--only {spec}: the grid has no {key} {', '.join(unknown)}; "
                                      f"it has {', '.join(known)}")
        selected = [run for run in selected if str(getattr(run, key)).lower() in wanted]
    return selected


def run_grid(path: str, shard_spec: str | None = None, dry_run: bool = False, rerun_changed: bool = False,
             filters: list[str] | None = None) -> int:
    grid = load_grid(path)
    runs = expand(grid)
    chosen = set(select(runs, filters))  # filters name the grid's values, whichever shard holds them
    selected = [run for run in shard(runs, shard_spec) if run in chosen]
    estimates = {run: estimate_time(run, runs) for run in selected}
    mine = run_order(selected, {run: estimate.seconds for run, estimate in estimates.items() if estimate})
    if grid.get("require_selection"):
        waiting = [run for run in mine if run.settings is None]
        if waiting:
            cells = sorted({f"{r.model}/{r.dataset}/{r.method}" for r in waiting})
            print(f"{len(waiting)} runs wait for selected settings (no sweep yet): {', '.join(cells)}", flush=True)
        mine = [run for run in mine if run.settings is not None]
    statuses = {run: run.status() for run in mine}
    changed = [run for run, status in statuses.items() if status == "changed"]
    if changed and not rerun_changed:
        for run in changed:
            print(f"CHANGED {run.label}: {run.output_dir} finished with other arguments; kept", flush=True)
    todo = [run for run in mine if statuses[run] in ("todo", "incomplete") or (rerun_changed and run in changed)
            or (statuses[run] == "done" and collapse_retry_due(grid, run, runs))]
    statuses.update({run: "collapsed" for run in todo if statuses[run] == "done"})  # set aside when its turn comes
    print(f"{len(runs)} runs in the grid, {len(mine)} selected, {len(todo)} to run", flush=True)
    if dry_run:
        for run in mine:
            estimate = estimates[run]
            guess = f"~{estimate.seconds / 60:.1f} min on {estimate.host_names}" if estimate else "no estimate yet"
            print(f"  {statuses[run]:10s} {run.label}  ({guess})")
        timed = [estimates[r] for r in todo if estimates[r]]
        hours_by_hosts: dict[str, float] = {}
        for estimate in timed:
            hours_by_hosts[estimate.host_names] = hours_by_hosts.get(estimate.host_names, 0.0) + estimate.seconds / 3600
        print(f"estimated time of what is to run (Trainer train_runtime of finished runs or of the sweep trials "
              f"their settings came from, per-epoch validation included): "
              f"{sum(hours_by_hosts.values()):.2f} h"
              + "".join(f"; {hours:.2f} h of it at the speed of {hosts}" for hosts, hours in hours_by_hosts.items())
              + f" ({len(todo) - len(timed)} runs without an estimate)")
        return 0
    failures = 0
    for number, run in enumerate(todo, start=1):
        with claim(run, grid["output_root"]) as lock:
            if lock is None:
                print(f"[{number}/{len(todo)}] {run.label}: another worker runs it; skipped", flush=True)
                continue
            run = current(grid, run)
            status = run.status()  # another worker may have finished it since the list was made
            if status == "done" and collapse_retry_due(grid, run, runs):
                run = set_aside(grid, run)
            elif status == "done" or (status == "changed" and not rerun_changed):
                continue
            if status == "incomplete":
                checkpoint = run.checkpoint()
                print(f"resuming incomplete run {run.output_dir} from {checkpoint.name}" if checkpoint
                      else f"restarting incomplete run {run.output_dir}", flush=True)
            started = time.time()
            print(f"[{number}/{len(todo)}] {run.label} -> {run.output_dir}", flush=True)
            code = execute(run, lock=lock)
            while code == 0 and collapse_retry_due(grid, run, runs):
                run = set_aside(grid, run)
                code = execute(run, lock=lock)
        elapsed = (time.time() - started) / 60
        if code:
            failures += 1
            print(f"    {run.label} FAILED (exit {code}) after {elapsed:.1f} min; see {run.output_dir / GRID_LOG_FILE}"
                  + (f": {user_error(run)}" if code == USER_ERROR_EXIT_CODE else ""), flush=True)
            continue
        metrics = run.directory.metrics()
        # named again: workers sharing one log interleave their lines
        print(f"    {run.label} done in {elapsed:.1f} min: accuracy {metrics.get('accuracy', float('nan')):.4f}, "
              f"macro_f1 {metrics.get('macro_f1', float('nan')):.4f}", flush=True)
    return 1 if failures else 0


def _stop_on_sigterm(signum, frame):
    # SystemExit raised inside subprocess.run kills the run in flight: `kill <grid pid>` leaves no
    # orphaned training process behind (it would keep the CPU and write into a run directory)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    parser = argparse.ArgumentParser(description="Run an experiment grid (resumable).")
    parser.add_argument("grid", help="YAML grid file")
    parser.add_argument("--shard", help="i/n: run every n-th run of the grid from the i-th (0-based), before --only")
    parser.add_argument("--dry_run", "--dry-run", action="store_true",
                        help="list the runs, their status and estimated time")
    parser.add_argument("--rerun_changed", "--rerun-changed", action="store_true",
                        help="rerun finished runs whose arguments changed (default: keep them and say so)")
    parser.add_argument("--only", action="append", metavar="KEY=VALUE",
                        help="run only matching runs (model, dataset, method, seed, or swept=true for the cells "
                             "their own sweep selected settings for; several values comma-separated, e.g. "
                             "seed=4,5); repeatable, each must match")
    args = parser.parse_args(argv)
    return run_grid(args.grid, args.shard, args.dry_run, args.rerun_changed, args.only)


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
