"""Report generation: tables, curves, placeholders, byte-for-byte regeneration."""

import math
from pathlib import Path

import pytest
from conftest import load_benchmark_script

from peftlab.markdown import table
from peftlab.report import UnfillablePlaceholder, build_report, fill_placeholders
from peftlab.results import aggregate, collect, difference_statement, seeds_text
from peftlab.runrecord import GRID_COORDINATES_FILE, STATE_FILE, RunDirectory, write_json

ASSIGNMENT_GRID = Path(__file__).parents[1] / "configs" / "grids" / "assignment.yaml"


def fixture_run(root, method, seed, accuracy, hardware=None, validation_rows=None, max_train_samples=None,
                validation_macro_f1=None, modules_to_save=None, dataset="acl_sup", settings=None, set_aside=None,
                model="m", train_rows=None, total_params=None):
    run = RunDirectory(root / model / dataset / method / f"seed{seed}")
    write_json(run.file(GRID_COORDINATES_FILE), {"model": model, "dataset": dataset, "method": method, "seed": seed,
                                                 **({"settings": settings} if settings else {}),
                                                 **({"set_aside": set_aside} if set_aside else {})})
    run_id = run.start({
        "resolved_model": {"checkpoint": "org/m", "source": "package"},
        "training_args": {"learning_rate": 1e-4, "num_train_epochs": 2, "bf16": True},
        "data_args": {"max_seq_length": 256, "max_train_samples": max_train_samples}, "label_names": ["Uses", "Future"],
        "method_args": {"tuning_method": method.split("-")[0], "lora_r": 8, "modules_to_save": modules_to_save},
        "hardware": hardware or {"cpu_count": 2}, "versions": {"torch": "2.13.0"},
        **({"num_train_rows": train_rows} if train_rows else {}),
        **({"validation_split": {"ratio": 0.1, "validation_rows": validation_rows}} if validation_rows else {})})
    run.finish(run_id, {
        "accuracy": accuracy, "micro_f1": accuracy, "macro_f1": accuracy - 0.1, "weighted_f1": accuracy,
        "trainable_percent": 1.0, "trainable_params": 5, "train_runtime": 12.0, "train_tokens_per_second": 100.0,
        "train_samples_per_second": 3.0, "peak_rss_mb": 900.0, "f1_Uses": accuracy, "f1_Future": 0.0,
        **({"validation_macro_f1": validation_macro_f1} if validation_macro_f1 is not None else {}),
        **({"total_params": total_params} if total_params else {})})
    history = [{"step": s, "loss": 1.0 / s + seed / 100} for s in (1, 2, 3, 4)]
    history += [{"step": 2, "eval_accuracy": accuracy - 0.05, "eval_macro_f1": 0.3},
                {"step": 4, "eval_accuracy": accuracy, "eval_macro_f1": 0.4}]
    write_json(run.file(STATE_FILE), {"log_history": history})


@pytest.fixture
def report_inputs(tmp_path):
    results = tmp_path / "results"
    for seed, acc in ((1, 0.7), (2, 0.8)):
        fixture_run(results, "full", seed, acc)
        fixture_run(results, "lora-r8", seed, acc - 0.1)
    prose = tmp_path / "prose"
    prose.mkdir()
    (tmp_path / "table.md").write_text("| a |\n")
    (prose / "REPORT.template.md").write_text(
        "# R\n{{section:environment}}\n{{section:configurations}}\n{{section:results_table}}\n"
        "{{section:curves}}\n{{section:bars}}\n{{section:per_class}}\n"
        "Full reaches {{metric:m/acl_sup/full/accuracy}} in "
        "{{cost:m/acl_sup/full/train_runtime}} s.\n{{file:table.md}}\n")
    (prose / "APPENDIX.template.md").write_text("# A\n{{section:per_seed}}\n")
    return results, prose, tmp_path


