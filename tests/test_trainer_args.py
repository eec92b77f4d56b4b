"""SmoothingTrainingArguments, compute_class_weights and SmoothingTrainer's construction errors."""

import dataclasses
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_bert_classifier
from sklearn.utils.class_weight import compute_class_weight
from transformers import HfArgumentParser, TrainingArguments

from hf_lsce import (
    SmoothingSeq2SeqTrainingArguments,
    SmoothingTrainer,
    SmoothingTrainingArguments,
    compute_class_weights,
)
from hf_lsce.training_args import SMOOTHING_OPTIONS

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import trainer_tasks as tasks  # noqa: E402

# ---- compute_class_weights ----


def test_balanced_weights_match_scikit_learn():
    labels = [0, 2, 2, 1, 2, 0, 2, -100, 3, 3]
    kept = np.array([y for y in labels if y != -100])
    expected = compute_class_weight("balanced", classes=np.arange(4), y=kept)
    torch.testing.assert_close(compute_class_weights(labels, 4), torch.from_numpy(expected))
    # n / (K * n_c): the weighted count of the training set is n, as unweighted.
    weights = compute_class_weights(torch.tensor(labels), 4)
    assert weights.dtype == torch.float64
    assert (torch.bincount(torch.from_numpy(kept), minlength=4) * weights).sum().item() == pytest.approx(len(kept))


def test_balanced_weights_count_tokens_of_ragged_sequences():
    per_example = [[0, -100, 1], [1, 1], [-100, 2, 2, 2, 0]]
    flat = np.array([y for row in per_example for y in row if y != -100])
    expected = compute_class_weight("balanced", classes=np.arange(3), y=flat)
    torch.testing.assert_close(compute_class_weights(per_example, 3), torch.from_numpy(expected))


@pytest.mark.parametrize(
    ("labels", "num_classes", "method", "match"),
    [
        ([0, 0, 2], 3, "balanced", r"classes \[1\] \(1 of 3\) have none"),
        ([0, 5], 3, "balanced", r"labels must hold class indices in \[0, 3\) or ignore_index=-100, got 5"),
        ([-100, -100], 3, "balanced", "hold no class index"),
        ([0, 1], 2, "inverse", r"method must be one of 'balanced', got 'inverse'"),
        ([0, 1], 1, "balanced", "num_classes must be an int >= 2, got 1"),
        (["a"], 2, "balanced", "integer class indices"),
    ],
)
def test_compute_class_weights_errors(labels, num_classes, method, match):
    with pytest.raises((ValueError, TypeError), match=match):
        compute_class_weights(labels, num_classes, method=method)


# ---- SmoothingTrainingArguments ----


def test_arguments_defaults_and_help(tmp_path):
    args = SmoothingTrainingArguments(output_dir=str(tmp_path), report_to=[])
    assert (args.label_smoothing, args.smoothing_style, args.weight_mode, args.class_weights) == (
        0.1,
        "uniform",
        "example",
        None,
    )
    for name in SMOOTHING_OPTIONS:
        assert SmoothingTrainingArguments.__dataclass_fields__[name].metadata["help"]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--class_weights", "balanced"], "balanced"),
        (["--class_weights", "1.0", "2.5"], [1.0, 2.5]),
        ([], None),
    ],
)
def test_arguments_parse_from_command_line(tmp_path, flags, expected):
    parser = HfArgumentParser(SmoothingTrainingArguments)
    cli = ["--output_dir", str(tmp_path), "--report_to", "none", "--label_smoothing", "0.2"]
    cli += ["--smoothing_style", "off_target", "--weight_mode", "example", *flags]
    (args,) = parser.parse_args_into_dataclasses(cli)
    assert args.class_weights == expected
    assert (args.label_smoothing, args.smoothing_style, args.weight_mode) == (0.2, "off_target", "example")


