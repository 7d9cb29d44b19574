"""Grid runner: expansion, shards, resume after a kill; aggregation over fixture run directories."""

import dataclasses
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_resume import KillAfterFirstCheckpoint, Killed

from peftlab.cli import parse_dict
from peftlab.errors import InvalidArgument
from peftlab.experiments import claim, estimate_time, expand, load_grid, run_grid, run_order, select, shard
from peftlab.hardware import cpu_model
from peftlab.metrics import collapsed
from peftlab.results import aggregate, collect, markdown_table, write_csv
from peftlab.runrecord import (
    ADDED_ARGUMENTS,
    GRID_ARGS_FILE,
    GRID_COORDINATES_FILE,
    METRICS_FILE,
    RESUMABLE,
    RunDirectory,
    environment,
    host_label,
    write_json,
)
from peftlab.training import PARSED_TYPES
from peftlab.training import run as train_run


def grid_file(tmp_path, model_dir, data_dir, **changes):
    grid = {
        "output_root": str(tmp_path / "results"),
        "defaults": {"num_train_epochs": 1, "report_to": "none", "disable_tqdm": True, "data_dir": str(data_dir),
                     "per_device_train_batch_size": 4, "logging_steps": 1, "bf16": False},
        "models": {"tiny": {"slot": "bert-base-uncased", "model_name_or_path": model_dir, "learning_rate": 1e-3}},
        "datasets": ["restaurant_sup", "acl_sup"],
        "methods": {"full": {"tuning_method": "full"}, "lora-r8": {"tuning_method": "lora", "lora_r": 8}},
        "seeds": [1, 2],
        "overrides": [{"match": {"dataset": "acl_sup", "method": "full"}, "set": {"max_train_samples": 6}}],
        **changes,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_expand_merges_and_names_runs(tmp_path):
    path = grid_file(tmp_path, "m", "d")
    runs = expand(load_grid(path))
    assert len(runs) == 8
    acl_full = next(r for r in runs if (r.dataset, r.method, r.seed) == ("acl_sup", "full", 2))
    assert acl_full.args["max_train_samples"] == 6 and acl_full.args["learning_rate"] == 1e-3
    assert "slot" not in acl_full.args and acl_full.args["seed"] == 2
    assert acl_full.output_dir == tmp_path / "results" / "tiny" / "acl_sup" / "full" / "seed2"
    assert len({r.output_dir for r in runs}) == 8
    assert [r.seed for r in select(runs, ["method=lora-r8", "dataset=acl_sup"])] == [1, 2]
    assert [(r.dataset, r.seed) for r in select(runs, ["method=full", "seed=2"])] == [("restaurant_sup", 2),
                                                                                 ("acl_sup", 2)]
    assert len(select(runs, ["dataset=acl_sup,restaurant_sup", "seed=1,2"])) == 8
    with pytest.raises(InvalidArgument, match="the grid has no seed 3; it has 1, 2"):
        select(runs, ["method=full", "seed=2,3"])
    with pytest.raises(InvalidArgument, match="no model minlm; it has tiny"):
        select(runs, ["model=minlm"])
    for typo in ("model", "model=", "modle=tiny"):
        with pytest.raises(InvalidArgument, match=f"--only {typo}: expected KEY=VALUE"):
            select(runs, [typo])
    grid = load_grid(path)
    grid["models"]["tiny"]["methods"] = ["full"]
    grid["models"]["tiny"]["datasets"] = ["acl_sup"]
    assert [(r.dataset, r.method) for r in expand(grid)] == [("acl_sup", "full")] * 2
    # a match value may list several: the override fits any of them
    grid = load_grid(grid_file(tmp_path, "m", "d", overrides=[
        {"match": {"method": ["lora-r8", "adapter"], "seed": 2}, "set": {"modules_to_save": "pooler"}}]))
    assert [(r.dataset, r.method, r.seed) for r in expand(grid) if "modules_to_save" in r.args] == [
        ("restaurant_sup", "lora-r8", 2), ("acl_sup", "lora-r8", 2)]


def test_a_grid_extends_another(tmp_path, tiny_models, fixture_data_dir):
    parent = grid_file(tmp_path, tiny_models["bert"], fixture_data_dir)
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"extends": str(parent), "output_root": str(tmp_path / "check"),
                                     "defaults": {"num_train_epochs": 2}, "datasets": ["acl_sup"]}))
    runs = expand(load_grid(child))
    assert {r.dataset for r in runs} == {"acl_sup"} and {r.method for r in runs} == {"full", "lora-r8"}
    for run in runs:  # the parent's defaults, one changed; its overrides still apply
        assert run.args["num_train_epochs"] == 2 and run.args["per_device_train_batch_size"] == 4
        assert run.output_dir.is_relative_to(tmp_path / "check")
        assert ("max_train_samples" in run.args) == (run.method == "full")


