"""Per-example weights (a ``sample_weight`` batch key / dataset column): one optimizer step equals the full batch's
weighted mean, ``sum_i s_i * loss_i / sum_i s_i * w[y_i]``, however the batch is split.

The truth is `trainer_tasks.full_batch_reference(..., sample_weights=...)`: all 8 examples padded together,
per-position losses from ``F.cross_entropy(reduction="none")``, each times its example's weight, one SGD step. The
datasets are `datasets.Dataset`s, so `Trainer`'s ``remove_unused_columns`` runs (and must keep ``sample_weight``).
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import check_matches_reference, run_two_processes

from hf_lsce import SmoothingSeq2SeqTrainer, SmoothingTrainer

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import trainer_tasks as tasks  # noqa: E402

TOLERANCE = 1e-6
WEIGHTS = tasks.SAMPLE_WEIGHTS
ALL_TASKS = (*tasks.TASKS, "seq2seq")


@pytest.fixture(scope="module")
def references():
    return {
        (task, mode): tasks.full_batch_reference(task, weight_mode=mode, sample_weights=WEIGHTS)
        for task in ALL_TASKS
        for mode in ("torch", "example")
    }


def _run(task, tmp_path, batch_size, grad_accum, weight_mode="torch", **kwargs):
    if task == "seq2seq":
        kwargs["trainer_cls"] = type("OrderedSeq2Seq", (tasks.SequentialSamplerMixin, SmoothingSeq2SeqTrainer), {})
        kwargs["args"] = _seq2seq_args(tmp_path, batch_size, grad_accum, weight_mode=weight_mode)
    return tasks.run(
        task, tmp_path, batch_size, grad_accum, train_dataset=tasks.weighted_dataset(task),
        args_kwargs={"weight_mode": weight_mode}, **kwargs,
    )  # fmt: skip


def _seq2seq_args(tmp_path, batch_size, grad_accum, **kwargs):
    from hf_lsce import SmoothingSeq2SeqTrainingArguments

    values = tasks.training_args(tmp_path, batch_size, grad_accum, class_weights=tasks.class_weights("seq2seq"))
    fields = {name: getattr(values, name) for name in ("per_device_train_batch_size", "gradient_accumulation_steps")}
    common = {key: value for key, value in values.to_dict().items() if key not in ("label_smoothing_factor",)}
    return SmoothingSeq2SeqTrainingArguments(**{**common, **fields, **kwargs})


@pytest.mark.parametrize("task", ALL_TASKS)
@pytest.mark.parametrize(("batch_size", "grad_accum"), [(8, 1), (2, 4)])
def test_one_step_equals_full_batch_weighted_mean(tmp_path, references, task, batch_size, grad_accum):
    result = _run(task, tmp_path, batch_size, grad_accum)
    check_matches_reference(result, references[task, "torch"])
    # The weights matter: the same step without them is another one.
    assert tasks.max_abs_diff(tasks.full_batch_reference(task)["params"], references[task, "torch"]["params"]) > 1e-3


@pytest.mark.parametrize("task", ["seq_cls", "token_cls"])
def test_example_weight_mode_one_step_equals_full_batch(tmp_path, references, task):
    result = _run(task, tmp_path, 2, 4, weight_mode="example")
    check_matches_reference(result, references[task, "example"])


def test_weights_without_class_weights(tmp_path):
    reference = tasks.full_batch_reference("token_cls", weights=False, sample_weights=WEIGHTS)
    result = tasks.run("token_cls", tmp_path, 2, 4, weights=False, train_dataset=tasks.weighted_dataset("token_cls"))
    check_matches_reference(result, reference)


def test_all_ones_equal_no_weights(tmp_path):
    result = tasks.run("seq_cls", tmp_path, 2, 4, train_dataset=tasks.weighted_dataset("seq_cls", [1.0] * 8))
    check_matches_reference(result, tasks.full_batch_reference("seq_cls"))


class PerMicroBatchWeightedMeanTrainer(tasks.PerMicroBatchMeanTrainer):
    """Negative control: each micro-batch's own weighted mean (sum s * loss / sum s * w[y]), then ÷ accumulation."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels, sample_weight = inputs.pop("labels"), inputs.pop("sample_weight")
        logits = model(**inputs).logits
        if self.shift:
            logits, labels = logits[..., :-1, :], labels[..., 1:]
        per_position = sample_weight.to(logits.dtype).reshape(-1, *[1] * (labels.dim() - 1)).expand_as(labels)
        logits, labels, per_position = logits.flatten(0, -2), labels.flatten(), per_position.flatten()
        weight = torch.tensor(self.weight, dtype=logits.dtype)
        losses = F.cross_entropy(logits, labels, weight=weight, reduction="none", label_smoothing=tasks.EPSILON)
        return (losses * per_position).sum() / (weight[labels.clamp(min=0)] * per_position * (labels != -100)).sum()


