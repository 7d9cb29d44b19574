"""Datasets: a registry of loaders, few-shot sampling and aggregation.

Every dataset comes back as a ``DatasetDict`` with ``train`` and ``test`` splits and two
columns, ``text`` (str) and ``label`` (a ``ClassLabel``, so class names travel with the data).
A dataset is added by one :func:`register_dataset` call; ``<name>_sup`` and ``<name>_fs`` are
derived from it.
"""

from __future__ import annotations

import csv
import difflib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, concatenate_datasets

DATA_DIR_ENV = "PEFTLAB_DATA_DIR"
DEFAULT_DATA_DIR = "data"
SPLITS = ("train", "test")
FEW_SHOT_SIZE = 32  # PPT (arXiv 2109.04332): 32 training and 32 held-out examples
FEW_SHOT_SEED = 2025
AGNEWS_SPLIT_SEED = 2025


class DataFormatError(ValueError):
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
    """The explicit argument, else ``$PEFTLAB_DATA_DIR``, else ``./data``; it must exist."""
    if data_dir is not None:
        source = "the data_dir argument"
    elif os.environ.get(DATA_DIR_ENV):
        data_dir, source = os.environ[DATA_DIR_ENV], f"${DATA_DIR_ENV}"
    else:
        data_dir, source = DEFAULT_DATA_DIR, "the default"
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"data directory {str(path)!r} (from {source}) does not exist; pass data_dir=... "
            f"(--data_dir on the command line) or set {DATA_DIR_ENV} to the folder holding "
            "restaurant_sup/, laptop_sup/, acl_sup/ and agnews_sup/"
        )
    return path


def _data_file(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(
            f"missing data file {str(path)!r}; check the data directory ({DATA_DIR_ENV} or "
            "--data_dir) holds the dataset folders"
        )
    return path


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
                records = json.loads(path.read_text(encoding="utf-8"))
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
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
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
    with path.open(encoding="utf-8", newline="") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            where = f"{path} line {number}"
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
        raise ValueError(f"unknown dataset {name!r}.{hint} Known datasets: {', '.join(known)}")
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
    spec, _ = _parse_name(dataset_name)
    full = load_supervised(spec, sep_token, data_dir)
    return DatasetDict({split: sample_balanced(full[split], sample_size, seed) for split in SPLITS})


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


def get_dataset(dataset_name: str | Sequence[str], sep_token: str, data_dir=None) -> DatasetDict:
    """The course entry point: one name, a list of names, or a comma-separated string.

    Several names are aggregated with non-overlapping labels (see :func:`aggregate`).
    """
    if isinstance(dataset_name, str) and "," in dataset_name:
        dataset_name = [part.strip() for part in dataset_name.split(",") if part.strip()]
    if isinstance(dataset_name, str):
        spec, kind = _parse_name(dataset_name)
        if kind == "fs":
            return get_fs(spec.name, sep_token, data_dir=data_dir)
        return load_supervised(spec, sep_token, data_dir)
    if not isinstance(dataset_name, (list, tuple)) or not dataset_name:
        raise TypeError(f"dataset_name must be a name or a non-empty list of names, got {dataset_name!r}")
    if len(set(dataset_name)) != len(dataset_name):
        raise ValueError(f"dataset list names a dataset twice: {list(dataset_name)}")
    bases = [_parse_name(name)[0].name for name in dataset_name]
    # The base name is the readable prefix; fall back to the full name when two share a base.
    prefixes = bases if len(set(bases)) == len(bases) else list(dataset_name)
    return aggregate([(prefix, get_dataset(name, sep_token, data_dir))
                      for prefix, name in zip(prefixes, dataset_name, strict=True)])