def test_grid_commands_take_swept_cells_first_then_seed_by_seed(tmp_path, capsys):
    """A swept cell's seeds run first (its selected settings over seeds), then every other cell's seed 1 before any
    seed 2: workers never wait for each other between seeds, and a grid stopped early leaves every cell a result."""
    selection = tmp_path / "selected.yaml"
    selection.write_text(yaml.safe_dump({"tiny/acl_sup/lora-r8": {"study": "s", "trial": 3,
                                                                  "params": {"learning_rate": 2e-3}}}))
    path = grid_file(tmp_path, "m", "d", selection=str(selection), require_selection=True,
                     transfers=[{"match": {}, "from": {"dataset": "acl_sup", "method": "lora-r8"}}])
    ordered = [(run.dataset, run.method, run.seed, run.swept) for run in run_order(expand(load_grid(path)))]
    assert ordered == [("acl_sup", "lora-r8", 1, True), ("acl_sup", "lora-r8", 2, True),
                       ("restaurant_sup", "full", 1, False), ("restaurant_sup", "lora-r8", 1, False),
                       ("acl_sup", "full", 1, False),
                       ("restaurant_sup", "full", 2, False), ("restaurant_sup", "lora-r8", 2, False),
                       ("acl_sup", "full", 2, False)]
    # within a seed, longest first where estimates exist (a pass then ends on short runs); no estimate: longest
    runs = expand(load_grid(path))
    seconds = {run: {"full": 60.0, "lora-r8": 600.0}[run.method] for run in runs if run.dataset == "restaurant_sup"}
    assert [(run.dataset, run.method, run.seed) for run in run_order(runs, seconds)][2:5] == [
        ("acl_sup", "full", 1), ("restaurant_sup", "lora-r8", 1), ("restaurant_sup", "full", 1)]
    assert run_grid(str(path), dry_run=True) == 0  # the command lists (and would run) them in that order
    listed = [line.split()[1:5] for line in capsys.readouterr().out.splitlines() if line.startswith("  todo")]
    assert [(dataset, method, int(seed[4:])) for _, dataset, method, seed in listed] == [o[:3] for o in ordered]
    assert [(r.method, r.seed) for r in select(expand(load_grid(path)), ["swept=true"])] == [("lora-r8", 1),
                                                                                            ("lora-r8", 2)]
    assert len(select(expand(load_grid(path)), ["swept=false", "seed=1"])) == 3
    with pytest.raises(InvalidArgument, match="swept is true or false"):
        select(expand(load_grid(path)), ["swept=yes"])


def test_grids_must_pin_host_dependent_precision(tmp_path):
    defaults = load_grid(grid_file(tmp_path, "m", "d"))["defaults"]
    del defaults["bf16"]
    with pytest.raises(ValueError, match="bf16"):
        load_grid(grid_file(tmp_path, "m", "d", defaults=defaults))
    one_model_pinned = {"tiny": {"model_name_or_path": "m", "bf16": True}, "other": {"model_name_or_path": "m"}}
    with pytest.raises(ValueError, match="bf16"):
        load_grid(grid_file(tmp_path, "m", "d", defaults=defaults, models=one_model_pinned))
    for shipped in sorted((Path(__file__).resolve().parents[1] / "configs" / "grids").glob("*.yaml")):
        assert all(run.args["bf16"] is True for run in expand(load_grid(shipped))), shipped