@pytest.mark.parametrize(("value", "expected"), [("balanced", "balanced"), ("[1.0, 2.5, 0]", [1.0, 2.5, 0.0])])
def test_arguments_parse_from_yaml(tmp_path, value, expected):
    config = tmp_path / "config.yaml"
    config.write_text(f"output_dir: {tmp_path}\nreport_to: none\nlabel_smoothing: 0.05\nclass_weights: {value}\n")
    (args,) = HfArgumentParser(SmoothingTrainingArguments).parse_yaml_file(str(config))
    assert args.class_weights == expected
    assert args.label_smoothing == 0.05


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"label_smoothing": 1.5}, r"label_smoothing must be a float in \[0, 1\], got 1.5"),
        ({"label_smoothing": "0.1"}, r"label_smoothing must be a float in \[0, 1\], got '0.1'"),
        ({"smoothing_style": "fairseq"}, "smoothing_style must be one of 'uniform', 'off_target', got 'fairseq'"),
        ({"weight_mode": "sample"}, "weight_mode must be one of 'torch', 'example', got 'sample'"),
        ({"class_weights": "inverse"}, r"class_weights must be None, \"balanced\" or a list .* got \['inverse'\]"),
        ({"class_weights": [1.0, -2.0]}, r"class_weights must be finite and non-negative, got \[1.0, -2.0\]"),
        ({"class_weights": [1.0]}, r"class_weights must hold one weight per class \(at least 2\), got \[1.0\]"),
        ({"class_weights": [0.0, 0.0]}, r"class_weights must not be all zero, got \[0.0, 0.0\]"),
        ({"class_weights": ["1.0", "nan"]}, r"class_weights must be finite and non-negative, got \[1.0, nan\]"),
        (
            {"label_smoothing": 0.2, "label_smoothing_factor": 0.1},
            "label_smoothing=0.2 and label_smoothing_factor=0.1 are both set",
        ),
        ({"label_smoothing_factor": 1.5}, r"label_smoothing_factor must be a float in \[0, 1\], got 1.5"),
    ],
)
def test_arguments_errors(tmp_path, kwargs, match):
    # A non-number is a TypeError, a number out of range a ValueError, as in the loss.
    error = TypeError if kwargs.get("label_smoothing") == "0.1" else ValueError
    with pytest.raises(error, match=match):
        SmoothingTrainingArguments(output_dir=str(tmp_path), report_to=[], **kwargs)


# ---- SmoothingTrainer construction ----


def _plain_args(tmp_path, **kwargs):
    return TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kwargs)


@pytest.mark.parametrize(
    ("model_kwargs", "trainer_kwargs", "match"),
    [
        ({"num_labels": 3, "problem_type": "multi_label_classification"}, {}, "multi_label_classification"),
        ({"num_labels": 1}, {}, r"regression head \(problem_type=None, num_labels=1\)"),
        ({"num_labels": 3, "problem_type": "regression"}, {}, "regression head"),
        ({"num_labels": 3}, {"compute_loss_func": lambda *a, **k: 0}, "compute_loss_func must be None"),
        ({"num_labels": 3}, {"class_weights": [1.0, 2.0]}, r"one weight per class of the model's head \(3\), got 2"),
        ({"num_labels": 3}, {"class_weights": "balanced"}, "needs a map-style train_dataset"),
        ({"num_labels": 3}, {"class_weights": [1.0, 2.0, -1.0]}, "class_weights must be finite and non-negative"),
        ({"num_labels": 3}, {"label_smoothing": 1.5}, r"label_smoothing must be a float in \[0, 1\], got 1.5"),
        ({"num_labels": 3}, {"label_smoothing": "0.1"}, r"label_smoothing must be a float in \[0, 1\], got '0.1'"),
        ({"num_labels": 3}, {"smoothing_style": "x"}, "smoothing_style must be one of 'uniform', 'off_target'"),
        ({"num_labels": 3}, {"weight_mode": "x"}, "weight_mode must be one of 'torch', 'example', got 'x'"),
        ({"num_labels": 3}, {"shift_labels": "yes"}, r"shift_labels must be None \(detect\), True or False"),
    ],
)
def test_trainer_construction_errors(tmp_path, model_kwargs, trainer_kwargs, match):
    error = TypeError if trainer_kwargs.get("label_smoothing") == "0.1" else ValueError
    with pytest.raises(error, match=match):
        SmoothingTrainer(model=tiny_bert_classifier(**model_kwargs), args=_plain_args(tmp_path), **trainer_kwargs)


def test_trainer_rejects_double_smoothing(tmp_path):
    args = _plain_args(tmp_path, label_smoothing_factor=0.1)
    with pytest.raises(ValueError, match="label_smoothing=0.2 and label_smoothing_factor=0.1 are both set"):
        SmoothingTrainer(model=tiny_bert_classifier(num_labels=3), args=args, label_smoothing=0.2)


def test_trainer_balanced_weights_need_every_class(tmp_path):
    data = [{"input_ids": [2, 3], "label": 0}, {"input_ids": [4], "label": 2}]
    with pytest.raises(ValueError, match=r"classes \[1\] \(1 of 3\) have none"):
        SmoothingTrainer(
            model=tiny_bert_classifier(num_labels=3),
            args=_plain_args(tmp_path),
            train_dataset=data,
            class_weights="balanced",
        )


