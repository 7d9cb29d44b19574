"""Does a changed default keep quality? Runs of one cell under two settings, paired by seed (issue 22).

Reads finished runs under a results folder (a check grid such as ``configs/grids/checks/frozen_dtype.yaml``),
compares every method label with ``--baseline`` seed by seed (same seed, same data order; the baseline's runs
may come from another grid's folder, ``--baseline_runs``, for the same models and datasets): test accuracy and
macro-F1 of each, the paired difference with its 95% t interval, and how far apart the two runs' logged
training losses are at the same steps (the fixed-seed loss curve check).

    python benchmarks/quality_check.py results/checks/frozen_dtype --baseline lora-r16-frozen-fp32 \\
        --out benchmarks/results/frozen_bf16_quality

Where a grid changed a setting under the same method label (an override of the assignment grid), ``--setting``
names the results folder's runs of the baseline's label, and ``--baseline_runs`` holds the runs as they ran
before the change.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from peftlab.markdown import table
from peftlab.results import collect, difference_statement, mean_interval, paired_differences


def loss_gap(run, baseline_run) -> tuple[float, float]:
    """(largest and mean absolute difference) between two runs' training losses logged at the same steps."""
    def losses(r):
        return {entry["step"]: entry["loss"] for entry in r.log_history() if "loss" in entry}

    mine, theirs = losses(run), losses(baseline_run)
    gaps = [abs(mine[step] - theirs[step]) for step in sorted(set(mine) & set(theirs))]
    return max(gaps), sum(gaps) / len(gaps)


def report(results: Path, baseline: str, baseline_runs: Path | None = None,
           setting: str | None = None) -> tuple[str, list[str]]:
    """(the tables, each checked cell's paired macro-F1 difference against the baseline as one statement, named
    by its dataset where the check spans several). With ``setting``, the runs under ``results`` of the
    baseline's own label, in the models and datasets ``baseline_runs`` has, are the checked ones, under that
    name."""
    runs = collect(results)
    if baseline_runs is not None:
        old = [run for run in collect(baseline_runs) if run.method == baseline]
        if setting is not None:
            had = {(run.model, run.dataset) for run in old}
            runs = [dataclasses.replace(run, method=setting) for run in runs
                    if run.method == baseline and (run.model, run.dataset) in had]
        checked = {(run.model, run.dataset) for run in runs}
        runs += [run for run in old if (run.model, run.dataset) in checked]
    by_seed = {(run.cell, run.seed): run for run in runs}
    rows = []
    for run in sorted(runs, key=lambda r: (r.method != baseline, r.method, r.seed)):
        base = by_seed.get(((run.model, run.dataset, baseline), run.seed))
        gap = "–" if base is None or run.method == baseline else "max {:.3f}, mean {:.3f}".format(*loss_gap(run, base))
        rows.append([run.model, run.dataset, run.method, run.seed, f"{100 * run.metrics['accuracy']:.1f}",
                     f"{100 * run.metrics['macro_f1']:.1f}", gap])
    text = table(["model", "dataset", "setting", "seed", "test accuracy %", "test macro-F1 %",
                  "training loss vs baseline, same steps"], rows)
    summary, statements = [], []
    several_datasets = len({run.dataset for run in runs}) > 1
    for cell in sorted({run.cell for run in runs}):
        members = [run for run in runs if run.cell == cell]
        cells = [mean_interval([run.metrics[key] for run in members]) for key in ("accuracy", "macro_f1")]
        differences = {key: [row for row in paired_differences(runs, key, baseline=baseline)
                             if (row["model"], row["dataset"], row["method"]) == cell]
                       for key in ("accuracy", "macro_f1")}
        summary.append([*cell, len(members), *cells,
                        *(difference_statement(rows[0]) if rows else "–" for rows in differences.values())])
        if differences["macro_f1"]:
            named = f"{cell[1]}: " if several_datasets else ""
            statements.append(named + difference_statement(differences["macro_f1"][0]))
    return text + "\n" + table(["model", "dataset", "setting", "n", "accuracy % [95% CI]", "macro-F1 % [95% CI]",
                                f"accuracy vs {baseline}, paired", f"macro-F1 vs {baseline}, paired"],
                                summary), statements


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="folder of the check grid's runs")
    parser.add_argument("--baseline", required=True, help="method label of the old setting")
    parser.add_argument("--baseline_runs", type=Path,
                        help="folder holding the baseline's runs, if not the check's own (e.g. results/assignment)")
    parser.add_argument("--setting", help="name for the results folder's runs of the --baseline label, when a grid "
                                          "changed a setting under the same label (their old runs: --baseline_runs)")
    parser.add_argument("--out", help="path stem: writes <out>.md and <out>_macro_f1.txt, the paired macro-F1 "
                                      "differences in one line (default: print only)")
    args = parser.parse_args()
    if args.setting and not args.baseline_runs:
        parser.error("--setting needs --baseline_runs: the runs as they ran before the change")
    text, statements = report(Path(args.results), args.baseline, args.baseline_runs, args.setting)
    if args.out:
        source = f" (from `{args.baseline_runs}`)" if args.baseline_runs else ""
        checked = f"`{args.baseline}` runs under `{args.results}` as `{args.setting}`" if args.setting else (
            f"Runs under `{args.results}`")
        Path(f"{args.out}.md").write_text(f"{checked}, paired by seed against `{args.baseline}`{source} "
                                          "(`benchmarks/quality_check.py`).\n\n" + text)
        # the report's findings cite this line ({{file:<out>_macro_f1.txt}})
        Path(f"{args.out}_macro_f1.txt").write_text("; ".join(statements) + "\n")
    print(text)


if __name__ == "__main__":
    main()