def test_report_content_and_byte_identical_regeneration(report_inputs):
    results, prose, root = report_inputs
    first = build_report(results, prose, root / "out1", root)
    second = build_report(results, prose, root / "out2", root)
    text = first.read_text()
    assert text == second.read_text()
    assert "Full reaches 75.0 ± 7.1 in 12 s." in text
    assert "| m | acl_sup | lora-r8 | 2 | 65.0 ± 7.1 |" in text
    assert "| m | org/m | package |" in text
    # the configuration table shows only what varies between cells; the rest is one line
    assert "| protocol | model | dataset | method | lora_r | lora_alpha |" in text
    assert "| fixed | m | acl_sup | full | – | – |" in text
    assert "Shared by every cell: learning_rate 0.0001; num_train_epochs 2;" in text and "modules_to_save –" in text
    assert "(`LORA_DEFAULT_TARGETS`): bert: query, value;" in text
    assert "| protocol | model | method | n | Uses | Future |" in text
    assert "| fixed | m | full | 2 | 75.0 ± 7.1 | 0.0 ± 0.0 |" in text
    assert "![curves_m_acl_sup](figures/curves_m_acl_sup.png)" in text and "| a |" in text
    appendix = (root / "out1" / "APPENDIX.md").read_text()
    assert appendix == (root / "out2" / "APPENDIX.md").read_text()
    run_row = f"| fixed | m | acl_sup | lora-r8 | 2 | 70.0 | 60.0 | 2 | 0.0001 | `{results}/m/acl_sup/lora-r8/seed2` |"
    assert run_row in appendix
    for name in ("curves_m_acl_sup.png", "bars_m.png"):
        assert (root / "out1" / "figures" / name).read_bytes() == (root / "out2" / "figures" / name).read_bytes()


def test_runs_on_another_host_are_named_and_untimed(report_inputs):
    results, prose, root = report_inputs
    other = {"cpu_count": 4, "cpu_model": "AMD EPYC", "native_bf16": None, "torch_threads": 1}
    fixture_run(results, "adapter", 1, 0.6, hardware=other)
    text = build_report(results, prose, root / "out", root).read_text()
    assert ('- CPU model unrecorded (bf16 support unrecorded): 4 runs, the reference host (`{"cpu_count": 2}`)'
            in text)
    assert ('- AMD EPYC (no native bf16), 1 torch thread: 1 run (m/acl_sup/adapter/seed1; '
            '`{"cpu_count": 4, "cpu_model": "AMD EPYC", "native_bf16": null, "torch_threads": 1}`)') in text
    runs = collect(results)
    with pytest.raises(UnfillablePlaceholder, match="reference host"):
        fill_placeholders("{{cost:m/acl_sup/adapter/train_runtime}}", runs, root)
    assert fill_placeholders("{{cost:m/acl_sup/adapter/peak_rss_mb}}", runs, root) == "900"


def test_the_command_line_says_when_the_main_text_outgrows_its_budget(report_inputs, monkeypatch, capsys):
    from peftlab.report import MAIN_TEXT_BUDGET, main

    results, prose, root = report_inputs
    monkeypatch.chdir(root)
    flags = ["--results", "results", "--prose", "prose", "--out", "out", "--grid", str(ASSIGNMENT_GRID)]
    main(flags)
    assert "warning" not in capsys.readouterr().err
    template = prose / "REPORT.template.md"
    template.write_text(template.read_text() + "x" * MAIN_TEXT_BUDGET)
    main(flags)
    out, err = capsys.readouterr()
    assert f"of {MAIN_TEXT_BUDGET / 1000:.0f} KB)" in out
    assert "over its 25 KB budget" in err and "prose/REPORT.template.md" in err


def test_the_command_line_names_a_missing_folder_or_result_in_one_line(report_inputs, monkeypatch, capsys):
    from peftlab.report import main

    results, prose, root = report_inputs
    monkeypatch.chdir(root)
    with pytest.raises(SystemExit) as stop:
        main(["--results", "no-such-results", "--prose", "prose"])
    assert stop.value.code == 2 and capsys.readouterr().err == "error: no results folder no-such-results\n"
    (prose / "REPORT.template.md").write_text("{{metric:m/agnews_sup/full/accuracy}}\n")
    with pytest.raises(SystemExit) as stop:
        main(["--results", "results", "--prose", "prose", "--out", "out", "--grid", str(ASSIGNMENT_GRID)])
    assert stop.value.code == 2
    assert capsys.readouterr().err == ("error: report placeholder {{metric:m/agnews_sup/full/accuracy}}: "
                                       "no fixed-protocol runs for m/agnews_sup/full\n")


def test_unknown_placeholder_is_an_error(report_inputs):
    results, _, root = report_inputs
    runs = collect(results)
    with pytest.raises(UnfillablePlaceholder, match="no fixed-protocol runs for m/agnews_sup/full"):
        fill_placeholders("{{metric:m/agnews_sup/full/accuracy}}", runs, root)
    with pytest.raises(UnfillablePlaceholder, match="no validation-protocol runs for m/acl_sup/full"):
        fill_placeholders("{{ci:validation:m/acl_sup/full/accuracy}}", runs, root)
    with pytest.raises(UnfillablePlaceholder, match="no selected settings for m/acl_sup/full"):
        fill_placeholders("{{selected:m/acl_sup/full}}", runs, root, {})
    with pytest.raises(UnfillablePlaceholder, match="no file"):
        fill_placeholders("{{file:nope.md}}", runs, root)


