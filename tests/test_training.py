"""End-to-end train.py runs on real data with MiniLM, and a fresh-process predict afterwards."""

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftlab.errors import InvalidArgument
from peftlab.results import collect
from peftlab.training import PeftlabTrainingArguments, main, parse_args

ROOT = Path(__file__).resolve().parents[1]


def train(tmp_path, real_data_dir, method, *extra):
    out = tmp_path / method
    metrics = main(["--model_name_or_path", "all-MiniLM-L6-v2", "--dataset_name", "restaurant_sup",
                    "--data_dir", str(real_data_dir), "--output_dir", str(out), "--tuning_method", method,
                    "--max_train_samples", "320", "--max_eval_samples", "64", "--logging_steps", "4",
                    "--do_predict", "true", *extra])
    return out, metrics


def fresh_process_predict(run_dir: Path) -> list[str]:
    target = run_dir / "fresh_predictions.txt"
    subprocess.run([sys.executable, str(ROOT / "predict.py"), "--run_dir", str(run_dir), "--output_file", str(target)],
                   check=True, cwd=ROOT, capture_output=True)
    return target.read_text().splitlines()


@pytest.mark.slow
def test_full_fine_tune_end_to_end(tmp_path, real_data_dir, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    out, metrics = train(tmp_path, real_data_dir, "full", "--num_train_epochs", "2", "--learning_rate", "1e-4")
    for name in ("run.json", "metrics.json", "trainer_state.json", "train.log", "predict_results.txt",
                 "model/model.safetensors", "model/tokenizer.json"):
        assert (out / name).is_file(), name
    record = json.loads((out / "run.json").read_text())
    assert record["resolved_model"]["checkpoint"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert record["resolved_model"]["source"] == "package"
    assert record["sep_token"] == " [SEP] " and record["num_train_rows"] == 320 and record["num_test_rows"] == 64
    assert record["label_names"] == ["positive", "neutral", "negative"]
    assert record["training_args"]["run_name"] == "all-MiniLM-L6-v2__restaurant_sup__full__seed42"
    assert {"torch", "transformers", "peft", "adapters"} <= set(record["versions"]) and "git_commit" in record
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    for key in ("accuracy", "micro_f1", "macro_f1", "weighted_f1", "train_runtime", "train_samples_per_second",
                "train_tokens_per_second", "trainable_params", "total_params", "peak_rss_mb"):
        assert isinstance(saved[key], float | int), key
    assert saved["trainable_percent"] == 100.0 and saved["total_params"] > 22_000_000
    per_class = [saved[f"f1_{name}"] for name in record["label_names"]]  # what macro-F1 averages
    assert saved["macro_f1"] == pytest.approx(sum(per_class) / 3)  # all three occur in the 64 test rows
    # throughput leaves out the per-epoch test evaluations, and aggregation derives it the same way
    assert 0 < saved["eval_seconds_during_training"] < saved["train_runtime"]
    assert saved["train_tokens_per_second"] == pytest.approx(
        record["train_tokens_per_epoch"] * 2 / (saved["train_runtime"] - saved["eval_seconds_during_training"]))
    (collected,) = collect(tmp_path)
    assert collected.metrics["train_tokens_per_second"] == pytest.approx(saved["train_tokens_per_second"])
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) >= 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # the loss went down
    evals = [entry for entry in history if "eval_accuracy" in entry]
    assert [e["epoch"] for e in evals] == [0.5, 1.0, 1.5, 2.0]  # at least 4 evaluations (--min_evaluations)
    assert (out / "train.log").read_text().count("Final test metrics") == 1
    assert list((out / "wandb").glob("offline-run-*")), "wandb runs offline by default without a login"
    predictions = (out / "predict_results.txt").read_text().splitlines()
    assert len(predictions) == 65 and predictions[0] == "index\tprediction"
    assert fresh_process_predict(out) == predictions


@pytest.mark.slow
def test_shuffled_length_groups_train_on_the_same_batches_in_a_random_order():
    """The batches of --group_by_length (each of rows of similar length), not longest to shortest within each
    mega-batch as Trainer orders them, but in an order drawn from the seeded torch RNG."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from peftlab.training import ShuffledLengthGroupedSampler

    lengths = [(7 * i) % 97 + 3 for i in range(1000)]

    def batches(sampler_type, seed):
        torch.manual_seed(seed)
        rows = list(sampler_type(16, lengths=lengths))
        assert sorted(rows) == list(range(1000))
        return [tuple(rows[i:i + 16]) for i in range(0, 1000, 16)]

    grouped, shuffled = batches(LengthGroupedSampler, 0), batches(ShuffledLengthGroupedSampler, 0)
    assert set(shuffled) == set(grouped) and shuffled != grouped
    assert shuffled == batches(ShuffledLengthGroupedSampler, 0) != batches(ShuffledLengthGroupedSampler, 1)

    def longest_first_runs(order):  # consecutive batches whose longest row shrinks
        longest = [max(lengths[i] for i in batch) for batch in order]
        return sum(a >= b for a, b in itertools.pairwise(longest))
    assert longest_first_runs(grouped) > 0.9 * len(grouped)
    assert longest_first_runs(shuffled) < 0.7 * len(shuffled)


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_peft_methods_end_to_end(method, tmp_path, real_data_dir):
    out, metrics = train(tmp_path, real_data_dir, method, "--num_train_epochs", "1", "--learning_rate", "1e-3",
                         "--report_to", "none")
    assert 0 < metrics["trainable_percent"] < 5
    record = json.loads((out / "run.json").read_text())
    # --frozen_weights_dtype auto: the frozen weights load in bf16 exactly when bf16 autocast is on
    assert record["frozen_weights_dtype"] == ("bfloat16" if record["training_args"]["bf16"] else "float32")
    assert fresh_process_predict(out) == (out / "predict_results.txt").read_text().splitlines()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["full", "lora", "adapter"])
def test_train_and_predict_on_cuda(method, tmp_path, tiny_models, fixture_data_dir):
    """The same train.py and predict.py on a GPU: bf16 by default there, CUDA memory recorded."""
    out = tmp_path / method
    metrics = main(["--model_name_or_path", tiny_models["bert"], "--dataset_name", "restaurant_sup",
                    "--data_dir", str(fixture_data_dir), "--output_dir", str(out), "--tuning_method", method,
                    "--num_train_epochs", "2", "--learning_rate", "1e-3", "--report_to", "none",
                    "--do_predict", "true"])
    record = json.loads((out / "run.json").read_text())
    assert record["hardware"]["cuda"] == torch.cuda.get_device_name()
    assert record["training_args"]["bf16"] is True and record["training_args"]["use_cpu"] is False
    assert metrics["cuda_max_allocated_mb"] > 0 and 0 <= metrics["accuracy"] <= 1
    assert fresh_process_predict(out) == (out / "predict_results.txt").read_text().splitlines()


def test_config_file_and_defaults(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model_name_or_path: all-MiniLM-L6-v2\ndataset_name: acl_sup\ntuning_method: lora\n"
                      "lora_r: 16\noutput_dir: somewhere\n")
    data, model, method, training = parse_args([str(config)])
    assert (data.dataset_name, model.model_name_or_path, method.lora_r) == ("acl_sup", "all-MiniLM-L6-v2", 16)
    assert isinstance(training, PeftlabTrainingArguments)
    assert training.num_train_epochs == 3 and training.learning_rate == 2e-5
    # per-epoch evaluation, but 3 epochs are fewer than --min_evaluations 4: every quarter of the steps instead
    assert training.eval_strategy == "steps" and training.eval_steps == 0.25
    assert data.max_seq_length == 256 and training.save_strategy == "no"
    with pytest.raises(SystemExit):  # argparse: the choices are the registered methods
        parse_args(["--model_name_or_path", "x", "--tuning_method", "prefix"])


def test_help_is_the_manual():
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                            cwd=ROOT, check=True)
    for flag in ("--dataset_name", "--tuning_method", "--lora_r", "--adapter_reduction_factor", "--max_seq_length"):
        assert flag in result.stdout


def test_predict_returns_rows_in_dataset_order_under_group_by_length(tmp_path, tiny_models):
    """Evaluation runs longest first (the stock Trainer shuffles it under --group_by_length), and predict()
    hands back each row's own logits and label, in the dataset's order."""
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, TrainingArguments

    from peftlab.data import tokenize
    from peftlab.hardware import attention_kernels
    from peftlab.models import get_model
    from peftlab.training import PeftlabTrainer, eval_order

    tokenizer, model = get_model(tiny_models["bert"], 3)
    words = "the food was good but service slow".split()
    rows = Dataset.from_dict({"text": [" ".join(words[: 1 + (3 * i) % 7]) for i in range(40)],
                              "label": [i % 3 for i in range(40)]})
    encoded = tokenize(rows, tokenizer, 32)
    trainer = PeftlabTrainer(model=model.eval(), data_collator=DataCollatorWithPadding(tokenizer),
                             args=TrainingArguments(output_dir=str(tmp_path), report_to=[], group_by_length=True,
                                                    per_device_eval_batch_size=8, use_cpu=True))
    padded = [batch["input_ids"].shape[1] for batch in trainer.get_test_dataloader(encoded)]
    assert padded == sorted(padded, reverse=True) and len(set(padded)) > 2  # batches longest first
    assert [len(encoded[i]["input_ids"]) for i in eval_order(encoded)][::8] == padded
    output = trainer.predict(encoded)
    assert output.label_ids.tolist() == rows["label"]
    # the same attention kernel as predict()'s batches (all under 128 tokens): the comparison is of row order
    with torch.no_grad(), attention_kernels(32, "cpu"):
        one_by_one = [model(**tokenizer(text, return_tensors="pt")).logits[0] for text in rows["text"]]
    assert torch.allclose(torch.tensor(output.predictions), torch.stack(one_by_one), atol=1e-5)


def tiny_decoder_run(out: Path, tiny_models, fixture_data_dir, method: str, *extra: str):
    """A 2-epoch bf16 run of the tiny Qwen2 on the fixture restaurants: its metrics and its logged losses."""
    metrics = main(["--model_name_or_path", tiny_models["qwen2"], "--dataset_name", "restaurant_sup",
                    "--data_dir", str(fixture_data_dir), "--output_dir", str(out), "--tuning_method", method,
                    "--num_train_epochs", "2", "--learning_rate", "1e-3", "--logging_steps", "1", "--bf16", "True",
                    "--report_to", "none", "--seed", "5", *extra])
    losses = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    return metrics, losses


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_gradient_checkpointing_changes_memory_not_results(method, tmp_path, tiny_models, fixture_data_dir):
    """The assignment grid recomputes the 1.5B decoder's activations in the backward pass (its ACL-ARC batches
    of 16 x 256 tokens would hold ~15 GB): the same run with and without it ends with the same losses and scores."""
    plain, plain_losses = tiny_decoder_run(tmp_path / "plain", tiny_models, fixture_data_dir, method)
    recomputed, recomputed_losses = tiny_decoder_run(
        tmp_path / "recomputed", tiny_models, fixture_data_dir, method,
        "--gradient_checkpointing", "True", "--gradient_checkpointing_kwargs", '{"use_reentrant": false}')
    assert recomputed_losses == pytest.approx(plain_losses, abs=2e-3)
    assert recomputed["macro_f1"] == pytest.approx(plain["macro_f1"], abs=1e-6)
    # within a token budget only the layers a batch needs recompute (the fixture's batches hold 40-400 tokens)
    budgeted, budgeted_losses = tiny_decoder_run(
        tmp_path / "budget", tiny_models, fixture_data_dir, method, "--gradient_checkpointing", "True",
        "--gradient_checkpointing_kwargs", '{"use_reentrant": false}', "--gradient_checkpointing_token_budget", "100")
    assert budgeted_losses == pytest.approx(plain_losses, abs=2e-3)
    assert budgeted["macro_f1"] == pytest.approx(plain["macro_f1"], abs=1e-6)


def test_a_token_budget_recomputes_as_few_layers_as_each_batch_needs(tiny_models, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from peftlab.training import PeftlabTrainer, PeftlabTrainingArguments, layers_to_recompute

    assert [layers_to_recompute(tokens, 1024, 28) for tokens in (512, 1024, 1100, 2048, 4096)] == [0, 0, 2, 14, 21]
    assert layers_to_recompute(4096, 0, 28) == 28  # no budget: every layer, every batch
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["qwen2"], num_labels=3)
    args = PeftlabTrainingArguments(output_dir=str(tmp_path), report_to="none", eval_strategy="no",
                                    gradient_checkpointing=True, gradient_checkpointing_token_budget=100)
    trainer = PeftlabTrainer(model=model, args=args)
    model.gradient_checkpointing_enable()
    layers = trainer.checkpointing_layers
    assert len(layers) == model.config.num_hidden_layers >= 2
    for rows, recomputing in ((4, 0), (50, math.ceil(len(layers) * 3 / 4))):  # 32 and 400 tokens
        trainer._recompute_within_budget({"input_ids": torch.ones(rows, 8, dtype=torch.long)})
        assert [layer.gradient_checkpointing for layer in layers] == [i < recomputing for i in range(len(layers))]
    with pytest.raises(InvalidArgument, match="needs --gradient_checkpointing True"):
        PeftlabTrainingArguments(output_dir=str(tmp_path), report_to="none", gradient_checkpointing_token_budget=100)


def test_short_cpu_training_batches_run_sdpa_on_its_math_kernel(tmp_path, tiny_models, fixture_data_dir):
    """On CPU, training steps of rows up to --cpu_math_attention_max_length tokens run SDPA's math kernel (PyTorch
    would pick its flash kernel, whose backward is slower at short rows), longer ones PyTorch's choice, and
    evaluation always PyTorch's choice (flash's forward alone is the faster); both kernels compute the same
    attention, so a run's losses and scores match with the switch off."""
    from datasets import Dataset
    from transformers import DataCollatorWithPadding

    from peftlab.data import tokenize
    from peftlab.hardware import attention_kernels
    from peftlab.models import get_model
    from peftlab.training import PeftlabTrainer

    def flash_allowed(width, device, limit):
        with attention_kernels(width, device, limit):
            return torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()
    assert flash_allowed(27, "cpu", 128) == (False, True)
    assert flash_allowed(129, "cpu", 128)[0] and flash_allowed(27, "cuda", 128)[0] and flash_allowed(27, "cpu", 0)[0]
    assert flash_allowed(None, "cpu", 128)[0]  # a batch of unknown width: PyTorch's choice

    tokenizer, model = get_model(tiny_models["qwen2"], 3)
    seen = []  # whether flash was allowed, per forward call: 4 training steps, then one prediction step
    model.register_forward_pre_hook(lambda module, args: seen.append(torch.backends.cuda.flash_sdp_enabled()))
    words = "the food was good but service slow".split()
    rows = tokenize(Dataset.from_dict({"text": [" ".join(words[: 1 + i % 7]) for i in range(16)],
                                       "label": [i % 3 for i in range(16)]}), tokenizer, 32)
    for limit, training in ((128, {False}), (4, {True, False})):  # at 4 tokens per row, only the shortest run math
        seen.clear()
        trainer = PeftlabTrainer(model=model, train_dataset=rows, data_collator=DataCollatorWithPadding(tokenizer),
                                 args=PeftlabTrainingArguments(output_dir=str(tmp_path), report_to="none",
                                                               per_device_train_batch_size=4, num_train_epochs=1,
                                                               eval_strategy="no", save_strategy="no"),
                                 math_attention_max_length=limit)
        trainer.train()
        trainer.predict(rows)
        assert len(seen) == 4 + 1 and set(seen[:4]) == training and seen[4]

    math, math_losses = tiny_decoder_run(tmp_path / "math", tiny_models, fixture_data_dir, "lora")
    flash, flash_losses = tiny_decoder_run(tmp_path / "flash", tiny_models, fixture_data_dir, "lora",
                                           "--cpu_math_attention_max_length", "0")
    assert math_losses == pytest.approx(flash_losses, abs=2e-3)
    assert math["macro_f1"] == pytest.approx(flash["macro_f1"], abs=1e-6)


