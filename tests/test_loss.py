"""The core loss against independent references: PyTorch, Transformers' LabelSmoother, the seed notebook."""

import functools

import pytest
import torch
import torch.nn.functional as F
from transformers.trainer_pt_utils import LabelSmoother

from hf_lsce import LabelSmoothedCrossEntropyLoss, label_smoothed_cross_entropy, mean_denominator

REDUCTIONS = ("mean", "sum", "none")


def make_batch(leading, num_classes, *, ignored=0.2, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(*leading, num_classes, generator=generator, dtype=torch.float64)
    target = torch.randint(0, num_classes, leading, generator=generator)
    if ignored:
        target[torch.rand(leading, generator=generator) < ignored] = -100
    weight = torch.rand(num_classes, generator=generator, dtype=torch.float64) + 0.1
    return logits.to(dtype), target, weight.to(dtype)


def torch_reference(logits, target, weight=None, reduction="mean", label_smoothing=0.0):
    """PyTorch's loss in its own layout: classes in dimension 1."""
    if logits.dim() > 2:
        logits = logits.movedim(-1, 1)
    return F.cross_entropy(logits, target, weight, reduction=reduction, label_smoothing=label_smoothing)


def loss_and_grad(fn, logits, *args, grad_output=None, **kwargs):
    logits = logits.detach().clone().requires_grad_(True)
    loss = fn(logits, *args, **kwargs)
    if loss.dim() and grad_output is None:  # a fixed, non-uniform weighting of the positions
        grad_output = torch.arange(loss.numel()).remainder(7).add(1).reshape(loss.shape)
    loss.backward(grad_output.to(loss.dtype) if loss.dim() else None)
    return loss.detach(), logits.grad


# ---------------------------------------------------------------------------------------------------------------
# Parity with PyTorch


@pytest.mark.parametrize("leading", [(13,), (3, 5), (9, 7)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("num_classes", [2, 3, 41, 1000])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.9])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_matches_torch_cross_entropy(lsce, leading, num_classes, label_smoothing, weighted):
    """Loss and input gradient equal PyTorch's, evaluated in fp64 on the same logits, to ~1e-6 (and PyTorch's own
    fp32 result to its fp32 rounding, which is larger: up to ~1e-5 on the gradient of a sum)."""
    logits, target, weight = make_batch(leading, num_classes, ignored=0.2 if len(leading) > 1 else 0)
    weight = weight if weighted else None
    grad_output = torch.rand(leading, dtype=torch.float32)
    for reduction in REDUCTIONS:
        options = dict(reduction=reduction, label_smoothing=label_smoothing)
        actual, actual_grad = loss_and_grad(lsce, logits, target, weight, **options, grad_output=grad_output)
        truth, truth_grad = loss_and_grad(
            torch_reference,
            logits.double(),
            target,
            None if weight is None else weight.double(),
            **options,
            grad_output=grad_output.double(),
        )
        assert actual.dtype == torch.float32 and actual.shape == truth.shape
        torch.testing.assert_close(actual, truth.float(), rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(actual_grad, truth_grad.float(), rtol=2e-6, atol=2e-6)
        theirs, their_grad = loss_and_grad(torch_reference, logits, target, weight, **options, grad_output=grad_output)
        torch.testing.assert_close(actual, theirs, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(actual_grad, their_grad, rtol=2e-5, atol=2e-5)


def test_unbatched_input_matches_torch(lsce):
    logits, target, weight = make_batch((), 7, ignored=0)
    expected, expected_grad = loss_and_grad(F.cross_entropy, logits, target, weight, label_smoothing=0.2)
    actual, actual_grad = loss_and_grad(lsce, logits, target, weight, label_smoothing=0.2)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(actual_grad, expected_grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_half_precision_error_no_worse_than_torch(lsce, dtype, weighted):
    """Against an fp64 truth on the same rounded logits, hf_lsce's error is at most PyTorch's own half-precision
    error plus a small slack, and the loss comes back in fp32 with the gradient in the input's dtype."""
    logits, target, weight = make_batch((6, 50), 1000, dtype=dtype)
    weight = weight if weighted else None  # in the logits' dtype, as PyTorch requires
    for reduction in REDUCTIONS:
        options = dict(reduction=reduction, label_smoothing=0.1)
        truth, truth_grad = loss_and_grad(
            torch_reference, logits.double(), target, None if weight is None else weight.double(), **options
        )
        theirs, their_grad = loss_and_grad(torch_reference, logits, target, weight, **options)
        ours, our_grad = loss_and_grad(lsce, logits, target, weight, **options)
        assert ours.dtype == torch.float32 and our_grad.dtype == dtype
        slack = torch.finfo(dtype).eps
        loss_error = (ours.double() - truth).abs().max()
        assert loss_error <= (theirs.double() - truth).abs().max() + slack * truth.abs().max()
        grad_error = (our_grad.double() - truth_grad).abs().max()
        assert grad_error <= (their_grad.double() - truth_grad).abs().max() + slack * truth_grad.abs().max()


def test_half_precision_loss_is_accumulated_in_fp32(lsce):
    """Negative control for the test above: the fp32-accumulated loss of bf16 logits is far closer to the truth
    than PyTorch's bf16 loss, so the comparison can tell a bf16 accumulation apart."""
    logits, target, _ = make_batch((64, 32), 1000, dtype=torch.bfloat16)
    truth = torch_reference(logits.double(), target, label_smoothing=0.1, reduction="sum")
    ours = lsce(logits, target, label_smoothing=0.1, reduction="sum")
    theirs = torch_reference(logits, target, label_smoothing=0.1, reduction="sum")
    assert (ours.double() - truth).abs() * 100 < (theirs.double() - truth).abs()


# ---------------------------------------------------------------------------------------------------------------
# Parity with Transformers' LabelSmoother (uniform smoothing, no weights)


@pytest.mark.parametrize("shift_labels", [False, True], ids=["seq2seq", "causal_lm"])
@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.3])
def test_matches_transformers_label_smoother(lsce, shift_labels, epsilon):
    logits, labels, _ = make_batch((4, 11), 97)
    smoother = LabelSmoother(epsilon=epsilon)
    expected, expected_grad = loss_and_grad(
        lambda x: smoother({"logits": x}, labels, shift_labels=shift_labels), logits
    )

    def ours(x):
        if shift_labels:
            return lsce(x[..., :-1, :], labels[..., 1:], label_smoothing=epsilon)
        return lsce(x, labels, label_smoothing=epsilon)

    actual, actual_grad = loss_and_grad(ours, logits)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(actual_grad, expected_grad)


def test_normalizer_matches_label_smoother_num_items_in_batch(lsce):
    logits, labels, _ = make_batch((4, 11), 97)
    expected = LabelSmoother(epsilon=0.1)({"logits": logits}, labels, num_items_in_batch=123)
    actual = lsce(logits, labels, label_smoothing=0.1, normalizer=123)
    torch.testing.assert_close(actual, expected)


# ---------------------------------------------------------------------------------------------------------------
# The seed notebook (../shared/SEED.md) and the off-target convention

SEED_LOGITS = torch.tensor(
    [
        [-0.6981, 0.9529, -0.0807, -0.5213, -0.0753],
        [0.8347, -1.4822, -0.0525, -0.7690, 0.4886],
        [-1.1051, 0.3915, 0.5995, 1.0561, 0.7371],
    ]
)
SEED_TARGETS = torch.tensor([1, 1, 3])


def seed_notebook_loss(logits, targets, weight=None, smoothing=0.0):
    """The seed notebook's dense formulation (one-hot smoothed with smoothing / (K - 1)), summed over positions."""
    num_classes = logits.shape[-1]
    dense = torch.full_like(logits, smoothing / (num_classes - 1)).scatter_(1, targets[:, None], 1 - smoothing)
    log_probs = F.log_softmax(logits, -1)
    if weight is not None:
        log_probs = log_probs * weight[None]
    return -(dense * log_probs).sum(-1)


def test_seed_notebook_printed_numbers(lsce):
    options = dict(label_smoothing=0.05, smoothing_style="off_target")
    per_example = lsce(SEED_LOGITS, SEED_TARGETS, reduction="none", **options)
    torch.testing.assert_close(per_example, torch.tensor([0.8229, 3.1199, 1.1403]), rtol=0, atol=1e-3)
    torch.testing.assert_close(
        lsce(SEED_LOGITS, SEED_TARGETS, reduction="sum", **options), torch.tensor(5.0831), rtol=0, atol=1e-3
    )
    torch.testing.assert_close(lsce(SEED_LOGITS, SEED_TARGETS, **options), torch.tensor(1.6944), rtol=0, atol=1e-3)
    # Negative control: the uniform convention at the same eps does not reproduce the notebook.
    uniform = lsce(SEED_LOGITS, SEED_TARGETS, reduction="none", label_smoothing=0.05)
    assert (uniform - per_example).abs().max() > 1e-3


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_off_target_matches_seed_dense_formulation(lsce, weighted):
    logits, target, weight = make_batch((17,), 6, ignored=0)
    weight = weight if weighted else None
    expected, expected_grad = loss_and_grad(
        lambda x: seed_notebook_loss(x, target, weight, smoothing=0.3).sum(), logits
    )
    actual, actual_grad = loss_and_grad(
        lsce, logits, target, weight, reduction="sum", label_smoothing=0.3, smoothing_style="off_target"
    )
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(actual_grad, expected_grad)


@pytest.mark.parametrize("num_classes", [2, 5, 1000])
@pytest.mark.parametrize("weight_mode", ["torch", "example"])
def test_off_target_is_uniform_with_rescaled_epsilon(lsce, num_classes, weight_mode):
    logits, target, weight = make_batch((4, 9), num_classes)
    eps = 0.4
    off_target = loss_and_grad(
        lsce, logits, target, weight, label_smoothing=eps, smoothing_style="off_target", weight_mode=weight_mode
    )
    uniform = loss_and_grad(
        lsce, logits, target, weight, label_smoothing=eps * num_classes / (num_classes - 1), weight_mode=weight_mode
    )
    torch.testing.assert_close(off_target, uniform)


# ---------------------------------------------------------------------------------------------------------------
# Weight modes


def unweighted_smoothed_losses(logits, target, eps):
    return torch_reference(logits, target, reduction="none", label_smoothing=eps)


def test_example_mode_is_weighted_mean_of_unweighted_losses(lsce):
    logits, target, weight = make_batch((5, 8), 11)
    valid = target != -100
    w_y = torch.where(valid, weight[target.clamp(min=0)], 0)

    def expected_fn(x):
        return (w_y * unweighted_smoothed_losses(x, target, 0.2)).sum() / w_y.sum()

    expected = loss_and_grad(expected_fn, logits)
    example = loss_and_grad(lsce, logits, target, weight, label_smoothing=0.2, weight_mode="example")
    torch.testing.assert_close(example, expected)
    # The two modes differ with non-uniform weights (weights also re-shape the smoothing mass in "torch" mode) ...
    torch_mode = lsce(logits, target, weight, label_smoothing=0.2, weight_mode="torch")
    assert (torch_mode - example[0]).abs() > 1e-3
    # ... and agree when every class has the same weight, which is then the plain smoothed mean.
    same = torch.full_like(weight, 2.5)
    plain = unweighted_smoothed_losses(logits, target, 0.2).sum() / valid.sum()
    for mode in ("torch", "example"):
        torch.testing.assert_close(lsce(logits, target, same, label_smoothing=0.2, weight_mode=mode), plain)


def test_modes_agree_without_smoothing(lsce):
    logits, target, weight = make_batch((5, 8), 11)
    torch.testing.assert_close(
        lsce(logits, target, weight, weight_mode="example"), lsce(logits, target, weight, weight_mode="torch")
    )


# ---------------------------------------------------------------------------------------------------------------
# Probability targets


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_probability_targets_match_torch(lsce, weighted):
    logits, _, weight = make_batch((3, 7), 13)
    weight = weight if weighted else None
    probabilities = torch.softmax(torch.randn(3, 7, 13, generator=torch.Generator().manual_seed(1)), -1)
    for reduction in REDUCTIONS:
        options = dict(reduction=reduction, label_smoothing=0.15)
        expected = loss_and_grad(torch_reference, logits, probabilities.movedim(-1, 1), weight, **options)
        actual = loss_and_grad(lsce, logits, probabilities, weight, **options)
        torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("style", ["uniform", "off_target"])
@pytest.mark.parametrize("weight_mode", ["torch", "example"])
def test_one_hot_probabilities_equal_class_indices(lsce, style, weight_mode):
    logits, target, weight = make_batch((6, 5), 9)
    one_hot = F.one_hot(target.clamp(min=0), 9).float() * (target != -100)[..., None]
    options = dict(label_smoothing=0.3, smoothing_style=style, weight_mode=weight_mode)
    reductions = ("sum", "none", "mean") if weight_mode == "example" else ("sum", "none")
    for reduction in reductions:
        torch.testing.assert_close(
            loss_and_grad(lsce, logits, one_hot, weight, reduction=reduction, **options),
            loss_and_grad(lsce, logits, target, weight, reduction=reduction, **options),
        )


def test_zero_probability_rows_are_ignored(lsce):
    logits, _, weight = make_batch((10,), 6, ignored=0)
    probabilities = torch.softmax(torch.randn(10, 6, generator=torch.Generator().manual_seed(3)), -1)
    probabilities[[2, 7]] = 0
    kept = [i for i in range(10) if i not in (2, 7)]
    for mode in ("torch", "example"):
        full = lsce(logits, probabilities, weight, label_smoothing=0.2, weight_mode=mode, reduction="none")
        assert full[[2, 7]].abs().max() == 0
        torch.testing.assert_close(
            lsce(logits, probabilities, weight, label_smoothing=0.2, weight_mode=mode),
            lsce(logits[kept], probabilities[kept], weight, label_smoothing=0.2, weight_mode=mode),
        )


# ---------------------------------------------------------------------------------------------------------------
# Padding, normalizer and the accumulation identity


def test_all_positions_ignored_gives_zero_not_nan(lsce):
    logits, _, weight = make_batch((2, 3), 5)
    target = torch.full((2, 3), -100)
    for w in (None, weight):
        loss, grad = loss_and_grad(lsce, logits, target, w, label_smoothing=0.1)
        assert loss.item() == 0 and not grad.isnan().any() and grad.abs().max() == 0
        for reduction in ("sum", "none"):
            loss, grad = loss_and_grad(lsce, logits, target, w, label_smoothing=0.1, reduction=reduction)
            assert loss.abs().max() == 0 and grad.abs().max() == 0
    # The intended difference from PyTorch, which divides 0 by 0.
    assert torch_reference(logits, target, label_smoothing=0.1).isnan()


def test_zero_total_weight_gives_zero_not_nan(lsce):
    """Counted positions whose classes all weigh 0, or a class-valued ignore_index covering every position."""
    logits, _, weight = make_batch((2, 3), 5)
    weight[1] = 0
    target = torch.tensor([[1, 1, -100], [1, -100, 1]])
    for smoothing in (0.0, 0.1):
        loss, grad = loss_and_grad(lsce, logits, target, weight, label_smoothing=smoothing)
        assert loss.item() == 0 and grad.abs().max() == 0
        assert not torch_reference(logits, target, weight, label_smoothing=smoothing).isfinite()  # control
    loss, grad = loss_and_grad(lsce, logits, torch.full((2, 3), 4), weight, 4, label_smoothing=0.1)
    assert loss.item() == 0 and grad.abs().max() == 0


def test_ignored_positions_cost_nothing(lsce):
    logits, target, weight = make_batch((4, 6), 7)
    loss, grad = loss_and_grad(lsce, logits, target, weight, label_smoothing=0.1, reduction="none")
    ignored = target == -100
    assert ignored.any() and loss[ignored].abs().max() == 0 and grad[ignored].abs().max() == 0


# Every path: the fused one, PyTorch's kernel (weight_mode="torch") and the general expression ("example").
PATHS = {
    "fused": dict(implementation="fused"),
    "kernel": dict(implementation="reference"),
    "expression": dict(implementation="reference", weight_mode="example"),
}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("validate", [True, False], ids=["validate", "trusted"])
def test_non_finite_logits_in_ignored_rows_get_zero_gradient(path, reduction, validate):
    """NaN and inf in padding rows: every gradient finite, those rows' exactly 0, the other rows' and the loss as
    with finite padding; PyTorch's own gradient is NaN there (the control)."""
    logits, target, weight = make_batch((3, 4), 70, ignored=0)
    target[0, 1:] = target[2, 0] = -100
    poisoned = logits.clone()
    poisoned[0, 1, 5] = float("nan")
    poisoned[0, 2, 0] = float("inf")
    poisoned[0, 3] = float("-inf")
    poisoned[2, 0] = float("nan")
    options = dict(PATHS[path], reduction=reduction, label_smoothing=0.1, validate=validate)
    loss, grad = loss_and_grad(label_smoothed_cross_entropy, poisoned, target, weight, **options)
    expected, expected_grad = loss_and_grad(label_smoothed_cross_entropy, logits, target, weight, **options)
    ignored = target == -100
    assert grad.isfinite().all() and grad[ignored].abs().max() == 0
    torch.testing.assert_close((loss, grad), (expected, expected_grad))
    _, their_grad = loss_and_grad(torch_reference, poisoned, target, weight, reduction=reduction, label_smoothing=0.1)
    assert their_grad[ignored].isnan().any()


@pytest.mark.parametrize("path", ["kernel", "expression"])
def test_non_finite_logits_in_ignored_rows_get_zero_gradient_without_host_reads(path):
    """Inside vmap no value can be read (nor, with validate=False, on GPUs): ignored rows are always replaced."""
    logits, target, weight = make_batch((5,), 7, ignored=0)
    target[1] = target[3] = -100
    logits[1, 2], logits[3, 0] = float("nan"), float("inf")

    def loss(x, y):
        return label_smoothed_cross_entropy(x, y, weight, reduction="sum", label_smoothing=0.1, **PATHS[path])

    grads = torch.func.vmap(torch.func.grad(loss))(logits[:, None], target[:, None])
    assert grads.isfinite().all() and grads[[1, 3]].abs().max() == 0
    counted = [0, 2, 4]
    torch.testing.assert_close(
        grads[counted], torch.func.vmap(torch.func.grad(loss))(logits[counted, None], target[counted, None])
    )


@pytest.mark.parametrize("path", sorted(PATHS))
def test_non_finite_logits_in_ignored_rows_leave_the_head_gradient_finite(path):
    """Logits from a linear head that overflow in padding rows (finite hidden states): the head's gradient stays
    finite and equals the one without those rows; a NaN logit in a counted row still gives NaN, as in PyTorch."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(8, 16, generator=generator)
    hidden[6:] = torch.finfo(torch.float32).max  # products that overflow to inf
    target = torch.randint(0, 70, (8,), generator=generator)
    target[6:] = -100
    head = torch.nn.Linear(16, 70)
    options = dict(PATHS[path], label_smoothing=0.1)
    label_smoothed_cross_entropy(head(hidden), target, **options).backward()
    logits = head(hidden)
    assert logits[6:].isinf().any()  # which makes their softmax NaN
    grads = [p.grad.clone() for p in head.parameters()]
    head.zero_grad()
    label_smoothed_cross_entropy(head(hidden[:6]), target[:6], **options).backward()
    for actual, expected in zip(grads, [p.grad for p in head.parameters()]):
        assert actual.isfinite().all()
        torch.testing.assert_close(actual, expected)
    head.zero_grad()
    counted_nan = head(hidden[:6]).index_fill(0, torch.tensor([1]), float("nan"))
    assert label_smoothed_cross_entropy(counted_nan, target[:6], **options).isnan()


def test_custom_ignore_index(lsce):
    logits, target, weight = make_batch((4, 6), 7)
    target = target.masked_fill(target == -100, 3)
    expected = F.cross_entropy(logits.movedim(-1, 1), target, weight, ignore_index=3, label_smoothing=0.1)
    torch.testing.assert_close(lsce(logits, target, weight, 3, label_smoothing=0.1), expected)


@pytest.mark.parametrize("weight_mode", ["torch", "example"])
def test_normalizer_gives_the_full_batch_mean_over_chunks(lsce, weight_mode):
    """Summing chunk losses normalized by the whole batch's denominator is the full-batch mean, forward and
    backward; the mean of per-chunk means (the naive accumulation) is not."""
    logits, target, weight = make_batch((12, 9), 10, ignored=0.4)
    chunks = [slice(0, 2), slice(2, 7), slice(7, 12)]
    options = dict(label_smoothing=0.1, weight_mode=weight_mode)
    expected = loss_and_grad(lsce, logits, target, weight, **options)
    denominator = sum(mean_denominator(target[c], weight, weight_mode=weight_mode) for c in chunks)
    torch.testing.assert_close(denominator, mean_denominator(target, weight, weight_mode=weight_mode))

    def accumulated(x):
        return sum(lsce(x[c], target[c], weight, normalizer=denominator, **options) for c in chunks)

    def naive(x):
        return sum(lsce(x[c], target[c], weight, **options) for c in chunks) / len(chunks)

    torch.testing.assert_close(loss_and_grad(accumulated, logits), expected)
    assert (loss_and_grad(naive, logits)[0] - expected[0]).abs() > 1e-3


def test_normalizer_number_and_tensor(lsce):
    logits, target, weight = make_batch((3, 4), 5)
    total = lsce(logits, target, weight, reduction="sum", label_smoothing=0.1)
    for normalizer in (7, 2.5, torch.tensor(2.5), torch.tensor(4.0, dtype=torch.float64)):
        torch.testing.assert_close(
            lsce(logits, target, weight, label_smoothing=0.1, normalizer=normalizer), total / float(normalizer)
        )


def test_mean_denominator():
    target = torch.tensor([[0, 2, -100], [1, -100, 2]])
    weight = torch.tensor([1.0, 10.0, 100.0])
    assert mean_denominator(target).item() == 4
    assert mean_denominator(target, weight).item() == 211
    assert mean_denominator(target.masked_fill(target == -100, 5), torch.ones(3), ignore_index=5).item() == 4
    probabilities = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert mean_denominator(probabilities, weight).item() == 2
    assert mean_denominator(probabilities, weight, weight_mode="example").item() == pytest.approx(105.5)


# ---------------------------------------------------------------------------------------------------------------
# Gradcheck in fp64


@pytest.mark.parametrize("style", ["uniform", "off_target"])
@pytest.mark.parametrize("weight_mode", ["torch", "example"])
@pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
def test_gradcheck(lsce, style, weight_mode, probabilities):
    logits, target, weight = make_batch((3, 4), 6, dtype=torch.float64)
    if probabilities:
        target = torch.softmax(torch.randn(3, 4, 6, dtype=torch.float64), -1)
    logits.requires_grad_(True)
    options = dict(label_smoothing=0.3, smoothing_style=style, weight_mode=weight_mode)
    for reduction in REDUCTIONS:
        loss = functools.partial(lsce, target=target, weight=weight, reduction=reduction, **options)
        assert torch.autograd.gradcheck(loss, (logits,))


# ---------------------------------------------------------------------------------------------------------------
# The module


def test_module_calls_the_function_and_keeps_weight_as_buffer(lsce):
    logits, target, weight = make_batch((3, 4), 5)
    module = LabelSmoothedCrossEntropyLoss(
        weight, label_smoothing=0.1, smoothing_style="off_target", weight_mode="example"
    )
    expected = label_smoothed_cross_entropy(
        logits, target, weight, label_smoothing=0.1, smoothing_style="off_target", weight_mode="example"
    )
    torch.testing.assert_close(module(logits, target), expected)
    assert torch.equal(module.state_dict()["weight"], weight)
    assert module.to(torch.float64).weight.dtype == torch.float64
    fresh = LabelSmoothedCrossEntropyLoss(
        torch.ones(5), label_smoothing=0.1, smoothing_style="off_target", weight_mode="example"
    )
    fresh.load_state_dict(module.state_dict())
    torch.testing.assert_close(fresh(logits, target), expected)
    torch.testing.assert_close(module(logits, target, normalizer=3.0), expected * mean_denominator(target, weight) / 3)
    assert "off_target" in repr(module)


def test_module_matches_cross_entropy_loss_defaults():
    logits, target, weight = make_batch((8,), 4, ignored=0)
    torch.testing.assert_close(
        LabelSmoothedCrossEntropyLoss(weight, label_smoothing=0.2)(logits, target),
        torch.nn.CrossEntropyLoss(weight, label_smoothing=0.2)(logits, target),
    )


# ---------------------------------------------------------------------------------------------------------------
# Bad input


LOGITS = torch.randn(4, 3)
TARGET = torch.tensor([0, 2, -100, 1])
BAD_LABEL = r"^target must hold class indices in \[0, 3\) or ignore_index=-100, got "


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(target=torch.tensor([0, 3, 1, 1])), ValueError, BAD_LABEL + "3$"),
        (dict(target=torch.tensor([0, -2, 1, 1])), ValueError, BAD_LABEL + "-2$"),
        # Beside padding, through PyTorch's kernel (each reduction) and through the general expression.
        (dict(target=torch.tensor([0, 3, -100, 1])), ValueError, BAD_LABEL + "3$"),
        (dict(target=torch.tensor([-5, -100, 1, 2]), reduction="sum"), ValueError, r"got -5"),
        (dict(target=torch.tensor([0, 3, -100, 1]), reduction="none"), ValueError, BAD_LABEL + "3$"),
        (
            dict(target=torch.tensor([0, 3, -100, 1]), weight=torch.ones(3), weight_mode="example"),
            ValueError,
            "got 3",
        ),
        (dict(weight=torch.ones(4)), ValueError, r"weight must hold one weight per class \(3\), got shape \(4,\)"),
        (dict(weight=torch.ones(3, 1)), ValueError, r"weight must hold one weight .* got shape \(3, 1\)"),
        (dict(weight=torch.tensor([1.0, -1.0, 1.0])), ValueError, r"non-negative, got \[1.0, -1.0, 1.0\]"),
        (dict(weight=torch.tensor([1.0, float("nan"), 1.0])), ValueError, "weight must be finite and non-negative"),
        (dict(weight=torch.tensor([1, 2, 3])), TypeError, "weight must be a floating-point tensor"),
        # More than 64 weights are checked through their minimum and maximum rather than read one by one.
        *[
            (
                dict(input=torch.randn(4, 100), weight=torch.ones(100).index_fill(0, torch.tensor(70), bad)),
                ValueError,
                match,
            )
            for bad, match in [(-1.0, "non-negative"), (float("nan"), "finite"), (float("inf"), "finite")]
        ],
        (dict(weight=torch.tensor([1.0, float("inf"), 1.0])), ValueError, "weight must be finite"),
        (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be a float in \[0, 1\], got 1.5"),
        (dict(label_smoothing=-0.1), ValueError, r"label_smoothing must be a float in \[0, 1\], got -0.1"),
        (dict(label_smoothing="0.1"), TypeError, r"label_smoothing must be a float in \[0, 1\], got '0.1'"),
        (dict(label_smoothing=True), TypeError, r"label_smoothing must be a float in \[0, 1\], got True"),
        (dict(label_smoothing=float("nan")), ValueError, r"label_smoothing must be a float in \[0, 1\], got nan"),
        (dict(weight=torch.zeros(3)), ValueError, r"weight must not be all zero, got \[0.0, 0.0, 0.0\]"),
        (dict(input=torch.randn(4, 100), weight=torch.zeros(100)), ValueError, r"weight must not be all zero"),
        (dict(ignore_index=True), TypeError, "ignore_index must be an int"),
        (dict(normalizer=True), TypeError, "normalizer must be a number or a 0-d tensor"),
        (dict(reduction="avg"), ValueError, "reduction must be one of 'mean', 'sum', 'none', got 'avg'"),
        (dict(smoothing_style="fairseq"), ValueError, "smoothing_style must be one of 'uniform', 'off_target'"),
        (dict(weight_mode="class"), ValueError, "weight_mode must be one of 'torch', 'example', got 'class'"),
        (dict(input=torch.randn(4, 1), target=torch.zeros(4, dtype=torch.long)), ValueError, "at least 2 classes"),
        (dict(input=torch.randint(0, 3, (4, 3))), TypeError, "input must be a floating-point tensor"),
        (dict(target=torch.rand(4, 2)), ValueError, r"probability target must have the input's shape \(4, 3\)"),
        (dict(target=-torch.rand(4, 3)), ValueError, "probability target must be finite and non-negative"),
        (dict(target=torch.tensor([0, 1, 2])), ValueError, r"target must have shape \(4,\).*got \(3,\)"),
        (dict(target=torch.tensor([True, False, True, True])), TypeError, "target must be an integer tensor"),
        (dict(normalizer=0), ValueError, r"normalizer must be a float > 0, got 0"),
        (dict(normalizer=torch.tensor(-1.0)), ValueError, r"normalizer must be a float > 0, got -1.0"),
        (dict(normalizer=torch.ones(2)), ValueError, "normalizer must be a number or a 0-d tensor"),
        (dict(normalizer="3"), TypeError, "normalizer must be a number or a 0-d tensor"),
        (dict(normalizer=3, reduction="sum"), ValueError, "normalizer replaces the denominator of reduction='mean'"),
        (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    ],
)
def test_bad_input_raises(lsce, kwargs, error, match):
    arguments = dict(input=LOGITS, target=TARGET) | kwargs
    with pytest.raises(error, match=match):
        lsce(**arguments)


@pytest.mark.parametrize("name", ["weight", "normalizer"])
def test_tensor_on_another_device_raises(lsce, name):
    """PyTorch would fail deep inside (or, for a 0-d tensor, move it silently); the error names both devices."""
    value = torch.ones(3, device="meta") if name == "weight" else torch.tensor(2.0, device="meta")
    with pytest.raises(ValueError, match=rf"^{name} must be on input's device cpu, got meta$"):
        lsce(LOGITS, TARGET, **{name: value})
    with pytest.raises(ValueError, match=r"^weight must be on target's device cpu, got meta$"):
        mean_denominator(TARGET, torch.ones(3, device="meta"))
    module = LabelSmoothedCrossEntropyLoss(torch.ones(3)).to("meta")
    with pytest.raises(ValueError, match=r"weight must be on input's device cpu, got meta"):
        module(LOGITS, TARGET)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_any_integer_target_dtype(lsce, dtype):
    """PyTorch's kernels take int64 indices only; other integer dtypes are widened, losslessly."""
    logits, target, weight = make_batch((6, 5), 7, ignored=0)
    expected = loss_and_grad(lsce, logits, target, weight, label_smoothing=0.1)
    actual = loss_and_grad(lsce, logits, target.to(dtype), weight, label_smoothing=0.1)
    torch.testing.assert_close(actual, expected)


def test_validate_false_skips_value_checks(lsce):
    weight = torch.tensor([1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="non-negative"):
        lsce(LOGITS, TARGET, weight)
    # Trusted inputs: the check that reads tensor values (a GPU synchronisation) is skipped.
    assert torch.isfinite(lsce(LOGITS, TARGET, weight, validate=False))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(label_smoothing=2.0), r"label_smoothing must be a float in \[0, 1\], got 2.0"),
        (dict(reduction="batchmean"), "reduction must be one of"),
        (dict(smoothing_style="x"), "smoothing_style must be one of"),
        (dict(weight_mode="x"), "weight_mode must be one of"),
        (dict(weight=torch.tensor([-1.0, 1.0])), "weight must be finite and non-negative"),
    ],
)
def test_module_rejects_bad_arguments_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LabelSmoothedCrossEntropyLoss(**kwargs)


def test_numpy_scalars_are_accepted_as_options(lsce):
    np = pytest.importorskip("numpy")
    logits, target = torch.randn(6, 4), torch.tensor([0, 3, -100, 1, 2, -100])
    expected = lsce(logits, target, label_smoothing=0.25, normalizer=3.0)
    given = lsce(
        logits, target, ignore_index=np.int64(-100), label_smoothing=np.float32(0.25), normalizer=np.float64(3)
    )
    torch.testing.assert_close(given, expected)
