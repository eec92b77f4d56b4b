"""hf_lsce.checks: the shared checks, their one message each, and the rules every caller applies alike."""

import ast
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_lsce import checks
from hf_lsce.checks import check_class_weight_values, check_labels, check_number
from hf_lsce.class_weights import check_class_weights, compute_class_weights
from hf_lsce.loss import label_smoothed_cross_entropy


def test_ground_floor_imports_only_torch_and_the_standard_library():
    tree = ast.parse(Path(checks.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported, "the walk found no import at all"
    assert all(name == "torch" or name in sys.stdlib_module_names for name in imported), imported


@pytest.mark.parametrize(
    ("value", "kwargs", "error", "match"),
    [
        (1.5, dict(low=0, high=1), ValueError, r"^eps must be a float in \[0, 1\], got 1.5$"),
        (-0.1, dict(low=0, high=1), ValueError, r"in \[0, 1\], got -0.1$"),
        (float("nan"), dict(low=0, high=1), ValueError, "got nan"),
        ("0.1", dict(low=0, high=1), TypeError, r"^eps must be a float in \[0, 1\], got '0.1'$"),
        (True, dict(low=0, high=1), TypeError, "got True"),
        (torch.tensor(0.5), dict(low=0, high=1), TypeError, r"got a torch.float32 tensor of shape \(\)"),
        (1.0, dict(low=0, high=1, high_open=True), ValueError, r"in \[0, 1\), got 1.0"),
        (0, dict(low=0, low_open=True), ValueError, "^eps must be a float > 0, got 0$"),
        (2.0, dict(low=2, integer=True), TypeError, "^eps must be an int >= 2, got 2.0$"),
        (1, dict(low=2, integer=True), ValueError, "^eps must be an int >= 2, got 1$"),
        (5, dict(high=4), ValueError, "^eps must be a float <= 4, got 5$"),
    ],
)
def test_check_number_refuses(value, kwargs, error, match):
    with pytest.raises(error, match=match):
        check_number("eps", value, **kwargs)


@pytest.mark.parametrize(
    ("value", "kwargs"),
    [(0, dict(low=0, high=1)), (1.0, dict(low=0, high=1)), (np.float32(0.25), dict(low=0, high=1)),
     (np.int64(3), dict(low=2, integer=True)), (1e-9, dict(low=0, low_open=True))],
)  # fmt: skip
def test_check_number_accepts(value, kwargs):
    check_number("eps", value, **kwargs)


def test_check_labels():
    check_labels(torch.tensor([0, 2, -100, 1]), 3)
    check_labels(torch.tensor([-100, -100]), 3)
    check_labels(torch.empty(0, dtype=torch.long), 3, ignore_index=None)
    with pytest.raises(ValueError, match=r"^labels must hold class indices in \[0, 3\) or ignore_index=-100, got 3$"):
        check_labels(torch.tensor([0, -100, 3]), 3)
    with pytest.raises(ValueError, match=r"^target must hold class indices in \[0, 3\) or ignore_index=7, got -100$"):
        check_labels(torch.tensor([[0, 7], [-100, 1]]), 3, 7, name="target")
    with pytest.raises(ValueError, match=r"^labels must hold class indices in \[0, 2\), got -100$"):
        check_labels(torch.tensor([0, -100, 1]), 2, ignore_index=None)


def test_one_label_message_everywhere():
    """The loss, compute_class_weights and the metrics all word a bad label alike."""
    from hf_lsce.evaluation.calibration import fit_temperature
    from hf_lsce.evaluation.metrics import classification_metrics

    labels = torch.tensor([0, 1, 5])
    expected = r"must hold class indices in \[0, 3\)"
    with pytest.raises(ValueError, match="target " + expected + r" or ignore_index=-100, got 5"):
        label_smoothed_cross_entropy(torch.randn(3, 3), labels)
    with pytest.raises(ValueError, match="labels " + expected + r" or ignore_index=-100, got 5"):
        compute_class_weights(labels, 3)
    with pytest.raises(ValueError, match="labels " + expected + ", got 5"):
        fit_temperature(torch.randn(3, 3), labels)
    with pytest.raises(ValueError, match="labels " + expected + ", got 5"):
        classification_metrics(np.zeros((3, 3)), labels.numpy())


@pytest.mark.parametrize(
    ("weights", "kwargs", "error", "match"),
    [
        ([1.0, -2.0], {}, ValueError, r"^class_weights must be finite and non-negative, got \[1.0, -2.0\]$"),
        ([1.0, float("nan")], {}, ValueError, "finite and non-negative"),
        ([1.0, float("inf")], {}, ValueError, "finite and non-negative"),
        ([0.0, 0.0, 0.0], {}, ValueError, r"^class_weights must not be all zero, got \[0.0, 0.0, 0.0\]$"),
        ([1.0], {}, ValueError, r"one weight per class \(at least 2\), got \[1.0\]$"),
        ([1.0, 2.0], dict(num_classes=3), ValueError, r"one weight per class \(3\), got \[1.0, 2.0\]$"),
        ([1.0, "2"], {}, TypeError, r"class_weights must hold numbers, got \[1.0, '2'\]"),
        ([1.0, True], {}, TypeError, "must hold numbers"),
        (
            [1.0, -1.0],
            dict(source="ckpt/class_weights.json"),
            ValueError,
            r"^ckpt/class_weights.json: class_weights must be finite and non-negative",
        ),
        (torch.ones(2, 2), dict(name="weight"), ValueError, r"^weight must hold one .* \(2, 2\)"),
        (torch.tensor([1.0, -1.0]), dict(name="weight"), ValueError, r"^weight must be finite and non-negative"),
        (torch.ones(100).index_fill(0, torch.tensor(80), -1.0), {}, ValueError, r"\.\.\.\] \(100 weights\)$"),
        (torch.zeros(100), {}, ValueError, "must not be all zero"),
    ],
)
def test_class_weight_rule_refuses(weights, kwargs, error, match):
    with pytest.raises(error, match=match):
        check_class_weight_values(weights, **kwargs)


def test_class_weight_rule_accepts_and_can_skip_reading_values():
    check_class_weight_values([0.0, 2.5, 1])
    check_class_weight_values(torch.tensor([0.0, 1.0, 3.0]), 3)
    check_class_weight_values(torch.tensor([-1.0, 1.0]), 2, read_values=False)
    with pytest.raises(ValueError, match=r"\(3\)"):
        check_class_weight_values(torch.tensor([-1.0, 1.0]), 3, read_values=False)


def test_class_weights_option_names_its_source():
    assert check_class_weights(["1.0", "2.5"]) == [1.0, 2.5]
    with pytest.raises(ValueError, match=r"^run/class_weights.json: class_weights must not be all zero"):
        check_class_weights([0, 0], source="run/class_weights.json")
    with pytest.raises(ValueError, match=r"^run/class_weights.json: class_weights must be None"):
        check_class_weights([1.0, None], source="run/class_weights.json")


def test_label_smoothing_has_one_rule_everywhere(tmp_path):
    """PyTorch's range [0, 1] in the loss, SmoothingTrainingArguments and the trainer alike, with one message."""
    from hf_lsce import SmoothingTrainingArguments

    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    torch.testing.assert_close(
        label_smoothed_cross_entropy(logits, labels, label_smoothing=1.0),
        torch.nn.functional.cross_entropy(logits, labels, label_smoothing=1.0),
    )
    assert SmoothingTrainingArguments(output_dir=str(tmp_path), report_to=[], label_smoothing=1.0).label_smoothing == 1
    message = r"^label_smoothing must be a float in \[0, 1\], got 1.5$"
    with pytest.raises(ValueError, match=message):
        label_smoothed_cross_entropy(logits, labels, label_smoothing=1.5)
    with pytest.raises(ValueError, match=message):
        SmoothingTrainingArguments(output_dir=str(tmp_path), report_to=[], label_smoothing=1.5)
    default = SmoothingTrainingArguments(output_dir=str(tmp_path), report_to=[]).label_smoothing
    assert checks.DEFAULT_LABEL_SMOOTHING == default == 0.1


def test_check_device_names_the_argument_and_both_devices():
    checks.check_device("weight", torch.ones(2), torch.device("cpu"))  # same device
    checks.check_device("weight", None, torch.device("cpu"))  # nothing given
    with pytest.raises(ValueError, match=r"^weight must be on target's device cpu, got meta$"):
        checks.check_device("weight", torch.ones(2, device="meta"), torch.device("cpu"), other="target")


def test_transform_detection():
    seen = []

    def probe(x):
        seen.append((checks.functorch_transforms_active(), checks.vmap_active()))
        return x.sum()

    probe(torch.ones(2))
    torch.func.grad(probe)(torch.ones(2))
    torch.func.vmap(probe)(torch.ones(3, 2))
    torch.func.grad(lambda x: torch.func.vmap(probe)(x).sum())(torch.ones(3, 2))
    assert seen == [(False, False), (True, False), (True, True), (True, True)]