def test_cpu_fast_dropout_is_on_by_default_recorded_and_switchable(tmp_path, tiny_models, fixture_data_dir):
    """train.py draws LoRA's dropout masks the fast way by default (other random numbers, so other losses at the
    same seed) and records it; --cpu_fast_dropout False trains with torch.nn.Dropout, repeatably."""
    runs = {name: tiny_decoder_run(tmp_path / name, tiny_models, fixture_data_dir, "lora", *extra)[1]
            for name, extra in (("fast", ()), ("torch", ("--cpu_fast_dropout", "False")),
                                ("torch_again", ("--cpu_fast_dropout", "False")))}
    assert runs["torch"] == runs["torch_again"] and runs["fast"] != runs["torch"]
    assert runs["fast"] == pytest.approx(runs["torch"], abs=0.2)  # the same training, other masks
    for name, flag in (("fast", True), ("torch", False)):
        assert json.loads((tmp_path / name / "run.json").read_text())["model_args"]["cpu_fast_dropout"] is flag


def test_compiled_norms_mlps_and_attention_train_as_the_eager_ones(tmp_path, tiny_models, fixture_data_dir):
    """--cpu_compile_rms_norm, --cpu_compile_mlp and --cpu_compile_attention fuse each RMSNorm, each gated MLP and
    the training steps' attention of a decoder (Llama, Qwen2) into compiled kernels: the same losses up to float
    rounding, the same scores, with the weights frozen (LoRA, the adapter) or trained (full fine-tuning); encoders
    have none to compile, and a decoder on eager attention (the user's choice) keeps it."""
    from peftlab.hardware import (
        COMPILED_ATTENTION,
        compile_modules,
        gated_mlp_classes,
        rms_norm_classes,
        use_cpu_compiled_attention,
    )
    from peftlab.models import get_model

    # 2 layers x 2 norms + the final one; one MLP and one attention module per layer
    for arch, norms, mlps, attention in (("qwen2", 5, 2, 2), ("llama", 5, 2, 2), ("bert", 0, 0, 0)):
        _, model = get_model(tiny_models[arch], 3)
        assert compile_modules(model, rms_norm_classes()) == norms
        assert compile_modules(model, gated_mlp_classes()) == mlps
        assert use_cpu_compiled_attention(model) == attention
        assert (model.config._attn_implementation == COMPILED_ATTENTION) == bool(attention)
    _, model = get_model(tiny_models["qwen2"], 3, attn_implementation="eager")
    assert use_cpu_compiled_attention(model) == 0 and model.config._attn_implementation == "eager"
    compiled_flags = ("--cpu_compile_rms_norm", "True", "--cpu_compile_mlp", "True", "--cpu_compile_attention", "True",
                      "--cpu_bf16_matmuls_in_fp32", "False")  # which would skip compilation
    eager_losses = {}
    for method in ("lora", "adapter", "full"):
        eager, eager_losses[method] = tiny_decoder_run(tmp_path / f"eager-{method}", tiny_models, fixture_data_dir,
                                                       method)
        compiled, compiled_losses = tiny_decoder_run(tmp_path / f"compiled-{method}", tiny_models, fixture_data_dir,
                                                     method, *compiled_flags)
        assert compiled_losses == pytest.approx(eager_losses[method], abs=2e-3)
        assert compiled["macro_f1"] == pytest.approx(eager["macro_f1"], abs=1e-6)
    # and where the 1.5B decoder's runs recompute activations in the backward pass, through the compiled modules
    _, recomputed_losses = tiny_decoder_run(
        tmp_path / "recomputed", tiny_models, fixture_data_dir, "lora", *compiled_flags,
        "--gradient_checkpointing", "True", "--gradient_checkpointing_kwargs", '{"use_reentrant": false}')
    assert recomputed_losses == pytest.approx(eager_losses["lora"], abs=2e-3)
    model_args = json.loads((tmp_path / "compiled-lora" / "run.json").read_text())["model_args"]
    assert model_args["cpu_compile_rms_norm"] is True and model_args["cpu_compile_mlp"] is True
    assert model_args["cpu_compile_attention"] is True
    assert "Training steps' attention compiled (inductor) in 2 attention modules" in (
        tmp_path / "compiled-lora" / "train.log").read_text()


