"""The report: plots and ``reports/REPORT.md`` generated from run directories and prose files.

No result is typed by hand: tables come from :mod:`peftlab.results`, and the prose files
(``REPORT.template.md``, the main text, and ``APPENDIX.template.md``) cite a result with a placeholder
that is filled in from the runs or a generated table:

* ``{{metric:CELL/KEY}}``: ``mean ± std`` (percent) of a quality metric over seeds,
  e.g. ``{{metric:minilm/restaurant_sup/full/accuracy}}``;
* ``{{ci:CELL/KEY}}``: ``mean [low, high] (n=k)``, the mean with its 95% t interval over seeds (clipped to 0-100);
* ``{{diff:CELL/KEY}}``: the method against full fine-tuning of the same model and dataset, paired by
  seed, stated as a difference only where its 95% interval excludes zero;
* ``{{cost:CELL/KEY}}``: the median over seeds of a cost column (train_runtime, ...);
* ``{{selected:MODEL/DATASET/METHOD}}``: the settings a sweep selected for the cell, with their validation
  macro-F1, study and trial;
* ``{{file:PATH}}``: the text of a generated file (a benchmark or memory table), relative to the repo;
* ``{{cell:PATH|COLUMN=VALUE,...|COLUMN[|DECIMALS]}}``: the number that leads one cell of a generated table in
  PATH: the one row whose cells equal the given values, in the column named (a header may add `` (...)``),
  e.g. ``{{cell:reports/vram_cuda.md|model=Qwen2.5-3B,method=full|measured peak GiB|1}}``.

``CELL`` is ``MODEL/DATASET/METHOD`` for the fixed-settings runs, or ``validation:MODEL/DATASET/METHOD``
for the runs under the validation protocol: a sentence always says which runs it cites.

A placeholder that names nothing is an error, so the report never shows a stale or made-up figure.
Output is deterministic: the same inputs give the same bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter  # noqa: E402

from .errors import MissingFile, UserError, exit_on_user_error  # noqa: E402
from .markdown import read_tables, table  # noqa: E402
from .methods import (  # noqa: E402
    LORA_DEFAULT_TARGETS,
    baseline_label,
    get_method,
    method_argument_fields,
    method_sort_key,
)
from .results import (  # noqa: E402
    FIXED,
    VALIDATION,
    RunResult,
    aggregate,
    collect,
    difference_bounds,
    difference_statement,
    interval_excludes_zero,
    interval_text,
    markdown_table,
    mean_interval,
    mean_std,
    model_differences,
    paired_differences,
    pm,
    reference_host,
    seed_counts,
    seeds_text,
    write_csv,
)
from .runrecord import ADDED_ARGUMENTS, host_label  # noqa: E402
from .selection import DEFAULT_SELECTION_FILE, read_selection  # noqa: E402

matplotlib.rcParams["svg.hashsalt"] = "peftlab"  # deterministic output


def _curve(runs: list[RunResult], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Mean and std over seeds of a logged value against step (steps shared by every seed)."""
    series = []
    for run in runs:
        points = {entry["step"]: entry[key] for entry in run.log_history() if key in entry}
        if points:
            series.append(points)
    if not series:
        return None
    steps = sorted(set.intersection(*(set(s) for s in series)))
    values = np.array([[s[step] for step in steps] for s in series])
    return np.array(steps), values.mean(axis=0), values.std(axis=0, ddof=1) if len(series) > 1 else 0 * values[0]


def _save(fig, axes, title: str, path: Path) -> Path:
    # the legend beside the panels, never over the data
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80, bbox_inches="tight", metadata={"Software": None})  # no version stamp
    plt.close(fig)
    return path


def method_colours(labels) -> dict[str, tuple]:
    """One fixed colour per method for every figure of a report, in method order."""
    ordered = sorted(set(labels), key=method_sort_key)
    return {label: plt.cm.tab10(i % 10) for i, label in enumerate(ordered)}


