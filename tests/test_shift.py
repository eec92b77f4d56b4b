"""Domain shift and label noise in examples/glue.py: extra test sets evaluated after training, noisy training labels.

Offline, on conftest's tiny BERT and tiny files written for the tests (the VADER sets in their own layout).
"""

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import glue  # noqa: E402
from common import UsageError  # noqa: E402

POSITIVE = "good great fine lovely superb fun".split()
NEGATIVE = "bad awful dull boring poor sad".split()
FILLER = "the a movie film plot was is really quite".split()
FAST_TRAINING = [
    "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
    "--learning_rate", "1e-3", "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
    "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--use_cpu", "true",
]  # fmt: skip


def sentence(rng: np.random.Generator, positive: bool) -> str:
    words = list(rng.choice(FILLER, size=3)) + [str(rng.choice(POSITIVE if positive else NEGATIVE))]
    return " ".join(rng.permutation(words))


def write_csv(path: Path, size: int, seed: int, labels=("negative", "positive"), column="text") -> Path:
    rng = np.random.default_rng(seed)
    rows = [{column: sentence(rng, bool(i % 2)), "label": labels[i % 2]} for i in range(size)]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def write_vader(path: Path, size: int, seed: int) -> tuple[Path, list[int]]:
    """A file in the VADER ground-truth layout; returns it and the binary labels of the rows that |s| >= 0.5 keeps."""
    rng = np.random.default_rng(seed)
    lines, kept = ["id\tsentiment\ttext"], []
    for index in range(size):
        rating = float(rng.choice([-2.5, -1.0, -0.2, 0.3, 1.5, 3.0]))
        text = sentence(rng, rating > 0) + f" {'really ' * (index % 3)}{index}"  # every text distinct
        lines.append(f"{index}\t{rating}\t{text}")
        if abs(rating) >= 0.5:
            kept.append(int(rating > 0))
    path.write_text("\r\n".join(lines) + "\r\n")
    return path, kept


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("shift")
    vader, vader_labels = write_vader(folder / "amazon_GroundTruth.txt", 30, seed=4)
    return {
        "train": write_csv(folder / "train.csv", 40, seed=0),
        "validation": write_csv(folder / "validation.csv", 12, seed=1),
        "test": write_csv(folder / "test.csv", 10, seed=2),
        "shifted": write_csv(folder / "shifted.csv", 14, seed=3),
        "vader": vader,
        "vader_labels": vader_labels,
    }


def data_flags(files) -> list[str]:
    return [
        "--train_file", str(files["train"]), "--validation_file", str(files["validation"]), "--test_file",
        str(files["test"]),
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# flip_labels: exactly round(p * n), never the same class, deterministic
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [2, 3, 5])
@pytest.mark.parametrize(("fraction", "n", "expected"), [(0.2, 50, 10), (0.25, 10, 3), (0.1, 7, 1), (0.3, 5, 2),
                                                         (0.0, 9, 0), (1.0, 9, 9), (0.29, 100, 29)])  # fmt: skip
def test_flip_labels_flips_exactly_round_pn_to_another_class(fraction, n, expected, num_classes):
    # 0.25 * 10 = 2.5 rounds up to 3 (halves up, not Python's round-half-even); 0.29 * 100 is 28.999... in floats.
    labels = np.random.default_rng(1).integers(0, num_classes, size=n)
    original = labels.copy()
    noisy, flipped = glue.flip_labels(labels, fraction, num_classes, seed=7)
    assert len(flipped) == expected == len(set(flipped.tolist()))
    changed = np.flatnonzero(noisy != labels)
    assert changed.tolist() == flipped.tolist()  # every drawn example changed class, no other did
    assert noisy.min() >= 0 and noisy.max() < num_classes
    np.testing.assert_array_equal(labels, original)  # the input is not modified


def test_flip_labels_is_deterministic_in_its_seed():
    labels = np.arange(200) % 4
    first, flipped = glue.flip_labels(labels, 0.3, 4, seed=3)
    again, flipped_again = glue.flip_labels(labels, 0.3, 4, seed=3)
    other, flipped_other = glue.flip_labels(labels, 0.3, 4, seed=4)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(flipped, flipped_again)
    assert flipped.tolist() != flipped_other.tolist()  # negative control: the seed matters