@pytest.mark.parametrize("task", tasks.TASKS)
def test_negative_control_per_micro_batch_normalization_fails(tmp_path, references, task):
    def control(batch_size, grad_accum):
        return tasks.run(
            task, tmp_path, batch_size, grad_accum, trainer_cls=PerMicroBatchWeightedMeanTrainer,
            train_dataset=tasks.examples(task, sample_weights=WEIGHTS), weight=tasks.class_weights(task),
            shift=task == "causal_lm", args_kwargs={"label_smoothing": 0.0, "remove_unused_columns": False},
        )  # fmt: skip

    reference = references[task, "torch"]
    assert tasks.max_abs_diff(control(2, 4)["params"], reference["params"]) > 1e-3
    # ... while the same loss over the whole batch at once is exact: the difference is the normalization only.
    assert tasks.max_abs_diff(control(8, 1)["params"], reference["params"]) <= TOLERANCE


# ---- evaluation ----


def test_eval_loss_is_weighted_and_eval_nll_is_not(tmp_path):
    trainer = tasks.OrderedSmoothingTrainer(
        model=tasks.model("token_cls"), args=tasks.training_args(tmp_path, 2, 1, per_device_eval_batch_size=3),
        eval_dataset=tasks.weighted_dataset("token_cls"), data_collator=tasks.collator("token_cls"),
        class_weights=tasks.class_weights("token_cls"),
    )  # fmt: skip
    metrics = trainer.evaluate()
    batch = tasks.collator("token_cls")(tasks.examples("token_cls"))
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = trainer.model(**batch).logits
    per_position = torch.tensor(WEIGHTS, dtype=torch.float64)[:, None].expand_as(labels).flatten()
    logits, labels = logits.flatten(0, 1), labels.flatten()
    weight = torch.tensor(tasks.class_weights("token_cls"), dtype=torch.float64)
    losses = F.cross_entropy(logits, labels, weight=weight, reduction="none", label_smoothing=tasks.EPSILON)
    truth = (losses * per_position).sum() / (weight[labels.clamp(min=0)] * per_position * (labels != -100)).sum()
    assert metrics["eval_loss"] == pytest.approx(truth.item(), abs=1e-9)
    assert metrics["eval_nll"] == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-9)
    unweighted = F.cross_entropy(logits, labels, weight=weight, label_smoothing=tasks.EPSILON).item()
    assert abs(metrics["eval_loss"] - unweighted) > 1e-3


def test_seq2seq_generation_keeps_weighted_eval_loss(tmp_path):
    args = _seq2seq_args(
        tmp_path, 2, 1, weight_mode="torch", predict_with_generate=True, generation_max_length=6,
        per_device_eval_batch_size=3,
    )  # fmt: skip
    trainer = SmoothingSeq2SeqTrainer(
        model=tasks.model("seq2seq"), args=args, eval_dataset=tasks.weighted_dataset("seq2seq"),
        data_collator=tasks.collator("seq2seq"), processing_class=tasks.tokenizer(), compute_metrics=lambda p: {},
    )  # fmt: skip
    metrics = trainer.evaluate()
    batch = tasks.collator("seq2seq")(tasks.examples("seq2seq"))
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = trainer.model(**batch, labels=labels).logits.flatten(0, 1)
    per_position = torch.tensor(WEIGHTS, dtype=torch.float64)[:, None].expand_as(labels).flatten()
    labels = labels.flatten()
    weight = torch.tensor(tasks.class_weights("seq2seq"), dtype=torch.float64)
    losses = F.cross_entropy(logits, labels, weight=weight, reduction="none", label_smoothing=tasks.EPSILON)
    truth = (losses * per_position).sum() / (weight[labels.clamp(min=0)] * per_position * (labels != -100)).sum()
    assert metrics["eval_loss"] == pytest.approx(truth.item(), abs=1e-9)
    assert metrics["eval_nll"] == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-9)


def test_model_never_sees_the_weights(tmp_path):
    seen = set()
    net = tasks.model("seq_cls")
    net.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    tasks.run("seq_cls", tmp_path, 2, 4, train_dataset=tasks.weighted_dataset("seq_cls"), eval_dataset=None)
    trainer = tasks.OrderedSmoothingTrainer(
        model=net, args=tasks.training_args(tmp_path, 2, 1), train_dataset=tasks.weighted_dataset("seq_cls"),
        eval_dataset=tasks.weighted_dataset("seq_cls"), data_collator=tasks.collator("seq_cls"),
    )  # fmt: skip
    trainer.train()
    trainer.evaluate()
    assert seen and "input_ids" in seen and not seen & {"sample_weight", "labels"}


