import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from datasets import ClassLabel, DatasetDict

from dataHelper import get_dataset, get_fs
from peftlab import data as data_module
from peftlab.data import (
    DATA_DIR_ENV,
    REPO_DATA_DIR,
    DataFormatError,
    dataset_names,
    resolve_data_dir,
    sample_balanced,
)

SEP = " [SEP] "


# ---------------------------------------------------------------- fixture data (unit tests)


def test_semeval_text_and_labels(fixture_data_dir):
    ds = get_dataset("restaurant_sup", SEP, data_dir=fixture_data_dir)
    assert isinstance(ds, DatasetDict) and set(ds) == {"train", "test"}
    assert ds["train"].column_names == ["text", "label"]
    assert ds["train"][0] == {"text": "term0 [SEP] the term0 was fine train", "label": 0}
    assert ds["train"].features["label"] == ClassLabel(names=["positive", "neutral", "negative"])
    assert ds["train"]["label"] == [0, 1, 2] * 10


def test_acl_and_agnews_formats(fixture_data_dir):
    acl = get_dataset("acl_sup", SEP, data_dir=fixture_data_dir)
    assert acl["train"].features["label"].names == [
        "Background", "CompareOrContrast", "Extends", "Future", "Motivation", "Uses"]
    assert acl["test"]["label"] == [0, 1, 2, 3, 4, 5]
    ag = get_dataset("agnews_sup", SEP, data_dir=fixture_data_dir)
    assert (len(ag["train"]), len(ag["test"])) == (18, 2)
    # description only, the CSV comma kept, the title dropped
    assert all(text.startswith("Description ") and "Title" not in text for text in ag["train"]["text"])
    by_text = {t: lab for t, lab in zip(list(ag["train"]["text"]) + list(ag["test"]["text"]),
                                        list(ag["train"]["label"]) + list(ag["test"]["label"]), strict=True)}
    assert by_text["Description 5, with a comma"] == 1  # class "2" -> label 1