def test_flip_labels_draws_the_new_class_uniformly_among_the_others():
    labels = np.zeros(30_000, dtype=np.int64)
    noisy, flipped = glue.flip_labels(labels, 0.5, 4, seed=0)
    counts = Counter(noisy[flipped].tolist())
    assert set(counts) == {1, 2, 3}
    # 15,000 draws: each share is 1/3 with a standard deviation of 0.004.
    assert all(abs(count / len(flipped) - 1 / 3) < 0.02 for count in counts.values()), counts


# ---------------------------------------------------------------------------------------------------------------------
# glue.py end to end: extra sets evaluated and recorded, noise on training only
# ---------------------------------------------------------------------------------------------------------------------


def test_extra_sets_are_evaluated_and_noise_touches_training_only(tiny_bert, files, tmp_path):
    output_dir = tmp_path / "run"
    args = [
        "--model_name_or_path", tiny_bert, *data_flags(files), "--max_seq_length", "16",
        "--extra_test_files", f"shifted={files['shifted']}", "--extra_test_sets", f"vader_amazon={files['vader']}",
        "--label_noise", "0.25", "--label_noise_seed", "5", "--output_dir", str(output_dir), *FAST_TRAINING,
    ]  # fmt: skip
    final = glue.main(args)
    assert list(final) == ["validation", "test", "shifted", "vader_amazon"]
    record = json.loads((output_dir / "record.json").read_text())
    with np.load(output_dir / "predictions.npz") as data:
        arrays = {name: data[name] for name in data.files}
    assert list(record["final"]) == list(final)
    from hf_lsce.evaluation.metrics import classification_metrics

    for name in final:
        metrics = record["final"][name]
        assert {"accuracy", "nll", "ece", "brier", "aurc", "error_at_80_coverage"} <= set(metrics)
        recomputed = classification_metrics(arrays[f"{name}_logits"], arrays[f"{name}_labels"])
        assert recomputed["accuracy"] == pytest.approx(metrics["accuracy"])
        assert recomputed["nll"] == pytest.approx(metrics["nll"], abs=1e-5)

    # Every evaluated label is the file's (negative 0, positive 1): the noise never reaches them.
    for name, path in (("validation", "validation"), ("test", "test"), ("shifted", "shifted")):
        expected = (pd.read_csv(files[path])["label"] == "positive").astype(int).tolist()
        assert arrays[f"{name}_labels"].tolist() == expected, name
    assert arrays["vader_amazon_labels"].tolist() == files["vader_labels"]
    assert record["label_noise"] == {"fraction": 0.25, "seed": 5, "examples": 40, "flipped": 10}
    kept = files["vader_labels"]
    assert record["extra_test_sets"] == {
        "shifted": {"source": str(files["shifted"]), "examples": 14, "class_counts": [7, 7]},
        "vader_amazon": {
            "source": "vader_amazon", "examples": len(kept), "class_counts": [kept.count(0), kept.count(1)],
        },
    }  # fmt: skip
    assert record["config"]["extra_test_sets"] == [f"vader_amazon={files['vader']}"]


def test_training_labels_after_noise(files):
    # The training split glue.py trains on: the flipped examples are those of flip_labels, the rest are the file's.
    import datasets

    train = datasets.Dataset.from_pandas(pd.read_csv(files["train"]).assign(label=lambda f: f.label.eq("positive")))
    train = train.cast_column("label", datasets.Value("int64"))
    noisy, summary = glue.add_label_noise(train, 0.3, 2, seed=11)
    expected, flipped = glue.flip_labels(np.asarray(train["label"]), 0.3, 2, seed=11)
    assert noisy["label"] == expected.tolist() and noisy["text"] == train["text"]
    assert summary == {"fraction": 0.3, "seed": 11, "examples": 40, "flipped": 12} and len(flipped) == 12
    assert noisy.features["label"] == train.features["label"]
    unchanged, summary = glue.add_label_noise(train, 0.0, 2, seed=11)
    assert unchanged["label"] == train["label"] and summary["flipped"] == 0


