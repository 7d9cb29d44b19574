"""Shared fixtures: the real data directory and tiny fixture datasets written by the tests."""

import json
import os
from pathlib import Path

import pytest

REAL_DATA = Path(os.environ.get("PEFTLAB_DATA_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
# CI sets PEFTLAB_REQUIRE_DATA=1: there, a missing data directory fails instead of skipping.
REQUIRE_DATA = os.environ.get("PEFTLAB_REQUIRE_DATA") == "1"


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    if not (REAL_DATA / "restaurant_sup" / "train.json").is_file():
        if REQUIRE_DATA:
            pytest.fail(f"PEFTLAB_REQUIRE_DATA=1 but the real data is not at {REAL_DATA}")
        pytest.skip(f"real data not found at {REAL_DATA}; set PEFTLAB_DATA_DIR")
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
    """A tiny data directory in the real formats (10 AG News rows, a few of each other)."""
    polarities = ["positive", "neutral", "negative"]
    semeval = {split: [(f"term{i}", f"the term{i} was fine {split}", polarities[i % 3]) for i in range(n)]
               for split, n in (("train", 9), ("dev", 3), ("test", 6))}
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
