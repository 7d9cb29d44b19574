import pytest
import torch
from conftest import load_benchmark_script

from peftlab.benchmark import _batches, markdown, matmul_peak, measure
from peftlab.errors import UserError
from peftlab.hardware import bf16_matmuls_fall_back


def test_matmul_peak_is_positive():
    assert matmul_peak(torch.float32, size=128, repeats=3) > 1e6


def test_padding_strategies(tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["bert"])
    texts = ["the food", "the food was great but service slow"] * 8
    fixed = _batches(tokenizer, texts, 4, "max_length", 16, 4)
    dynamic = _batches(tokenizer, texts, 4, "dynamic", 16, 4)
    grouped = _batches(tokenizer, texts, 4, "grouped", 16, 4)
    assert all(b["input_ids"].shape == (4, 16) for b in fixed)
    assert all(b["input_ids"].shape[1] == 9 for b in dynamic)
    assert sum(b["input_ids"].numel() for b in grouped) < sum(b["input_ids"].numel() for b in dynamic)


@pytest.mark.parametrize("method,checkpointing", [("full", False), ("lora-r8", False), ("lora-r8", True)])
def test_measure_tiny(method, checkpointing, tiny_models, real_data_dir):
    result = measure(tiny_models["qwen2"], method, "bf16", "dynamic", batch_size=4, steps=2, warmup=1, threads=1,
                     data_dir=str(real_data_dir), max_length=32, gradient_checkpointing=checkpointing)
    assert result["gradient_checkpointing"] is checkpointing
    assert result["train_step_s"]["n"] == 2 and result["train_tokens_per_s"] > 0
    assert result["backward_over_forward"] > 0
    assert "| backward / forward |" in markdown([result], {"bf16": 1e12, "fp32": 1e12, "threads": 1})
    assert result["infer_examples_per_s"] > 0 and result["peak_rss_mb"] > 0
    assert ("merged_infer_examples_per_s" in result) == (method != "full")


def test_fresh_process_call_and_its_errors():
    from peftlab.isolated import call_in_fresh_process

    assert call_in_fresh_process("peftlab.memory:builtin_config_names")[:1] == ["Qwen2.5-0.5B"]
    with pytest.raises(RuntimeError, match="no_such_function"):  # a bug keeps its traceback
        call_in_fresh_process("peftlab.memory:no_such_function")
    with pytest.raises(UserError, match=r"^'/no/such/model' is neither a folder nor a hub id"):  # one line, as here
        call_in_fresh_process("peftlab.models:resolve_model", name_or_path="/no/such/model")


def test_measure_compares_attention_kernels_and_dropout(tiny_models, real_data_dir):
    results = [measure(tiny_models["bert"], "lora-r8", "bf16", "dynamic", batch_size=4, steps=1, warmup=1, threads=1,
                       data_dir=str(real_data_dir), max_length=32, attn_implementation=kernel, fast_dropout=fast,
                       matmuls_in_fp32=False)
               for kernel, fast in (("sdpa", True), ("eager", True), ("eager", False))]
    assert [r["attn_implementation"] for r in results] == ["sdpa", "eager", "eager"]
    from peftlab.benchmark import markdown

    table = markdown(results, {"fp32": 1e11, "bf16": 4e11, "threads": 1}).splitlines()
    assert table[0].startswith("| model | method | precision | frozen weights | checkpointing | padding | attention | "
                               "dropout | LoRA input | RMSNorm |")
    # LoRA under bf16 loads its frozen weights in bf16, as train.py's --frozen_weights_dtype auto does
    # (RMSNorm and MLP eager, attention not compiled, PyTorch's bf16 products, freed memory unmapped, one thread)
    settings = "| eager | eager | no | bf16 kernels | unmapped | 1 |"
    assert f"| lora-r8 | bf16 | bfloat16 | no | dynamic | eager | fast | as is {settings}" in table[3]
    assert f"| lora-r8 | bf16 | bfloat16 | no | dynamic | eager | torch | as is {settings}" in table[4]


def test_stock_recipe_summary_states_speed_up_and_paired_quality():
    """benchmarks/stock_recipe.py's table: medians, the speed-up over the stock arm, differences paired by seed."""
    stock_recipe = load_benchmark_script("stock_recipe")
    results = []
    for seed in (1, 2, 3):
        for arm, seconds, accuracy in zip(stock_recipe.ARMS, (300, 60, 100, 60), (0.75, 0.74, 0.74, 0.70),
                                          strict=True):
            results.append({"arm": arm, "seed": seed, "seconds": seconds + seed, "accuracy": accuracy + seed / 100,
                            "macro_f1": accuracy - 0.2})
    rows = stock_recipe.summary(results).splitlines()
    assert rows[2].startswith("| stock | 3 | 301 / 302 / 303 | 302 | 1.00x | 77.0 [74.5, 79.5] | – |")
    # each train.py arm is paired by seed with the baseline arm (random batches, the default grouping replaced)
    assert rows[3].startswith("| train.py | 3 | 61 / 62 / 63 | 62 | 4.87x | 76.0 [73.5, 78.5] | +0.0 [+0.0, +0.0] |")
    assert rows[4].startswith(f"| {stock_recipe.BASELINE} | 3 | 101 / 102 / 103 | 102 | 2.96x | 76.0 [73.5, 78.5] |")
    assert "| 61 / 62 / 63 | 62 | 4.87x | 72.0 [69.5, 74.5] | -4.0 [-4.0, -4.0] |" in rows[5]