def test_bf16_matrix_products_in_fp32_train_as_bf16_and_are_recorded(tmp_path, tiny_models, fixture_data_dir):
    """--cpu_bf16_matmuls_in_fp32: the tiny decoder's bf16 LoRA run with its matrix products in fp32 logs the losses
    of the run with PyTorch's bf16 kernels, up to bf16 rounding; run.json records the value that ran (not given: on
    where this CPU has no native bf16 products), and the --cpu_compile_* options are skipped under it."""
    from peftlab.hardware import native_bf16

    runs = {name: tiny_decoder_run(tmp_path / name, tiny_models, fixture_data_dir, "lora", *extra)
            for name, extra in (("fp32", ("--cpu_bf16_matmuls_in_fp32", "True", "--cpu_compile_mlp", "True")),
                                ("bf16", ("--cpu_bf16_matmuls_in_fp32", "False")), ("default", ()))}
    assert runs["fp32"][1] == pytest.approx(runs["bf16"][1], abs=0.02)
    assert runs["fp32"][0]["macro_f1"] == pytest.approx(runs["bf16"][0]["macro_f1"], abs=0.1)
    recorded = {name: json.loads((tmp_path / name / "run.json").read_text())["model_args"]["cpu_bf16_matmuls_in_fp32"]
                for name in runs}
    assert recorded == {"fp32": True, "bf16": False, "default": native_bf16() is None}
    log = (tmp_path / "fp32" / "train.log").read_text()
    assert "bf16 matrix products in fp32: no module compiled" in log and "Compiled" not in log


