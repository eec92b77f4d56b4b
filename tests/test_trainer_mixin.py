"""SmoothingTrainerMixin on other Trainer classes: Seq2SeqTrainer (with generation), PEFT, and refused orders."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments

from hf_lsce import (
    SmoothingSeq2SeqTrainer,
    SmoothingSeq2SeqTrainingArguments,
    SmoothingTrainer,
    SmoothingTrainerMixin,
)
from hf_lsce.training_args import SMOOTHING_OPTIONS

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import trainer_tasks as tasks  # noqa: E402

TOLERANCE = 1e-6

# ---- method order ----


class OwnLossTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return torch.zeros((), requires_grad=True)


class OwnLossMixin:
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return torch.zeros((), requires_grad=True)


@pytest.mark.parametrize("first", [OwnLossTrainer, OwnLossMixin], ids=["trainer", "plain_mixin"])
def test_a_compute_loss_before_ours_raises_when_the_class_is_defined(first):
    with pytest.raises(TypeError, match=rf"{first.__name__}.compute_loss comes before SmoothingTrainerMixin"):
        type("Wrong", (first, SmoothingTrainer), {})
    # The other order is the mixin's use: our loss replaces the parent's.
    right = type("Right", (SmoothingTrainerMixin, OwnLossTrainer), {})
    assert right.compute_loss is SmoothingTrainerMixin.compute_loss


class SkipsOurLoss(tasks.SequentialSamplerMixin, SmoothingTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return model(**inputs).loss  # the model's own loss: no smoothing, no weights, no window normalization


class WrapsOurLoss(tasks.SequentialSamplerMixin, SmoothingTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def test_an_override_must_call_our_loss(tmp_path, references_seq_cls):
    with pytest.raises(TypeError, match=r"SkipsOurLoss.compute_loss did not call SmoothingTrainerMixin.compute_loss"):
        tasks.run("seq_cls", tmp_path / "skips", 2, 1, trainer_cls=SkipsOurLoss)
    result = tasks.run("seq_cls", tmp_path / "wraps", 2, 4, trainer_cls=WrapsOurLoss)
    assert tasks.max_abs_diff(result["params"], references_seq_cls["params"]) <= TOLERANCE


class RebuildsArguments(Trainer):
    def __init__(self, model=None, args=None, **kwargs):
        super().__init__(model, TrainingArguments(output_dir=args.output_dir, report_to=[], use_cpu=True), **kwargs)


def test_a_parent_that_drops_the_options_raises_at_construction(tmp_path):
    cls = type("Dropped", (SmoothingTrainerMixin, RebuildsArguments), {})
    with pytest.raises(TypeError, match="replaced the arguments by a TrainingArguments, which has no smoothing"):
        cls(model=tasks.model("seq_cls"), args=tasks.training_args(tmp_path, 2, 1))


@pytest.fixture(scope="module")
def references_seq_cls():
    return tasks.full_batch_reference("seq_cls")


# ---- Seq2Seq ----


def _seq2seq_args(tmp_path, cls=SmoothingSeq2SeqTrainingArguments, **kwargs):
    common = tasks.training_args(tmp_path, 2, 4).to_dict()
    for name in (*SMOOTHING_OPTIONS, "label_smoothing_factor"):
        common.pop(name)
    if cls is SmoothingSeq2SeqTrainingArguments:
        kwargs = {"label_smoothing": tasks.EPSILON, "weight_mode": "torch", **kwargs}
    return cls(**{**common, **kwargs})


def test_seq2seq_one_step_equals_full_batch(tmp_path):
    args = _seq2seq_args(tmp_path, class_weights=tasks.class_weights("seq2seq"))
    result = tasks.run("seq2seq", tmp_path, 2, 4, trainer_cls=SmoothingSeq2SeqTrainer, args=args)
    reference = tasks.full_batch_reference("seq2seq")
    assert tasks.max_abs_diff(result["params"], reference["params"]) <= TOLERANCE
    assert result["training_loss"] == pytest.approx(reference["loss"], abs=TOLERANCE)


def _eval_truth(model):
    """The whole evaluation set as one batch: smoothed weighted loss (torch mode) and plain cross-entropy."""
    batch = tasks.collator("seq2seq")(tasks.examples("seq2seq"))
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch, labels=labels).logits.flatten(0, 1)
    labels = labels.flatten()
    weight = torch.tensor(tasks.class_weights("seq2seq"), dtype=torch.float64)
    smoothed = F.cross_entropy(logits, labels, weight=weight, label_smoothing=tasks.EPSILON).item()
    return smoothed, F.cross_entropy(logits, labels).item()


@pytest.mark.parametrize("keywords", [False, True], ids=["smoothing_args", "plain_args_and_keywords"])
def test_predict_with_generate_keeps_our_eval_loss_and_reports_nll(tmp_path, keywords):
    generation = {"predict_with_generate": True, "generation_max_length": 6, "per_device_eval_batch_size": 3}
    weights = tasks.class_weights("seq2seq")
    options = {"label_smoothing": tasks.EPSILON, "weight_mode": "torch", "class_weights": weights}
    if keywords:
        args, trainer_kwargs = _seq2seq_args(tmp_path, cls=Seq2SeqTrainingArguments, **generation), options
    else:
        args, trainer_kwargs = _seq2seq_args(tmp_path, **generation, **options), {}
    generated = []

    def compute_metrics(prediction):
        generated.append(prediction.predictions)
        return {}

    trainer = SmoothingSeq2SeqTrainer(
        model=tasks.model("seq2seq"), args=args, eval_dataset=tasks.examples("seq2seq"),
        data_collator=tasks.collator("seq2seq"), processing_class=tasks.tokenizer(), compute_metrics=compute_metrics,
        **trainer_kwargs,
    )  # fmt: skip
    assert type(trainer.args) is SmoothingSeq2SeqTrainingArguments and trainer.args.predict_with_generate
    metrics = trainer.evaluate()
    # Generation ran: compute_metrics got token ids (batch, length), not logits (batch, length, vocabulary).
    assert generated and generated[0].ndim == 2 and generated[0].dtype.kind == "i"
    smoothed, nll = _eval_truth(trainer.model)
    assert metrics["eval_loss"] == pytest.approx(smoothed, abs=1e-9)
    assert metrics["eval_nll"] == pytest.approx(nll, abs=1e-9)
    assert trainer.label_smoother is None  # our loss is lent to Seq2SeqTrainer's prediction_step only

    # Negative control: plain Seq2SeqTrainer reports the model's own, unsmoothed, per-batch-averaged loss.
    plain = Seq2SeqTrainer(
        model=tasks.model("seq2seq"), args=_seq2seq_args(tmp_path, cls=Seq2SeqTrainingArguments, **generation),
        eval_dataset=tasks.examples("seq2seq"), data_collator=tasks.collator("seq2seq"),
        processing_class=tasks.tokenizer(),
    )  # fmt: skip
    plain_metrics = plain.evaluate()
    assert "eval_nll" not in plain_metrics
    assert abs(plain_metrics["eval_loss"] - smoothed) > 1e-3


# ---- PEFT ----


def test_peft_lora_sequence_classifier(tmp_path, references_seq_cls):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"])
    base = tasks.model("seq_cls")
    frozen = {name: p.detach().clone() for name, p in base.named_parameters()}
    net = peft.get_peft_model(base, lora)
    args = tasks.training_args(tmp_path, 2, 4, class_weights=tasks.class_weights("seq_cls"))
    trainer = tasks.OrderedSmoothingTrainer(
        model=net, args=args, train_dataset=tasks.examples("seq_cls"), data_collator=tasks.collator("seq_cls")
    )
    assert trainer.num_classes == 3
    output = trainer.train()
    # LoRA's B starts at zero and the head's trainable copy equals the head: the first loss is the base model's.
    assert output.training_loss == pytest.approx(references_seq_cls["loss"], abs=TOLERANCE)
    # The trained head copy moved exactly as the full model's head does in the reference step.
    head = dict(net.named_parameters())["base_model.model.classifier.modules_to_save.default.weight"]
    torch.testing.assert_close(head, references_seq_cls["params"]["classifier.weight"], rtol=0, atol=TOLERANCE)
    for name, p in base.named_parameters():
        original = name.replace("base_layer.", "").replace("original_module.", "")
        if "lora_" not in name and "modules_to_save" not in name:
            torch.testing.assert_close(p, frozen[original], rtol=0, atol=0)
