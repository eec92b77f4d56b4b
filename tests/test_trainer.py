"""SmoothingTrainer invariants: one optimizer step equals the full batch's weighted mean, however the batch is split.

The truth is `trainer_tasks.full_batch_reference`: one SGD step on all 8 examples, padded together, with
``F.cross_entropy(weight=w, label_smoothing=0.1)``. Single-process splits run in this process; the two-process
splits run once through ``torchrun --nproc_per_node 2`` (gloo) on tests/scripts/trainer_worker.py.
"""

import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import ACCELERATE_LAUNCH, check_matches_reference, run_two_processes
from packaging import version

import hf_lsce._io
import hf_lsce.fused
import hf_lsce.trainer
from hf_lsce import SmoothingTrainer, label_smoothed_cross_entropy

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import trainer_tasks as tasks  # noqa: E402

TOLERANCE = 1e-6  # max abs difference of parameters after one step, and of the losses
# Transformers 4.x rounds each logged loss to 4 decimals (`train_loss`, from `train()`, is not rounded).
LOG_TOLERANCE = TOLERANCE if version.parse(transformers.__version__).major >= 5 else 5e-5


@pytest.fixture(scope="module")
def references():
    return {task: tasks.full_batch_reference(task) for task in (*tasks.TASKS, "seq2seq")}


@pytest.mark.parametrize("task", [*tasks.TASKS, "seq2seq"])
@pytest.mark.parametrize(("batch_size", "grad_accum"), [(8, 1), (2, 4)])
def test_one_step_equals_full_batch(tmp_path, references, task, batch_size, grad_accum):
    result = tasks.run(task, tmp_path, batch_size, grad_accum)
    check_matches_reference(result, references[task], log_tolerance=LOG_TOLERANCE)


@pytest.mark.parametrize("task", ["seq_cls", "token_cls"])
@pytest.mark.parametrize(("batch_size", "grad_accum"), [(8, 1), (2, 4)])
def test_example_weight_mode_one_step_equals_full_batch(tmp_path, references, task, batch_size, grad_accum):
    """The default weight_mode="example": sum of w[y_i] * smoothed loss_i / sum of w[y_i] over the full batch."""
    reference = tasks.full_batch_reference(task, weight_mode="example")
    # The two modes differ here, so matching one reference is not matching the other.
    assert tasks.max_abs_diff(reference["params"], references[task]["params"]) > 1e-3
    result = tasks.run(task, tmp_path, batch_size, grad_accum, args_kwargs={"weight_mode": "example"})
    check_matches_reference(result, reference, log_tolerance=LOG_TOLERANCE)


@pytest.mark.parametrize("task", tasks.TASKS)
def test_negative_control_per_micro_batch_mean_fails(tmp_path, references, task):
    """The usual override (a weighted mean per micro-batch, ÷ accumulation steps) fails the same check."""
    result = tasks.run(task, tmp_path, 2, 4, trainer_cls=tasks.PerMicroBatchMeanTrainer)
    assert tasks.max_abs_diff(result["params"], references[task]["params"]) > 1e-3
    assert abs(result["training_loss"] - references[task]["loss"]) > 1e-3
    # ... while the same override is exact without accumulation: the difference is the normalization only.
    exact = tasks.run(task, tmp_path, 8, 1, trainer_cls=tasks.PerMicroBatchMeanTrainer)
    assert tasks.max_abs_diff(exact["params"], references[task]["params"]) <= TOLERANCE


# ---- two processes ----


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun") / "results.pt"
    return run_two_processes("trainer_worker.py", out)


@pytest.mark.distributed
@pytest.mark.parametrize("task", tasks.TASKS)
@pytest.mark.parametrize("split", ["2x4", "2x2x2"])
def test_two_processes_equal_full_batch(two_process_results, references, task, split):
    check_matches_reference(two_process_results[f"{task}/{split}"], references[task], log_tolerance=LOG_TOLERANCE)


