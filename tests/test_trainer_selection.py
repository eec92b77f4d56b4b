"""Model selection on lower-is-better metrics: ``metric_for_best_model="eval_nll"`` keeps the checkpoint with the least
``eval_nll``, where Transformers alone (``greater_is_better`` resolved to True) keeps the one with the most.
"""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import HfArgumentParser, TrainingArguments

from hf_lsce import SmoothingSeq2SeqTrainingArguments, SmoothingTrainer, SmoothingTrainingArguments

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import trainer_tasks as tasks  # noqa: E402

STEPS = 6
# SGD at this rate overshoots on the tiny classifier: eval_nll falls, then rises, then falls again (checked below), so
# its minimum and maximum are two interior checkpoints, neither the first nor the last.
LEARNING_RATE = 2.0


@pytest.mark.parametrize(
    "metric", ["nll", "eval_nll", "ece", "eval_ece", "brier", "eval_brier", "eval_aurc", "eval_valid_nll"]
)
def test_unset_greater_is_better_minimizes_our_metrics(tmp_path, metric):
    args = SmoothingTrainingArguments(str(tmp_path), metric_for_best_model=metric, report_to=[])
    assert args.greater_is_better is False
    # The bug this fixes: Transformers minimizes only names ending in "loss".
    assert TrainingArguments(str(tmp_path), metric_for_best_model=metric, report_to=[]).greater_is_better is True


@pytest.mark.parametrize(("metric", "expected"), [("eval_loss", False), ("accuracy", True), ("eval_nll_rank", True)])
def test_other_metrics_keep_the_base_rule(tmp_path, metric, expected):
    assert SmoothingTrainingArguments(str(tmp_path), metric_for_best_model=metric).greater_is_better is expected


def test_explicit_false_is_kept_and_explicit_true_is_refused(tmp_path):
    args = SmoothingTrainingArguments(str(tmp_path), metric_for_best_model="eval_nll", greater_is_better=False)
    assert args.greater_is_better is False
    with pytest.raises(ValueError, match=r"metric_for_best_model='eval_nll' is lower-is-better.*greater_is_better="):
        SmoothingTrainingArguments(str(tmp_path), metric_for_best_model="eval_nll", greater_is_better=True)
    with pytest.raises(ValueError, match="greater_is_better=False"):
        SmoothingSeq2SeqTrainingArguments(str(tmp_path), metric_for_best_model="brier", greater_is_better=True)


def test_plain_arguments_resolved_to_true_are_refused_at_construction(tmp_path):
    """A plain TrainingArguments has resolved an unset value to True already: refused, naming both options."""
    args = TrainingArguments(str(tmp_path), metric_for_best_model="eval_nll", report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match=r"metric_for_best_model='eval_nll'.*greater_is_better=False"):
        SmoothingTrainer(model=tasks.model("seq_cls"), args=args, train_dataset=tasks.examples("seq_cls"))
    args = TrainingArguments(
        str(tmp_path), metric_for_best_model="eval_nll", greater_is_better=False, report_to=[], use_cpu=True
    )
    trainer = SmoothingTrainer(model=tasks.model("seq_cls"), args=args, train_dataset=tasks.examples("seq_cls"))
    assert trainer.args.greater_is_better is False


def test_command_line_metric_resolves_to_minimize(tmp_path):
    (args,) = HfArgumentParser(SmoothingTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--metric_for_best_model", "eval_nll", "--report_to", "none"]
    )
    assert args.greater_is_better is False


def _train_with_selection(output_dir, greater_is_better_as_transformers_resolves_it=False):
    args = tasks.training_args(
        output_dir, 4, 1, steps=STEPS, learning_rate=LEARNING_RATE, eval_strategy="steps", eval_steps=1,
        save_strategy="steps", save_steps=1, load_best_model_at_end=True, metric_for_best_model="eval_nll",
    )  # fmt: skip
    if greater_is_better_as_transformers_resolves_it:
        # What `TrainingArguments(metric_for_best_model="eval_nll", load_best_model_at_end=True)` gives.
        args.greater_is_better = TrainingArguments(
            str(output_dir), metric_for_best_model="eval_nll", report_to=[]
        ).greater_is_better
        assert args.greater_is_better is True
    else:
        assert args.greater_is_better is False
    result = tasks.run("seq_cls", output_dir, 4, 1, args=args, eval_dataset=tasks.examples("seq_cls"))
    trainer = result["trainer"]
    history = {entry["step"]: entry["eval_nll"] for entry in trainer.state.log_history if "eval_nll" in entry}
    assert sorted(history) == list(range(1, STEPS + 1))
    checkpoints = {step: load_file(Path(output_dir) / f"checkpoint-{step}" / "model.safetensors") for step in history}
    loaded = {name: p.detach() for name, p in trainer.model.state_dict().items()}
    matching = [step for step, weights in checkpoints.items() if _equal(weights, loaded)]
    return history, trainer.state.best_model_checkpoint, matching


def _equal(checkpoint: dict, loaded: dict) -> bool:
    assert checkpoint.keys() <= loaded.keys()
    return all(torch.equal(tensor, loaded[name]) for name, tensor in checkpoint.items())


def test_load_best_model_at_end_loads_the_least_eval_nll(tmp_path):
    history, best, matching = _train_with_selection(tmp_path / "ours")
    values = [history[step] for step in sorted(history)]
    assert any(b < a for a, b in zip(values, values[1:])) and any(b > a for a, b in zip(values, values[1:]))
    least = min(history, key=history.get)
    assert 1 < least < STEPS
    assert best.endswith(f"checkpoint-{least}")
    # The weights in the trainer at the end are that checkpoint's, and no other's.
    assert matching == [least]

    # Negative control: the same run with greater_is_better resolved as Transformers alone resolves it (True) loads
    # the checkpoint with the *highest* eval_nll, another one.
    control_history, control_best, control_matching = _train_with_selection(tmp_path / "control", True)
    assert control_history == pytest.approx(history, abs=1e-12)
    most = max(history, key=history.get)
    assert most != least
    assert control_best.endswith(f"checkpoint-{most}") and control_matching == [most]
