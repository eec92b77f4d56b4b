"""``label_names``: one custom label key (``label_names=["target"]``) is where the trainer reads the targets; the model
never receives it. More than one key, or another key with a trainer whose collators fix "labels", is refused."""

import sys
from pathlib import Path

import pytest
import torch

from hf_lsce import SmoothingSeq2SeqTrainer, SmoothingTrainer

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import trainer_tasks as tasks  # noqa: E402

TOLERANCE = 1e-6


@pytest.mark.parametrize("task", ["seq_cls", "token_cls"])
@pytest.mark.parametrize(("batch_size", "grad_accum"), [(8, 1), (2, 4)])
def test_custom_label_key_equals_full_batch(tmp_path, task, batch_size, grad_accum):
    seen = set()
    net = tasks.model(task)
    net.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    args = tasks.training_args(
        tmp_path, batch_size, grad_accum, label_names=["target"], class_weights=tasks.class_weights(task)
    )
    trainer = tasks.OrderedSmoothingTrainer(
        model=net, args=args, train_dataset=tasks.examples(task, label_key="target"),
        eval_dataset=tasks.examples(task, label_key="target"), data_collator=_collator(task),
    )  # fmt: skip
    output = trainer.train()
    reference = tasks.full_batch_reference(task)
    params = {name: p.detach() for name, p in trainer.model.named_parameters()}
    assert tasks.max_abs_diff(params, reference["params"]) <= TOLERANCE
    assert output.training_loss == pytest.approx(reference["loss"], abs=TOLERANCE)
    metrics = trainer.evaluate()
    assert "eval_nll" in metrics and metrics["eval_loss"] > 0
    assert "input_ids" in seen and not seen & {"target", "labels"}


def _collator(task):
    if task == "seq_cls":
        return tasks.collator(task)  # tokenizer.pad keeps the integer "target"
    # DataCollatorForTokenClassification pads only "labels": pad the renamed key the same way, with -100.
    inner = tasks.collator(task)

    def collate(features):
        batch = inner([{("labels" if k == "target" else k): v for k, v in f.items()} for f in features])
        batch["target"] = batch.pop("labels")
        return batch

    return collate


def test_evaluation_with_custom_key_equals_labels(tmp_path):
    """The same model and data under "labels" and under "target" give the same eval_loss and eval_nll."""
    metrics = {}
    for key, label_names in (("label", None), ("target", ["target"])):
        trainer = SmoothingTrainer(
            model=tasks.model("seq_cls"), args=tasks.training_args(tmp_path, 2, 1, label_names=label_names),
            eval_dataset=tasks.examples("seq_cls", label_key=key), data_collator=tasks.collator("seq_cls"),
        )  # fmt: skip
        metrics[key] = trainer.evaluate()
    assert metrics["target"]["eval_loss"] == pytest.approx(metrics["label"]["eval_loss"], abs=1e-12)
    assert metrics["target"]["eval_nll"] == pytest.approx(metrics["label"]["eval_nll"], abs=1e-12)


def test_without_label_names_the_custom_key_is_not_read(tmp_path):
    """Negative control: the same data without ``label_names`` has no targets."""
    with pytest.raises(ValueError, match="needs 'labels' in every training batch"):
        tasks.run("seq_cls", tmp_path, 2, 4, train_dataset=tasks.examples("seq_cls", label_key="target"))


def test_balanced_weights_read_the_custom_column(tmp_path):
    trainer = SmoothingTrainer(
        model=tasks.model("seq_cls"), args=tasks.training_args(tmp_path, 2, 1, label_names=["target"]),
        train_dataset=tasks.examples("seq_cls", label_key="target"), class_weights="balanced",
    )  # fmt: skip
    labels = torch.tensor([row["label"] for row in tasks.examples("seq_cls")])
    counts = torch.bincount(labels, minlength=3).double()
    torch.testing.assert_close(trainer.class_weights, len(labels) / (3 * counts))


@pytest.mark.parametrize("label_names", [["start_positions", "end_positions"], [], "target", [3]])
def test_label_names_must_name_one_key(tmp_path, label_names):
    args = tasks.training_args(tmp_path, 2, 1)
    args.label_names = label_names
    with pytest.raises(ValueError, match=r"label_names must name the one batch key that holds the class labels"):
        SmoothingTrainer(model=tasks.model("seq_cls"), args=args, train_dataset=tasks.examples("seq_cls"))


def test_seq2seq_refuses_another_key(tmp_path):
    from hf_lsce import SmoothingSeq2SeqTrainingArguments

    args = SmoothingSeq2SeqTrainingArguments(str(tmp_path), label_names=["target"], report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match=r"label_names must be None or \['labels'\] with SmoothingSeq2SeqTrainer"):
        SmoothingSeq2SeqTrainer(model=tasks.model("seq2seq"), args=args)
    args = SmoothingSeq2SeqTrainingArguments(str(tmp_path), label_names=["labels"], report_to=[], use_cpu=True)
    assert SmoothingSeq2SeqTrainer(model=tasks.model("seq2seq"), args=args).label_name == "labels"


def test_sft_refuses_another_key(tmp_path):
    pytest.importorskip("trl")
    import trainer_sft_tasks as sft

    with pytest.raises(ValueError, match=r"label_names must be None or \['labels'\] with .*TRL's collators"):
        sft.run(tmp_path, 8, 1, config_kwargs={"label_names": ["target"]})