def plot_curves(runs: list[RunResult], out_dir: Path, colours: dict, evaluated_on: str = "test",
                prefix: str = "curves") -> list[Path]:
    """Per (model, dataset): train loss, and accuracy and macro-F1 (percent) on the split the runs evaluated each
    epoch on, against step; one line per method in method order, in its colour (``colours``, one per method
    for the whole report); accuracy and macro-F1 on one y-range."""
    by_pair: dict[tuple[str, str], dict[str, list[RunResult]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        by_pair[run.model, run.dataset][run.method].append(run)
    paths = []
    for (model, dataset), methods in sorted(by_pair.items()):
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        axes[2].sharey(axes[1])  # accuracy and macro-F1 on one scale
        for method in sorted(methods, key=method_sort_key):
            members = methods[method]
            for axis, key in zip(axes, ("loss", "eval_accuracy", "eval_macro_f1"), strict=True):
                curve = _curve(members, key)
                if curve is None:
                    continue
                steps, mean, std = curve
                scale = 1 if key == "loss" else 100
                axis.plot(steps, scale * mean, marker="o" if key != "loss" else None, markersize=3,
                          color=colours[method], label=f"{method} (n={len(members)})")
                axis.fill_between(steps, scale * (mean - std), scale * (mean + std), alpha=0.2, color=colours[method])
                evaluated_loss = _curve(members, "eval_loss") if key == "loss" else None
                if evaluated_loss is not None:  # dashed: the evaluated split's loss at each evaluation
                    axis.plot(evaluated_loss[0], evaluated_loss[1], linestyle="--", marker="o", markersize=3,
                              color=colours[method])
        titles = (f"loss (train; dashed: {evaluated_on})", f"{evaluated_on} accuracy (%)",
                  f"{evaluated_on} macro-F1 (%)")
        for axis, title in zip(axes, titles, strict=True):
            axis.set_title(title)
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
        paths.append(_save(fig, axes, f"{model} on {dataset}: mean over seeds, band = ±1 std",
                           out_dir / f"{prefix}_{model}_{dataset}.png"))
    return paths


def plot_bars(rows: list[dict], out_dir: Path, colours: dict) -> list[Path]:
    """Per model: accuracy and macro-F1 (percent) by dataset and method, ±1 std error bars, methods in order and
    in their colours, one y-range for both panels fitted to the bars (not from zero: the differences show);
    rows with ``protocol`` fixed (untuned settings) hatched."""
    paths = []
    for model in sorted({row["model"] for row in rows}):
        mine = [row for row in rows if row["model"] == model]
        datasets = sorted({row["dataset"] for row in mine})
        methods = sorted({row["method"] for row in mine}, key=method_sort_key)
        fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
        width = 0.8 / len(methods)
        extent = []
        for axis, key in zip(axes, ("accuracy", "macro_f1"), strict=True):
            for i, method in enumerate(methods):
                cells = {row["dataset"]: row for row in mine if row["method"] == method}
                means = [100 * cells[d][f"{key}_mean"] if d in cells else np.nan for d in datasets]
                stds = [np.nan_to_num(100 * cells[d][f"{key}_std"]) if d in cells else 0 for d in datasets]
                bars = axis.bar(np.arange(len(datasets)) + i * width, means, width, yerr=stds, capsize=3,
                                label=method, color=colours[method])
                for bar, dataset in zip(bars, datasets, strict=True):
                    if cells.get(dataset, {}).get("protocol") == FIXED:
                        bar.set_hatch("//")
                extent += [m - s for m, s in zip(means, stds, strict=True)] + [
                    m + s for m, s in zip(means, stds, strict=True)]
            axis.set_xticks(np.arange(len(datasets)) + width * (len(methods) - 1) / 2, datasets)
            axis.set_title(f"{key} (%)")
            axis.grid(axis="y", alpha=0.3)
        low, high = np.nanmin(extent), np.nanmax(extent)
        margin = max(2.0, 0.05 * (high - low))
        axes[0].set_ylim(max(0.0, low - margin), min(100.0, high + margin))
        hatched = any(row.get("protocol") == FIXED for row in mine)
        title = f"{model}: test metrics, mean ± std over seeds" + (
            " (hatched: fixed settings, not tuned)" if hatched else "")
        paths.append(_save(fig, axes, title, out_dir / f"bars_{model}.png"))
    return paths


def headline_runs(runs: list[RunResult]) -> dict[tuple, list[RunResult]]:
    """Per (model, dataset, method): its runs under the validation protocol where it has any, else its
    fixed-settings runs (the reader sees which from ``RunResult.protocol``)."""
    cells: dict[tuple, dict[str, list[RunResult]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        cells[run.cell][run.protocol].append(run)
    return {cell: by_protocol.get(VALIDATION) or by_protocol[FIXED] for cell, by_protocol in sorted(cells.items())}


def headline_section(runs: list[RunResult], wanted: list = ()) -> str:
    """One row per model and method, one column per dataset: test macro-F1 and accuracy, each the mean with its
    95% t interval over seeds, clipped to 0-100; fixed-settings cells (no validation-protocol runs yet) marked †.
    ``wanted`` (the assignment grid's GridRuns) adds its cells that have no run yet, and a cell short of its
    validation-protocol seeds shows ``n=k of N``."""
    if not runs and not wanted:
        return "_no finished runs yet_\n"
    cells = headline_runs(runs)
    seeds_wanted = Counter((run.model, run.dataset, run.method) for run in wanted)
    shown = {*cells, *seeds_wanted}
    datasets = sorted({dataset for _, dataset, _ in shown})
    rows, complete = [], 0
    for model, method in sorted({(model, method) for model, _, method in shown},
                                key=lambda pair: (pair[0], method_sort_key(pair[1]))):
        row = [model, method]
        for dataset in datasets:
            cell = (model, dataset, method)
            members = cells.get(cell, [])
            validation = len(members) if members and members[0].protocol == VALIDATION else 0
            short = f" of {seeds_wanted[cell]}" if validation < seeds_wanted[cell] else ""
            complete += cell in seeds_wanted and not short
            if not members:
                row.append(f"– (n=0{short})" if short else "–")
                continue
            marker = "†" if members[0].protocol == FIXED else ""
            macro_f1, accuracy = (mean_interval([run.metrics[key] for run in members])
                                  for key in ("macro_f1", "accuracy"))
            row.append(f"{macro_f1} / {accuracy} (n={len(members)}{'' if marker else short}){marker}")
        rows.append(row)
    coverage = (f"{complete} of {len(seeds_wanted)} cells of the assignment's grid have all their seeds under the "
                "validation protocol; a cell short of them shows n=k of N, a † cell has none yet.\n\n"
                if seeds_wanted else "")
    return coverage + table(["model", "method", *datasets], rows) + row_caps(cells)


def row_caps(cells: dict[tuple, list[RunResult]]) -> str:
    """One line naming the training-row caps of the cells shown (``max_train_samples``), per model and dataset,
    and saying so wherever the methods compared on one model and dataset trained on different caps."""
    caps: dict[tuple, set] = defaultdict(set)
    for (model, dataset, _), members in cells.items():
        for run in members:
            caps[model, dataset].add(run.record["data_args"].get("max_train_samples"))
    capped = []
    for (model, dataset), values in sorted(caps.items()):
        if values == {None}:
            continue
        shown = ", ".join("all" if v is None else str(v) for v in sorted(values, key=lambda v: v or math.inf))
        capped.append(f"{model}/{dataset} {shown}" + (" (differs between its methods)" if len(values) > 1 else ""))
    return ("\nTraining rows capped (the same cap for every method of a model and dataset unless said): "
            + "; ".join(capped) + ". Every other cell trains on all its rows.\n") if capped else ""


PLACEHOLDER = re.compile(r"\{\{(metric|ci|diff|cost|file|cell|selected):([^}]+)\}\}")


def selected_text(entry: dict) -> str:
    settings = ", ".join(f"{key} {_setting(value)}" for key, value in entry["params"].items())
    return (f"{settings} (validation macro-F1 {100 * entry['validation_macro_f1']:.1f}; "
            f"study {entry['study']}, trial {entry['trial']})")


class UnfillablePlaceholder(UserError, LookupError):
    """A report template cites a result, file, table cell or setting that is not there (yet)."""


def table_cell(path: Path, target: str) -> str:
    """The number leading the cell ``target`` (``COLUMN=VALUE,...|COLUMN[|DECIMALS]``) names in a table of
    ``path``; exactly one row must match, and the cell must start with a number."""
    where, column, *decimals = target.split("|")
    conditions = dict(pair.split("=", 1) for pair in where.split(","))

    def index(header: list[str], name: str) -> int | None:
        return next((i for i, cell in enumerate(header) if cell == name or cell.startswith(name + " (")), None)

    cells = []
    for header, rows in read_tables(path.read_text()):
        columns = {name: index(header, name) for name in (*conditions, column)}
        if None not in columns.values():
            cells += [row[columns[column]] for row in rows
                      if all(row[columns[name]] == value for name, value in conditions.items())]
    if len(cells) != 1:
        raise UnfillablePlaceholder(f"{path}: {len(cells)} rows have {where} and a column {column!r}, not one")
    number = re.match(r"[-+]?\d[\d,]*(\.\d+)?", cells[0])
    if number is None:
        raise UnfillablePlaceholder(f"{path}: the {column!r} cell of {where} is {cells[0]!r}, not a number")
    text = number.group(0)
    return f"{float(text.replace(',', '')):.{int(decimals[0])}f}" if decimals else text


def fill_placeholders(text: str, runs: list[RunResult], repo_root: Path, selection: dict | None = None) -> str:
    by_cell: dict[tuple, list[RunResult]] = defaultdict(list)
    for run in runs:
        by_cell[(run.protocol, *run.cell)].append(run)
    rows = {(protocol, row["model"], row["dataset"], row["method"]): row
            for protocol in (FIXED, VALIDATION)
            for row in aggregate([run for run in runs if run.protocol == protocol])}
    differences: dict[tuple, dict] = {}  # (protocol, key) -> {cell: paired difference}, computed once each

    def paired(protocol: str, key: str) -> dict:
        if (protocol, key) not in differences:
            differences[protocol, key] = {
                (row["model"], row["dataset"], row["method"]): row
                for row in paired_differences([run for run in runs if run.protocol == protocol], key)}
        return differences[protocol, key]

    def substitute(match: re.Match) -> str:
        kind, target = match.groups()
        if kind in ("file", "cell"):
            relative, _, cell = target.partition("|")
            path = repo_root / relative
            if not path.is_file():
                raise UnfillablePlaceholder(f"report placeholder {match.group(0)}: no file {path}")
            return table_cell(path, cell) if kind == "cell" else path.read_text().rstrip("\n")
        if kind == "selected":
            if target not in (selection or {}):
                raise UnfillablePlaceholder(
                    f"report placeholder {match.group(0)}: no selected settings for {target}")
            return selected_text(selection[target])
        protocol, _, cell = target.rpartition(":")
        protocol = protocol or FIXED
        model, dataset, method, key = cell.split("/")
        row = rows.get((protocol, model, dataset, method))
        if row is None:
            raise UnfillablePlaceholder(f"report placeholder {match.group(0)}: no {protocol}-protocol runs for "
                                        f"{model}/{dataset}/{method}")
        if kind == "metric":
            return pm(row, key)
        if kind == "ci":
            return interval_text([run.metrics[key] for run in by_cell[(protocol, model, dataset, method)]])
        if kind == "diff":
            pair = paired(protocol, key).get((model, dataset, method))
            if pair is None:
                raise UnfillablePlaceholder(
                    f"report placeholder {match.group(0)}: no seeds shared with {baseline_label()}")
            return difference_statement(pair)
        if math.isnan(row[key]):
            raise UnfillablePlaceholder(
                f"report placeholder {match.group(0)}: no value (times need runs on the reference host)")
        return f"{row[key]:.0f}" if row[key] >= 10 else f"{row[key]:.2f}"

    return PLACEHOLDER.sub(substitute, text)


def configuration_section(runs: list[RunResult]) -> str:
    """The hyperparameters per (protocol, model, dataset, method) cell, from run.json: a column for each that
    varies between cells, one line for those every cell shares."""
    keys = [("training_args", "learning_rate"), ("training_args", "num_train_epochs"),
            ("training_args", "per_device_train_batch_size"), ("training_args", "warmup_ratio"),
            ("training_args", "weight_decay"), ("training_args", "lr_scheduler_type"), ("training_args", "bf16"),
            ("training_args", "optim"), ("training_args", "group_by_length"),
            ("training_args", "shuffle_length_groups"),
            ("data_args", "max_seq_length"), ("data_args", "max_train_samples")]
    # each method's own arguments, for the methods these runs used, then the one every PEFT method takes
    used = {run.record["method_args"]["tuning_method"] for run in runs}
    own_keys = [("method_args", name) for name in method_argument_fields() if any(
        name in get_method(method).argument_fields for method in used)]
    keys += own_keys + [("method_args", "modules_to_save")]
    cells = {}
    for run in runs:
        if (run.protocol, *run.cell) in cells:
            continue
        values = []
        for group, key in keys:
            value = run.record.get(group, {}).get(key)
            is_method_key = (group, key) in own_keys
            if is_method_key and key not in get_method(run.record["method_args"]["tuning_method"]).argument_fields:
                value = "–"
            elif value is None:  # the fields whose None means something
                value = "default" if is_method_key else {"max_train_samples": "all", "modules_to_save": "–",
                                                         "group_by_length": False,
                                                         **ADDED_ARGUMENTS}.get(key, value)
            values.append(value)
        source = (f"{run.settings['from']} ({run.settings['study']}, trial {run.settings['trial']})"
                  + collapse_factor_text(run.settings) if run.settings else "–")
        cells[(run.protocol, *run.cell)] = [*values, source]
    names = [key for _, key in keys] + ["settings from sweep"]
    varying = [i for i in range(len(names)) if len({str(v[i]) for v in cells.values()}) > 1]
    shared = "; ".join(f"{names[i]} {next(iter(cells.values()))[i]}" for i in range(len(names)) if i not in varying)
    defaults = "; ".join(f"{model_type}: {', '.join(modules)}" for model_type, modules in LORA_DEFAULT_TARGETS.items())
    return (table(["protocol", "model", "dataset", "method", *(names[i] for i in varying)],
                  ([*cell, *(values[i] for i in varying)] for cell, values in cells.items()))
            + f"\nShared by every cell: {shared}.\n"
            + f"\nLoRA's `default` target modules, by architecture (`LORA_DEFAULT_TARGETS`): {defaults}.\n")


def per_seed_section(runs: list[RunResult]) -> str:
    """Every run: its test scores and where it lives (the appendix's per-seed detail)."""
    return table(["protocol", "model", "dataset", "method", "seed", "accuracy", "macro-F1", "epochs",
                  "learning rate", "run directory"],
                 ([run.protocol, run.model, run.dataset, run.method, run.seed, f"{100 * run.metrics['accuracy']:.1f}",
                   f"{100 * run.metrics['macro_f1']:.1f}", f"{run.record['training_args']['num_train_epochs']:g}",
                   _setting(run.record["training_args"]["learning_rate"]), f"`{run.directory}`"]
                  for run in sorted(runs, key=lambda r: (r.protocol != VALIDATION, r.model, r.dataset,
                                                         method_sort_key(r.method), r.seed))))


def set_aside_section(runs: list[RunResult]) -> str:
    """The runs a grid's collapse rule set aside (configs/grids/assignment.yaml, ``collapse_retry``): each one's
    learning rate and validation score, the reason its cell ran again lower; the cell's tables hold its reruns."""
    if not runs:
        return "_the collapse rule set no run aside_\n"
    return table(["model", "dataset", "method", "seed", "learning rate", "epochs", "validation macro-F1",
                  "run directory"],
                 ([run.model, run.dataset, run.method, run.seed, _setting(run.record["training_args"]["learning_rate"]),
                   f"{run.record['training_args']['num_train_epochs']:g}",
                   f"{100 * run.metrics['validation_macro_f1']:.1f}", f"`{run.directory}`"] for run in runs))


def collapse_factor_text(settings: dict) -> str:
    """``, learning rate x0.5 (collapse rule)`` where the collapse rule lowered a cell's learning rate, else empty."""
    factor = settings.get("learning_rate_factor")
    return f", learning rate x{factor:g} (collapse rule)" if factor else ""


def transfer_text(settings: dict) -> str:
    """Where a transferred cell's settings came from, with the collapse rule's factor on its learning rate."""
    return f"transferred from {settings['from']}" + collapse_factor_text(settings)


def per_class_section(runs: list[RunResult]) -> str:
    """Per dataset, the test F1 of each class per cell: mean ± std over the runs that recorded it."""
    by_dataset: dict[str, list[RunResult]] = defaultdict(list)
    for run in runs:
        if any(key.startswith("f1_") for key in run.metrics):
            by_dataset[run.dataset].append(run)
    if not by_dataset:
        return "_no finished run has recorded per-class F1 yet_\n"
    blocks = []
    for dataset, members in sorted(by_dataset.items()):
        classes = members[0].record["label_names"]
        rows = []
        cells: dict[tuple, list[RunResult]] = defaultdict(list)
        for run in members:
            cells[(run.protocol, run.model, run.method)].append(run)
        for (protocol, model, method), group in sorted(
                cells.items(), key=lambda item: (item[0][0] != VALIDATION, item[0][1], method_sort_key(item[0][2]))):
            row = {}
            for name in classes:
                row[f"{name}_mean"], row[f"{name}_std"] = mean_std([run.metrics[f"f1_{name}"] for run in group])
            rows.append([protocol, model, method, len(group), *(pm(row, name) for name in classes)])
        blocks.append(f"`{dataset}`:\n\n" + table(["protocol", "model", "method", "n", *classes], rows).rstrip("\n"))
    return "\n\n".join(blocks) + "\n"


def environment_section(runs: list[RunResult]) -> str:
    """Checkpoints that actually ran per model key, hardware and versions (from run.json)."""
    first = {}
    for run in runs:
        first.setdefault(run.model, run)
    lines = table(["model key", "checkpoint that ran", "source"],
                  ([model, run.checkpoint, run.record["resolved_model"]["source"]]
                   for model, run in sorted(first.items()))).splitlines()
    reference = reference_host(runs)
    by_host: dict[str, list[RunResult]] = defaultdict(list)
    for run in runs:
        by_host[run.host].append(run)
    lines += ["", "Hardware seen in these runs (times in the tables come from the reference host's runs only):", ""]
    for host, members in sorted(by_host.items(), key=lambda item: item[0] != reference):
        hardware = members[0].record.get("hardware", {})
        threads = hardware.get("torch_threads")
        label = host_label(hardware) + (f", {threads} torch thread{'s' if threads > 1 else ''}" if threads else "")
        count = f"{len(members)} run{'s' if len(members) > 1 else ''}"
        if host == reference:
            lines.append(f"- {label}: {count}, the reference host (`{host}`)")
        else:
            names = ", ".join(f"{r.model}/{r.dataset}/{r.method}/seed{r.seed}" for r in members[:10])
            lines.append(f"- {label}: {count} ({names}{', ...' if len(members) > 10 else ''}; `{host}`)")
    versions = sorted({json.dumps(run.record.get("versions", {}), sort_keys=True) for run in runs})
    lines += ["", "Software versions seen in these runs:", ""] + [f"- `{v}`" for v in versions]
    return "\n".join(lines) + "\n"


def load_studies(storage: str | None) -> list:
    """Every Optuna study in ``storage`` (a sweep database), by name; none when there is no database."""
    if storage is None or (storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).is_file()):
        return []
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return [optuna.load_study(study_name=name, storage=storage)
            for name in sorted(optuna.study.get_all_study_names(storage))]


def _trial_score(trial) -> tuple[float, str] | None:
    """(validation macro-F1, how the trial ended): the final epoch's for a complete trial, the last epoch it
    reached for a pruned one."""
    if trial.state.name == "COMPLETE":
        return trial.value, "complete"
    if trial.state.name == "PRUNED" and trial.intermediate_values:
        return trial.intermediate_values[max(trial.intermediate_values)], "pruned, at its last epoch"
    return None


SWEEP_PANELS_PER_ROW = 4  # a model's four encoder sweeps side by side


def plot_sweeps(studies: list, path: Path) -> Path | None:
    """One panel per study, four to a row: each trial's validation macro-F1 against its learning rate (log
    scale), coloured by its epochs; pruned trials as crosses, at the last epoch they reached. Panels share the
    y-range; one legend, below them all."""
    scored_by_study = [[(trial, score) for trial in study.trials if (score := _trial_score(trial))]
                       for study in studies]
    if not any(scored_by_study):
        return None
    columns = min(SWEEP_PANELS_PER_ROW, len(studies))
    rows = math.ceil(len(studies) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(max(6.0, 4.2 * columns), 3.4 * rows + 0.4), sharey=True,
                             squeeze=False, layout="constrained")
    markers = {"complete": "o", "pruned, at its last epoch": "x"}
    epochs = [trial.params.get("num_train_epochs", 0) for scored in scored_by_study for trial, _ in scored]
    norm = matplotlib.colors.Normalize(min(epochs), max(epochs))  # one colour scale over every study's trials
    for axis, study, scored in zip(axes.flat, studies, scored_by_study, strict=False):
        for state, marker in markers.items():
            points = [(t.params["learning_rate"], 100 * score, t.params.get("num_train_epochs", 0))
                      for t, (score, how) in scored if how == state]
            if points:
                lr, score, trial_epochs = zip(*points, strict=True)
                axis.scatter(lr, score, c=trial_epochs, cmap="viridis", norm=norm, s=36, marker=marker)
        axis.set_xscale("log")
        # labelled ticks at 1 and 3 per decade: matplotlib labels every minor tick of a range under a decade wide,
        # and at this width those labels (2x10^-5, 3x10^-5, ...) overlap
        axis.xaxis.set_major_locator(LogLocator(subs=(1.0, 3.0)))
        axis.xaxis.set_minor_formatter(NullFormatter())
        if not scored:
            axis.text(0.5, 0.5, "no finished trial yet", transform=axis.transAxes, ha="center", color="grey")
            axis.set_xticks([])
        axis.set_title(study.study_name, fontsize=9)
        axis.set_xlabel("learning rate")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(studies):]:
        axis.set_visible(False)
    for row in axes:
        row[0].set_ylabel("validation macro-F1 (%),\nfinal epoch")
    colorbar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=axes, label="epochs")
    colorbar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(handles=[Line2D([], [], color="grey", marker=marker, linestyle="none", label=state)
                        for state, marker in markers.items()],
               loc="outside lower center", ncol=2, fontsize=8)  # below the panels, never over the points
    fig.savefig(path, dpi=80, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path


def sweep_section(studies: list, selection: dict, figure: Path | None, runs: list[RunResult] = ()) -> str:
    """What each study has tried, its best trial so far, what it selected once it had its trials, and the
    validation macro-F1 of the cell's seeds at the selected settings (``runs``): the selected trial is the best
    of many on one seed, so its own score is optimistic; the seeds' mean on the same held-out rows is not."""
    if not studies:
        return "_no sweep has run yet_\n"
    chosen = {entry["study"]: (cell, entry) for cell, entry in selection.items()}
    seeds_validation: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        if run.protocol == VALIDATION and "validation_macro_f1" in run.metrics:
            seeds_validation["/".join(run.cell)].append(run.metrics["validation_macro_f1"])
    rows, at_an_edge = [], False
    for study in studies:
        states = Counter(_trial_state(trial, study) for trial in study.trials)
        complete = [trial for trial in study.trials if trial.state.name == "COMPLETE"]
        best = max(complete, key=lambda trial: trial.value) if complete else None
        cell, entry = chosen.get(study.study_name, (study.user_attrs.get("cell", "–"), None))
        edges = {key: _range_edge(best, key) for key in best.params} if best else {}
        at_an_edge |= any(edges.values())
        named = cell if study.study_name == cell.replace("/", "-") else f"{cell} (study {study.study_name})"
        rows.append([named, ", ".join(f"{n} {state}" for state, n in sorted(states.items())),
                     f"{100 * best.value:.1f} (trial {best.number}: "
                     + ", ".join(f"{key} {_setting(value)}{edges[key]}" for key, value in best.params.items()) + ")"
                     if best else "–",
                     f"trial {entry['trial']}" if entry else "–",
                     interval_text(seeds_validation[cell]) if entry and seeds_validation[cell] else "–"])
    text = table(["cell the study selects for", "trials", "best validation macro-F1 so far", "selected",
                  "the cell's seeds at the selected settings: validation macro-F1"], rows)
    if at_an_edge:
        text += "\n[top of ...], [bottom of ...]: in the outer tenth of the searched range; the best may lie beyond.\n"
    return text + (f"\n![sweeps](figures/{figure.name})\n" if figure else "")


EDGE_FRACTION = 0.1  # a setting this close to a bound of its searched range, as a fraction of the range, is flagged


def _range_edge(trial, key: str) -> str:
    """`` [top of LOW..HIGH]`` or `` [bottom of ...]`` where ``trial``'s numeric setting ``key`` lies within
    EDGE_FRACTION of a bound of its distribution (log-scaled for a log-uniform one), else nothing."""
    import optuna

    distribution = trial.distributions.get(key)
    if not isinstance(distribution, optuna.distributions.FloatDistribution | optuna.distributions.IntDistribution):
        return ""
    low, high, value = distribution.low, distribution.high, trial.params[key]
    if distribution.log:
        low, high, value = math.log(low), math.log(high), math.log(value)
    if high == low:
        return ""
    position = (value - low) / (high - low)
    bounds = f"{_setting(distribution.low)}..{_setting(distribution.high)}"
    if position >= 1 - EDGE_FRACTION:
        return f" [top of {bounds}]"
    return f" [bottom of {bounds}]" if position <= EDGE_FRACTION else ""


def _trial_state(trial, study) -> str:
    """A trial's state for the sweep table. A RUNNING trial may be one a stopped worker left (the next sweep fails
    and retries it), so "unfinished"; a failed trial that a later trial retries (from its last checkpoint, if it
    saved one) was killed, by a session's end say, not failed by its settings: "killed and retried"."""
    if trial.state.name == "RUNNING":
        return "unfinished"
    if trial.state.name == "FAIL" and any(trial.number in other.system_attrs.get("retry_history", ())
                                          for other in study.trials):
        return "killed and retried"
    return trial.state.name.lower()


def _setting(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


FEW_PAIRS = 4  # up to this many, the validation finding names every pair, differing or not


def _cell_name(row: dict) -> str:
    return f"{row['model']} {row['dataset']} {row['method']}"


def seed_range(rows: list[dict]) -> str:
    """The fewest to the most seeds behind these differences (each side's cell where two models compare)."""
    counts = [count for row in rows for count in seed_counts(row)]
    return str(min(counts)) if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"


def differences_summary(rows: list[dict], nothing: str, pairs_noun: str = "method-cell pairs") -> str:
    """A finding's sentence over differences: a few pairs each named with their numbers; more counted, and those
    whose interval excludes zero named (the appendix lists every pair); ``nothing`` while there are none."""
    if not rows:
        return nothing

    def statements(named: list[dict]) -> str:
        return "; ".join(f"{_cell_name(row)} {difference_statement(row)}" for row in named)
    # one seed gives no interval: such pairs are counted apart, not as "no difference detected"
    tested = [row for row in rows if row["n"] > 1]
    waiting = len(rows) - len(tested)
    if not tested:
        return f"{waiting} {pairs_noun[:-1] if waiting == 1 else pairs_noun} with one seed so far, no interval yet."
    pending = f"; {waiting} more with one seed so far" if waiting else ""
    if len(tested) <= FEW_PAIRS:
        return statements(tested) + pending + "."
    detected = [row for row in tested if interval_excludes_zero(row)]
    pairs = f"{len(tested)} {pairs_noun} ({seed_range(tested)} seeds each)"
    if not detected:
        return f"no difference detected in the {pairs}{pending}."
    others = len(tested) - len(detected)
    return (f"{len(detected)} of {pairs} differ{'s' if len(detected) == 1 else ''}: {statements(detected)}; "
            f"no difference detected in the other {others}{pending}.")


def _finding_order(row: dict) -> tuple:
    return row["dataset"], row["model"], method_sort_key(row["method"])


def validation_differences_sentence(runs: list[RunResult]) -> str:
    """The summary's finding on the validation protocol: each method against full fine-tuning of the same model
    and dataset, test macro-F1 paired by seed."""
    rows = sorted(paired_differences([run for run in runs if run.protocol == VALIDATION]), key=_finding_order)
    return differences_summary(rows, "no method shares seeds with full fine-tuning of its cell yet (the grid runs "
                                     "them next).")


def rank_pairs(runs: list[RunResult]) -> list[dict]:
    """LoRA's ranks compared (the assignment compares three): each cell that took its settings from another rank
    (LoRA r=8 and r=32 from r=16, on AG News all three from the restaurant cell's r=16), against that rank on the
    same model and dataset, test macro-F1 paired by seed, under the validation protocol."""
    validation = [run for run in runs if run.protocol == VALIDATION]
    kinds = {run.cell: run.record["method_args"]["tuning_method"] for run in validation}
    sources = {}  # a cell -> the method of the same model and dataset whose settings it shares
    for run in validation:
        model, _, method = run.settings["from"].split("/") if run.settings else (None, None, None)
        peer = (run.model, run.dataset, method)
        if model == run.model and peer != run.cell and kinds.get(peer) == kinds[run.cell]:
            sources[run.cell] = method
    return sorted((row for source in sorted(set(sources.values()))
                   for row in paired_differences(validation, baseline=source)
                   if sources.get((row["model"], row["dataset"], row["method"])) == source), key=_finding_order)


def rank_differences_sentence(runs: list[RunResult]) -> str:
    """The summary's finding on LoRA's ranks (:func:`rank_pairs`)."""
    return differences_summary(rank_pairs(runs), "no rank shares seeds with the rank its settings came from yet.",
                               "rank-cell pairs")


def _model_cell(row: dict) -> str:
    return f"{row['dataset']} {row['method']}"


def model_pair_summary(rows: list[dict]) -> str:
    """One model against one smaller one over the cells both ran: each cell named with its difference while few
    have an interval; past that, the cells counted by direction, beside the range of their differences and the
    span of their intervals, and named only where few (the appendix gives every cell's interval)."""
    tested = [row for row in rows if row["n"] > 1]
    waiting = len(rows) - len(tested)
    pending = [f"{waiting} more with one seed so far"] if tested and waiting else []
    if not tested:
        return f"{waiting} cell{'s' if waiting > 1 else ''} with one seed so far, no interval yet"
    if len(tested) <= FEW_PAIRS:
        return "; ".join([f"{_model_cell(row)} {difference_statement(row)}" for row in tested] + pending)
    kinds = []
    for kind, found in (("higher", [row for row in tested if row["low"] > 0]),
                        ("lower", [row for row in tested if row["high"] < 0]),
                        ("no difference detected", [row for row in tested if not interval_excludes_zero(row)])):
        if not found:
            continue
        means = sorted(100 * row["mean"] for row in found)
        within = difference_bounds(min(row["low"] for row in found), max(row["high"] for row in found))
        details = [f"{means[0]:+.1f} points, 95% CI {within}" if len(found) == 1 else
                   f"{means[0]:+.1f} to {means[-1]:+.1f} points, each 95% CI within {within}"]
        if len(found) <= FEW_PAIRS:
            details.append(", ".join(_model_cell(row) for row in found))
        kinds.append(f"{kind} in {len(found)} ({'; '.join(details)})")
    return "; ".join([f"over {len(tested)} cells ({seed_range(tested)} seeds each), " + ", ".join(kinds)] + pending)


def model_differences_sentence(runs: list[RunResult]) -> str:
    """The summary's finding on the models: each against a smaller one on the same dataset, method and training
    rows, under the validation protocol (:func:`peftlab.results.model_differences`), per pair of models
    (:func:`model_pair_summary`)."""
    by_pair = defaultdict(list)
    for row in sorted(model_differences([run for run in runs if run.protocol == VALIDATION]), key=_finding_order):
        by_pair[(row["model"], row["baseline"])].append(row)
    if not by_pair:
        return "no two models share a dataset, method and training rows yet."
    return "; ".join(f"{model} against {baseline}: {model_pair_summary(rows)}"
                     for (model, baseline), rows in sorted(by_pair.items())) + "."


def protocol_section(runs: list[RunResult], selection: dict) -> str:
    """Per cell run under the validation protocol: the earlier fixed-settings runs beside the selected-settings
    runs, test macro-F1 and accuracy, mean ± std over seeds."""
    new = aggregate([run for run in runs if run.protocol == VALIDATION])
    if not new:
        return "_no run under the validation protocol has finished yet_\n"
    old = {(row["model"], row["dataset"], row["method"]): row for row in aggregate(
        [run for run in runs if run.protocol == FIXED])}
    fixed_settings = {}
    for run in runs:
        if run.protocol == FIXED:
            args = run.record["training_args"]
            fixed_settings[run.cell] = f"lr {_setting(args['learning_rate'])}, {args['num_train_epochs']:g} epochs"
    transferred = {run.cell: run.settings for run in runs if run.protocol == VALIDATION and run.settings}
    rows = []
    for row in new:
        cell = (row["model"], row["dataset"], row["method"])
        before = old.get(cell)
        entry = selection.get("/".join(cell))
        if entry:
            settings = selected_text(entry)
        elif cell in transferred:
            settings = transfer_text(transferred[cell])
        else:
            settings = "–"
        rows.append(["/".join(cell), fixed_settings.get(cell, "–"),
                     f"{pm(before, 'macro_f1')} / {pm(before, 'accuracy')} (n={before['n']})" if before else "–",
                     settings, f"{pm(row, 'macro_f1')} / {pm(row, 'accuracy')} (n={row['n']})"])
    text = table(["cell", "fixed settings", "fixed: test macro-F1 / accuracy", "selected settings (sweep)",
                  "selected: test macro-F1 / accuracy"], rows)
    validation = [run for run in runs if run.protocol == VALIDATION]
    comparisons = (
        ("Each method against full fine-tuning of the same model and dataset, then each LoRA rank against the rank "
         "whose settings it took, test macro-F1, paired by seed (the same held-out rows and data order), mean "
         "difference in points and its 95% t interval", ["model", "dataset", "method", "baseline", "n"],
         paired_differences(validation) + rank_pairs(runs)),
        ("Each model against a smaller one on the same dataset and method, where both trained on the same number of "
         "rows, test macro-F1: the difference of the means over seeds and its Welch 95% interval (different models "
         "share no data order, so their seeds do not pair)", ["dataset", "method", "model", "baseline", "seeds"],
         sorted(model_differences(validation), key=_finding_order)))
    for intro, columns, rows in comparisons:
        if rows:
            headers = [{"baseline": "vs", "n": "n seeds"}.get(column, column) for column in columns]
            text += f"\n{intro}:\n\n" + table(headers + ["difference"], (
                [seeds_text(row) if column == "seeds" else row[column] for column in columns]
                + [difference_statement(row)] for row in rows))
    return text


TEMPLATES = {"REPORT.template.md": "REPORT.md", "APPENDIX.template.md": "APPENDIX.md"}  # main text, appendix


MAIN_TEXT_BUDGET = 25_000  # bytes of REPORT.md a reader takes in; per-seed detail belongs in the appendix

CHECKS_FOLDER = "checks"  # under results/: quality checks of changed defaults (configs/grids/checks), not cells


def build_report(results_root: Path, prose_dir: Path, out_dir: Path, repo_root: Path,
                 studies_storage: str | None = None, selection_file: Path | None = None,
                 grid_file: Path | None = None) -> Path:
    """Write figures, ``results.csv``, ``REPORT.md`` and (when its template exists) ``APPENDIX.md`` into
    ``out_dir``; returns the path of ``REPORT.md``. Runs under ``<results_root>/checks`` are left out: they
    compare two settings of a default (``benchmarks/quality_check.py`` reports them)."""
    from .experiments import expand, load_grid

    collected = [run for run in collect(results_root)
                 if CHECKS_FOLDER not in run.directory.relative_to(results_root).parts[:1]]
    every_run = [run for run in collected if not run.set_aside]
    fixed = [run for run in every_run if run.protocol == FIXED]
    validation = [run for run in every_run if run.protocol == VALIDATION]
    fixed_rows = aggregate(fixed)
    headline = headline_runs(every_run)
    headline_rows = [row | {"protocol": members[0].protocol}
                     for members in headline.values() for row in aggregate(members)]
    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for stale in figures.glob("*.png"):  # the folder is generated whole: no figure of runs that are gone
        stale.unlink()
    write_csv([row | {"protocol": protocol} for protocol, runs in ((FIXED, fixed), (VALIDATION, validation))
               for row in aggregate(runs)], out_dir / "results.csv")
    colours = method_colours(run.method for run in every_run)  # one colour per method in every figure
    studies = load_studies(studies_storage)
    selection = read_selection(selection_file) if selection_file else {}

    def images(paths: list[Path]) -> str:
        return "\n".join(f"![{p.stem}](figures/{p.name})" for p in paths) + "\n"

    sections = {
        "results_table": markdown_table(fixed_rows) if fixed_rows else "_no finished runs yet_\n",
        "configurations": configuration_section(every_run) if every_run else "_no finished runs yet_\n",
        "environment": environment_section(every_run) if every_run else "_no finished runs yet_\n",
        "per_class": per_class_section(every_run),
        "per_seed": per_seed_section(every_run) if every_run else "_no finished runs yet_\n",
        "headline": headline_section(every_run, expand(load_grid(grid_file)) if grid_file else []),
        "curves": images(plot_curves(fixed, figures, colours)),
        "bars": images(plot_bars(headline_rows, figures, colours)),
        "sweeps": sweep_section(studies, selection, plot_sweeps(studies, figures / "sweeps.png"), every_run),
        "protocol": protocol_section(every_run, selection),
        "set_aside": set_aside_section([run for run in collected if run.set_aside]),
        "validation_differences": validation_differences_sentence(every_run),
        "rank_differences": rank_differences_sentence(every_run),
        "model_differences": model_differences_sentence(every_run),
        "protocol_curves": images(plot_curves(validation, figures, colours, "validation", prefix="protocol_curves"))
                           if validation else "_no run under the validation protocol has finished yet_\n",
    }
    for template_name, output_name in TEMPLATES.items():
        template_path = prose_dir / template_name
        if not template_path.is_file():
            continue
        text = template_path.read_text()
        for name, body in sections.items():
            text = text.replace(f"{{{{section:{name}}}}}", body.rstrip("\n"))
        (out_dir / output_name).write_text(fill_placeholders(text, every_run, repo_root, selection))
    return out_dir / "REPORT.md"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate reports/REPORT.md from the results.")
    parser.add_argument("--results", default="results", help="root of the run directories")
    parser.add_argument("--prose", default="reports", help="folder of REPORT.template.md")
    parser.add_argument("--out", default="reports", help="where REPORT.md, results.csv and figures/ go")
    parser.add_argument("--studies", help="Optuna storage of the sweeps (default: sqlite:///<results>/sweeps/studies.db)")
    parser.add_argument("--selection", default=DEFAULT_SELECTION_FILE, help="the sweeps' selection file")
    parser.add_argument("--grid", default="configs/grids/assignment.yaml",
                        help="the grid whose cells the headline table counts seeds against")
    args = parser.parse_args(argv)
    exit_on_user_error(lambda: generate(args))


def generate(args: argparse.Namespace) -> None:
    """The report the command line asks for, and its size against the budget."""
    if not Path(args.results).is_dir():
        raise MissingFile(f"no results folder {args.results}")
    if not (Path(args.prose) / "REPORT.template.md").is_file():
        raise MissingFile(f"no {Path(args.prose) / 'REPORT.template.md'}")
    studies = args.studies or f"sqlite:///{Path(args.results) / 'sweeps' / 'studies.db'}"
    path = build_report(Path(args.results), Path(args.prose), Path(args.out), Path.cwd(), studies,
                        Path(args.selection), Path(args.grid))
    size = path.stat().st_size
    print(f"wrote {path} ({size / 1000:.1f} of {MAIN_TEXT_BUDGET / 1000:.0f} KB)")
    if size > MAIN_TEXT_BUDGET:
        print(f"warning: {path} is over its {MAIN_TEXT_BUDGET / 1000:.0f} KB budget: move detail from "
              f"{Path(args.prose) / 'REPORT.template.md'} to the appendix", file=sys.stderr)


if __name__ == "__main__":
    main()
