"""Results: collect finished runs from their directories and aggregate them over seeds.

Everything here reads finished run directories through :mod:`peftlab.runrecord`.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .markdown import table
from .methods import MethodArguments, baseline_label, method_label
from .runrecord import RunDirectory, finished_runs

QUALITY = ("accuracy", "micro_f1", "macro_f1", "weighted_f1")
COSTS = ("trainable_percent", "trainable_params", "train_runtime", "train_tokens_per_second",
         "train_samples_per_second", "peak_rss_mb")
# Wall-clock costs compare only between runs on one host (without AMX, bf16 runs slower than fp32).
TIMED = ("train_runtime", "train_tokens_per_second", "train_samples_per_second")
CELL = ("model", "dataset", "method")
FIXED, VALIDATION = "fixed", "validation"  # the two protocols runs were made under (RunResult.protocol)


@dataclass
class RunResult:
    model: str
    dataset: str
    method: str
    seed: int
    directory: Path
    checkpoint: str
    metrics: dict
    record: dict = field(repr=False)
    settings: dict | None = None  # a grid run's selected settings' source (grid_coordinates.json): {from, study, ...}
    set_aside: str | None = None  # why a grid set the run aside (``collapsed``): not one of its cell's seeds

    @property
    def cell(self) -> tuple[str, str, str]:
        return self.model, self.dataset, self.method

    @property
    def protocol(self) -> str:
        """``validation`` for runs that held out a validation split (tuned settings, test evaluated once),
        ``fixed`` for the earlier runs (fixed settings, the test split evaluated every epoch)."""
        return VALIDATION if self.record.get("validation_split", {}).get("validation_rows") else FIXED

    @property
    def host(self) -> str:
        """The hardware this run recorded in run.json, as one comparable string."""
        return json.dumps(self.record.get("hardware", {}), sort_keys=True)

    def log_history(self) -> list[dict]:
        return RunDirectory(self.directory).log_history()


def training_throughput(tokens_per_epoch: int, epochs: float, train_runtime: float,
                        log_history: list[dict]) -> tuple[float, float]:
    """(training tokens/s, seconds of test evaluation inside the run): the Trainer's train_runtime
    includes the per-epoch evaluations, which the throughput leaves out."""
    eval_seconds = sum(entry.get("eval_runtime", 0.0) for entry in log_history)
    return tokens_per_epoch * epochs / (train_runtime - eval_seconds), eval_seconds


def load_run(run_dir: RunDirectory) -> RunResult:
    record, metrics = run_dir.record(), run_dir.metrics()
    coordinates = run_dir.grid_coordinates()
    if coordinates is None:  # a run made by hand: its coordinates come from its arguments
        method_args = record["method_args"]
        coordinates = {"model": Path(record["model_args"]["model_name_or_path"]).name,
                       "dataset": record["data_args"]["dataset_name"],
                       "method": method_label(MethodArguments.from_record(method_args)),
                       "seed": record["training_args"]["seed"]}
    result = RunResult(coordinates["model"], coordinates["dataset"], coordinates["method"],
                       int(coordinates["seed"]), run_dir.path, record["resolved_model"]["checkpoint"], metrics, record,
                       coordinates.get("settings"), coordinates.get("set_aside"))
    if "train_tokens_per_epoch" in record and "train_runtime" in metrics:
        # derived the same way for every run, whichever version of train.py wrote metrics.json
        metrics["train_tokens_per_second"], metrics["eval_seconds_during_training"] = training_throughput(
            record["train_tokens_per_epoch"], metrics["epoch"], metrics["train_runtime"], result.log_history())
    return result


def collect(root: str | Path) -> list[RunResult]:
    """Every finished and tested run under ``root``, in a fixed order: started or broken runs are left out,
    and so are sweep trials, which never see the test split."""
    runs = [load_run(run_dir) for run_dir in finished_runs(root) if set(QUALITY) <= set(run_dir.metrics())]
    return sorted(runs, key=lambda r: (r.model, r.dataset, r.method, r.seed))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student's t interval of the mean over seeds (NaN bounds for a single value)."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf((1 + confidence) / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


SCORE_RANGE = (0.0, 1.0)  # what a score (accuracy, an F1) can be
DIFFERENCE_RANGE = (-1.0, 1.0)  # what a difference of two scores can be


def clipped(low: float, high: float, bounds: tuple[float, float]) -> tuple[float, float]:
    """An interval's bounds clipped to ``bounds``; NaN ones (a single seed) stay NaN."""
    return (low, high) if math.isnan(low) else (max(low, bounds[0]), min(high, bounds[1]))