@pytest.mark.distributed
@pytest.mark.parametrize("task", tasks.TASKS)
def test_two_processes_negative_control_fails(two_process_results, references, task):
    result = two_process_results[f"{task}/control"]
    assert tasks.max_abs_diff(result["params"], references[task]["params"]) > 1e-3


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_through_accelerate_launch(tmp_path, references):
    """The multi-GPU command a user runs; without GPUs accelerate starts 2 CPU ranks on gloo."""
    results = run_two_processes("trainer_worker.py", tmp_path / "results.pt", "seq_cls", launcher=ACCELERATE_LAUNCH)
    for split in ("2x4", "2x2x2"):
        check_matches_reference(results[f"seq_cls/{split}"], references["seq_cls"], log_tolerance=LOG_TOLERANCE)


# ---- behaviour ----


@pytest.mark.parametrize(
    ("task", "plain_cls"),
    [
        ("seq_cls", tasks.OrderedTrainer),
        ("token_cls", tasks.OrderedTrainer),
        # Plain Trainer 5.x miscounts GPT-2's targets (see `OrderedModelMeanTrainer`): compare with the model's mean.
        ("causal_lm", tasks.OrderedModelMeanTrainer),
    ],
)
def test_without_smoothing_and_weights_equals_plain_trainer(tmp_path, task, plain_cls):
    kwargs = {"args_kwargs": {"label_smoothing": 0.0}, "weights": False}
    ours = tasks.run(task, tmp_path / "ours", 8, 1, **kwargs)
    plain = tasks.run(task, tmp_path / "plain", 8, 1, trainer_cls=plain_cls, **kwargs)
    assert tasks.max_abs_diff(ours["params"], plain["params"]) <= TOLERANCE
    assert ours["training_loss"] == pytest.approx(plain["training_loss"], abs=TOLERANCE)
    reference = tasks.full_batch_reference(task, weights=False, epsilon=0.0)
    assert tasks.max_abs_diff(ours["params"], reference["params"]) <= TOLERANCE


def test_all_padding_window_gives_zero_loss(tmp_path):
    rows = tasks.examples("token_cls")
    for row in rows[:2]:
        row["labels"] = [-100] * len(row["labels"])
    initial = dict(tasks.model("token_cls").named_parameters())
    trainer = tasks.OrderedSmoothingTrainer(
        model=tasks.model("token_cls"),
        args=tasks.training_args(tmp_path, 2, 1, class_weights=tasks.class_weights("token_cls")),
        train_dataset=rows,
        data_collator=tasks.collator("token_cls"),
    )
    output = trainer.train()
    assert output.training_loss == 0.0 and not math.isnan(output.training_loss)
    assert tasks.max_abs_diff(dict(trainer.model.named_parameters()), initial) == 0.0


@pytest.mark.parametrize("task", ["seq_cls", "causal_lm"])
def test_evaluation_reports_full_set_loss_and_nll(tmp_path, task):
    trainer = tasks.OrderedSmoothingTrainer(
        model=tasks.model(task),
        args=tasks.training_args(
            tmp_path, 2, 1, per_device_eval_batch_size=3, class_weights=tasks.class_weights(task)
        ),
        eval_dataset=tasks.examples(task),
        data_collator=tasks.collator(task),
    )
    metrics = trainer.evaluate()
    # Truth: the whole evaluation set as one batch (eval batches of 3, 3, 2 examples are padded differently).
    batch = tasks.collator(task)(tasks.examples(task))
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = trainer.model(**batch).logits
    if task == "causal_lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    logits, labels = logits.flatten(0, -2), labels.flatten()
    weight = torch.tensor(tasks.class_weights(task), dtype=torch.float64)
    expected_loss = F.cross_entropy(logits, labels, weight=weight, label_smoothing=tasks.EPSILON).item()
    assert metrics["eval_loss"] == pytest.approx(expected_loss, abs=1e-9)
    assert metrics["eval_nll"] == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-9)


