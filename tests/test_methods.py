"""Tuning methods on tiny random BERT, RoBERTa, MPNet, Qwen2 and Llama models."""

import contextlib

import pytest
import torch

from peftlab.methods import (
    METHODS,
    MethodArguments,
    get_method,
    head_parameters,
    method_from_label,
    method_label,
    parameter_counts,
)
from peftlab.models import get_model

LABELS = {0: "a", 1: "b", 2: "c"}
ARCHS = ["bert", "roberta", "mpnet", "qwen2", "llama"]


def wrapped(tiny_models, arch, method, **kwargs):
    torch.manual_seed(0)
    tokenizer, model = get_model(tiny_models[arch], 3, LABELS)
    return tokenizer, get_method(method).wrap(model, MethodArguments(tuning_method=method, **kwargs))


def arch_kwargs(arch: str, method: str) -> dict:
    """peft has no IA3 defaults for MPNet: its attention projections are k, v and its outputs o."""
    return {"ia3_target_modules": "k,v,o", "ia3_feedforward_modules": "o"} if (arch, method) == ("mpnet", "ia3") else {}


def batch(tokenizer):
    encoded = tokenizer(["the food was great", "bad service", "we follow prior work"], padding=True,
                        return_tensors="pt")
    return {**encoded, "labels": torch.tensor([0, 1, 2])}


def trainable_names(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


OWN_WEIGHTS = {"lora": "lora_", "ia3": "ia3_l", "adapter": "adapters."}  # in the names of each method's weights


def expected_trainable(name: str, method: str) -> bool:
    # the head, and BERT's pooler, which the tiny MLM checkpoint lacks (so it starts random too)
    in_head = any(part in ("classifier", "score", "pooler") for part in name.split("."))
    if method in ("lora", "ia3"):  # peft trains saved copies of the head
        return OWN_WEIGHTS[method] in name or ("modules_to_save" in name and in_head)
    return "adapters." in name or in_head  # adapter: bottleneck weights and the head


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["lora", "ia3", "adapter"])
def test_only_expected_parameters_train_and_change(arch, method, tiny_models):
    tokenizer, model = wrapped(tiny_models, arch, method, **arch_kwargs(arch, method))
    names = trainable_names(model)
    assert names and all(expected_trainable(n, method) for n in names), sorted(names)
    assert any(OWN_WEIGHTS[method] in n for n in names)
    assert any("classifier" in n or "score" in n for n in names)  # the head trains too
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch(tokenizer)).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= names
    # LoRA's B starts at zero, so after one step both A... at least the head and the method's own weights move
    assert any("classifier" in n or "score" in n for n in changed)
    assert any(("lora_B" in n) if method == "lora" else (OWN_WEIGHTS[method] in n) for n in changed)


def test_full_trains_everything(tiny_models):
    _, model = wrapped(tiny_models, "bert", "full")
    counts = parameter_counts(model)
    assert counts["trainable_params"] == counts["total_params"] and counts["trainable_percent"] == 100.0


def test_lora_count_by_hand(tiny_models):
    # tiny BERT: hidden 32, 2 layers; LoRA r=8 on query and value adds A (8x32) + B (32x8) per module:
    # 2 modules x 2 layers x 512 = 2048; the classifier (32x3 + 3 = 99) and the pooler the checkpoint
    # lacks (32x32 + 32 = 1056) train as saved copies.
    _, model = wrapped(tiny_models, "bert", "lora", lora_r=8, lora_alpha=16)
    assert parameter_counts(model)["trainable_params"] == 2048 + 99 + 1056


def test_adapter_count_by_hand(tiny_models):
    # Houlsby, reduction 16 on hidden 32 -> bottleneck 2: down (32x2 + 2) + up (2x32 + 32) = 162 per adapter,
    # two adapters per layer, 2 layers = 648; plus the classifier 99 and the pooler 1056.
    _, model = wrapped(tiny_models, "bert", "adapter", adapter_reduction_factor=16)
    assert parameter_counts(model)["trainable_params"] == 648 + 99 + 1056


