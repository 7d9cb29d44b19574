"""Datasets: a registry of loaders, few-shot sampling and aggregation.

Every dataset comes back as a ``DatasetDict`` with ``train`` and ``test`` splits and two
columns, ``text`` (str) and ``label`` (a ``ClassLabel``, so class names travel with the data).
A dataset is added by one :func:`register_dataset` call; ``<name>_sup`` and ``<name>_fs`` are
derived from it.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, concatenate_datasets

from .errors import InvalidArgument, MissingFile, UserError

DATA_DIR_ENV = "PEFTLAB_DATA_DIR"
# The repository's vendored copy (src/peftlab/data.py -> <repo>/data), found from wherever a command
# starts; an installed (non-editable) package has none and falls back to ./data.
REPO_DATA_DIR = Path(__file__).resolve().parents[2] / "data"
DEFAULT_DATA_DIR = REPO_DATA_DIR if REPO_DATA_DIR.is_dir() else Path("data")
SPLITS = ("train", "test")
FEW_SHOT_SIZE = 32  # PPT (arXiv 2109.04332): 32 training and 32 held-out examples
FEW_SHOT_SEED = 2025
AGNEWS_SPLIT_SEED = 2025
SLICE_SEED = 2025  # --max_*_samples take the same rows whatever the training seed
VALIDATION_SEED = 2025  # the held-out validation rows are the same for every training seed and method


class DataFormatError(UserError, ValueError):
    """A data file that cannot be read as its dataset's format, or a split that is empty."""


@dataclass(frozen=True)
class DatasetSpec:
    """One supervised dataset: its class names (in label order) and how to read it.

    ``load(data_dir, sep_token)`` returns ``{"train": (texts, labels), "test": (texts, labels)}``
    with integer labels indexing ``classes``.
    """

    name: str
    classes: tuple[str, ...]
    load: Callable[[Path, str], dict[str, tuple[list[str], list[int]]]]
    description: str = ""


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    if spec.name in DATASETS:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    DATASETS[spec.name] = spec
    return spec


def dataset_names() -> list[str]:
    """Every name :func:`get_dataset` accepts."""
    return [f"{base}_{kind}" for base in DATASETS for kind in ("sup", "fs")]


# ----------------------------------------------------------------------------- data directory


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The explicit argument, else ``$PEFTLAB_DATA_DIR``, else the repository's ``data/``; it must exist."""
    if data_dir is not None:
        source = "the data_dir argument"
    elif os.environ.get(DATA_DIR_ENV):
        data_dir, source = os.environ[DATA_DIR_ENV], f"${DATA_DIR_ENV}"
    else:
        data_dir, source = DEFAULT_DATA_DIR, "the default"
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise MissingFile(
            f"data directory {str(path)!r} (from {source}) does not exist; pass data_dir=... "
            f"(--data_dir on the command line) or set {DATA_DIR_ENV} to the folder holding "
            "restaurant_sup/, laptop_sup/, acl_sup/ and agnews_sup/"
        )
    return path