def test_placeholders_cite_intervals_paired_differences_and_protocols(tmp_path):
    results = tmp_path / "results"
    for seed, full, lora in ((1, 0.70, 0.80), (2, 0.75, 0.86), (3, 0.80, 0.89)):
        fixture_run(results, "full", seed, full)
        fixture_run(results, "lora-r8", seed, lora)
    fixture_run(results / "protocol", "full", 1, 0.9, validation_rows=169)
    runs = collect(results)
    # accuracy 0.70, 0.75, 0.80: mean 75.0, t(0.975, 2) = 4.303 x 5.0 / 1.732 = 12.4 either side
    assert fill_placeholders("{{ci:m/acl_sup/full/accuracy}}", runs, tmp_path) == "75.0 [62.6, 87.4] (n=3)"
    assert fill_placeholders("{{ci:validation:m/acl_sup/full/accuracy}}", runs, tmp_path) == "90.0 (n=1)"
    assert fill_placeholders("{{diff:m/acl_sup/lora-r8/accuracy}}", runs, tmp_path).startswith(
        "+10.0 points (95% CI +7.5 to +12.5)")
    with pytest.raises(UnfillablePlaceholder, match="no seeds shared with full"):
        fill_placeholders("{{diff:validation:m/acl_sup/full/accuracy}}", runs, tmp_path)
    entry = {"study": "s", "trial": 4, "validation_macro_f1": 0.551, "params": {"learning_rate": 8.5e-5}}
    assert fill_placeholders("{{selected:m/acl_sup/full}}", runs, tmp_path, {"m/acl_sup/full": entry}) == (
        "learning_rate 8.5e-05 (validation macro-F1 55.1; study s, trial 4)")


def test_headline_prefers_the_validation_protocol_and_counts_the_grids_seeds(tmp_path):
    from peftlab.experiments import GridRun
    from peftlab.report import headline_section

    results = tmp_path / "results"
    for seed in (1, 2):
        fixture_run(results, "full", seed, 0.7)
        fixture_run(results, "lora-r8", seed, 0.6)
    fixture_run(results / "protocol", "full", 1, 0.9, validation_rows=169)
    runs = collect(results)
    headline = headline_section(runs)
    assert "| m | full | 80.0 / 90.0 (n=1) |" in headline  # its validation-protocol run, unmarked
    assert "| m | lora-r8 | 50.0 [50.0, 50.0] / 60.0 [60.0, 60.0] (n=2)† |" in headline  # fixed settings
    assert "Training rows capped" not in headline  # every cell trained on all its rows
    fixture_run(results, "adapter", 1, 0.6, max_train_samples=1000)
    assert ("Training rows capped (the same cap for every method of a model and dataset unless said): "
            "m/acl_sup 1000, all (differs between its methods).") in headline_section(collect(results))
    wanted = [GridRun("m", dataset, method, seed, {})
              for dataset, method in (("acl_sup", "full"), ("acl_sup", "lora-r8"), ("agnews_sup", "full"))
              for seed in (1, 2, 3)]
    headline = headline_section(runs, wanted)
    assert headline.startswith("0 of 3 cells of the assignment's grid have all their seeds")
    assert "| m | full | 80.0 / 90.0 (n=1 of 3) | – (n=0 of 3) |" in headline  # short of its seeds
    assert "| m | lora-r8 | 50.0 [50.0, 50.0] / 60.0 [60.0, 60.0] (n=2)† | – |" in headline  # not in the grid there
    for seed in (2, 3):
        fixture_run(results / "protocol", "full", seed, 0.9, validation_rows=169)
    headline = headline_section(collect(results), wanted)
    assert headline.startswith("1 of 3 cells") and "(n=3) | – (n=0 of 3) |" in headline