def train_save_reload(model, tokenizer, method, base_path, tmp_path):
    """Train the trainable weights a little (so a random head on reload would show), save them, load them back
    onto ``base_path`` and check the logits match: (the reloaded model, its inputs, the expected logits)."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch(tokenizer)).loss.backward()
        optimizer.step()
    model.eval()
    inputs = {k: v for k, v in batch(tokenizer).items() if k != "labels"}
    with torch.no_grad():
        expected = model(**inputs).logits
    METHODS[method].save(model, tmp_path / "model")
    reloaded = METHODS[method].load(base_path, tmp_path / "model").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
    return reloaded, inputs, expected


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["full", "lora", "ia3", "adapter"])
def test_save_and_reload_same_logits(arch, method, tiny_models, tmp_path):
    tokenizer, model = wrapped(tiny_models, arch, method, **arch_kwargs(arch, method))
    reloaded, inputs, expected = train_save_reload(model, tokenizer, method, tiny_models[arch], tmp_path)
    served = METHODS[method].for_inference(reloaded)
    with torch.no_grad():
        torch.testing.assert_close(served(**inputs).logits, expected, atol=1e-4, rtol=1e-4)
    if METHODS[method].merges:
        assert not any(OWN_WEIGHTS[method] in n for n, _ in served.named_parameters())  # merged into the base


def test_lora_target_defaults_and_errors(tiny_models):
    _, model = wrapped(tiny_models, "qwen2", "lora")
    assert set(model.peft_config["default"].target_modules) == {"q_proj", "v_proj"}
    _, model = wrapped(tiny_models, "bert", "lora", lora_target_modules="all-linear")
    assert any("intermediate.dense.lora_A" in n for n in trainable_names(model))
    with pytest.raises(ValueError, match="unknown tuning_method 'prefix'"):
        MethodArguments(tuning_method="prefix")


@pytest.mark.parametrize("label", ["full", "adapter", "lora-r8", "lora-r32", "ia3"])
def test_method_label_round_trips(label):
    assert method_label(method_from_label(label)) == label


def test_ia3_count_by_hand_and_unknown_architecture(tiny_models):
    # tiny BERT, peft's defaults (key, value, output.dense; output.dense as feed-forward): the key and value
    # outputs (32 each) and the inputs of both layers named output.dense, the attention output's (32) and the
    # feed-forward output's (64), per layer: 160, x 2 layers = 320; plus the classifier 99 and the pooler 1056
    _, model = wrapped(tiny_models, "bert", "ia3")
    assert parameter_counts(model)["trainable_params"] == 320 + 99 + 1056
    assert get_method("ia3").argument_fields == ("ia3_target_modules", "ia3_feedforward_modules")
    with pytest.raises(ValueError, match="IA3 on model_type 'mpnet'.*--ia3_target_modules"):
        wrapped(tiny_models, "mpnet", "ia3")


def test_method_from_bad_label_is_clear():
    assert method_from_label("lora").lora_r == MethodArguments().lora_r
    with pytest.raises(ValueError, match="unknown tuning_method 'prefix'"):
        method_from_label("prefix")
    with pytest.raises(ValueError):
        method_from_label("lora-rx")


def test_adapter_unsupported_architecture_is_clear():
    from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification

    model = GPTNeoXForSequenceClassification(GPTNeoXConfig(hidden_size=32, num_hidden_layers=1,
                                                           num_attention_heads=4, intermediate_size=64,
                                                           vocab_size=64, num_labels=2))
    with pytest.raises(ValueError, match=r"do not support model_type 'gpt_neox'; supported: .*bert.*mpnet.*qwen2"):
        get_method("adapter").wrap(model, MethodArguments(tuning_method="adapter"))


def test_head_parameters_find_each_architecture_head(tiny_models):
    for arch in ARCHS:
        _, model = get_model(tiny_models[arch], 3, LABELS)
        assert head_parameters(model), arch


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_head_trains_even_when_the_checkpoint_has_one(method, tiny_models, tmp_path):
    # a classifier saved with the same labels loads with nothing missing; its head still trains
    tokenizer, model = get_model(tiny_models["roberta"], 3, LABELS)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    _, reloaded = get_model(str(tmp_path), 3, LABELS)
    assert reloaded.newly_initialized_modules == []
    wrapped_model = get_method(method).wrap(reloaded, MethodArguments(tuning_method=method))
    assert any("classifier" in n for n in trainable_names(wrapped_model))


@pytest.mark.parametrize("arch", ["bert", "qwen2"])
@pytest.mark.parametrize("method", ["lora", "ia3", "adapter"])
def test_frozen_weights_in_bf16_train_in_fp32(arch, method, tiny_models):
    """Loaded in bfloat16 (--frozen_weights_dtype): the frozen weights stay bf16 and unchanged, every trainable
    parameter (method and head) is fp32 and moves, and the bf16-autocast step matches fp32-frozen weights'."""
    from peftlab.errors import InvalidArgument
    from peftlab.methods import frozen_weights_dtype, upcast_trainable

    args = MethodArguments(tuning_method=method)
    tuning = get_method(method)
    assert frozen_weights_dtype(tuning, "auto", bf16=True) == torch.bfloat16
    assert frozen_weights_dtype(tuning, "auto", bf16=False) == torch.float32
    assert frozen_weights_dtype(tuning, "float32", bf16=True) == torch.float32
    with pytest.raises(InvalidArgument, match="needs --bf16 True"):
        frozen_weights_dtype(tuning, "bfloat16", bf16=False)
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        tokenizer, model = get_model(tiny_models[arch], 3, LABELS, dtype=dtype)
        model = upcast_trainable(tuning.wrap(model, args))
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
        assert {p.dtype for n, p in model.named_parameters() if n in frozen} == {dtype}
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch(tokenizer)).loss
        loss.backward()
        optimizer.step()
        assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
        losses[dtype] = loss.item()
    # autocast computes the frozen matmuls in bf16 either way: only norms and embeddings are rounded differently
    assert losses[torch.bfloat16] == pytest.approx(losses[torch.float32], abs=0.05)