def mean_interval(values: list[float], scale: float = 100.0, sign: str = "",
                  bounds: tuple[float, float] = SCORE_RANGE) -> str:
    """``mean [low, high]`` (percent by default): the mean over seeds with its 95% t interval, clipped to
    ``bounds``, the range the mean can take (a score's 0 to 1 by default: at two seeds t's factor of 12.7 can
    reach past 100%, and clipping keeps the coverage, the mean lying inside); the mean alone for a single
    value. ``sign="+"`` writes differences with their sign (pass ``bounds=DIFFERENCE_RANGE`` for them)."""
    mean, low, high = t_interval(values)
    mean, low, high = (scale * v for v in (mean, *clipped(low, high, bounds)))
    return f"{mean:{sign}.1f}" if math.isnan(low) else f"{mean:{sign}.1f} [{low:{sign}.1f}, {high:{sign}.1f}]"


def interval_text(values: list[float], scale: float = 100.0) -> str:
    """``mean [low, high] (n=k)``: :func:`mean_interval` with the number of seeds."""
    return f"{mean_interval(values, scale)} (n={len(values)})"


def paired_differences(runs: list[RunResult], key: str = "macro_f1", baseline: str | None = None) -> list[dict]:
    """Each method against ``baseline`` (default: full fine-tuning) of the same model and dataset (and
    protocol), seed by seed: the per-seed differences of ``key`` on the seeds both ran (same data order), their
    mean and t interval."""
    baseline = baseline or baseline_label()
    by_seed = {(run.protocol, run.model, run.dataset, run.method, run.seed): run.metrics[key] for run in runs}
    rows = []
    for protocol, model, dataset, method in sorted({(r.protocol, *r.cell) for r in runs if r.method != baseline}):
        differences = [value - by_seed[(protocol, model, dataset, baseline, seed)]
                       for (p, m, d, meth, seed), value in sorted(by_seed.items())
                       if (p, m, d, meth) == (protocol, model, dataset, method)
                       and (protocol, model, dataset, baseline, seed) in by_seed]
        if differences:
            mean, low, high = t_interval(differences)
            rows.append({"protocol": protocol, "model": model, "dataset": dataset, "method": method,
                         "baseline": baseline, "key": key, "n": len(differences), "mean": mean, "low": low,
                         "high": high})
    return rows


def welch_interval(values: list[float], others: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(difference, low, high): the difference of two means over seeds with Welch's t interval (unequal
    variances, Welch-Satterthwaite degrees of freedom); NaN bounds unless both sides have two values or more."""
    from scipy import stats

    difference = statistics.fmean(values) - statistics.fmean(others)
    if min(len(values), len(others)) < 2:
        return difference, math.nan, math.nan
    sides = (values, others)
    shares = [statistics.variance(side) / len(side) for side in sides]  # each mean's squared standard error
    spread = sum(shares)
    if spread == 0:
        return difference, difference, difference
    freedom = spread ** 2 / sum(share ** 2 / (len(side) - 1) for share, side in zip(shares, sides, strict=True))
    half = stats.t.ppf((1 + confidence) / 2, freedom) * math.sqrt(spread)
    return difference, difference - half, difference + half


def model_differences(runs: list[RunResult], key: str = "macro_f1") -> list[dict]:
    """Each model against every smaller one (fewer parameters) on the same dataset and method, under one
    protocol, where both cells trained on the same number of rows (a row cap on one model only would confound
    the two): the difference of the cells' means over seeds with Welch's 95% interval. Different models share
    no data order (their tokenizers group rows differently), so their seeds do not pair."""
    comparable: dict[tuple, dict[str, list[RunResult]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:  # (protocol, dataset, method) -> model -> its runs
        comparable[(run.protocol, run.dataset, run.method)][run.model].append(run)
    rows = []
    for (protocol, dataset, method), by_model in sorted(comparable.items()):
        cells = {model: (statistics.median(run.metrics.get("total_params", math.nan) for run in members),
                         {run.record.get("num_train_rows") for run in members}, [run.metrics[key] for run in members])
                 for model, members in sorted(by_model.items())}
        for model, (size, trained, values) in cells.items():
            for other, (other_size, other_trained, other_values) in cells.items():
                if not size > other_size or len(trained) != 1 or trained != other_trained:
                    continue
                mean, low, high = welch_interval(values, other_values)
                rows.append({"protocol": protocol, "model": model, "dataset": dataset, "method": method,
                             "baseline": other, "key": key, "n": min(len(values), len(other_values)),
                             "cell_seeds": (len(values), len(other_values)), "mean": mean, "low": low,
                             "high": high})
    return rows


def interval_excludes_zero(row: dict) -> bool:
    """Whether a paired difference's interval lies wholly on one side of zero (never for one seed: NaN)."""
    return row["low"] > 0 or row["high"] < 0