def test_validation_protocol_runs_sit_beside_the_fixed_settings_runs(tmp_path):
    """Runs that held out a validation split go to their own section, next to the fixed-settings cell."""
    from peftlab.report import protocol_section
    from peftlab.results import FIXED, VALIDATION

    results = tmp_path / "results"
    for seed, acc in ((1, 0.7), (2, 0.8)):
        fixture_run(results, "full", seed, acc)
    source = {"from": "m/acl_sup/full", "study": "s", "trial": 4, "run_dir": "sweeps/s/trial4"}
    for seed, acc in ((1, 0.9), (2, 0.92)):
        fixture_run(results / "protocol", "full", seed, acc, validation_rows=169, settings=source)
    fixture_run(results / "protocol", "lora-r8", 1, 0.85, validation_rows=169, settings=source)
    runs = collect(results)
    assert sorted(run.protocol for run in runs) == [FIXED, FIXED, VALIDATION, VALIDATION, VALIDATION]
    selection = {"m/acl_sup/full": {"study": "s", "trial": 4, "validation_macro_f1": 0.5,
                                    "params": {"learning_rate": 2e-4, "num_train_epochs": 9}}}
    section = protocol_section(runs, selection)
    assert ("| m/acl_sup/full | lr 0.0001, 2 epochs | 65.0 ± 7.1 / 75.0 ± 7.1 (n=2) | learning_rate 0.0002, "
            "num_train_epochs 9 (validation macro-F1 50.0; study s, trial 4) "
            "| 81.0 ± 1.4 / 91.0 ± 1.4 (n=2) |") in section
    # a cell that was not swept names the cell its settings came from
    assert "| m/acl_sup/lora-r8 | – | – | transferred from m/acl_sup/full | 75.0 / 85.0 (n=1) |" in section
    # and the collapse rule's factor, where its learning rate took one
    fixture_run(results / "protocol", "lora-r16", 1, 0.85, validation_rows=169,
                settings={**source, "learning_rate_factor": 0.5})
    assert ("| m/acl_sup/lora-r16 | – | – | transferred from m/acl_sup/full, learning rate x0.5 (collapse rule) "
            "| 75.0 / 85.0 (n=1) |") in protocol_section(collect(results), selection)


def test_runs_a_grid_set_aside_are_listed_and_left_out_of_their_cell(report_inputs):
    results, prose, root = report_inputs
    fixture_run(results / "collapsed", "lora-r8", 1, 0.3, validation_rows=169, validation_macro_f1=0.25,
                set_aside="collapsed")
    (prose / "APPENDIX.template.md").write_text("# A\n{{section:per_seed}}\n{{section:set_aside}}\n")
    build_report(results, prose, root / "out", root)
    appendix = (root / "out" / "APPENDIX.md").read_text()
    assert (f"| m | acl_sup | lora-r8 | 1 | 0.0001 | 2 | 25.0 | `{results}/collapsed/m/acl_sup/lora-r8/seed1` |"
            in appendix)
    assert "| validation | m |" not in appendix  # not among the cell's seeds
    (prose / "APPENDIX.template.md").write_text("{{section:set_aside}}\n")
    (results / "collapsed" / "m" / "acl_sup" / "lora-r8" / "seed1" / "metrics.json").unlink()
    build_report(results, prose, root / "out", root)
    assert (root / "out" / "APPENDIX.md").read_text() == "_the collapse rule set no run aside_\n"


def test_paired_differences_state_only_what_their_interval_supports(tmp_path):
    from peftlab.results import difference_statement, paired_differences, t_interval

    mean, low, high = t_interval([0.70, 0.72, 0.74])
    assert mean == pytest.approx(0.72) and (low, high) == pytest.approx((0.72 - 0.04968, 0.72 + 0.04968), abs=1e-4)
    results = tmp_path / "results"
    for seed, full, lora in ((1, 0.70, 0.80), (2, 0.75, 0.86), (3, 0.80, 0.89)):
        fixture_run(results, "full", seed, full)
        fixture_run(results, "lora-r8", seed, lora)
    fixture_run(results, "lora-r16", 1, 0.71)
    fixture_run(results, "lora-r16", 2, 0.70)
    (lora16, lora8) = paired_differences(collect(results), "accuracy")
    assert (lora8["method"], lora8["baseline"], lora8["n"]) == ("lora-r8", "full", 3)
    assert lora8["mean"] == pytest.approx(0.10) and lora8["low"] > 0  # +10, +11, +9: an interval above zero
    assert difference_statement(lora8).startswith("+10.0 points (95% CI +7.5 to +12.5)")
    # an interval that just excludes zero does not print a bound of 0.0
    assert difference_statement({**lora8, "low": -0.219, "high": -0.0003}) == (
        "+10.0 points (95% CI -21.9 to -0.03)")
    assert lora16["n"] == 2 and lora16["low"] < 0 < lora16["high"]  # +1, -5: paired on the seeds both ran
    assert difference_statement(lora16).startswith("no difference detected at 2 seeds (-2.0, 95% CI")
    # at two seeds t's factor of 12.7 can reach past what a difference of two scores can be
    assert difference_statement({**lora16, "low": -1.9, "high": 1.8}).endswith("95% CI -100.0 to +100.0)")
    # any label can be the baseline (a check of a changed default compares two settings of one method)
    against_r16 = {row["method"]: row for row in paired_differences(collect(results), "accuracy", "lora-r16")}
    assert against_r16["lora-r8"]["n"] == 2 and against_r16["lora-r8"]["mean"] == pytest.approx((0.09 + 0.16) / 2)
    assert against_r16["full"]["mean"] == pytest.approx((-0.01 + 0.05) / 2)