def test_full_fine_tuning_keeps_fp32_master_weights():
    from peftlab.errors import InvalidArgument
    from peftlab.methods import frozen_weights_dtype

    assert frozen_weights_dtype(get_method("full"), "auto", bf16=True) == torch.float32
    with pytest.raises(InvalidArgument, match="freezes no weights"):
        frozen_weights_dtype(get_method("full"), "bfloat16", bf16=True)


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_modules_to_save_train_beside_the_method_and_reload(method, tiny_models, tmp_path):
    # a BERT classifier saved whole: its pooler loads from the checkpoint, so it stays frozen unless named
    tokenizer, model = get_model(tiny_models["bert"], 3, LABELS)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    _, base = get_model(str(tmp_path / "base"), 3, LABELS)
    assert base.newly_initialized_modules == []
    assert not any("pooler" in n for n in trainable_names(get_method(method).wrap(
        base, MethodArguments(tuning_method=method))))
    torch.manual_seed(0)
    _, base = get_model(str(tmp_path / "base"), 3, LABELS)
    model = get_method(method).wrap(base, MethodArguments(tuning_method=method, modules_to_save="pooler"))
    assert {n for n in trainable_names(model) if "pooler" in n}  # the pooler (peft: its saved copy) trains
    original = base.bert.pooler.dense.weight.detach().clone() if method == "adapter" else None
    # the same logits after the reload: the trained pooler came back with the method's weights
    reloaded, _, _ = train_save_reload(model, tokenizer, method, str(tmp_path / "base"), tmp_path)
    if original is not None:
        assert not torch.equal(reloaded.bert.pooler.dense.weight, original)
    with pytest.raises(ValueError, match="--modules_to_save names modules BertForSequenceClassification lacks: nope"):
        get_method(method).wrap(get_model(str(tmp_path / "base"), 3, LABELS)[1],
                                MethodArguments(tuning_method=method, modules_to_save="pooler,nope"))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_cpu_fast_dropout_masks_have_torch_dropouts_distribution(p):
    """Four mask elements per 64-bit random word: each lane keeps 1 - p of its elements (the word's top bit, always 0,
    must not bias the lane that holds it), kept values are scaled by 1 / (1 - p) as torch.nn.Dropout scales them, the
    gradient is the same mask, a seed repeats the mask, and evaluation passes the input through."""
    from peftlab.hardware import CpuFastDropout

    dropout = CpuFastDropout(p)
    hidden = torch.ones(1000, 1024, requires_grad=True)
    torch.manual_seed(0)
    out = dropout(hidden)
    kept = out != 0
    for lane in range(4):  # elements 4k + lane come from the same 16 bits of each word
        assert kept.flatten()[lane::4].float().mean().item() == pytest.approx(1 - p, abs=0.003)
    assert torch.equal(out[kept], torch.full_like(out[kept], 1 / (1 - p)))
    out.sum().backward()
    assert torch.equal(hidden.grad, out.detach())
    torch.manual_seed(0)
    assert torch.equal(dropout(hidden), out)
    assert not torch.equal(dropout(hidden), out)  # the generator moved on
    assert dropout.eval()(hidden) is hidden
    bf16 = CpuFastDropout(p).train()(torch.ones(7, 5, 3, dtype=torch.bfloat16))  # any shape, a count not divisible by 4
    assert bf16.dtype == torch.bfloat16 and bf16.shape == (7, 5, 3)


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_cpu_fast_dropout_replaces_every_dropout_module_and_changes_no_evaluation(method, tiny_models):
    from peftlab.hardware import CpuFastDropout, use_cpu_fast_dropout

    tokenizer, model = wrapped(tiny_models, "mpnet", method)
    model.eval()
    inputs = {key: value for key, value in batch(tokenizer).items() if key != "labels"}
    before = model(**inputs).logits
    rates = [module.p for module in model.modules() if type(module) is torch.nn.Dropout]
    assert len(rates) > 10 and max(rates) > 0  # MPNet's own (hidden, attention) and the method's
    fast = use_cpu_fast_dropout(model)
    assert not [module for module in fast.modules() if type(module) is torch.nn.Dropout]
    assert [module.p for module in fast.modules() if isinstance(module, CpuFastDropout)] == rates
    assert torch.equal(fast(**inputs).logits, before)