def test_measure_defaults_to_the_models_own_attention(tiny_models, real_data_dir):
    """MPNet has no SDPA kernel: by default the benchmark builds each model as train.py does."""
    result = measure(tiny_models["mpnet"], "full", "fp32", "dynamic", batch_size=4, steps=1, warmup=1, threads=1,
                     data_dir=str(real_data_dir), max_length=32)
    assert result["attn_implementation"] == "eager" and result["train_step_s"]["median"] > 0


def test_cuda_defaults_batches_keep_real_lengths_and_pad_as_each_variant_does():
    """benchmarks/cuda_defaults.py: the rows' real token counts, padded per batch, to 128, or in length groups."""
    from types import SimpleNamespace

    cuda_defaults = load_benchmark_script("cuda_defaults")
    config = SimpleNamespace(pad_token_id=1, vocab_size=64)
    lengths = list(range(5, 45)) * 20
    random = cuda_defaults.batches(lengths, "random", 4, 4, config, "cpu", seed=0)
    grouped = cuda_defaults.batches(lengths, "grouped", 4, 4, config, "cpu", seed=0)
    padded = cuda_defaults.batches(lengths, "max_length", 4, 4, config, "cpu", seed=0)
    for made in (random, grouped, padded):
        for batch in made:
            mask = batch["attention_mask"].bool()
            assert set(batch["attention_mask"].sum(1).tolist()) <= set(lengths)
            assert (batch["input_ids"][~mask] == 1).all() and (batch["input_ids"][mask] != 1).all()
    assert all(b["input_ids"].shape[1] == 128 for b in padded)
    # grouped batches hold rows of similar length: short rows with short, long with long
    assert all(b["attention_mask"].sum(1).max() - b["attention_mask"].sum(1).min() <= 3 for b in grouped)
    assert sum(b["input_ids"].numel() for b in grouped) < sum(b["input_ids"].numel() for b in random)


def test_cuda_defaults_runs_every_variant_on_cpu(tiny_models, tmp_path, monkeypatch):
    """The device script's code path, on a tiny config on CPU: every variant measured, the summary's ratios."""
    import json
    import sys

    cuda_defaults = load_benchmark_script("cuda_defaults")
    lengths = tmp_path / "lengths.json"
    lengths.write_text(json.dumps({"lengths": {"bert-base-uncased": [5, 9, 12, 30, 7, 8, 20, 11] * 8}}))
    out = tmp_path / "defaults"
    monkeypatch.setattr(sys, "argv", ["cuda_defaults.py", "--device", "cpu", "--models", tiny_models["bert"],
                                      "--methods", "lora-r16", "--steps", "2",
                                      "--repeats", "2", "--lengths", str(lengths), "--out", str(out)])
    cuda_defaults.main()
    results = json.loads(out.with_suffix(".json").read_text())["results"]
    assert len(results) == 2 * len(cuda_defaults.VARIANTS) and all(r["tokens_per_s"] > 0 for r in results)
    stock = next(r for r in results if r["variant"] == "stock recipe")
    assert (stock["bf16"], stock["fused_adamw"], stock["frozen_weights_dtype"]) == (False, False, "float32")
    table = out.with_suffix(".md").read_text().splitlines()
    assert table[2].startswith("| model | method | defaults tokens/s | defaults' padding | vs fp32 |")
    assert len(table) == 5 and table[4].split(" | ")[1] == "lora-r16"
    # one ratio per repeat
    assert all(len(cell.split(" / ")) == 2 for cell in table[4].strip("| ").split(" | ")[4:])


@pytest.mark.skipif(bf16_matmuls_fall_back(), reason="oneDNN packs bf16 weights on CPUs with AVX-512 or AVX-NE-CONVERT")
def test_packed_linear_gives_the_same_numbers_and_a_row_per_layer(tmp_path):
    """benchmarks/packed_linear.py: prepacked weights compute what plain ones do, forward and input gradient."""
    packed_linear = load_benchmark_script("packed_linear")
    result = packed_linear.measure_layer(128, 96, tokens=8, repeats=1, calls=1)
    assert result["max_diff"] == 0 and set(result["seconds"]) == {
        "forward", "forward packed", "input grad", "input grad packed"}
    out = tmp_path / "packed"
    packed_linear.main(["--tokens", "8", "--threads", "1", "--repeats", "1", "--calls", "1", "--out", str(out)])
    lines = out.with_suffix(".md").read_text().splitlines()
    assert sum(line.startswith("| 8 |") for line in lines) == len(packed_linear.DECODER_LAYER)
    assert lines[-1].startswith("- 8 rows per call:")