def _data_file(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise MissingFile(
            f"missing data file {str(path)!r}; check the data directory ({DATA_DIR_ENV} or "
            "--data_dir) holds the dataset folders"
        )
    return path


def _read_text(path: Path) -> str:
    """The file as UTF-8 text; a byte that is not UTF-8 is reported with its file and line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise DataFormatError(f"{path} line {line}: byte {raw[err.start]:#04x} is not UTF-8 "
                              "(the data files must be UTF-8)") from None


def _label_index(classes: Sequence[str], value: object, where: str) -> int:
    try:
        return classes.index(value)
    except ValueError:
        raise DataFormatError(f"{where}: unknown label {value!r}; expected one of {list(classes)}") from None


# ----------------------------------------------------------------------------- loaders

SEMEVAL_POLARITIES = ("positive", "neutral", "negative")
ACL_ARC_INTENTS = ("Background", "CompareOrContrast", "Extends", "Future", "Motivation", "Uses")
AGNEWS_CLASSES = ("World", "Sports", "Business", "Sci/Tech")


def _semeval_loader(folder: str):
    """SemEval-2014 Task 4 aspect polarity: text = term + sep_token + sentence."""

    def load(data_dir: Path, sep_token: str):
        splits = {}
        for split in SPLITS:
            path = _data_file(data_dir / folder, f"{split}.json")
            try:
                records = json.loads(_read_text(path))
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
            if not isinstance(records, dict):
                raise DataFormatError(f"{path}: expected one JSON object keyed by id")
            texts, labels = [], []
            for key, record in records.items():
                where = f"{path} id {key!r}"
                if not isinstance(record, dict) or not {"term", "sentence", "polarity"} <= record.keys():
                    raise DataFormatError(f"{where}: expected an object with term, sentence and polarity")
                texts.append(f"{record['term']}{sep_token}{record['sentence']}")
                labels.append(_label_index(SEMEVAL_POLARITIES, record["polarity"], where))
            splits[split] = texts, labels
        return splits

    return load


def _load_acl_arc(data_dir: Path, sep_token: str):
    splits = {}
    for split in SPLITS:
        path = _data_file(data_dir / "acl_sup", f"{split}.jsonl")
        texts, labels = [], []
        for number, line in enumerate(_read_text(path).splitlines(), start=1):
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{where}: invalid JSON: {err.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataFormatError(f"{where}: expected an object with a text string and a label")
            texts.append(record["text"])
            labels.append(_label_index(ACL_ARC_INTENTS, record.get("label"), where))
        splits[split] = texts, labels
    return splits


def _load_agnews(data_dir: Path, sep_token: str):
    """The official AG News test split only (course rule), description as text, split 9:1."""
    path = _data_file(data_dir / "agnews_sup", "test.csv")
    texts, labels = [], []
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    for row in reader:
        where = f"{path} line {reader.line_num}"
        if len(row) != 3:
            raise DataFormatError(f"{where}: expected 3 fields (class, title, description), got {len(row)}")
        if row[0] not in {"1", "2", "3", "4"}:
            raise DataFormatError(f"{where}: unknown label {row[0]!r}; expected one of 1..4")
        texts.append(row[2])
        labels.append(int(row[0]) - 1)
    if not texts:
        raise DataFormatError(f"{path}: no rows")
    full = _to_dataset(texts, labels, AGNEWS_CLASSES)
    halves = full.train_test_split(test_size=0.1, seed=AGNEWS_SPLIT_SEED)
    return {split: (list(halves[split]["text"]), list(halves[split]["label"])) for split in SPLITS}


register_dataset(DatasetSpec("restaurant", SEMEVAL_POLARITIES, _semeval_loader("restaurant_sup"),
                             "SemEval-2014 Task 4 restaurant aspect sentiment"))
register_dataset(DatasetSpec("laptop", SEMEVAL_POLARITIES, _semeval_loader("laptop_sup"),
                             "SemEval-2014 Task 4 laptop aspect sentiment"))
register_dataset(DatasetSpec("acl", ACL_ARC_INTENTS, _load_acl_arc, "ACL-ARC citation intent"))
register_dataset(DatasetSpec("agnews", AGNEWS_CLASSES, _load_agnews, "AG News topic (test split, 9:1)"))


# ----------------------------------------------------------------------------- building


def _features(classes: Sequence[str]) -> Features:
    return Features({"text": Value("string"), "label": ClassLabel(names=list(classes))})


def _to_dataset(texts: list[str], labels: list[int], classes: Sequence[str]) -> Dataset:
    return Dataset.from_dict({"text": texts, "label": labels}, features=_features(classes))


def _parse_name(name: object) -> tuple[DatasetSpec, str]:
    """``restaurant_sup`` -> (spec, "sup"); a bare base name counts as supervised."""
    if not isinstance(name, str):
        raise TypeError(f"a dataset name must be a str, got {type(name).__name__}: {name!r}")
    base, _, kind = name.rpartition("_")
    if kind not in ("sup", "fs") or base not in DATASETS:
        base, kind = name, "sup"
    if base not in DATASETS:
        known = dataset_names()
        close = difflib.get_close_matches(name, known + list(DATASETS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise InvalidArgument(f"unknown dataset {name!r}.{hint} Known datasets: {', '.join(known)}")
    return DATASETS[base], kind


def load_supervised(spec: DatasetSpec, sep_token: str, data_dir=None) -> DatasetDict:
    if not isinstance(sep_token, str):
        raise TypeError(f"sep_token must be a str, got {type(sep_token).__name__}")
    splits = spec.load(resolve_data_dir(data_dir), sep_token)
    for split, (texts, _) in splits.items():
        if not texts:
            raise DataFormatError(f"dataset {spec.name!r}: the {split} split is empty")
    return DatasetDict({split: _to_dataset(*splits[split], spec.classes) for split in SPLITS})


def sample_balanced(dataset: Dataset, size: int, seed: int = FEW_SHOT_SEED) -> Dataset:
    """``size`` rows, as evenly spread over the classes as their counts allow; deterministic.

    Each class gets ``size // k`` rows, capped at its count; what a small class cannot give is
    handed, one row at a time, to the classes that still have rows (in label order).
    """
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"sample size must be a positive int, got {size!r}")
    if size > len(dataset):
        raise ValueError(f"cannot sample {size} rows from a split of {len(dataset)}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(dataset["label"])
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(dataset.features["label"].num_classes)]
    quotas = [0] * len(pools)
    remaining = size
    while remaining:
        open_classes = [c for c, pool in enumerate(pools) if quotas[c] < len(pool)]
        share = max(remaining // len(open_classes), 1)
        for c in open_classes:
            take = min(share, len(pools[c]) - quotas[c], remaining)
            quotas[c] += take
            remaining -= take
    chosen = np.concatenate([pool[:quota] for pool, quota in zip(pools, quotas, strict=True)])
    return dataset.select(rng.permutation(chosen).tolist())


def get_fs(dataset_name: str, sep_token: str, sample_size: int = FEW_SHOT_SIZE,
           seed: int = FEW_SHOT_SEED, data_dir=None) -> DatasetDict:
    """A few-shot version: ``sample_size`` label-balanced rows from each split.

    Accepts the base (``restaurant``), supervised (``acl_sup``) or few-shot (``acl_fs``) name.
    """
    return _few_shot(_parse_name(dataset_name)[0], sep_token, sample_size, seed, data_dir)


def _few_shot(spec: DatasetSpec, sep_token: str, sample_size: int = FEW_SHOT_SIZE, seed: int = FEW_SHOT_SEED,
              data_dir=None) -> DatasetDict:
    full = load_supervised(spec, sep_token, data_dir)
    return DatasetDict({split: sample_balanced(full[split], sample_size, seed) for split in SPLITS})


def _load(spec: DatasetSpec, kind: str, sep_token: str, data_dir) -> DatasetDict:
    return _few_shot(spec, sep_token, data_dir=data_dir) if kind == "fs" else load_supervised(spec, sep_token, data_dir)


def aggregate(parts: Sequence[tuple[str, DatasetDict]]) -> DatasetDict:
    """Concatenate datasets, shifting each one's labels past all classes declared before it.

    Class names are prefixed with the part's name (``laptop:positive``).
    """
    names: list[str] = []
    offsets = []
    for prefix, dataset in parts:
        offsets.append(len(names))
        names += [f"{prefix}:{name}" for name in dataset["train"].features["label"].names]
    features = _features(names)

    def shifted(dataset: Dataset, offset: int) -> Dataset:
        return dataset.map(lambda batch: {"label": [label + offset for label in batch["label"]]},
                           batched=True, features=features, desc="relabel")

    return DatasetDict({
        split: concatenate_datasets([shifted(dd[split], off) for (_, dd), off in zip(parts, offsets, strict=True)])
        for split in SPLITS
    })


def parse_dataset_names(dataset_name: str | Sequence[str]) -> list[tuple[DatasetSpec, str]]:
    """``(spec, "sup" or "fs")`` for one name, a list of names or a comma-separated string, checked before any
    file is read: an unknown name or a dataset named twice raises :class:`InvalidArgument`."""
    if isinstance(dataset_name, str):
        names = [part.strip() for part in dataset_name.split(",") if part.strip()]
    elif isinstance(dataset_name, (list, tuple)) and dataset_name:
        names = list(dataset_name)
    else:
        raise TypeError(f"dataset_name must be a name or a non-empty list of names, got {dataset_name!r}")
    if not names:  # an empty string, or commas alone
        raise InvalidArgument(f"dataset_name names no dataset: {dataset_name!r}")
    parsed = [_parse_name(name) for name in names]
    # Compared after resolving names: "restaurant" and "restaurant_sup" are one dataset, and its _sup and
    # _fs forms share rows, so either pair would give texts with two labels.
    bases = [spec.name for spec, _ in parsed]
    repeated = sorted({base for base in bases if bases.count(base) > 1})
    if repeated:
        raise InvalidArgument(f"dataset list {names} names {', '.join(repeated)} more than once "
                              "(as its _sup or _fs form, or by its base name); aggregate each dataset once")
    return parsed


def get_dataset(dataset_name: str | Sequence[str], sep_token: str, data_dir=None) -> DatasetDict:
    """The course entry point: one name, a list of names, or a comma-separated string.

    Several names are aggregated with non-overlapping labels (see :func:`aggregate`).
    """
    parsed = parse_dataset_names(dataset_name)
    if isinstance(dataset_name, str) and "," not in dataset_name:
        return _load(*parsed[0], sep_token, data_dir)
    return aggregate([(spec.name, _load(spec, kind, sep_token, data_dir)) for spec, kind in parsed])


# ----------------------------------------------------------------------------- preparing for a model


def load_data(dataset_name: str, sep_token: str = "<SEP>", data_dir=None) -> tuple[DatasetDict, int]:
    """The course's ``load_data``: the dataset and its number of classes."""
    dataset = get_dataset(dataset_name, sep_token, data_dir=data_dir)
    return dataset, dataset["train"].features["label"].num_classes


def take_slice(dataset: Dataset, size: int | None) -> Dataset:
    """A fixed random ``size`` rows (the same whatever the training seed), or all of them."""
    if size is None or size >= len(dataset):
        return dataset
    return dataset.shuffle(seed=SLICE_SEED).select(range(size))


def tokenize(dataset, tokenizer, max_seq_length: int):
    """Token ids without padding: ``DataCollatorWithPadding`` pads each batch to its own longest row."""
    return dataset.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_seq_length),
                       batched=True, remove_columns=["text"], desc="Tokenizing")