def test_resume_continues_trajectory_and_keeps_weights(tmp_path):
    args_kwargs = {"class_weights": "balanced", "save_strategy": "steps", "save_steps": 2}
    common = {"args_kwargs": args_kwargs, "weights": False, "steps": 4}
    full = tasks.run("seq_cls", tmp_path / "full", 2, 1, **common)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    stored = json.loads((checkpoint / "class_weights.json").read_text())
    assert stored["method"] == "balanced"
    assert stored["class_weights"] == pytest.approx(full["trainer"].class_weights.tolist())

    resumed = tasks.run("seq_cls", tmp_path / "resumed", 2, 1, resume_from_checkpoint=str(checkpoint), **common)
    assert resumed["logged"] == pytest.approx(full["logged"], abs=LOG_TOLERANCE)
    assert len(resumed["logged"]) == 4
    assert tasks.max_abs_diff(resumed["params"], full["params"]) <= TOLERANCE

    # The weights come from the checkpoint, not from recomputing them: edit the stored ones and resume again.
    edited = tmp_path / "edited" / "checkpoint-2"
    shutil.copytree(checkpoint, edited)
    stored["class_weights"] = [0.25, 1.0, 4.0]
    (edited / "class_weights.json").write_text(json.dumps(stored))
    again = tasks.run("seq_cls", tmp_path / "edited", 2, 1, resume_from_checkpoint=str(edited), **common)
    assert again["trainer"].class_weights.tolist() == [0.25, 1.0, 4.0]
    assert again["logged"][:2] == full["logged"][:2] and again["logged"][2] != pytest.approx(full["logged"][2])


# ---- class_weights.json in checkpoints ----

BAD_WEIGHT_FILES = {
    "negative": ('{"method": "balanced", "class_weights": [1.0, -0.5, 2.0]}', "must be finite and non-negative"),
    "nan": ('{"method": "balanced", "class_weights": [1.0, NaN, 2.0]}', "must be finite and non-negative"),
    "infinite": ('{"method": "balanced", "class_weights": [1.0, Infinity, 2.0]}', "must be finite and non-negative"),
    "all_zero": ('{"method": "balanced", "class_weights": [0.0, 0, 0.0]}', "must not be all zero"),
    "wrong_count": ('{"method": "balanced", "class_weights": [1.0, 2.0]}', r"one weight per class \(3\)"),
    "not_numbers": ('{"method": "balanced", "class_weights": ["a", "b", "c"]}', "must hold numbers"),
    "truncated": ('{"method": "balanced", "class_weights": [1.0, 0.5', "cannot read the class weights"),
    "empty": ("", "cannot read the class weights"),
    "not_an_object": ("[1.0, 2.0, 3.0]", "expected a JSON object with a 'class_weights' list"),
}