def test_headline_and_figures_follow_method_order_colours_and_data(tmp_path, report_inputs, monkeypatch):
    from peftlab import report

    runs = collect(report_inputs[0])
    headline = report.headline_section(runs).splitlines()
    # full: macro-F1 0.6 and 0.7 -> 65.0, t(0.975, 1) = 12.706 x 7.07 / 1.414 = 63.5 either side, clipped
    # to the score's 100% (accuracy's 138.5 too)
    assert headline[2] == "| m | full | 65.0 [1.5, 100.0] / 75.0 [11.5, 100.0] (n=2)† |"
    assert headline[3].startswith("| m | lora-r8 | 55.0 [")
    colours = report.method_colours(["lora-r16", "adapter", "full", "lora-r8"])
    assert list(colours) == ["full", "lora-r8", "lora-r16", "adapter"]  # registry order, ranks numeric
    captured = {}
    real_save = report._save

    def keep_axes(fig, axes, title, path):
        captured[path.name] = [axis.get_ylim() for axis in axes]
        return real_save(fig, axes, title, path)

    monkeypatch.setattr(report, "_save", keep_axes)
    report.plot_bars(aggregate(runs), tmp_path, colours)
    (left, right) = captured["bars_m.png"]
    assert left == right and left[0] > 0  # one range for both panels, fitted to the bars


def test_quality_checks_and_stale_figures_stay_out_of_the_report(report_inputs):
    results, prose, root = report_inputs
    fixture_run(results / "checks" / "frozen_dtype", "lora-r8-frozen-bf16", 1, 0.9, validation_rows=10)
    (root / "out" / "figures").mkdir(parents=True)
    (root / "out" / "figures" / "curves_gone_acl_sup.png").write_bytes(b"old")
    text = build_report(results, prose, root / "out", root).read_text()
    assert "frozen-bf16" not in text and "| m | acl_sup | lora-r8 |" in text
    assert not (root / "out" / "figures" / "curves_gone_acl_sup.png").exists()


def test_quality_check_pairs_a_changed_default_with_its_baseline(tmp_path):
    """benchmarks/quality_check.py: per-seed scores, the loss-curve gap at shared steps, paired differences."""
    import shutil

    quality_check = load_benchmark_script("quality_check")
    results = tmp_path / "results"
    for seed, old, new in ((1, 0.70, 0.71), (2, 0.75, 0.75), (3, 0.80, 0.80)):
        fixture_run(results, "lora-r8-old", seed, old)
        fixture_run(results, "lora-r8-new", seed, new)
    text, statements = quality_check.report(results, "lora-r8-old")
    assert statements == ["no difference detected at 3 seeds (+0.3, 95% CI -1.1 to +1.8)"]  # the finding's line
    # same seed, same logged losses in the fixture: the curves match exactly
    assert "| m | acl_sup | lora-r8-new | 1 | 71.0 | 61.0 | max 0.000, mean 0.000 |" in text
    assert "| m | acl_sup | lora-r8-old | 1 | 70.0 | 60.0 | – |" in text
    assert "| m | acl_sup | lora-r8-new | 3 |" in text and "no difference detected at 3 seeds (+0.3" in text
    # the baseline may live in another grid's folder: only its runs of the checked models and datasets count
    elsewhere = tmp_path / "grid"
    for seed, old in ((1, 0.70), (2, 0.75), (3, 0.80)):
        fixture_run(elsewhere, "lora-r8-old", seed, old)
        fixture_run(elsewhere, "lora-r8-other", seed, old)
    shutil.rmtree(results / "m" / "acl_sup" / "lora-r8-old")
    text, _ = quality_check.report(results, "lora-r8-old", baseline_runs=elsewhere)
    assert "| m | acl_sup | lora-r8-old | 1 | 70.0 | 60.0 | – |" in text and "lora-r8-other" not in text
    assert "no difference detected at 3 seeds (+0.3" in text
    # a grid that changed a setting under the same label: its runs of that label, named, against the old runs;
    # a check over two datasets names each statement's dataset
    changed = tmp_path / "changed"
    for seed, new in ((1, 0.80), (2, 0.86), (3, 0.89)):
        fixture_run(changed, "lora-r8-old", seed, new)
        fixture_run(changed, "full", seed, new)  # another label of that grid: not part of the check
        fixture_run(changed, "lora-r8-old", seed, new, dataset="agnews_sup")  # no old runs there: left out
        fixture_run(changed, "lora-r8-old", seed, new, dataset="restaurant_sup")
        fixture_run(elsewhere, "lora-r8-old", seed, 0.70, dataset="restaurant_sup")
    text, statements = quality_check.report(changed, "lora-r8-old", baseline_runs=elsewhere, setting="lora-r8-new")
    assert "| m | acl_sup | lora-r8-new | 1 | 80.0 | 70.0 | max 0.000, mean 0.000 |" in text and "| full |" not in text
    assert "agnews_sup" not in text
    assert statements == ["acl_sup: +10.0 points (95% CI +7.5 to +12.5)",
                          "restaurant_sup: +15.0 points (95% CI +3.6 to +26.4)"]