def check_validation_ratio(ratio: float) -> None:
    if not 0 <= ratio < 1:
        raise InvalidArgument(f"--validation_split must be in [0, 1), got {ratio}")


def hold_out_validation(train: Dataset, ratio: float,
                        seed: int = VALIDATION_SEED) -> tuple[Dataset, Dataset | None, dict]:
    """Split ``train`` into (train, validation), stratified by label, with a fixed seed.

    Returns the two splits (validation None for ``ratio`` 0) and a record of the split for ``run.json``:
    ratio, seed, row counts and a sha256 of the held-out row indices (into the given ``train``).
    """
    check_validation_ratio(ratio)
    if ratio == 0:
        return train, None, {"ratio": 0.0, "seed": seed, "train_rows": len(train), "validation_rows": 0}
    indexed = train.add_column("source_row", list(range(len(train))))
    try:
        halves = indexed.train_test_split(test_size=ratio, seed=seed, stratify_by_column="label")
    except ValueError as err:
        raise InvalidArgument(f"cannot hold out a stratified {ratio:.0%} of {len(train)} training rows ({err}); "
                              "raise --validation_split, or set it to 0 for no validation split") from None
    held_out = sorted(halves["test"]["source_row"])
    record = {"ratio": ratio, "seed": seed, "train_rows": len(halves["train"]), "validation_rows": len(held_out),
              "held_out_sha256": hashlib.sha256(",".join(map(str, held_out)).encode()).hexdigest()}
    return halves["train"].remove_columns("source_row"), halves["test"].remove_columns("source_row"), record
