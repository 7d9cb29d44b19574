"""VRAM estimator: a hand-computed tiny config, and trainable counts equal to real wrapping."""

import pytest
import torch
from transformers import BertConfig

from peftlab.memory import (
    GIB,
    builtin_config_names,
    estimate,
    load_config,
    scenario_table,
)
from peftlab.methods import MethodArguments, get_method, parameter_counts
from peftlab.models import get_model

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=64)


def test_hand_computed_tiny_bert():
    config = BertConfig(**TINY, num_labels=2)
    # embeddings 64*32 + 512*32 + 2*32 + LayerNorm 64 = 18560; per layer q,k,v,o 4*(32*32+32) = 4224,
    # 2 LayerNorms 128, MLP 32*64+64 + 64*32+32 = 4192 -> 8544, x2 = 17088; pooler 1056; classifier 66
    est = estimate(config, "full", "fp32", batch_size=1, seq_len=8)
    assert est.total_params == 18560 + 17088 + 1056 + 66 == 36770
    assert (est.weights, est.gradients, est.optimizer) == (36770 * 4, 36770 * 4, 36770 * 8)
    # per token and layer: 2h + h + 3h + h + h + 2i = 64 + 32 + 96 + 32 + 32 + 128 = 384 values of 4 bytes,
    # x 8 tokens x 2 layers = 24576, plus the embedding output 8 x 32 x 4 = 1024
    assert est.activations == 25600
    eager = estimate(config, "full", "fp32", batch_size=1, seq_len=8, eager_attention=True)
    assert eager.activations - est.activations == 2 * (4 * 1 * 4 * 8 * 8 * 2)  # scores + probs, 2 layers
    mixed = estimate(config, "full", "bf16-mixed", batch_size=1, seq_len=8)
    assert mixed.weights == est.weights and mixed.activations == est.activations // 2
    lora = estimate(config, "lora", "bf16-mixed", batch_size=1, seq_len=8, lora_r=8)
    assert lora.trainable_params == 2 * 2 * 8 * 64 + 66  # q and v in 2 layers, r*(in+out); head copy
    assert lora.optimizer == lora.trainable_params * 8 and lora.weights == (36770 + lora.trainable_params) * 4


@pytest.mark.parametrize("arch", ["roberta", "qwen2", "llama", "mpnet"])
@pytest.mark.parametrize("method,kwargs", [("lora", {"lora_r": 8}), ("lora", {"lora_r": 16}),
                                           ("lora", {"lora_r": 4, "lora_target_modules": "all-linear"}),
                                           ("adapter", {"adapter_reduction_factor": 16}), ("ia3", {})])
def test_trainable_counts_match_real_wrapping(arch, method, kwargs, tiny_models):
    """The estimator counts through the method's own wrap on the meta device: any registered method, exactly."""
    from test_methods import arch_kwargs

    kwargs = kwargs | arch_kwargs(arch, method)
    _, model = get_model(tiny_models[arch], 3)
    predicted = estimate(model.config, method, batch_size=1, seq_len=1, **kwargs).trainable_params
    wrapped = get_method(method).wrap(model, MethodArguments(tuning_method=method, **kwargs))
    assert parameter_counts(wrapped)["trainable_params"] == predicted


def test_builtin_configs_have_published_sizes():
    assert set(builtin_config_names()) >= {"bert-base-uncased", "roberta-large", "Qwen2.5-0.5B", "Qwen2.5-1.5B",
                                           "Qwen2.5-3B"}
    sizes = {name: estimate(load_config(name), batch_size=1, seq_len=1).total_params - head
             for name, head in (("bert-base-uncased", 2 * 768 + 2), ("roberta-large", 1024 * 1024 + 1024 + 2050),
                                ("Qwen2.5-0.5B", 896 * 2), ("Qwen2.5-3B", 2048 * 2))}
    # published body sizes; RoBERTa's classification model has no pooler (355,359,744 - 1024*1024 - 1024)
    assert sizes == {"bert-base-uncased": 109_482_240, "roberta-large": 354_310_144,
                     "Qwen2.5-0.5B": 494_032_768, "Qwen2.5-3B": 3_085_938_688}


def test_3b_full_vs_lora():
    config = load_config("Qwen2.5-3B")
    full = estimate(config, "full", "bf16-mixed", batch_size=16, seq_len=256)
    lora = estimate(config, "lora", "bf16-mixed", batch_size=16, seq_len=256, lora_r=8)
    assert 16 * full.total_params == full.weights + full.gradients + full.optimizer  # 16 bytes per parameter
    assert lora.gradients + lora.optimizer < 0.01 * (full.gradients + full.optimizer)
    assert full.total / GIB > 45 and lora.total / GIB < full.total / GIB / 2
    table = scenario_table("Qwen2.5-3B")
    assert table.count("\n| ") == 8 and "| full, fp32 | 3,085,942,784 |" in table