def test_the_validation_finding_pairs_each_method_with_full_fine_tuning_once_seeds_exist(tmp_path):
    from peftlab.report import validation_differences_sentence

    results = tmp_path / "results"
    for seed, full in ((1, 0.70), (2, 0.75), (3, 0.80)):
        fixture_run(results, "full", seed, full)  # fixed settings: not part of this finding
        fixture_run(results / "protocol", "full", seed, full, validation_rows=169)
    assert validation_differences_sentence(collect(results)).startswith("no method shares seeds")
    for seed, lora8, lora16 in ((1, 0.80, 0.71), (2, 0.86, 0.74), (3, 0.89, 0.81)):
        fixture_run(results / "protocol", "lora-r16", seed, lora16, validation_rows=169)
        fixture_run(results / "protocol", "lora-r8", seed, lora8, validation_rows=169)
    assert validation_differences_sentence(collect(results)) == (  # a few pairs: each named, with its numbers
        "m acl_sup lora-r8 +10.0 points (95% CI +7.5 to +12.5); "
        "m acl_sup lora-r16 no difference detected at 3 seeds (+0.3, 95% CI -2.5 to +3.2).")
    fixture_run(results / "protocol", "adapter", 1, 0.70, validation_rows=169)
    fixture_run(results / "protocol", "lora-r8", 4, 0.70, validation_rows=169)  # no full run of seed 4: unpaired
    # one seed gives no interval: counted apart, not as "no difference detected"
    assert validation_differences_sentence(collect(results)).endswith(
        "lora-r16 no difference detected at 3 seeds (+0.3, 95% CI -2.5 to +3.2); 1 more with one seed so far.")
    for method in ("adapter", "ia3", "lora-r32"):
        for seed, full in ((1, 0.70), (2, 0.75)):
            fixture_run(results / "protocol", method, seed, full + seed / 100, validation_rows=169)
    fixture_run(results / "protocol", "lora-r64", 1, 0.70, validation_rows=169)
    # more pairs than a sentence holds: the differing ones named, the rest counted
    assert validation_differences_sentence(collect(results)) == (
        "1 of 5 method-cell pairs (2-3 seeds each) differs: m acl_sup lora-r8 +10.0 points (95% CI +7.5 to +12.5); "
        "no difference detected in the other 4; 1 more with one seed so far.")
    for seed, full in ((1, 0.70), (2, 0.75), (3, 0.80)):
        fixture_run(results / "protocol", "lora-r8", seed, full, validation_rows=169)  # now scoring as full does
    fixture_run(results / "protocol", "lora-r64", 2, 0.75, validation_rows=169)
    assert validation_differences_sentence(collect(results)) == (
        "no difference detected in the 6 method-cell pairs (2-3 seeds each).")


def test_the_rank_finding_pairs_each_rank_with_the_rank_whose_settings_it_took(tmp_path):
    from peftlab.report import protocol_section, rank_differences_sentence

    results = tmp_path / "results"
    own = {"from": "m/acl_sup/lora-r16", "study": "s", "trial": 1}
    other_dataset = {"from": "m/restaurant_sup/lora-r16", "study": "t", "trial": 2}
    assert rank_differences_sentence([]).startswith("no rank shares seeds")
    for seed, lora16, lora8 in ((1, 0.70, 0.80), (2, 0.75, 0.86), (3, 0.80, 0.89)):
        fixture_run(results, "lora-r16", seed, lora16, validation_rows=169, settings=own)
        fixture_run(results, "lora-r8", seed, lora8, validation_rows=169, settings=own)
        fixture_run(results, "adapter", seed, 0.5, validation_rows=169, settings=own)  # another method: not a rank
        fixture_run(results, "lora-r16", seed, 0.9, validation_rows=169, dataset="agnews_sup", settings=other_dataset)
    fixture_run(results, "lora-r32", 1, 0.9, validation_rows=169, dataset="agnews_sup", settings=other_dataset)
    fixture_run(results, "lora-r8", 4, 0.9, validation_rows=169, dataset="restaurant_sup", settings=other_dataset)
    # AG News's ranks all took the restaurant cell's settings: paired with AG News's r=16; restaurants has no r=16 run
    assert rank_differences_sentence(collect(results)) == (
        "m acl_sup lora-r8 +10.0 points (95% CI +7.5 to +12.5); 1 more with one seed so far.")
    section = protocol_section(collect(results), {})  # the appendix lists every pair
    assert "| m | acl_sup | lora-r8 | lora-r16 | 3 | +10.0 points (95% CI +7.5 to +12.5) |" in section
    assert "| m | agnews_sup | lora-r32 | lora-r16 | 1 | +0.0 from one seed (no interval) |" in section