def test_attention_kernels_compares_flash_and_math_on_the_same_attention(tmp_path):
    """benchmarks/attention_kernels.py: both kernels time the same inputs, and compute the same attention."""
    attention_kernels = load_benchmark_script("attention_kernels")
    out = tmp_path / "kernels"
    attention_kernels.main(["--tokens", "8", "200", "--rows", "2", "--heads", "2", "--head_dim", "8",
                            "--repeats", "1", "--threads", "1", "--out", str(out)])
    lines = out.with_suffix(".md").read_text().splitlines()
    short, long = (line.split(" | ") for line in lines[-2:])
    assert short[0] == "| 8" and short[-1] == "math |" and long[-1] == "flash |"
    assert all(float(row[4]) < 0.05 for row in (short, long))  # bf16 rounding, not a different attention


def test_attention_kernels_times_whole_evaluations_of_finished_runs(tmp_path, tiny_models, fixture_data_dir):
    """benchmarks/attention_kernels.py --runs: a finished run's test rows predicted under both kernels, as train.py
    evaluates them; the kernels compute the same attention, so they label the rows alike."""
    from peftlab.training import main as train_main

    run = tmp_path / "run"
    metrics = train_main(["--model_name_or_path", tiny_models["qwen2"], "--dataset_name", "restaurant_sup",
                          "--data_dir", str(fixture_data_dir), "--output_dir", str(run), "--tuning_method", "lora",
                          "--num_train_epochs", "1", "--bf16", "True", "--report_to", "none"])
    out = tmp_path / "evaluations"
    load_benchmark_script("attention_kernels").main(["--runs", str(run), "--repeats", "1", "--threads", "1",
                                                     "--out", str(out)])
    row = out.with_suffix(".md").read_text().splitlines()[-1].split(" | ")
    assert row[0] == f"| {run}" and row[5] == "100.0%"
    assert row[6] == f"{100 * metrics['accuracy']:.1f} / {100 * metrics['accuracy']:.1f}"


def test_measure_takes_a_checkpoints_first_layers_and_can_reuse_freed_memory(tiny_models, real_data_dir):
    """--num_hidden_layers keeps the checkpoint's first layers (a deep model's step in less memory), and the
    table names the model so; --reuse_freed_memory 1 measures as train.py's --cpu_reuse_freed_memory runs."""
    settings = dict(precision="bf16", padding="grouped", batch_size=4, steps=1, warmup=1, threads=1,
                    data_dir=str(real_data_dir), max_length=32)
    whole = measure(tiny_models["qwen2"], "full", **settings)
    first = measure(tiny_models["qwen2"], "full", **settings, num_hidden_layers=1, reuse_freed=True)
    assert first["model"] == f"{tiny_models['qwen2']} (first 1 layers)" and first["reuse_freed"] is True
    assert first["total_params"] < whole["total_params"] and whole["reuse_freed"] is False
    assert "| reused |" in markdown([first], {"bf16": 1e12, "fp32": 1e12, "threads": 1})


def test_main_measures_every_combination_in_order_and_refuses_a_bad_switch(tiny_models, real_data_dir, tmp_path,
                                                                            capsys):
    """The command line: each option's values in every combination, the last option varying fastest (so "0 1 0 1"
    alternates), each in a fresh process; the decoders' MLPs compiled as train.py's --cpu_compile_mlp does, except
    where bf16 products run by fp32 kernels (--bf16_matmuls_in_fp32 1), as train.py skips compilation there."""
    import json

    from peftlab.benchmark import main

    main(["--models", tiny_models["qwen2"], "--methods", "lora-r8", "--precisions", "bf16", "--threads", "1",
          "--steps", "1", "--warmup", "1", "--batch_size", "4", "--max_length", "32", "--data_dir", str(real_data_dir),
          "--compile_mlp", "1", "--compile_attention", "1", "--reuse_freed_memory", "0", "1",
          "--bf16_matmuls_in_fp32", "0", "1", "--out", str(tmp_path / "table")])
    results = json.loads((tmp_path / "table.json").read_text())["results"]
    assert [(r["reuse_freed"], r["matmuls_in_fp32"], r["compile_mlp"]) for r in results] == [
        (False, False, True), (False, True, False), (True, False, True), (True, True, False)]
    rows = (tmp_path / "table.md").read_text().splitlines()
    assert "| RMSNorm | MLP | attention compiled | bf16 products | freed memory |" in rows[2]
    assert "| eager | compiled | yes | bf16 kernels | unmapped |" in rows[4]
    assert "| eager | eager | no | fp32 kernels | reused |" in rows[7]
    with pytest.raises(SystemExit):
        main(["--compile_mlp", "2"])
    assert "argument --compile_mlp: expected 0 or 1, got '2'" in capsys.readouterr().err