def test_measurement_runs_and_tables(tiny_models):
    from peftlab.benchmark import measure_step_memory, measurement_table

    result = measure_step_memory(tiny_models["qwen2"], "lora-r8", batch_size=2, seq_len=8, steps=1)
    assert result["measured_bytes"] > 0 and result["trainable_params"] > 0
    table = measurement_table([result])
    assert "| lora-r8 | 2 x 8 |" in table and table.count("\n") == 3


def test_device_measurement_on_cpu(tiny_models):
    """The accelerator check's code path, run on the CPU: times but no CUDA memory, and its table."""
    from peftlab.benchmark import device_table, measure_device_step

    results = [measure_device_step(tiny_models["qwen2"], method, batch_size=2, seq_len=8, steps=2, warmup=1,
                                   device="cpu") for method in ("lora-r8", "adapter")]
    results.append(measure_device_step(tiny_models["qwen2"], "lora-r8", batch_size=2, seq_len=8, steps=2, warmup=1,
                                       device="cpu", frozen_weights_dtype="bfloat16"))
    lora, adapter, lora_bf16 = results
    # frozen weights in bf16: estimated with 2 bytes per stored weight, the same parameters train
    assert lora_bf16["frozen_weights_dtype"] == "bfloat16" and lora_bf16["trainable_params"] == lora["trainable_params"]
    assert lora_bf16["estimated_weights_bytes"] < lora["estimated_weights_bytes"]
    assert lora["peak_bytes"] is None and lora["train_step_s"]["n"] == 2 and "merged_infer_batch_s" in lora
    assert "merged_infer_batch_s" not in adapter
    assert 0 < lora["trainable_params"] < lora["total_params"]
    assert lora["estimated_trainable_params"] == lora["trainable_params"]  # estimator counts what peft adds
    table = device_table(results).splitlines()
    assert table[0].startswith("Device: cpu") and len(table) == 7
    assert "| lora-r8 | float32 | 2 x 8 |" in table[4] and table[4].count("|") == 13
    assert "| lora-r8 | bfloat16 | 2 x 8 |" in table[6]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_device_check_without_cuda_is_a_clear_error(tmp_path, capsys):
    from peftlab.memory import main

    with pytest.raises(SystemExit):
        main(["--check_device", str(tmp_path / "vram")])
    assert "needs a CUDA device" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_per_gpu_memory_by_sharding_strategy():
    from peftlab.memory import Estimate, per_gpu_bytes, smallest_gpu_count

    est = Estimate(total_params=10, trainable_params=10, weights=400, gradients=400, optimizer=800, activations=100)
    gathered = 40
    assert per_gpu_bytes(est, 4, "ddp", False, gathered) == 1700  # a full replica
    assert per_gpu_bytes(est, 4, "zero1", False, gathered) == 400 + 400 + 200 + 100
    assert per_gpu_bytes(est, 4, "zero2", False, gathered) == 400 + 100 + 200 + 100
    assert per_gpu_bytes(est, 4, "zero2", True, gathered) == 400 + 100 + 0 + 100  # AdamW state in CPU memory
    assert per_gpu_bytes(est, 4, "zero3", False, gathered) == (400 + 400 + 800) // 4 + 40 + 100
    assert per_gpu_bytes(est, 4, "fsdp", False, gathered) == per_gpu_bytes(est, 4, "zero3", False, gathered)
    assert per_gpu_bytes(est, 4, "fsdp", True, gathered) == 40 + 100  # only the gathered unit and activations
    with pytest.raises(ValueError, match="offload needs ZeRO or FSDP"):
        per_gpu_bytes(est, 2, "ddp", True, gathered)
    assert smallest_gpu_count(est, "zero3", False, gathered, card_bytes=540) == 4  # 1600/n + 140 <= 540
    assert smallest_gpu_count(est, "ddp", False, gathered, card_bytes=1000) is None


def test_multi_gpu_table_for_the_3b_decoder():
    from peftlab.memory import largest_unit_params, multi_gpu_table

    # Qwen2.5-3B: the embeddings (151936 x 2048) outweigh any one of its 36 decoder layers
    assert largest_unit_params(load_config("Qwen2.5-3B")) > 151936 * 2048
    text = multi_gpu_table("Qwen2.5-3B").splitlines()
    assert "one GPU needs 58.6 GiB" in text[0]
    assert text[4].startswith("| ddp | 58.6 | 58.6 | 58.6 | does not fit | does not fit | does not fit | 1 |")
    assert len(text) == 2 + 2 + 7