# ---- bad input ----


def _train_on(tmp_path, rows, task="seq_cls", batch_size=2, grad_accum=1, **kwargs):
    return tasks.run(task, tmp_path, batch_size, grad_accum, train_dataset=rows, **kwargs)


@pytest.mark.parametrize(
    ("bad", "match"),
    [(-0.5, r"sample_weight must be finite and non-negative, got -0\.5"), (float("nan"), "got nan"),
     (float("inf"), "got inf")],
)  # fmt: skip
def test_bad_weight_values_raise(tmp_path, bad, match):
    rows = tasks.examples("seq_cls", sample_weights=[1.0, 1.0, 1.0, bad, 1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=match):
        _train_on(tmp_path, rows, batch_size=2, grad_accum=4)


def test_bad_weights_in_evaluation_raise(tmp_path):
    trainer = tasks.OrderedSmoothingTrainer(
        model=tasks.model("seq_cls"), args=tasks.training_args(tmp_path, 2, 1),
        eval_dataset=tasks.examples("seq_cls", sample_weights=[1.0] * 7 + [-1.0]),
        data_collator=tasks.collator("seq_cls"),
    )  # fmt: skip
    with pytest.raises(ValueError, match="sample_weight must be finite and non-negative, got -1.0"):
        trainer.evaluate()


def test_weights_missing_in_some_batches_raise(tmp_path):
    rows = tasks.examples("seq_cls", sample_weights=WEIGHTS)
    for row in rows[4:]:
        del row["sample_weight"]
    with pytest.raises(ValueError, match="'sample_weight' is in some training batches and not in others"):
        _train_on(tmp_path, rows, batch_size=2, grad_accum=2, steps=2)
    # Also when the batches without weights come first.
    with pytest.raises(ValueError, match="'sample_weight' is in some training batches and not in others"):
        _train_on(tmp_path, rows[4:] + rows[:4], batch_size=2, grad_accum=2, steps=2)


def test_missing_weights_in_evaluation_raise(tmp_path):
    rows = tasks.examples("seq_cls", sample_weights=WEIGHTS)
    for row in rows[4:]:
        del row["sample_weight"]
    trainer = tasks.OrderedSmoothingTrainer(
        model=tasks.model("seq_cls"), args=tasks.training_args(tmp_path, 2, 1, per_device_eval_batch_size=2),
        eval_dataset=rows, data_collator=tasks.collator("seq_cls"),
    )  # fmt: skip
    with pytest.raises(ValueError, match="'sample_weight' is in some evaluation batches and not in others"):
        trainer.evaluate()


def test_wrong_shape_raises(tmp_path):
    rows = tasks.examples("seq_cls", sample_weights=[[1.0, 2.0]] * 8)
    with pytest.raises(ValueError, match=r"one weight per example, shape \(2,\) .* got shape \(2, 2\)"):
        _train_on(tmp_path, rows)


def test_non_numeric_weights_raise(tmp_path):
    rows = tasks.examples("seq_cls", sample_weights=[True] * 8)
    with pytest.raises(TypeError, match="sample_weight must be a tensor of real numbers, got a torch.bool tensor"):
        _train_on(tmp_path, rows)


def test_a_collator_dropping_the_column_raises(tmp_path):
    def drop_weights(features):
        return tasks.collator("seq_cls")([{k: v for k, v in f.items() if k != "sample_weight"} for f in features])

    match = "train_dataset has a 'sample_weight' column, but the training batches do not"
    with pytest.raises(ValueError, match=match):
        _train_on(tmp_path, tasks.weighted_dataset("seq_cls"), data_collator=drop_weights)


def test_plain_trainer_would_drop_the_column(tmp_path):
    """Why `_set_signature_columns_if_needed` is overridden: `Trainer` removes the column, the weights vanish."""
    from transformers import Trainer

    trainer = Trainer(
        model=tasks.model("seq_cls"), args=tasks.training_args(tmp_path, 8, 1),
        train_dataset=tasks.weighted_dataset("seq_cls"), data_collator=tasks.collator("seq_cls"),
    )  # fmt: skip
    assert "sample_weight" not in next(iter(trainer.get_train_dataloader()))
    ours = SmoothingTrainer(
        model=tasks.model("seq_cls"), args=tasks.training_args(tmp_path, 8, 1),
        train_dataset=tasks.weighted_dataset("seq_cls"), data_collator=tasks.collator("seq_cls"),
    )  # fmt: skip
    batch = next(iter(ours.get_train_dataloader()))
    assert sorted(batch["sample_weight"].tolist()) == sorted(WEIGHTS)


# ---- TRL ----


def test_sft_one_step_equals_full_batch_weighted_mean(tmp_path):
    pytest.importorskip("trl")
    import trainer_sft_tasks as sft

    reference = sft.full_batch_reference(tmp_path / "reference", sample_weights=WEIGHTS)
    unweighted = sft.full_batch_reference(tmp_path / "unweighted")
    assert tasks.max_abs_diff(reference["params"], unweighted["params"]) > 1e-3
    for batch_size, grad_accum in [(8, 1), (2, 4)]:
        result = sft.run(tmp_path / f"{batch_size}x{grad_accum}", batch_size, grad_accum, sample_weights=WEIGHTS)
        check_matches_reference(result, reference)


@pytest.mark.parametrize("option", ["packing", "padding_free"])
def test_sft_refuses_weights_with_packing(tmp_path, option):
    pytest.importorskip("trl")
    import trainer_sft_tasks as sft

    with pytest.raises(ValueError, match="train_dataset have a 'sample_weight' column.*packing or padding_free"):
        sft.run(tmp_path, 8, 1, sample_weights=WEIGHTS, config_kwargs={option: True})


# ---- two processes ----


@pytest.mark.distributed
def test_two_processes_equal_full_batch_weighted_mean(tmp_path, references):
    try:
        import trainer_sft_tasks as sft
    except ImportError:  # TRL is an optional extra
        sft = None
    weighted_tasks = [*tasks.TASKS, "sft"] if sft is not None else list(tasks.TASKS)
    out = tmp_path / "results.pt"
    results = run_two_processes("trainer_worker.py", out, *(f"sample_weight/{task}" for task in weighted_tasks))
    expected = {task: references[task, "torch"] for task in tasks.TASKS}
    if sft is not None:
        # SFT runs in its default weight_mode="example", as trainer_sft_tasks' truth does.
        expected["sft"] = sft.full_batch_reference(tmp_path, sample_weights=WEIGHTS)
    for task in weighted_tasks:
        for split in ("2x4", "2x2x2"):
            check_matches_reference(results[f"sample_weight/{task}/{split}"], expected[task])


def test_a_later_training_run_may_change_whether_batches_have_weights(tmp_path):
    trainer = tasks.OrderedSmoothingTrainer(
        model=tasks.model("seq_cls"), args=tasks.training_args(tmp_path, 2, 1),
        train_dataset=tasks.weighted_dataset("seq_cls"), data_collator=tasks.collator("seq_cls"),
    )  # fmt: skip
    trainer.train()
    trainer.train_dataset = tasks.examples("seq_cls")
    trainer.train()
    assert trainer._sample_weight_presence["train"] is False


def test_sft_collator_keeps_its_class(tmp_path):
    """TRL checks `isinstance(trainer.data_collator, DataCollatorForLanguageModeling)`: still true with the weights."""
    pytest.importorskip("trl")
    import trainer_sft_tasks as sft
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    trainer = sft.OrderedSmoothingSFTTrainer(
        model=sft.model(), args=sft.config(tmp_path, 8, 1), train_dataset=sft.dataset(WEIGHTS),
        processing_class=sft.tokenizer(),
    )  # fmt: skip
    assert isinstance(trainer.data_collator, DataCollatorForLanguageModeling)
    examples = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer.data_collator(examples)
    assert batch["sample_weight"].tolist() == list(WEIGHTS[:3]) and "input_ids" in batch
    with pytest.raises(ValueError, match="sample_weight is None for some examples of a batch"):
        trainer.data_collator([*examples[:2], {**examples[2], "sample_weight": None}])


def test_sft_function_collator_carries_the_weights():
    """A plain function given as the collator is wrapped (it has no class to extend): it sees the examples without
    their weights, and the batch gets them back."""
    pytest.importorskip("trl")
    from hf_lsce.sft import _carrying_sample_weight

    seen = []

    def collate(examples):
        seen.append(examples)
        return {"input_ids": torch.tensor([e["input_ids"] for e in examples])}

    carrier = _carrying_sample_weight(collate)
    batch = carrier([{"input_ids": [1, 2], "sample_weight": 0.5}, {"input_ids": [3, 4], "sample_weight": 2.0}])
    assert batch["sample_weight"].tolist() == [0.5, 2.0] and batch["input_ids"].tolist() == [[1, 2], [3, 4]]
    assert all("sample_weight" not in e for e in seen[0])
    assert "sample_weight" not in carrier([{"input_ids": [1, 2]}])  # no weights, nothing added