def test_evaluation_corpus_classes_are_mapped_to_the_training_task(files):
    # A task whose ids run the other way (positive first) gets the corpus labels swapped; rotten/fresh read as
    # negative/positive; the text column takes the task's name.
    swapped = glue.load_evaluation_corpus("vader_nyt", str(files["vader"]), ["sentence"], ["positive", "negative"])
    assert swapped["label"] == [1 - label for label in files["vader_labels"]]
    assert "sentence" in swapped.column_names and "text" not in swapped.column_names
    rotten = glue.load_evaluation_corpus("vader_nyt", str(files["vader"]), ["text"], ["rotten", "fresh"])
    assert rotten["label"] == files["vader_labels"]
    with pytest.raises(UsageError, match="vader_nyt has the classes negative, positive; the training task's are "
                                         "ham, spam: an extra test set needs the same classes"):  # fmt: skip
        glue.load_evaluation_corpus("vader_nyt", str(files["vader"]), ["text"], ["ham", "spam"])
    with pytest.raises(UsageError, match="the training task's are negative, neutral, positive"):
        glue.load_evaluation_corpus("vader_nyt", str(files["vader"]), ["text"], ["negative", "neutral", "positive"])
    with pytest.raises(UsageError, match="holds one text per example; the training task pairs a and b"):
        glue.load_evaluation_corpus("vader_nyt", str(files["vader"]), ["a", "b"], ["negative", "positive"])


def test_extra_files_next_to_a_corpus_take_class_names_or_ids(tmp_path):
    # With --dataset, an extra file has the corpus's text column and labels as its class names or ids.
    names = tmp_path / "names.csv"
    pd.DataFrame({"text": ["good film", "bad film"], "label": ["fresh", "rotten"]}).to_csv(names, index=False)
    ids = tmp_path / "ids.csv"
    pd.DataFrame({"text": ["good film", "bad film"], "label": [1, 0]}).to_csv(ids, index=False)
    args = glue.DataArguments(dataset="rotten_tomatoes", extra_test_files=[f"names={names}", f"ids={ids}"])
    sets = glue.load_extra_test_sets(args, {}, ["text"], ["rotten", "fresh"])
    assert sets["names"]["label"] == sets["ids"]["label"] == [1, 0]
    wrong = tmp_path / "wrong.csv"
    pd.DataFrame({"text": ["good film"], "label": ["spam"]}).to_csv(wrong, index=False)
    args = glue.DataArguments(dataset="rotten_tomatoes", extra_test_files=[f"wrong={wrong}"])
    with pytest.raises(UsageError, match=r"wrong.csv: label 'spam' is not a class of the training task: give a "
                                         r"name \(rotten, fresh\) or an id in \[0, 2\)"):  # fmt: skip
        glue.load_extra_test_sets(args, {}, ["text"], ["rotten", "fresh"])


BAD_EXTRA_SETS = {
    # case: (flags, expected error)
    "not name=path": (["--extra_test_files", "shifted.csv"], "--extra_test_files: entries must be name=path"),
    "unknown corpus": (["--extra_test_sets", "vader_imdb"], "--extra_test_sets: must be one of vader_amazon, "),
    "empty path": (["--extra_test_sets", "vader_nyt="], "--extra_test_sets: 'vader_nyt=' names no file after '='"),
    "split name": (["--extra_test_files", "test={shifted}"], "--extra_test_files: 'test' is the name of a split"),
    "not a word": (["--extra_test_files", "my set={shifted}"], "--extra_test_files: a name is a letter followed by"),
    "twice": (
        ["--extra_test_files", "vader_nyt={shifted}", "--extra_test_sets", "vader_nyt"],
        "--extra_test_sets: the name 'vader_nyt' is given twice",
    ),
    "missing file": (["--extra_test_files", "x=nowhere.csv"], "--extra_test_files: nowhere.csv does not exist"),
    "noise above 1": (["--label_noise", "1.5"], "--label_noise: must be a fraction in [0, 1], got 1.5"),
    "classes of another task": (
        ["--extra_test_sets", "vader_tweets={vader}"],
        "--extra_test_sets: vader_tweets has the classes negative, positive; the training task's are ham, spam",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_EXTRA_SETS))