def test_data_dir_resolution_order(fixture_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(fixture_data_dir))
    assert resolve_data_dir() == fixture_data_dir
    assert resolve_data_dir(tmp_path) == tmp_path  # explicit argument wins
    monkeypatch.delenv(DATA_DIR_ENV)
    monkeypatch.chdir(tmp_path)  # the default is the repository's data/, wherever the command starts
    assert resolve_data_dir() == REPO_DATA_DIR == Path(__file__).resolve().parents[1] / "data"
    monkeypatch.setattr(data_module, "DEFAULT_DATA_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"nowhere'.*the default.*PEFTLAB_DATA_DIR"):
        resolve_data_dir()
    assert len(get_dataset("acl_sup", SEP, data_dir=fixture_data_dir)["train"]) == 12


def test_missing_file_names_path(fixture_data_dir):
    (fixture_data_dir / "laptop_sup" / "test.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"laptop_sup/test\.json"):
        get_dataset("laptop_sup", SEP, data_dir=fixture_data_dir)


def test_unknown_name_suggests_closest(fixture_data_dir):
    with pytest.raises(ValueError, match=r"Did you mean 'agnews_sup'\?.*restaurant_sup"):
        get_dataset("agnew_sup", SEP, data_dir=fixture_data_dir)
    with pytest.raises(ValueError, match="unknown dataset 'imdb'"):
        get_dataset(["restaurant_fs", "imdb"], SEP, data_dir=fixture_data_dir)


@pytest.mark.parametrize("bad", [3, None, {"restaurant_sup"}, []])
def test_wrong_name_type(bad, fixture_data_dir):
    with pytest.raises(TypeError):
        get_dataset(bad, SEP, data_dir=fixture_data_dir)


def test_wrong_sep_type(fixture_data_dir):
    with pytest.raises(TypeError, match="sep_token"):
        get_dataset("restaurant_sup", None, data_dir=fixture_data_dir)


def test_malformed_json_names_file_and_line(fixture_data_dir):
    (fixture_data_dir / "restaurant_sup" / "test.json").write_text('{"a": {"term": "x",\n "sentence": }')
    with pytest.raises(DataFormatError, match=r"restaurant_sup/test\.json: invalid JSON at line 2"):
        get_dataset("restaurant_sup", SEP, data_dir=fixture_data_dir)


def test_unknown_polarity_names_id(fixture_data_dir):
    path = fixture_data_dir / "laptop_sup" / "train.json"
    records = json.loads(path.read_text())
    records["4_0"]["polarity"] = "conflict"
    path.write_text(json.dumps(records))
    with pytest.raises(DataFormatError, match=r"train\.json id '4_0': unknown label 'conflict'"):
        get_dataset("laptop_sup", SEP, data_dir=fixture_data_dir)


def test_malformed_jsonl_and_unknown_intent(fixture_data_dir):
    path = fixture_data_dir / "acl_sup" / "test.jsonl"
    path.write_text('{"text": "a", "label": "Uses"}\n{"text": "b", "label": "Praise"}\n')
    with pytest.raises(DataFormatError, match=r"test\.jsonl line 2: unknown label 'Praise'"):
        get_dataset("acl_sup", SEP, data_dir=fixture_data_dir)
    path.write_text('{"text": "a", "label": "Uses"}\nnot json\n')
    with pytest.raises(DataFormatError, match=r"test\.jsonl line 2: invalid JSON"):
        get_dataset("acl_sup", SEP, data_dir=fixture_data_dir)


def test_malformed_csv(fixture_data_dir):
    path = fixture_data_dir / "agnews_sup" / "test.csv"
    path.write_text('"1","t","d"\n"2","only two"\n')
    with pytest.raises(DataFormatError, match=r"test\.csv line 2: expected 3 fields"):
        get_dataset("agnews_sup", SEP, data_dir=fixture_data_dir)
    path.write_text('"1","t","d"\n"5","t","d"\n')
    with pytest.raises(DataFormatError, match=r"test\.csv line 2: unknown label '5'"):
        get_dataset("agnews_sup", SEP, data_dir=fixture_data_dir)


def test_empty_split(fixture_data_dir):
    (fixture_data_dir / "acl_sup" / "test.jsonl").write_text("")
    with pytest.raises(DataFormatError, match="test split is empty"):
        get_dataset("acl_sup", SEP, data_dir=fixture_data_dir)


def test_sample_balanced_spreads_what_small_classes_cannot_give(fixture_data_dir):
    train = get_dataset("acl_sup", SEP, data_dir=fixture_data_dir)["train"]  # 2 rows per class
    sample = sample_balanced(train, 10, seed=1)
    assert sorted(Counter(sample["label"]).values()) == [1, 1, 2, 2, 2, 2]
    assert len(set(sample["text"])) == 10
    with pytest.raises(ValueError, match="cannot sample 13"):
        sample_balanced(train, 13)


def test_aggregation_offsets_from_declared_classes(fixture_data_dir):
    # A few-shot test split of 2 rows cannot hold every class; offsets still come from the declared ones.
    acl_only = get_fs("acl", SEP, sample_size=2, data_dir=fixture_data_dir)
    assert len(set(acl_only["test"]["label"])) == 2
    agg = get_dataset("acl_sup,restaurant_sup", SEP, data_dir=fixture_data_dir)
    names = agg["train"].features["label"].names
    assert len(names) == 9 and names[0] == "acl:Background" and names[6] == "restaurant:positive"
    assert agg["test"]["label"] == [0, 1, 2, 3, 4, 5] + [6, 7, 8] * 2


# ---------------------------------------------------------------- real data (integration)

EXPECTED = {  # name: (train, test, classes)
    "restaurant_sup": (3452, 1120, ["positive", "neutral", "negative"]),
    "laptop_sup": (2163, 638, ["positive", "neutral", "negative"]),
    "acl_sup": (1688, 139, ["Background", "CompareOrContrast", "Extends", "Future", "Motivation", "Uses"]),
    "agnews_sup": (6840, 760, ["World", "Sports", "Business", "Sci/Tech"]),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_sizes_and_classes(name, real_data_dir):
    ds = get_dataset(name, "<sep>", data_dir=real_data_dir)
    n_train, n_test, classes = EXPECTED[name]
    assert (len(ds["train"]), len(ds["test"])) == (n_train, n_test)
    assert ds["train"].features["label"].names == classes
    for split in ("train", "test"):
        assert set(ds[split]["label"]) == set(range(len(classes)))
        assert all(isinstance(t, str) and t for t in ds[split]["text"])


def test_real_class_counts(real_data_dir):
    rest = get_dataset("restaurant_sup", "<sep>", data_dir=real_data_dir)
    assert Counter(rest["train"]["label"]) == {0: 2094, 1: 579, 2: 779}
    assert Counter(rest["test"]["label"]) == {0: 728, 1: 196, 2: 196}
    acl = get_dataset("acl_sup", "<sep>", data_dir=real_data_dir)
    assert Counter(acl["train"]["label"]) == {0: 867, 1: 305, 2: 63, 3: 60, 4: 76, 5: 317}
    assert rest["train"][0]["text"] == "server<sep>Our server was very helpful and friendly."


def test_real_agnews_split_is_seeded_description_only(real_data_dir):
    a = get_dataset("agnews_sup", " ", data_dir=real_data_dir)
    b = get_dataset("agnews_sup", " ", data_dir=real_data_dir)
    assert a["test"]["text"] == b["test"]["text"]
    assert Counter(a["train"]["label"]) + Counter(a["test"]["label"]) == {c: 1900 for c in range(4)}
    # Row 1 of test.csv: title "Fears for T N pension after talks" is not in the text.
    texts = list(a["train"]["text"]) + list(a["test"]["text"])
    hit = [t for t in texts if t.startswith("Unions representing workers at Turner")]
    assert hit == ["Unions representing workers at Turner   Newall say they are 'disappointed' after talks "
                   "with stricken parent firm Federal Mogul."]


@pytest.mark.parametrize("name", ["restaurant_fs", "laptop_fs", "acl_fs", "agnews_fs"])
def test_real_few_shot(name, real_data_dir):
    fs = get_dataset(name, "<sep>", data_dir=real_data_dir)
    assert (len(fs["train"]), len(fs["test"])) == (32, 32)
    k = fs["train"].features["label"].num_classes
    counts = Counter(fs["train"]["label"])
    assert len(counts) == k and max(counts.values()) - min(counts.values()) <= 1
    again = get_dataset(name, "<sep>", data_dir=real_data_dir)
    assert fs["train"]["text"] == again["train"]["text"] and fs["test"]["text"] == again["test"]["text"]
    full = get_dataset(name.replace("_fs", "_sup"), "<sep>", data_dir=real_data_dir)
    assert set(fs["test"]["text"]) <= set(full["test"]["text"])


def test_real_get_fs_names_sizes_and_seeds(real_data_dir):
    by_base = get_fs("acl", "<sep>", sample_size=60, data_dir=real_data_dir)
    assert (len(by_base["train"]), len(by_base["test"])) == (60, 60)
    assert Counter(by_base["train"]["label"]) == {c: 10 for c in range(6)}
    # acl test has only 5 Extends and 5 Future: the rest is spread over the other classes.
    # Each class is offered 10, capped at its count (5+5+7), and the 13 left go 4+4+4+1 to the others.
    assert Counter(by_base["test"]["label"]) == {0: 15, 1: 14, 2: 5, 3: 5, 4: 7, 5: 14}
    for alias in ("acl_fs", "acl_sup"):
        same = get_fs(alias, "<sep>", sample_size=60, data_dir=real_data_dir)
        assert same["train"]["text"] == by_base["train"]["text"]
    other_seed = get_fs("acl", "<sep>", sample_size=60, seed=7, data_dir=real_data_dir)
    assert other_seed["train"]["text"] != by_base["train"]["text"]


def test_real_aggregation_of_four_few_shot(real_data_dir):
    names = ["restaurant_fs", "laptop_fs", "acl_fs", "agnews_fs"]
    agg = get_dataset(names, "<sep>", data_dir=real_data_dir)
    feature = agg["train"].features["label"]
    assert feature.num_classes == 16
    assert feature.names[3:6] == ["laptop:positive", "laptop:neutral", "laptop:negative"]
    assert feature.names[12] == "agnews:World"
    assert (len(agg["train"]), len(agg["test"])) == (128, 128)
    assert set(agg["train"]["label"]) == set(range(16))
    laptop = get_dataset("laptop_fs", "<sep>", data_dir=real_data_dir)
    assert list(agg["train"]["label"])[32:64] == [label + 3 for label in laptop["train"]["label"]]
    assert list(agg["train"]["text"])[32:64] == list(laptop["train"]["text"])


def test_known_names():
    bases = ("restaurant", "laptop", "acl", "agnews")
    assert set(dataset_names()) == {f"{b}_{k}" for b in bases for k in ("sup", "fs")}


def test_vendored_data_matches_its_sums():
    """The copy in the repository is byte-identical to the reference (SHA256SUMS lists every data file)."""
    listed = [line.split(maxsplit=1) for line in (REPO_DATA_DIR / "SHA256SUMS").read_text().splitlines()]
    assert {name for _, name in listed} >= {"restaurant_sup/train.json", "acl_sup/test.jsonl", "agnews_sup/test.csv"}
    for digest, name in listed:
        assert hashlib.sha256((REPO_DATA_DIR / name).read_bytes()).hexdigest() == digest, name
    assert "Licence and source" in (REPO_DATA_DIR / "PROVENANCE.md").read_text()


@pytest.mark.parametrize("names", [["restaurant", "restaurant_sup"], ["laptop_sup", "laptop_fs"],
                                   "acl_fs,agnews_fs,acl_sup"])
def test_aggregating_one_dataset_twice_is_refused(names, fixture_data_dir):
    """The same rows twice would give every text two labels (6904 rows for restaurant + restaurant_sup)."""
    with pytest.raises(ValueError, match="more than once"):
        get_dataset(names, SEP, data_dir=fixture_data_dir)


@pytest.mark.parametrize(("folder", "file", "good_line"), [
    ("restaurant_sup", "train.json", '{"a": {"term": "x", "sentence": "fine", "polarity": "positive", "id": "a"},\n'),
    ("acl_sup", "train.jsonl", '{"text": "fine", "label": "Uses"}\n'),
    ("agnews_sup", "test.csv", '"1","t","fine"\n'),
])
def test_non_utf8_byte_names_file_and_line(folder, file, good_line, fixture_data_dir):
    bad_line = good_line.replace("fine", "caf\udce9", 1).encode("utf-8", "surrogateescape")  # a Latin-1 é
    (fixture_data_dir / folder / file).write_bytes(good_line.encode() * 2 + bad_line)
    with pytest.raises(DataFormatError, match=rf"{folder}/{file} line 3: byte 0xe9 is not UTF-8"):
        get_dataset(folder, SEP, data_dir=fixture_data_dir)