def test_reused_freed_memory_faults_no_pages_in_and_changes_nothing_computed(tmp_path, tiny_models, fixture_data_dir):
    """--cpu_reuse_freed_memory (on by default) keeps what glibc's malloc frees for reuse: a fresh process that
    allocates and frees a 64 MB tensor faults its pages in again each time without it, not at all with it once
    the heap has grown (a few rounds); and the tiny decoder's full fine-tuning, each way in a fresh process, logs
    the same losses to the last digit."""
    count_faults = ("import resource, sys, torch; from peftlab.hardware import reuse_freed_memory\n"
                    "applied = sys.argv[1] == 'True' and reuse_freed_memory()\n"
                    "for _ in range(10): torch.ones(2**24)\n"
                    "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
                    "for _ in range(5): torch.ones(2**24)\n"
                    "print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")
    faults = {}
    for reuse in ("True", "False"):
        done = subprocess.run([sys.executable, "-c", count_faults, reuse], capture_output=True, text=True, check=True)
        applied, faults[reuse] = done.stdout.split()
        assert applied == reuse
    assert int(faults["False"]) >= 5 * 2**26 // 4096 // 2 and int(faults["True"]) < 1000  # 4 KB pages

    losses = {}
    for reuse in ("True", "False"):
        out = tmp_path / reuse
        done = subprocess.run(
            [sys.executable, "-m", "peftlab.training", "--model_name_or_path", tiny_models["qwen2"],
             "--dataset_name", "restaurant_sup", "--data_dir", str(fixture_data_dir), "--output_dir", str(out),
             "--tuning_method", "full", "--num_train_epochs", "2", "--logging_steps", "1", "--bf16", "True",
             "--report_to", "none", "--cpu_reuse_freed_memory", reuse], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("malloc keeps freed memory for reuse" in done.stdout) == (reuse == "True")
        losses[reuse] = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"]
                         if "loss" in e]
    assert len(losses["True"]) > 2 and losses["True"] == losses["False"]