def seed_counts(row: dict) -> tuple[int, ...]:
    """The seeds behind a difference: each cell's where two models' cells are compared (their seeds do not
    pair), else the paired rows' one count."""
    return row.get("cell_seeds", (row["n"],))


def seeds_text(row: dict) -> str:
    return " and ".join(str(count) for count in seed_counts(row))


def difference_bounds(low: float, high: float, scale: float = 100.0) -> str:
    """``low to high`` of a difference's interval, clipped to what a difference of two scores can be
    (``DIFFERENCE_RANGE``), as :func:`mean_interval` clips a score's."""
    def bound(value: float) -> str:  # one decimal, or as many as keep a bound near zero off zero
        return f"{value:+.1f}" if abs(value) >= 0.05 or value == 0 else f"{value:+.1g}"
    return " to ".join(bound(scale * value) for value in clipped(low, high, DIFFERENCE_RANGE))


def difference_statement(row: dict, scale: float = 100.0) -> str:
    """A difference is stated only where its interval excludes zero; otherwise none was detected."""
    mean = scale * row["mean"]
    if math.isnan(row["low"]):
        return f"{mean:+.1f} from one seed (no interval)"
    interval = f"95% CI {difference_bounds(row['low'], row['high'], scale)}"
    if interval_excludes_zero(row):
        return f"{mean:+.1f} points ({interval})"
    return f"no difference detected at {seeds_text(row)} seeds ({mean:+.1f}, {interval})"


def reference_host(runs: list[RunResult]) -> str | None:
    """The host most runs ran on (ties: the first in sorted order), whose runs alone give wall-clock costs."""
    counts = Counter(run.host for run in runs)
    return max(sorted(counts), key=counts.get) if counts else None


def aggregate(runs: list[RunResult]) -> list[dict]:
    """Per (model, dataset, method): n, mean and sample std of the quality metrics, medians of the costs
    (wall-clock times on a shared machine: the median ignores one run slowed by other work). Times come
    from the reference host's runs only; a cell without any has NaN times."""
    reference = reference_host(runs)
    groups: dict[tuple, list[RunResult]] = defaultdict(list)
    for run in runs:
        groups[run.cell].append(run)
    rows = []
    for (model, dataset, method), members in sorted(groups.items()):
        row = {"model": model, "dataset": dataset, "method": method, "n": len(members),
               "seeds": " ".join(str(m.seed) for m in members), "checkpoint": members[0].checkpoint}
        for key in QUALITY:
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std([m.metrics[key] for m in members])
        for key in COSTS:
            values = [m.metrics[key] for m in members if m.metrics.get(key) is not None
                      and (key not in TIMED or m.host == reference)]
            row[key] = statistics.median(values) if values else math.nan
        rows.append(row)
    return rows


def csv_value(value):
    """Floats to 6 significant digits, except whole ones: the median of an even number of seeds' parameter counts
    is a float (494036352.0), which ``.6g`` would cut to 4.94036e+08."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else f"{value:.6g}"
    return value


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else list(CELL), lineterminator="\n")
        writer.writeheader()
        writer.writerows({key: csv_value(value) for key, value in row.items()} for row in rows)


def pm(row: dict, key: str, scale: float = 100.0) -> str:
    """``mean ± std`` in percent (std omitted for a single seed)."""
    mean, std = row[f"{key}_mean"] * scale, row[f"{key}_std"] * scale
    return f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def whole(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.0f}"


def markdown_table(rows: list[dict]) -> str:
    header = ["model", "dataset", "method", "n", "accuracy", "micro-F1", "macro-F1", "weighted-F1", "trainable %",
              "train time (s, with test evals)", "train tokens/s", "peak RSS (MB)"]  # costs: medians over seeds
    return table(header, ([row["model"], row["dataset"], row["method"], row["n"], pm(row, "accuracy"),
                           pm(row, "micro_f1"), pm(row, "macro_f1"), pm(row, "weighted_f1"),
                           f"{row['trainable_percent']:.2f}", whole(row["train_runtime"]),
                           whole(row["train_tokens_per_second"]), whole(row["peak_rss_mb"])] for row in rows))