def test_shards_cover_every_run_once(tmp_path):
    runs = expand(load_grid(grid_file(tmp_path, "m", "d")))
    parts = [shard(runs, f"{i}/3") for i in range(3)]
    assert sorted(r.label for part in parts for r in part) == sorted(r.label for r in runs)
    with pytest.raises(InvalidArgument, match="need 0 <= i < n"):
        shard(runs, "3/3")
    for typo in ("abc", "1/2/3", "1-2"):
        with pytest.raises(InvalidArgument, match=f"--shard {typo}: expected i/n"):
            shard(runs, typo)


def test_a_run_that_stops_on_a_user_error_is_reported_with_its_error_line(tmp_path, tiny_models, fixture_data_dir,
                                                                         capsys):
    """A typo only the loaded model reveals passes the grid's own check; the run fails, the grid says why."""
    path = grid_file(tmp_path, tiny_models["bert"], fixture_data_dir, seeds=[1], datasets=["restaurant_sup"],
                     methods={"lora-r8": {"tuning_method": "lora", "lora_r": 8, "lora_target_modules": "query,vlaue"}})
    assert run_grid(str(path)) == 1
    assert ("tiny restaurant_sup lora-r8 seed1 FAILED (exit 2)" in (out := capsys.readouterr().out)
            and out.rstrip().endswith("error: --lora_target_modules names modules BertForSequenceClassification "
                                      "lacks: vlaue")), out