def test_bad_extra_sets_are_usage_errors_before_the_model_loads(case, files, tmp_path):
    flags, expected = BAD_EXTRA_SETS[case]
    train, validation = files["train"], files["validation"]
    if case == "classes of another task":
        train = write_csv(tmp_path / "spam.csv", 6, seed=0, labels=("ham", "spam"))
        validation = write_csv(tmp_path / "spam_validation.csv", 4, seed=1, labels=("ham", "spam"))
    args = ["--train_file", str(train), "--validation_file", str(validation)]
    args += ["--model_name_or_path", str(tmp_path / "no_model"), "--output_dir", str(tmp_path / "out")]
    args += [flag.format(shifted=files["shifted"], vader=files["vader"]) for flag in flags]
    with pytest.raises(UsageError) as raised:
        glue.main(args)  # a missing model folder would fail later: the data are refused first
    assert str(raised.value).startswith(expected), str(raised.value)


def test_bad_extra_file_is_named_like_the_other_files(files, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\ngood film,positive\n,negative\n")
    unlabeled = tmp_path / "unlabeled.csv"
    unlabeled.write_text("text\ngood film\n")
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("text,label\ngood film,neutral\n")
    base = data_flags(files) + ["--output_dir", str(tmp_path / "out")]
    for path, expected in (
        (bad, f"{bad}: row 2: empty text in column 'text'"),
        (unlabeled, f"{unlabeled}: has no label column 'label'"),
        (unknown, f"{unknown}: labels ['neutral'] do not occur in the training labels"),
    ):
        with pytest.raises(UsageError) as raised:
            glue.main([*base, "--extra_test_files", f"mine={path}"])
        assert str(raised.value).startswith(expected)


# ---------------------------------------------------------------------------------------------------------------------
# The comparison: label noise as a grid dimension, one table per evaluation set, every plot
# ---------------------------------------------------------------------------------------------------------------------

import compare_report  # noqa: E402
import compare_smoothing  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_noise_grid_slugs_labels_and_one_baseline_per_noise_level(tmp_path):
    args = compare_smoothing.parse_args(["--label_smoothing", "0", "0.1", "--smoothing_style", "uniform",
                                         "--class_weights", "none", "--label_noise", "0", "0.2"])  # fmt: skip
    settings = compare_smoothing.expand_grid(args)
    assert [s.slug for s in settings] == [
        "eps0-cw_none", "eps0.1-uniform-cw_none", "eps0-cw_none-noise0.2", "eps0.1-uniform-cw_none-noise0.2",
        "eps0-cw_none-ts", "eps0-cw_none-noise0.2-ts",
    ]  # fmt: skip
    assert [s.label for s in settings][-3:] == [
        "ε=0.1 uniform, noise 0.2", "ε=0 + temperature scaling", "ε=0 + temperature scaling, noise 0.2",
    ]  # fmt: skip
    assert settings[-1].cross_entropy == settings[2]  # the noisy baseline reuses the noisy ε = 0 run
    command = compare_smoothing.glue_command(args, settings[3], 7, tmp_path)
    assert command[command.index("--label_noise") + 1] == "0.2"
    command = compare_smoothing.glue_command(args, settings[0], 7, tmp_path)
    assert command[command.index("--label_noise") + 1] == "0"  # also overrides a base config's noise
    with pytest.raises(UsageError, match=r"--label_noise: must be fractions in \[0, 1\], got 1.5"):
        compare_smoothing.parse_args(["--label_noise", "0", "1.5"])


def test_report_refuses_an_analysis_of_an_older_version(tmp_path):
    (tmp_path / "eps0-cw_none" / "seed1").mkdir(parents=True)
    (tmp_path / "eps0-cw_none" / "seed1" / "analysis.json").write_text(json.dumps({"setting": {}, "metrics": {}}))
    with pytest.raises(UsageError, match="written by an older compare_smoothing.py: run the comparison again"):
        compare_report.write_report(tmp_path)


def test_comparison_with_an_extra_set_and_a_noise_dimension_builds_every_table_and_plot(tiny_bert, files, tmp_path):
    import yaml

    from hf_lsce.evaluation.calibration import apply_temperature, fit_temperature
    from hf_lsce.evaluation.metrics import classification_metrics

    base = {
        "model_name_or_path": tiny_bert, "train_file": str(files["train"]),
        "validation_file": str(files["validation"]), "test_file": str(files["test"]),
        "extra_test_files": [f"shifted={files['shifted']}"], "max_seq_length": 16,
        "num_train_epochs": 1, "per_device_train_batch_size": 8, "learning_rate": 1e-3, "eval_strategy": "no",
        "save_strategy": "no", "report_to": "none", "use_cpu": True, "disable_tqdm": True, "label_noise_seed": 3,
    }  # fmt: skip
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    output_dir = tmp_path / "out"
    status = compare_smoothing.main([
        "--base_config", str(tmp_path / "base.yaml"), "--output_dir", str(output_dir), "--seeds", "1",
        "--label_smoothing", "0", "0.1", "--smoothing_style", "uniform", "--class_weights", "none",
        "--label_noise", "0", "0.25", "--title", "tiny shift",
    ])  # fmt: skip
    assert status == 0

    table = (output_dir / "results.md").read_text()
    headings = [line for line in table.splitlines() if line.startswith("#")]
    # The class names of the record's id2label (glue.py writes it), not class ids.
    id2label = json.loads((output_dir / "eps0-cw_none" / "seed1" / "record.json").read_text())["id2label"]
    assert id2label == {"0": "negative", "1": "positive"}
    assert headings == [
        "### tiny shift",
        "#### test (in-domain): 10 examples, 50 % negative / 50 % positive",
        "#### shifted: 14 examples, 50 % negative / 50 % positive",
    ]
    labels = ["ε=0 (cross-entropy)", "ε=0 + temperature scaling", "ε=0.1 uniform"]
    labels += [f"{label}, noise 0.25" for label in labels]
    for section in table.split("#### ")[1:]:
        rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| ")]
        assert rows[0][:2] == ["| setting", "seeds"] and "AURC ↓" in rows[0] and "err@80% ↓" in rows[0]
        assert [row[0].removeprefix("| ") for row in rows[1:]] == labels
    assert "T: the temperature fitted on the in-domain validation split" in table

    import csv

    with open(output_dir / "results.csv") as file:
        csv_rows = list(csv.DictReader(file))
    assert [row["evaluation_set"] for row in csv_rows] == ["test"] * 6 + ["shifted"] * 6
    for name in ("reliability.png", "reliability_shifted.png", "accuracy_ece_vs_eps.png", "ece_aurc_vs_eps.png",
                 "confidence_hist.png"):  # fmt: skip
        content = (output_dir / name).read_bytes()
        assert content[:8] == PNG_SIGNATURE and len(content) > 5_000, name

    # The noisy runs trained on 10 flipped labels of 40; the baseline of each noise level is its own ε = 0 run's
    # logits divided by one T fitted on that run's validation split, on every set.
    for slug, flipped in (("eps0-cw_none", 0), ("eps0-cw_none-noise0.25", 10)):
        record = json.loads((output_dir / slug / "seed1" / "record.json").read_text())
        assert record["label_noise"]["flipped"] == flipped and record["label_noise"]["seed"] == 3
        scaled = json.loads((output_dir / f"{slug}-ts" / "seed1" / "analysis.json").read_text())
        assert scaled["source_record"] == str(output_dir / slug / "seed1" / "record.json")
        with np.load(output_dir / slug / "seed1" / "predictions.npz") as data:
            temperature = fit_temperature(data["validation_logits"], data["validation_labels"])
            assert scaled["temperature"] == pytest.approx(temperature, rel=1e-6)
            for name in ("test", "shifted"):
                expected = classification_metrics(apply_temperature(data[f"{name}_logits"], temperature),
                                                  data[f"{name}_labels"])  # fmt: skip
                for metric in ("nll", "ece", "aurc", "accuracy"):
                    assert scaled["metrics"][name][metric] == pytest.approx(expected[metric], rel=1e-6), (name, metric)
    # The table's cells are the records' numbers: the noisy baseline's ECE on the shifted set.
    shifted_rows = {row["setting"]: row for row in csv_rows if row["evaluation_set"] == "shifted"}
    assert float(shifted_rows["ε=0 + temperature scaling, noise 0.25"]["ece_mean"]) == pytest.approx(
        scaled["metrics"]["shifted"]["ece"]
    )
    cell = f"{scaled['metrics']['shifted']['ece']:.3f}"
    assert cell in table.split("#### shifted")[1].split("ε=0 + temperature scaling, noise 0.25")[1].splitlines()[0]
