"""Shared fixtures: the real data directory and tiny fixture datasets written by the tests."""

import json
import os
from pathlib import Path

import pytest

# The data vendored in the repository (or PEFTLAB_DATA_DIR, where a user points elsewhere).
REAL_DATA = Path(os.environ.get("PEFTLAB_DATA_DIR") or Path(__file__).resolve().parents[1] / "data")
# CI sets PEFTLAB_REQUIRE_DATA=1: there, a missing data directory fails instead of skipping.
REQUIRE_DATA = os.environ.get("PEFTLAB_REQUIRE_DATA") == "1"


@pytest.fixture(autouse=True)
def isolated_process_state():
    """Each test starts from the process state the one before it found. A run leaves some behind: transformers'
    ``TrainingArguments`` writes ``--bf16`` into ``ACCELERATE_MIXED_PRECISION`` (which a later one without
    ``--bf16`` keeps), accelerate's state is a process-wide singleton, and a run reporting to wandb sets WANDB_*
    to its own folder. Left alone, one bf16 test would run every later Trainer of the pytest process in bf16."""
    from accelerate.state import AcceleratorState

    environ = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(environ)
    AcceleratorState._reset_state(reset_partial_state=True)  # as accelerate's own AccelerateTestCase does


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    if not (REAL_DATA / "restaurant_sup" / "train.json").is_file():
        if REQUIRE_DATA:
            pytest.fail(f"PEFTLAB_REQUIRE_DATA=1 but the real data is not at {REAL_DATA}")
        pytest.skip(f"real data not found at {REAL_DATA}")
    return REAL_DATA


def write_semeval(folder: Path, records_by_split: dict[str, list[tuple[str, str, str]]]) -> None:
    """records: (term, sentence, polarity)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, records in records_by_split.items():
        payload = {f"{i}_0": {"polarity": p, "term": t, "id": f"{i}_0", "sentence": s}
                   for i, (t, s, p) in enumerate(records)}
        (folder / f"{split}.json").write_text(json.dumps(payload))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def fixture_data_dir(tmp_path: Path) -> Path:
    """A tiny data directory in the real formats (20 AG News rows, 30 SemEval training rows: 10% of them
    hold out one per class, a few of each other)."""
    polarities = ["positive", "neutral", "negative"]
    semeval = {split: [(f"term{i}", f"the term{i} was fine {split}", polarities[i % 3]) for i in range(n)]
               for split, n in (("train", 30), ("dev", 3), ("test", 6))}
    write_semeval(tmp_path / "restaurant_sup", semeval)
    write_semeval(tmp_path / "laptop_sup", semeval)
    intents = ["Background", "CompareOrContrast", "Extends", "Future", "Motivation", "Uses"]
    for split, n in (("train", 12), ("dev", 6), ("test", 6)):
        write_jsonl(tmp_path / "acl_sup" / f"{split}.jsonl",
                    [{"text": f"citation {i}", "label": intents[i % 6], "metadata": {}} for i in range(n)])
    (tmp_path / "agnews_sup").mkdir()
    (tmp_path / "agnews_sup" / "test.csv").write_text(
        "".join(f'"{i % 4 + 1}","Title {i}","Description {i}, with a comma"\n' for i in range(20)))
    return tmp_path


def load_benchmark_script(name: str):
    """A script of benchmarks/ (not a package), imported as a module so its functions can be tested."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- tiny random models

WORDS = ("the food was great but service slow laptop battery screen fine bad good citation uses "
         "prior work we follow news sports market term").split()


def _word_tokenizer(specials: dict[str, str]):
    """A real fast tokenizer over a tiny word vocabulary, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(dict.fromkeys([*specials.values(), *WORDS]))}
    core = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if "cls_token" in specials:  # encoders wrap inputs in CLS ... SEP
        cls, sep = specials["cls_token"], specials["sep_token"]
        core.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    # Only BERT uses segment ids; the others, like their real tokenizers, must not emit them.
    input_names = ["input_ids", "token_type_ids", "attention_mask"] if specials is ENCODER_SPECIALS else \
        ["input_ids", "attention_mask"]
    return PreTrainedTokenizerFast(tokenizer_object=core, model_input_names=input_names, **specials)


ENCODER_SPECIALS = {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
ROBERTA_SPECIALS = {"unk_token": "<unk>", "pad_token": "<pad>", "cls_token": "<s>", "sep_token": "</s>",
                    "bos_token": "<s>", "eos_token": "</s>"}
DECODER_SPECIALS = {"unk_token": "<unk>", "eos_token": "<|endoftext|>"}  # no pad token, as real decoders


def build_tiny_model(directory, arch: str):
    """Save a tiny randomly initialised pretrained-style checkpoint (LM head) with its tokenizer."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        BertConfig,
        LlamaConfig,
        MPNetConfig,
        Qwen2Config,
        RobertaConfig,
    )

    size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    if arch == "bert":
        tokenizer, config = _word_tokenizer(ENCODER_SPECIALS), BertConfig(vocab_size=64, **size)
    elif arch == "roberta":
        tokenizer = _word_tokenizer(ROBERTA_SPECIALS)
        config = RobertaConfig(vocab_size=64, pad_token_id=tokenizer.pad_token_id, max_position_embeddings=130,
                               **size)
    elif arch == "mpnet":
        tokenizer = _word_tokenizer(ROBERTA_SPECIALS)
        config = MPNetConfig(vocab_size=64, pad_token_id=tokenizer.pad_token_id, **size)
    elif arch in ("qwen2", "llama"):
        tokenizer = _word_tokenizer(DECODER_SPECIALS)
        config_class = Qwen2Config if arch == "qwen2" else LlamaConfig
        config = config_class(vocab_size=64, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
                              tie_word_embeddings=True, **size)
    else:
        raise ValueError(arch)
    lm_class = AutoModelForCausalLM if arch in ("qwen2", "llama") else AutoModelForMaskedLM
    lm_class.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: str(build_tiny_model(root / arch, arch)) for arch in ("bert", "roberta", "mpnet", "qwen2", "llama")}


def write_tiny_llama_gguf(path) -> bytes:
    """A real GGUF file of a tiny random Llama (byte-level BPE tokenizer), written with `gguf`; its bytes."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    pieces = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", "Ġt", "he"]
    tokens = specials + pieces
    hidden, width, layers, heads, kv_heads = 32, 64, 2, 4, 2
    kv = kv_heads * hidden // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(width)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(specials) + [gguf.TokenType.NORMAL] * len(pieces))
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        shapes |= {f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
                   f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (kv, hidden),
                   f"blk.{i}.attn_v.weight": (kv, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden),
                   f"blk.{i}.ffn_gate.weight": (width, hidden), f"blk.{i}.ffn_up.weight": (width, hidden),
                   f"blk.{i}.ffn_down.weight": (hidden, width)}
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.normal(size=shape) * 0.02).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()