@pytest.mark.parametrize("given", [False, True], ids=["balanced", "given"])
@pytest.mark.parametrize("case", sorted(BAD_WEIGHT_FILES))
def test_bad_checkpoint_class_weights_name_the_file(tmp_path, case, given):
    text, problem = BAD_WEIGHT_FILES[case]
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    path = checkpoint / "class_weights.json"
    path.write_text(text)
    trainer = tasks.OrderedSmoothingTrainer(
        model=tasks.model("seq_cls"),
        args=tasks.training_args(tmp_path, 2, 1, class_weights=[1.0, 2.0, 3.0] if given else "balanced"),
        train_dataset=tasks.examples("seq_cls"),
        data_collator=tasks.collator("seq_cls"),
    )
    # Raised before any training: the checkpoint is checked first.
    with pytest.raises((ValueError, TypeError), match=f"^{re.escape(str(path))}: .*{problem}"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 0


@pytest.fixture(scope="module")
def balanced_run(tmp_path_factory):
    """A 4-step "balanced" run that saves a checkpoint after step 2."""
    root = tmp_path_factory.mktemp("balanced")
    args_kwargs = {"class_weights": "balanced", "save_strategy": "steps", "save_steps": 2}
    full = tasks.run("seq_cls", root / "full", 2, 1, args_kwargs=args_kwargs, weights=False, steps=4)
    return root / "full" / "checkpoint-2", args_kwargs, full


RECOMPUTED = "the 'balanced' class weights are recomputed from the training data"


@pytest.mark.parametrize("keep_file", [True, False])
def test_resume_without_weights_file_warns_that_weights_are_recomputed(tmp_path, caplog, balanced_run, keep_file):
    checkpoint, args_kwargs, full = balanced_run
    copy = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(checkpoint, copy)
    if not keep_file:
        (copy / "class_weights.json").unlink()
    with caplog.at_level("WARNING"):
        resumed = tasks.run(
            "seq_cls", tmp_path / "run", 2, 1, args_kwargs=args_kwargs, weights=False, steps=4,
            resume_from_checkpoint=str(copy),
        )  # fmt: skip
    warnings = [record.getMessage() for record in caplog.records if RECOMPUTED in record.getMessage()]
    assert len(warnings) == (0 if keep_file else 1)
    if not keep_file:
        assert str(copy) in warnings[0]
    # Same data here, so the recomputed weights are the stored ones and the trajectory continues unchanged.
    assert resumed["logged"] == pytest.approx(full["logged"], abs=LOG_TOLERANCE)


def test_class_weights_file_is_written_whole_with_the_checkpoint_permissions(tmp_path, monkeypatch):
    trainer = SmoothingTrainer(
        model=tasks.model("seq_cls"), args=tasks.training_args(tmp_path, 2, 1, class_weights=[1.0, 2.0, 3.0])
    )
    out = tmp_path / "out"
    trainer.save_model(str(out))
    path = out / "class_weights.json"
    before = path.read_text()
    assert json.loads(before) == {"method": "given", "class_weights": [1.0, 2.0, 3.0]}
    # The permissions of the files Transformers writes beside it (open's), not mkstemp's 0o600.
    assert path.stat().st_mode & 0o777 == (out / "config.json").stat().st_mode & 0o777 != 0o600
    files = sorted(os.listdir(out))
    assert not [name for name in files if name.endswith(".tmp")]

    def killed_before_the_rename(path):  # the data is written and synced, the name not yet moved
        raise KeyboardInterrupt

    trainer.class_weights = torch.tensor([4.0, 5.0, 6.0], dtype=torch.float64)
    monkeypatch.setattr(hf_lsce._io, "_permissions_for", killed_before_the_rename)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_model(str(out))
    assert path.read_text() == before  # the previous file, whole
    assert sorted(os.listdir(out)) == files  # and no temporary file left behind
    monkeypatch.undo()
    trainer.save_model(str(out))
    assert json.loads(path.read_text())["class_weights"] == [4.0, 5.0, 6.0]


def test_bf16_autocast_on_cpu(tmp_path):
    fp32 = tasks.run("seq_cls", tmp_path / "fp32", 4, 2, dtype=torch.float32)
    bf16 = tasks.run("seq_cls", tmp_path / "bf16", 4, 2, dtype=torch.float32, args_kwargs={"bf16": True})
    assert bf16["trainer"].accelerator.mixed_precision == "bf16"
    assert math.isfinite(bf16["training_loss"])
    assert bf16["training_loss"] == pytest.approx(fp32["training_loss"], rel=2e-2)
    assert bf16["training_loss"] != fp32["training_loss"]  # autocast did run in bf16


def test_direct_call_outside_training_is_the_batch_mean(tmp_path):
    trainer = SmoothingTrainer(
        model=tasks.model("token_cls"),
        args=tasks.training_args(tmp_path, 2, 1, class_weights=tasks.class_weights("token_cls")),
    )
    batch = tasks.collator("token_cls")(tasks.examples("token_cls"))
    loss, outputs = trainer.compute_loss(trainer.model, dict(batch), return_outputs=True)
    weight = torch.tensor(tasks.class_weights("token_cls"), dtype=torch.float64)
    expected = F.cross_entropy(
        outputs.logits.flatten(0, 1), batch["labels"].flatten(), weight=weight, label_smoothing=tasks.EPSILON
    )
    torch.testing.assert_close(loss, expected)
    assert "labels" in batch  # the caller's dict is left alone


def test_training_releases_the_fused_gradient_memory(tmp_path):
    x = torch.randn(4, 300, requires_grad=True)
    label_smoothed_cross_entropy(x, torch.arange(4), implementation="fused").backward()
    assert hf_lsce.fused._SPARE is not None
    tasks.run("seq_cls", tmp_path, 8, 1)
    assert hf_lsce.fused._SPARE is None