def test_resume_after_kill_recomputes_nothing_finished(tmp_path, tiny_models, fixture_data_dir):
    path = grid_file(tmp_path, tiny_models["bert"], fixture_data_dir, seeds=[1, 2, 3])
    runs = expand(load_grid(path))
    grid = subprocess.Popen([sys.executable, "-m", "peftlab.experiments", str(path), "--only", "method=full",
                             "--only", "dataset=restaurant_sup"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = runs[0].directory.file(METRICS_FILE)
    deadline = time.time() + 240
    while not first.exists() and time.time() < deadline and grid.poll() is None:
        time.sleep(0.2)
    assert first.exists(), "the first run did not finish"
    second = str(runs[1].directory.file(GRID_ARGS_FILE))

    def second_running() -> bool:
        return subprocess.run(["pgrep", "-f", second], stdout=subprocess.DEVNULL).returncode == 0

    # the first run's process may take a while to exit (on a GPU, say) before the grid starts the second
    while not second_running() and time.time() < deadline and grid.poll() is None:
        time.sleep(0.1)
    assert second_running(), "the grid did not start its second run"
    grid.terminate()  # SIGTERM to the grid runner alone: it must take its run in flight down with it
    assert grid.wait(timeout=30) == 128 + signal.SIGTERM
    time.sleep(0.5)
    assert not second_running(), "orphaned run"
    stamp = first.stat().st_mtime_ns
    statuses = [r.status() for r in runs[:3]]
    assert statuses[0] == "done" and statuses[1] in ("incomplete", "todo") and statuses[2] == "todo"
    assert run_grid(str(path), filters=["method=full", "dataset=restaurant_sup"]) == 0
    assert first.stat().st_mtime_ns == stamp  # not recomputed
    assert [r.status() for r in runs[:3]] == ["done"] * 3
    # time estimates come from finished runs: the cell's mean, else the model and method's seconds per row
    runtimes = [r.directory.metrics()["train_runtime"] for r in runs[:3]]
    assert estimate_time(runs[0], runs).seconds == pytest.approx(sum(runtimes) / 3)
    assert estimate_time(runs[0], runs).hosts == {host_label(environment()["hardware"])}  # they ran here
    # a run that executed otherwise (here: before an execution setting existed) ran at another speed: the cell's
    # runs that executed as this one will time it, and it still counts as done
    first_args = runs[0].directory.grid_args()
    write_json(runs[0].directory.file(GRID_ARGS_FILE),
               {**first_args, "cpu_reuse_freed_memory": not runs[0].args.get("cpu_reuse_freed_memory")})
    assert runs[0].status() == "done"
    assert estimate_time(runs[0], runs).seconds == pytest.approx(sum(runtimes[1:]) / 2)
    write_json(runs[0].directory.file(GRID_ARGS_FILE), first_args)
    acl_full = next(r for r in runs if (r.dataset, r.method) == ("acl_sup", "full"))
    per_row = sum(t / 27 for t in runtimes) / 3  # 30 restaurant fixture rows, 3 held out, 1 epoch
    assert estimate_time(acl_full, runs).seconds == pytest.approx(per_row * 6)  # the override keeps 6 rows
    lora_r8 = next(r for r in runs if (r.dataset, r.method) == ("restaurant_sup", "lora-r8"))
    assert estimate_time(lora_r8, runs) is None
    # a cell whose settings transfer from a swept cell is timed by that cell's finished runs
    source = {"run_dir": str(tmp_path / "sweeps" / "trial0")}  # never ran: the grid's runs time it
    timed = [dataclasses.replace(r, settings=source) for r in (*runs[:3], lora_r8)]
    assert estimate_time(timed[-1], timed).seconds == pytest.approx(per_row * 27)
    # where tokens per row on the run's dataset are known (a run there finished), the estimate is per token: a
    # dataset of rows twice as long takes twice as long per row
    restaurant = runs[0].directory.record()
    acl_lora = next(r for r in runs if (r.dataset, r.method) == ("acl_sup", "lora-r8"))
    shutil.copytree(runs[0].output_dir, acl_lora.output_dir)
    write_json(acl_lora.directory.file(GRID_ARGS_FILE), acl_lora.args)
    write_json(acl_lora.directory.file("run.json"), {
        **restaurant, "data_args": {**restaurant["data_args"], "dataset_name": "acl_sup"},
        "train_tokens_per_epoch": 2 * restaurant["train_tokens_per_epoch"]})
    assert acl_lora.status() == "done"
    assert estimate_time(acl_full, runs).seconds == pytest.approx(per_row * 6 * 2)
    # a changed argument is reported and kept, never overwritten silently
    changed = grid_file(tmp_path, tiny_models["bert"], fixture_data_dir, seeds=[1, 2, 3],
                        defaults={**load_grid(path)["defaults"], "num_train_epochs": 2})
    assert expand(load_grid(changed))[0].status() == "changed"
    run_grid(str(changed), dry_run=True, filters=["method=full", "dataset=restaurant_sup"])
    assert first.stat().st_mtime_ns == stamp


def test_a_killed_run_resumes_from_its_checkpoint_unless_its_arguments_changed(tmp_path, tiny_models,
                                                                              fixture_data_dir):
    path = grid_file(tmp_path, tiny_models["bert"], fixture_data_dir, seeds=[1],
                     defaults={**load_grid(grid_file(tmp_path, tiny_models["bert"], fixture_data_dir))["defaults"],
                               "num_train_epochs": 3})
    first, second = expand(load_grid(path))[:2]  # restaurant_sup full and lora-r8
    for run in (first, second):  # each killed right after its first epoch's checkpoint
        run.output_dir.mkdir(parents=True)
        write_json(run.directory.file(GRID_ARGS_FILE), run.args)
        with pytest.raises(Killed):
            train_run(*parse_dict(PARSED_TYPES, run.args), callbacks=[KillAfterFirstCheckpoint()])
        assert run.status() == "incomplete" and run.checkpoint() is not None
    # the second one's grid arguments changed since (a new selection, say): its checkpoint is not theirs
    write_json(second.directory.file(GRID_ARGS_FILE), {**second.args, "learning_rate": 0.5})
    assert second.checkpoint() is None
    assert run_grid(str(path), filters=["dataset=restaurant_sup"]) == 0
    assert first.directory.record()["resumed_from_checkpoint"] == str(first.output_dir / "checkpoint-7")
    assert second.directory.record()["resumed_from_checkpoint"] is None
    assert [run.status() for run in (first, second)] == ["done", "done"]
    # checkpointing changes nothing a run computes: a run finished before grids saved checkpoints is done
    write_json(first.directory.file(GRID_ARGS_FILE),
               {key: value for key, value in first.args.items() if key not in RESUMABLE})
    assert first.status() == "done"
    # an argument train.py gained since the run: the grid that pins it at its old value still finds the run done
    first.args["shuffle_length_groups"] = ADDED_ARGUMENTS["shuffle_length_groups"]
    assert first.status() == "done"
    # settings that change memory, allocation or kernels, not what the run computes (a grid may set them while its
    # runs are under way)
    first.args.update(gradient_checkpointing_token_budget=1024, cpu_compile_mlp=True, cpu_reuse_freed_memory=False)
    assert first.status() == "done"
    first.args["shuffle_length_groups"] = not ADDED_ARGUMENTS["shuffle_length_groups"]
    assert first.status() == "changed" and first.checkpoint() is None


def test_workers_running_one_grid_take_each_run_once(tmp_path, tiny_models, fixture_data_dir):
    path = grid_file(tmp_path, tiny_models["bert"], fixture_data_dir, datasets=["restaurant_sup"])
    runs = expand(load_grid(path))
    held = runs[0]
    with claim(held, load_grid(path)["output_root"]) as lock:  # a live worker holds the first run
        assert lock is not None
        workers = [subprocess.Popen([sys.executable, "-m", "peftlab.experiments", str(path)], text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
        outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    started = [line for output in outputs for line in output.splitlines() if " -> " in line]
    assert sorted(line.split("] ")[1].split(" -> ")[0] for line in started) == sorted(r.label for r in runs[1:])
    assert held.status() == "todo" and all(r.status() == "done" for r in runs[1:])
    assert sum("another worker runs it" in output for output in outputs) == 2  # both skipped the held run
    assert run_grid(str(path)) == 0 and held.status() == "done"  # free once its holder let go


def write_fixture_run(root, model, dataset, method, seed, accuracy, macro_f1, runtime, amx=True):
    run = RunDirectory(root / model / dataset / method / f"seed{seed}")
    write_json(run.file(GRID_COORDINATES_FILE), {"model": model, "dataset": dataset, "method": method, "seed": seed})
    run_id = run.start({"resolved_model": {"checkpoint": f"org/{model}"}, "hardware": {"cpu_amx_bf16": amx}})
    run.finish(run_id, {
        "accuracy": accuracy, "micro_f1": accuracy, "macro_f1": macro_f1, "weighted_f1": accuracy,
        "trainable_percent": 100.0 if method == "full" else 1.0, "trainable_params": 494036352,
        "train_runtime": runtime, "train_tokens_per_second": 1000.0, "train_samples_per_second": 10.0,
        "peak_rss_mb": 2048.0})


def test_aggregation_of_fixture_runs(tmp_path):
    for seed, acc, f1, secs in ((1, 0.80, 0.60, 100.0), (2, 0.82, 0.64, 110.0), (3, 0.84, 0.68, 300.0)):
        write_fixture_run(tmp_path, "m", "acl_sup", "full", seed, acc, f1, secs)
    write_fixture_run(tmp_path, "m", "acl_sup", "lora-r8", 1, 0.5, 0.25, 50.0)
    # two runs on a host without AMX: their quality counts, their times are not comparable
    write_fixture_run(tmp_path, "m", "acl_sup", "lora-r8", 2, 0.7, 0.45, 900.0, amx=False)
    write_fixture_run(tmp_path, "m", "acl_sup", "lora-r16", 1, 0.6, 0.35, 800.0, amx=False)
    rows = aggregate(collect(tmp_path))
    assert [(r["method"], r["n"]) for r in rows] == [("full", 3), ("lora-r16", 1), ("lora-r8", 2)]
    assert rows[2]["accuracy_mean"] == pytest.approx(0.6) and rows[2]["train_runtime"] == pytest.approx(50.0)
    assert math.isnan(rows[1]["train_runtime"]) and rows[1]["peak_rss_mb"] == pytest.approx(2048.0)
    full = rows[0]
    assert full["accuracy_mean"] == pytest.approx(0.82) and full["accuracy_std"] == pytest.approx(0.02)
    assert full["macro_f1_mean"] == pytest.approx(0.64) and full["macro_f1_std"] == pytest.approx(0.04)
    # costs are medians: the seed-3 run that was slowed down by other work does not move them
    assert full["train_runtime"] == pytest.approx(110.0) and full["checkpoint"] == "org/m"
    assert math.isnan(rows[1]["accuracy_std"])
    table = markdown_table(rows)
    assert "| m | acl_sup | lora-r16 | 1 | 60.0 | 60.0 | 35.0 | 60.0 | 1.00 | – | – | 2048 |" in table
    assert "| m | acl_sup | full | 3 | 82.0 ± 2.0 | 82.0 ± 2.0 | 64.0 ± 4.0 | 82.0 ± 2.0 | 100.00 | 110 |" in table
    assert "| m | acl_sup | lora-r8 | 2 | 60.0 ± 14.1 | " in table
    write_csv(rows, tmp_path / "out" / "results.csv")
    csv_text = (tmp_path / "out" / "results.csv").read_text()
    assert csv_text.splitlines()[1].startswith("m,acl_sup,full,3,1 2 3,org/m,0.82,0.02,")
    # two seeds' median parameter count is a float; the file keeps it whole, not 4.94036e+08
    lora_r8 = csv_text.splitlines()[3]
    assert lora_r8.startswith("m,acl_sup,lora-r8,2,1 2,org/m,0.6,") and ",1,494036352," in lora_r8


def test_seeds_by_dataset_and_a_models_own_seeds(tmp_path):
    from collections import Counter

    grid = load_grid(grid_file(tmp_path, "m", "d", seeds=[1, 2, 3], seeds_by_dataset={"acl_sup": [1, 2, 3, 4, 5]}))
    seeds_per_cell = Counter((run.dataset, run.method) for run in expand(grid))
    assert seeds_per_cell == {("acl_sup", "full"): 5, ("acl_sup", "lora-r8"): 5,
                              ("restaurant_sup", "full"): 3, ("restaurant_sup", "lora-r8"): 3}
    grid["models"]["tiny"]["seeds"] = [7]  # a model's own seeds win over both
    assert {run.seed for run in expand(grid)} == {7}


def test_a_transferred_cell_whose_first_run_collapsed_runs_again_at_a_lower_learning_rate(
        tmp_path, tiny_models, fixture_data_dir, capsys):
    """The collapse rule: a cell that took another cell's settings and whose first run predicts one class on
    validation runs again at learning_rate x factor, the collapsed run kept aside; a swept cell never does."""
    selection = tmp_path / "selected.yaml"  # a learning rate that diverges: every tiny run predicts one class
    selection.write_text(yaml.safe_dump({"tiny/restaurant_sup/full": {"study": "s", "trial": 0,
                                                                      "params": {"learning_rate": 1e4}}}))
    defaults = {**load_grid(grid_file(tmp_path, tiny_models["bert"], fixture_data_dir))["defaults"],
                "validation_split": 0.1}
    spec = {"selection": str(selection), "require_selection": True, "datasets": ["restaurant_sup"], "seeds": [1],
            "defaults": defaults, "transfers": [{"match": {"method": "lora-r8"}, "from": {"method": "full"}}]}
    path = grid_file(tmp_path, tiny_models["bert"], fixture_data_dir, **spec)
    assert run_grid(str(path)) == 0  # without the rule: both cells kept as they ran
    full, lora = expand(load_grid(path))
    assert all(collapsed(run.directory.metrics()) for run in (full, lora))
    stamp = full.directory.file(METRICS_FILE).stat().st_mtime_ns
    kept = tmp_path / "collapsed"
    rule = {"learning_rate_factor": 0.5, "max_retries": 2, "kept_in": str(kept)}
    path = grid_file(tmp_path, tiny_models["bert"], fixture_data_dir, **spec, collapse_retry=rule)
    capsys.readouterr()
    assert run_grid(str(path), dry_run=True) == 0 and "  collapsed  tiny restaurant_sup lora-r8 seed1" in (
        capsys.readouterr().out)
    # the rule holds for runs that finished before it: set aside, then again after its rerun collapsed, then kept
    assert run_grid(str(path)) == 0
    assert capsys.readouterr().out.count("COLLAPSED") == 2
    aside = sorted(p.name for p in (kept / "tiny" / "restaurant_sup" / "lora-r8").iterdir())
    assert aside == ["seed1-lr1e+04", "seed1-lr5e+03"]
    assert RunDirectory(kept / "tiny" / "restaurant_sup" / "lora-r8" / aside[0]).grid_args()["learning_rate"] == 1e4
    full, lora = expand(load_grid(path))
    assert lora.status() == "done" and lora.args["learning_rate"] == 2500
    assert lora.directory.grid_coordinates()["settings"]["learning_rate_factor"] == 0.25
    assert full.status() == "done" and full.args["learning_rate"] == 1e4 and not (kept / "tiny" / "restaurant_sup"
                                                                                  / "full").exists()
    assert full.directory.file(METRICS_FILE).stat().st_mtime_ns == stamp  # a swept cell chose its own settings
    for wrong in ({**rule, "learning_rate_factor": 2.0}, {**rule, "max_retries": "two"}, {"kept_in": "x"}, "half"):
        with pytest.raises(InvalidArgument, match="collapse_retry"):
            load_grid(grid_file(tmp_path, "m", "d", collapse_retry=wrong))


@pytest.mark.parametrize(("changes", "pattern"), [
    ({"methods": {"full": {"tuning_method": "full", "num_train_epoch": 2}}},
     r"grid\.yaml: tiny restaurant_sup full seed1: Some keys are not used .*'num_train_epoch'"),
    ({"datasets": ["restaurnt_sup"]}, r"tiny restaurnt_sup full seed1: unknown dataset 'restaurnt_sup'"),
])
def test_a_grid_whose_runs_train_py_would_refuse_fails_as_it_loads(tmp_path, changes, pattern):
    with pytest.raises(InvalidArgument, match=pattern):
        load_grid(grid_file(tmp_path, "m", "d", **changes))


def test_cpu_model_names_the_generation_that_a_virtual_machine_name_hides(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpu = "processor\t: {}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n\n"
    cpuinfo.write_text(cpu.format(0) + cpu.format(1))
    assert cpu_model(cpuinfo) == "AMD EPYC, family 25 model 1"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\n")  # no family: the name alone
    assert cpu_model(cpuinfo) == "Some CPU"
    assert cpu_model(tmp_path / "missing") is None


def test_host_label_names_the_bf16_hardware_even_in_old_records():
    assert host_label({"cpu_model": "AMD EPYC", "native_bf16": None, "cpu_amx_bf16": False}) == \
        "AMD EPYC (no native bf16)"
    assert host_label({"cpu_model": "Intel(R) Xeon(R) Processor", "native_bf16": "amx_bf16"}) == \
        "Intel(R) Xeon(R) Processor (amx_bf16)"
    assert host_label({"cpu_model": None, "cpu_amx_bf16": True}) == "CPU model unrecorded (amx_bf16)"
    assert host_label({"cpu_amx_bf16": False}) == "CPU model unrecorded (bf16 support unrecorded)"
    assert host_label({"cpu_model": "AMD EPYC", "cuda": "NVIDIA H200"}) == "NVIDIA H200"