def test_bf16_matrix_products_in_fp32_round_what_fp32_kernels_compute():
    """Under Bf16MatmulsInFp32 each bf16 matrix product is the fp32 product of its bf16 operands rounded to bf16
    (what a native bf16 kernel computes, up to the order of summation: within a bf16 rounding of PyTorch's own
    kernel); fp32 products are left as they are."""
    from peftlab.hardware import Bf16MatmulsInFp32

    torch.manual_seed(0)
    a, b, bias = torch.randn(8, 32), torch.randn(32, 16), torch.randn(16)
    batched_a, batched_b = torch.randn(3, 8, 32), torch.randn(3, 32, 16)
    products = {"mm": lambda x, y, _: torch.mm(x, y), "addmm": lambda x, y, c: torch.addmm(c, x, y),
                "linear": lambda x, y, c: torch.nn.functional.linear(x, y.t(), c)}
    batched = {"bmm": lambda x, y, _: torch.bmm(x, y), "baddbmm": lambda x, y, c: torch.baddbmm(c, x, y)}
    for product, operands in [*((f, (a, b, bias)) for f in products.values()),
                              *((f, (batched_a, batched_b, bias.expand(3, 8, 16))) for f in batched.values())]:
        bf16 = [t.bfloat16() for t in operands]
        with Bf16MatmulsInFp32():
            result = product(*bf16)
            fp32_result = product(*operands)
        assert result.dtype == torch.bfloat16
        assert torch.equal(result, product(*(t.float() for t in bf16)).bfloat16())
        assert torch.allclose(result.float(), product(*bf16).float(), rtol=1e-2, atol=1e-2)
        assert torch.equal(fp32_result, product(*operands))


def test_bf16_matrix_products_in_fp32_reach_the_backward_pass_and_train_as_native_bf16(tiny_models):
    """A LoRA step of the tiny Qwen2 under bf16 autocast: with the mode, its forward and backward products (input
    and weight gradients) all pass through it, and loss and gradients are as close to fp32's as native bf16's."""
    from peftlab.hardware import MATRIX_PRODUCTS, Bf16MatmulsInFp32

    class Counted(Bf16MatmulsInFp32):
        def __init__(self):
            super().__init__()
            self.products = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.products += func in MATRIX_PRODUCTS and args[-1].dtype == torch.bfloat16
            return super().__torch_dispatch__(func, types, args, kwargs)

    tokenizer, model = wrapped(tiny_models, "qwen2", "lora")
    inputs = batch(tokenizer)

    def step(bf16: bool, mode=None):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), mode or contextlib.nullcontext():
            loss = model(**inputs).loss
            loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    fp32_loss, fp32_grads = step(False)
    native_loss, native_grads = step(True)
    counted = Counted()
    loss, grads = step(True, counted)
    forward = Counted()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), forward:
        model(**inputs)
    assert forward.products > 0 and counted.products > 2 * forward.products  # the backward's products too
    assert loss == pytest.approx(native_loss, abs=0.02) and loss == pytest.approx(fp32_loss, abs=0.02)

    def error(g):
        return ((g - fp32_grads).norm() / fp32_grads.norm()).item()

    assert error(grads) < max(2 * error(native_grads), 1e-3)


@pytest.mark.parametrize("arch", ["mpnet", "qwen2"])
def test_lora_on_bf16_frozen_weights_skips_the_input_upcast_with_the_same_numbers(arch, tiny_models):
    """With frozen weights in bf16, LoRA layers keep their bf16 inputs (peft would cast them to fp32, and autocast
    back to bf16 for the matmul): with CpuFastDropout on the LoRA input, the same loss and gradients bit for bit."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from peftlab.hardware import use_cpu_fast_dropout
    from peftlab.methods import upcast_trainable

    torch.manual_seed(0)
    tokenizer, model = get_model(tiny_models[arch], 3, LABELS, dtype=torch.bfloat16)
    model = upcast_trainable(get_method("lora").wrap(model, MethodArguments(tuning_method="lora")))
    model = use_cpu_fast_dropout(model)
    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    assert layers and not any(layer.cast_input_dtype_enabled for layer in layers)
    model.train()
    results = {}
    for cast in (False, True):
        for layer in layers:
            layer.cast_input_dtype_enabled = cast
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch(tokenizer)).loss
        loss.backward()
        results[cast] = (loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert torch.equal(results[False][0], results[True][0])
    assert all(torch.equal(a, b) for a, b in zip(results[False][1], results[True][1], strict=True))

    _, fp32_model = get_model(tiny_models[arch], 3, LABELS)  # frozen fp32 weights: peft's casting stays
    fp32_model = upcast_trainable(get_method("lora").wrap(fp32_model, MethodArguments(tuning_method="lora")))
    assert all(module.cast_input_dtype_enabled for module in fp32_model.modules() if isinstance(module, BaseTunerLayer))