def test_models_compare_by_welch_interval_on_the_same_dataset_method_and_rows(tmp_path):
    from scipy import stats

    from peftlab.report import model_differences_sentence, model_pair_summary, protocol_section
    from peftlab.results import model_differences, welch_interval

    big, small = [0.80, 0.84, 0.83, 0.86], [0.70, 0.75, 0.74]
    expected = stats.ttest_ind([v + 0.1 for v in big], [v + 0.1 for v in small], equal_var=False)
    assert welch_interval(big, small) == pytest.approx(
        (sum(big) / 4 - sum(small) / 3, *expected.confidence_interval(0.95)))
    assert welch_interval([0.8], small)[1:] == pytest.approx((math.nan, math.nan), nan_ok=True)
    results = tmp_path / "results"
    assert model_differences_sentence([]).startswith("no two models share")
    for model, params, rows, scores in (("big", 200, 1519, big), ("small", 20, 1519, small),
                                        ("capped", 900, 1000, small)):  # fewer rows: compared with no one
        for seed, accuracy in enumerate(scores, 1):
            fixture_run(results, "full", seed, accuracy, validation_rows=169, model=model, train_rows=rows,
                        total_params=params)
    fixture_run(results / "fixed", "full", 1, 0.9, model="big", train_rows=1519, total_params=200)  # fixed settings
    fixture_run(results, "adapter", 1, 0.9, validation_rows=169, model="big", train_rows=1519, total_params=201)
    for seed in (1, 2):
        fixture_run(results, "adapter", seed, 0.8, validation_rows=169, model="small", train_rows=1519,
                    total_params=21)
    runs = collect(results)
    (adapter, full) = sorted(model_differences([run for run in runs if run.protocol == "validation"]),
                             key=lambda row: row["method"])
    assert (full["model"], full["baseline"], full["n"], seeds_text(full)) == ("big", "small", 3, "4 and 3")
    assert full["low"] > 0 and seeds_text(adapter) == "1 and 2"
    assert model_differences_sentence(runs) == (
        f"big against small: acl_sup full {difference_statement(full)}; 1 more with one seed so far.")
    assert difference_statement(full) == "+10.3 points (95% CI +4.9 to +15.6)"
    assert "| acl_sup | adapter | big | small | 1 and 2 | +10.0 from one seed (no interval) |" in protocol_section(
        runs, {})
    # more cells of one model pair than a sentence names: counted by direction with their range, and named where
    # few; the seed range counts each side's cell, not the smaller one only
    many = [{**full, "dataset": dataset, "mean": mean} for dataset, mean in (("d1", 0.10), ("d2", 0.05), ("d3", 0.12),
                                                                             ("d4", 0.08))]
    many += [{**full, "dataset": "d5", "mean": -0.05, "low": -0.09, "high": -0.01},
             {**full, "dataset": "d6", "mean": 0.01, "low": -0.02, "high": 0.04}, {**full, "dataset": "d7", "n": 1}]
    assert model_pair_summary(many) == (
        "over 6 cells (3-4 seeds each), higher in 4 (+5.0 to +12.0 points, each 95% CI within +4.9 to +15.6; d1 full, "
        "d2 full, d3 full, d4 full), lower in 1 (-5.0 points, 95% CI -9.0 to -1.0; d5 full), no difference detected "
        "in 1 (+1.0 points, 95% CI -2.0 to +4.0; d6 full); 1 more with one seed so far")
    # an interval that holds zero names both sides' seeds
    assert "no difference detected at 3 and 2 seeds" in difference_statement(
        {**full, "cell_seeds": (3, 2), "low": -0.1, "high": 0.2})