def test_trainer_options_from_plain_arguments_and_overrides(tmp_path):
    model = tiny_bert_classifier(num_labels=3)
    trainer = SmoothingTrainer(model=model, args=_plain_args(tmp_path))
    assert (trainer.label_smoothing, trainer.smoothing_style, trainer.weight_mode) == (0.1, "uniform", "example")
    assert trainer.class_weights is None and not trainer.shift_labels
    # The base factor alone keeps its meaning (uniform smoothing of that size) and no `LabelSmoother` runs as well.
    trainer = SmoothingTrainer(model=model, args=_plain_args(tmp_path, label_smoothing_factor=0.05))
    assert trainer.label_smoothing == 0.05 and trainer.label_smoother is None
    trainer = SmoothingTrainer(
        model=model,
        args=SmoothingTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, class_weights=[1, 2, 3]),
        label_smoothing=0.0,
        weight_mode="example",
    )
    assert (trainer.label_smoothing, trainer.weight_mode) == (0.0, "example")
    args = SmoothingTrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, label_smoothing=0.0, label_smoothing_factor=0.2
    )
    assert SmoothingTrainer(model=model, args=args).label_smoothing == 0.2
    torch.testing.assert_close(trainer.class_weights, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))


def test_causal_lm_shift_is_detected_and_can_be_overridden(tmp_path):
    args = _plain_args(tmp_path)
    assert SmoothingTrainer(model=tasks.model("causal_lm"), args=args).shift_labels is True
    assert SmoothingTrainer(model=tasks.model("causal_lm"), args=args, shift_labels=False).shift_labels is False
    assert SmoothingTrainer(model=tasks.model("token_cls"), args=args).shift_labels is False


@pytest.mark.parametrize("as_dataset", [False, True])
@pytest.mark.parametrize("task", ["seq_cls", "token_cls"])
def test_balanced_weights_from_training_set(tmp_path, task, as_dataset):
    data = tasks.examples(task)
    train_dataset = datasets.Dataset.from_list(data) if as_dataset else data
    trainer = SmoothingTrainer(
        model=tasks.model(task), args=_plain_args(tmp_path), train_dataset=train_dataset, class_weights="balanced"
    )
    key = "label" if task == "seq_cls" else "labels"
    flat = np.array([y for row in data for y in np.atleast_1d(row[key]) if y != -100])
    expected = compute_class_weight("balanced", classes=np.arange(tasks.NUM_LABELS[task]), y=flat)
    torch.testing.assert_close(trainer.class_weights, torch.from_numpy(expected))


def test_balanced_weights_for_causal_lm_count_shifted_labels(tmp_path):
    # Token 3 only starts sequences, so it is never a target: counted without the shift, it would not be missing.
    data = [{"input_ids": [3, 2, 4], "labels": [3, 2, 4]}, {"input_ids": [3, 4, 2, 2], "labels": [3, 4, 2, 2]}]
    model = tasks.model("causal_lm")
    model.resize_token_embeddings(5)
    with pytest.raises(ValueError, match=r"classes \[0, 1, 3\] \(3 of 5\) have none"):
        SmoothingTrainer(model=model, args=_plain_args(tmp_path), train_dataset=data, class_weights="balanced")


# ---- the torch-mode warning ----

TORCH_MODE_WARNING = "smoothing mass moves towards heavily weighted classes"


def _torch_mode_warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if TORCH_MODE_WARNING in record.getMessage()]


@pytest.mark.parametrize("through", ["keywords", "arguments"])
@pytest.mark.parametrize("class_weights", [None, [1.0, 2.0, 3.0], "balanced"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weight_mode", [None, "torch", "example"])
def test_torch_mode_warning_only_when_weights_reshape_smoothing(
    tmp_path, caplog, weight_mode, label_smoothing, class_weights, through
):
    options = {"label_smoothing": label_smoothing, "class_weights": class_weights}
    if weight_mode is not None:
        options["weight_mode"] = weight_mode
    data = [{"input_ids": [2, 3], "label": 0}, {"input_ids": [4], "label": 1}, {"input_ids": [5], "label": 2}]
    if through == "keywords":
        args, kwargs = _plain_args(tmp_path), options
    else:
        args, kwargs = SmoothingTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **options), {}
    with caplog.at_level("WARNING"):
        SmoothingTrainer(model=tiny_bert_classifier(num_labels=3), args=args, train_dataset=data, **kwargs)
    warned = _torch_mode_warnings(caplog)
    if weight_mode == "torch" and label_smoothing > 0 and class_weights is not None:
        assert len(warned) == 1
        assert "weight_mode='example'" in warned[0] and "p_c proportional to w_c * q_c" in warned[0]
    else:
        assert warned == []


def test_torch_mode_warning_with_the_base_smoothing_factor(tmp_path, caplog):
    args = _plain_args(tmp_path, label_smoothing_factor=0.2)
    with caplog.at_level("WARNING"):
        SmoothingTrainer(
            model=tiny_bert_classifier(num_labels=3), args=args, weight_mode="torch", class_weights=[1.0, 2.0, 3.0]
        )
    assert len(_torch_mode_warnings(caplog)) == 1


# ---- options resolved once into the arguments ----


def test_label_smoothing_factor_alone_keeps_its_base_meaning(tmp_path):
    parser = HfArgumentParser(SmoothingTrainingArguments)
    cli = ["--output_dir", str(tmp_path), "--report_to", "none", "--use_cpu", "true"]
    cli += ["--label_smoothing_factor", "0.2"]
    (args,) = parser.parse_args_into_dataclasses(cli)
    # Resolved into label_smoothing; the base option is spent, so Transformers' LabelSmoother is never built.
    assert (args.label_smoothing, args.label_smoothing_factor) == (0.2, 0.0)
    model = tasks.model("seq_cls")
    trainer = SmoothingTrainer(model=model, args=args)
    assert trainer.label_smoother is None and trainer.label_smoothing == 0.2
    batch = tasks.collator("seq_cls")(tasks.examples("seq_cls"))
    loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
    torch.testing.assert_close(loss, F.cross_entropy(outputs.logits, batch["labels"], label_smoothing=0.2))
    # Building the arguments again from their own fields gives the same (no "both are set" on a copy).
    copy = SmoothingTrainingArguments(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init})
    assert (copy.label_smoothing, copy.label_smoothing_factor) == (0.2, 0.0)