def test_the_sweep_table_sets_the_selected_trial_beside_the_cells_seeds(tmp_path):
    import optuna

    from peftlab.report import sweep_section

    study = optuna.create_study(study_name="m-acl_sup-full", direction="maximize")
    distributions = {"learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)}
    for lr, value in ((1e-4, 0.55), (3e-4, 0.60)):
        study.add_trial(optuna.trial.create_trial(params={"learning_rate": lr}, distributions=distributions,
                                                  value=value))
    # a trial a stopped worker left RUNNING: counted as unfinished, since nothing may be running it
    study.add_trial(optuna.trial.create_trial(params={"learning_rate": 1e-3}, distributions=distributions,
                                              state=optuna.trial.TrialState.RUNNING))
    # a killed trial, retried by a later one (killed and retried), and one that failed for good
    for state, system_attrs in ((optuna.trial.TrialState.FAIL, {}), (optuna.trial.TrialState.RUNNING,
                                                                     {"failed_trial": 3, "retry_history": [3]}),
                                (optuna.trial.TrialState.FAIL, {})):
        study.add_trial(optuna.trial.create_trial(params={"learning_rate": 2e-4}, distributions=distributions,
                                                  state=state, system_attrs=system_attrs))
    selection = {"m/acl_sup/full": {"study": "m-acl_sup-full", "trial": 1, "params": {"learning_rate": 3e-4},
                                    "validation_macro_f1": 0.60}}
    results = tmp_path / "results"
    fixture_run(results, "full", 1, 0.7)  # fixed settings: no validation score, not counted
    for seed, validation in ((1, 0.60), (2, 0.50), (3, 0.46)):
        fixture_run(results / "protocol", "full", seed, 0.7, validation_rows=169, validation_macro_f1=validation)
    row = sweep_section([study], selection, None, collect(results)).splitlines()[2]
    # the winner's own score (60.0, seed 1) beside its seeds' mean and 95% t interval (sd 7.2, t 4.30)
    assert row == ("| m/acl_sup/full | 2 complete, 1 fail, 1 killed and retried, "
                   "2 unfinished | 60.0 (trial 1: learning_rate 0.0003) | trial 1 | 52.0 [34.1, 69.9] (n=3) |")

    # a best setting in the outer tenth of its range (log scale for the learning rate) is flagged, and explained
    epochs = {"num_train_epochs": optuna.distributions.IntDistribution(2, 20)}
    study.add_trial(optuna.trial.create_trial(params={"learning_rate": 8e-4, "num_train_epochs": 3},
                                              distributions={**distributions, **epochs}, value=0.7))
    text = sweep_section([study], selection, None, collect(results))
    assert ("70.0 (trial 6: learning_rate 0.0008 [top of 1e-05..0.001], num_train_epochs 3 [bottom of 2..20])"
            in text.splitlines()[2])
    assert "outer tenth of the searched range" in text


def test_the_configuration_table_shows_modules_trained_beside_a_method(tmp_path):
    from peftlab.report import configuration_section

    results = tmp_path / "results"
    fixture_run(results, "full", 1, 0.7)
    fixture_run(results, "lora-r8", 1, 0.7, modules_to_save="pooler")
    text = configuration_section(collect(results))
    assert text.startswith("| protocol | model | dataset | method | lora_r | lora_alpha | lora_dropout | "
                           "lora_target_modules | modules_to_save |")
    assert "| fixed | m | acl_sup | full | – | – | – | – | – |" in text
    assert "| fixed | m | acl_sup | lora-r8 | 8 | default | default | default | pooler |" in text


def test_a_cell_placeholder_quotes_one_generated_table_cell(tmp_path):
    rows = [["Qwen2.5-3B", "full", "58.59 (11.50 + 35.09)", "60.84", "17,125"],
            ["Qwen2.5-3B", "lora-r8", "24.13 (11.50 + 12.63)", "31.46", "23,596"],
            ["bert", "lora-r8", "1.54 (0.41 + 1.13)", "1.80", "108,494"]]
    (tmp_path / "vram.md").write_text("Device: a GPU\n\n" + table(
        ["model", "method", "estimated GiB (weights + rest)", "measured peak GiB", "tokens/s"], rows))

    def cell(target: str) -> str:
        return fill_placeholders("{{cell:vram.md|" + target + "}}", [], tmp_path)

    assert cell("model=Qwen2.5-3B,method=lora-r8|measured peak GiB|1") == "31.5"
    assert cell("model=Qwen2.5-3B,method=full|estimated GiB") == "58.59"  # a header's "(...)" may be left out
    assert cell("model=bert|tokens/s|0") == "108494"
    with pytest.raises(UnfillablePlaceholder, match="2 rows have method=lora-r8"):
        cell("method=lora-r8|measured peak GiB")
    with pytest.raises(UnfillablePlaceholder, match="0 rows"):
        cell("model=Qwen2.5-3B,method=full|infer ms")
    with pytest.raises(UnfillablePlaceholder, match="no file"):
        fill_placeholders("{{cell:nope.md|model=bert|tokens/s}}", [], tmp_path)