@pytest.mark.parametrize(
    ("label_smoothing", "factor", "expected"),
    [(None, 0.0, 0.1), (None, 0.2, 0.2), (0.0, 0.2, 0.2), (0.0, 0.0, 0.0), (0.3, 0.0, 0.3), (1.0, 0.0, 1.0)],
)
def test_label_smoothing_resolution(tmp_path, label_smoothing, factor, expected):
    args = SmoothingTrainingArguments(
        output_dir=str(tmp_path), report_to=[], label_smoothing=label_smoothing, label_smoothing_factor=factor
    )
    assert (args.label_smoothing, args.label_smoothing_factor) == (expected, 0.0)


def test_plain_arguments_are_converted_with_every_field(tmp_path):
    plain = _plain_args(
        tmp_path, learning_rate=3e-4, lr_scheduler_type="cosine", save_strategy="steps", save_steps=7,
        hub_token="secret-token", seed=123, label_smoothing_factor=0.05,
    )  # fmt: skip
    trainer = SmoothingTrainer(model=tiny_bert_classifier(num_labels=3), args=plain, weight_mode="torch")
    args = trainer.args
    assert type(args) is SmoothingTrainingArguments
    assert args.hub_token == "secret-token"  # `to_dict()` hides it; the conversion must not lose it
    converted, original = args.to_dict(), plain.to_dict()
    for name in SMOOTHING_OPTIONS:
        converted.pop(name)
    assert converted.pop("label_smoothing_factor") == 0.0 and original.pop("label_smoothing_factor") == 0.05
    assert converted == original
    assert (args.label_smoothing, args.weight_mode) == (0.05, "torch")
    assert plain.label_smoothing_factor == 0.05 and not hasattr(plain, "label_smoothing")  # the caller's is untouched


def test_keyword_options_override_into_a_copy(tmp_path):
    args = SmoothingTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, class_weights=[1, 2, 3])
    model = tiny_bert_classifier(num_labels=3)
    assert SmoothingTrainer(model=model, args=args).args is args  # nothing to override: used as is
    trainer = SmoothingTrainer(model=model, args=args, label_smoothing=0.3, smoothing_style="off_target")
    assert trainer.args is not args and type(trainer.args) is SmoothingTrainingArguments
    assert (trainer.args.label_smoothing, trainer.args.smoothing_style, trainer.args.class_weights) == (
        0.3,
        "off_target",
        [1.0, 2.0, 3.0],
    )
    assert (args.label_smoothing, args.smoothing_style) == (0.1, "uniform")
    # The trainer's views are the arguments'.
    assert (trainer.label_smoothing, trainer.smoothing_style, trainer.weight_mode) == (0.3, "off_target", "example")


def test_arguments_of_another_class_are_refused_when_fields_would_be_lost(tmp_path):
    from transformers import Seq2SeqTrainingArguments

    common = {"output_dir": str(tmp_path), "report_to": [], "use_cpu": True}
    with pytest.raises(TypeError, match=r"args is a Seq2SeqTrainingArguments, whose fields generation_config, .*"):
        SmoothingTrainer(model=tiny_bert_classifier(num_labels=3), args=Seq2SeqTrainingArguments(**common))
    # Arguments with the smoothing options and more fields keep their class.
    args = SmoothingSeq2SeqTrainingArguments(**common)
    assert SmoothingTrainer(model=tiny_bert_classifier(num_labels=3), args=args).args is args
    trainer = SmoothingTrainer(model=tiny_bert_classifier(num_labels=3), args=args, weight_mode="torch")
    assert type(trainer.args) is SmoothingSeq2SeqTrainingArguments and trainer.args.weight_mode == "torch"
