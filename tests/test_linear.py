"""`hf_lsce.linear_label_smoothed_cross_entropy` against the logits path: the same loss of materialized logits
``F.linear(hidden, head_weight, head_bias)`` (scaled, soft-capped), forward and every parameter's gradient."""

import functools
import itertools
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import hf_lsce.linear
from hf_lsce import label_smoothed_cross_entropy, linear_label_smoothed_cross_entropy
from hf_lsce.linear import LinearLabelSmoothedCrossEntropyLoss

# Every way of ordering the work runs the same parity tests: gradients in the forward pass, logits recomputed in the
# backward pass, and the automatic choice.
IMPLEMENTATIONS = {
    "forward": functools.partial(linear_label_smoothed_cross_entropy, recompute=False),
    "recompute": functools.partial(linear_label_smoothed_cross_entropy, recompute=True),
    "auto": linear_label_smoothed_cross_entropy,
}
OPTION_NAMES = ("reduction", "label_smoothing", "smoothing_style", "weight_mode", "normalizer")


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def linear(request):
    return IMPLEMENTATIONS[request.param]


def make_head(leading, hidden_size, num_classes, *, ignored=0.2, dtype=torch.float64, seed=0):
    """Hidden states, head weight, bias, labels (some ignored) and class weights, drawn in fp64 then rounded."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*leading, hidden_size, generator=generator, dtype=torch.float64)
    weight = torch.randn(num_classes, hidden_size, generator=generator, dtype=torch.float64) * 3 / hidden_size**0.5
    bias = torch.randn(num_classes, generator=generator, dtype=torch.float64)
    target = torch.randint(0, num_classes, leading, generator=generator)
    if ignored:
        target[torch.rand(leading, generator=generator) < ignored] = -100
    class_weight = torch.rand(num_classes, generator=generator, dtype=torch.float64) + 0.1
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype), target, class_weight.to(dtype)


def logits_path(
    hidden, head_weight, target, head_bias=None, class_weight=None, *, logit_scale=None, logit_softcap=None, **options
):
    """The loss of materialized logits: the head, scale and cap as Transformers' models apply them, then hf_lsce."""
    logits = F.linear(hidden, head_weight, head_bias)
    if logit_scale is not None:
        logits = logits * logit_scale
    if logit_softcap is not None:
        logits = torch.tanh(logits / logit_softcap) * logit_softcap
    return label_smoothed_cross_entropy(logits, target, class_weight, implementation="reference", **options)


def torch_loss(hidden, head_weight, target, head_bias=None, class_weight=None, **options):
    """PyTorch alone: F.cross_entropy of F.linear's logits (in the inputs' dtype), reshaped back for "none"."""
    losses = F.cross_entropy(
        F.linear(hidden, head_weight, head_bias).flatten(0, -2), target.flatten(), class_weight, **options
    )
    return losses.reshape(target.shape) if options.get("reduction") == "none" else losses


def loss_and_grads(fn, hidden, head_weight, target, head_bias=None, *args, grad_output=None, **kwargs):
    """The loss and the gradients of hidden, head_weight and head_bias (None for a bias that is None)."""
    leaves = [
        t.detach().clone().requires_grad_(True) if t is not None else None for t in (hidden, head_weight, head_bias)
    ]
    loss = fn(leaves[0], leaves[1], target, leaves[2], *args, **kwargs)
    if loss.dim() and grad_output is None:  # a fixed, non-uniform weighting of the positions
        grad_output = torch.arange(loss.numel()).remainder(7).add(1).reshape(loss.shape)
    if grad_output is not None:
        grad_output = grad_output.to(loss.dtype)
    loss.backward(grad_output)
    return loss.detach(), *(None if t is None else t.grad for t in leaves)


def assert_all_close(actual, expected, **tolerances):
    assert len(actual) == len(expected)
    for name, a, e in zip(("loss", "hidden", "head_weight", "head_bias"), actual, expected):
        if e is None:
            assert a is None, name
            continue
        torch.testing.assert_close(a, e, **tolerances, msg=lambda m, name=name: f"{name}: {m}")


OPTIONS = [
    dict(zip(OPTION_NAMES, values))
    for values in itertools.product(
        ["mean", "sum", "none"], [0.0, 0.2], ["uniform", "off_target"], ["torch", "example"], [None]
    )
] + [dict(reduction="mean", label_smoothing=0.1, normalizer=normalizer) for normalizer in (7.5, torch.tensor(3.0))]


def applicable(linear, options):
    """Gradients computed in the forward pass are scaled by one number: no reduction="none"."""
    return not (getattr(linear, "keywords", {}).get("recompute") is False and options["reduction"] == "none")


# ---------------------------------------------------------------------------------------------------------------
# Parity with the logits path, every option


@pytest.mark.parametrize("head", ["plain", "bias+scale+softcap"])
def test_matches_logits_path_for_every_option(linear, head):
    """fp64: loss and the gradients of hidden, head_weight and head_bias equal the logits path to rounding."""
    hidden, weight, bias, target, class_weight = make_head((3, 7), 5, 41)
    extras = dict(
        logit_scale=0.7 if "scale" in head else None,
        logit_softcap=2.0 if "softcap" in head else None,
    )
    head_bias = bias if "bias" in head else None
    for options, w in itertools.product(OPTIONS, [None, class_weight]):
        if not applicable(linear, options):
            continue
        options = dict(options, **extras)
        expected = loss_and_grads(logits_path, hidden, weight, target, head_bias, w, **options)
        actual = loss_and_grads(linear, hidden, weight, target, head_bias, w, **options)
        assert actual[0].shape == target.shape if options["reduction"] == "none" else actual[0].dim() == 0
        assert_all_close(actual, expected, rtol=1e-10, atol=1e-12)


def test_defaults_equal_torch_cross_entropy(linear):
    """fp32, defaults: F.cross_entropy of F.linear's logits, PyTorch's own fp32 result to its rounding."""
    hidden, weight, bias, target, class_weight = make_head((4, 9), 16, 300, dtype=torch.float32)

    for options in (dict(), dict(label_smoothing=0.1), dict(reduction="sum", label_smoothing=0.3)):
        expected = loss_and_grads(torch_loss, hidden, weight, target, bias, class_weight, **options)
        actual = loss_and_grads(linear, hidden, weight, target, bias, class_weight, **options)
        assert actual[0].dtype == torch.float32
        assert_all_close(actual, expected, rtol=2e-5, atol=2e-5)


def test_fp32_against_fp64_truth(linear):
    hidden, weight, bias, target, class_weight = make_head((64,), 32, 1000, dtype=torch.float32)
    options = dict(label_smoothing=0.1, weight_mode="example", logit_softcap=5.0)
    truth = loss_and_grads(
        logits_path, hidden.double(), weight.double(), target, bias.double(), class_weight.double(), **options
    )
    actual = loss_and_grads(linear, hidden, weight, target, bias, class_weight, **options)
    assert all(t.dtype == torch.float32 for t in actual)
    assert_all_close(actual, tuple(t.float() for t in truth), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_half_precision_error_no_worse_than_torch(linear, dtype, weighted):
    """Against an fp64 truth on the same rounded inputs, the error is at most PyTorch's own (F.linear then
    F.cross_entropy in bf16/fp16) plus a small slack; the loss is fp32 and each gradient has its input's dtype."""
    hidden, weight, bias, target, class_weight = make_head((6, 50), 64, 1000, dtype=dtype)
    class_weight = class_weight if weighted else None

    for reduction in ("mean", "sum", "none"):
        if not applicable(linear, dict(reduction=reduction)):
            continue
        options = dict(reduction=reduction, label_smoothing=0.1)
        wide_weight = None if class_weight is None else class_weight.double()
        truth = loss_and_grads(
            logits_path, hidden.double(), weight.double(), target, bias.double(), wide_weight, **options
        )
        theirs = loss_and_grads(torch_loss, hidden, weight, target, bias, class_weight, **options)
        ours = loss_and_grads(linear, hidden, weight, target, bias, class_weight, **options)
        assert ours[0].dtype == torch.float32 and all(t.dtype == dtype for t in ours[1:])
        slack = torch.finfo(dtype).eps
        for name, mine, their, true in zip(("loss", "hidden", "head_weight", "head_bias"), ours, theirs, truth):
            error = (mine.double() - true).abs().max()
            assert error <= (their.double() - true).abs().max() + slack * true.abs().max(), name


def test_half_precision_head_gradient_is_accumulated_in_fp32():
    """Negative control for the test above: the head's gradient summed over many chunks of rows in fp32 is closer
    to the truth than the same sum made in bf16 (the forward pass's chunks, one row each)."""
    hidden, weight, _, target, _ = make_head((256,), 32, 64, dtype=torch.bfloat16)
    truth = loss_and_grads(logits_path, hidden.double(), weight.double(), target, reduction="sum")[2]
    ours = loss_and_grads(
        linear_label_smoothed_cross_entropy, hidden, weight, target, reduction="sum", recompute=False, chunk_bytes=1
    )[2]
    # The same chunks summed in bf16: each row's outer product added to a bf16 running sum.
    logits = F.linear(hidden.double(), weight.double())
    g = (torch.softmax(logits, -1) - F.one_hot(target.clamp(min=0), 64)) * (target != -100)[:, None]
    running = torch.zeros_like(weight)
    for row in range(256):
        running += torch.outer(g[row], hidden[row].double()).to(torch.bfloat16)
    assert (ours.double() - truth).abs().max() * 2 < (running.double() - truth).abs().max()


# ---------------------------------------------------------------------------------------------------------------
# Chunks, blocks and rows that count


@pytest.mark.parametrize("rows_per_chunk", [1, 3, 64], ids=lambda r: f"{r}rows")
@pytest.mark.parametrize("block_columns", [8, 256], ids=lambda c: f"{c}columns")
def test_chunk_boundaries(monkeypatch, rows_per_chunk, block_columns):
    """N = 10 rows and V = 41 classes: chunks of 1 row, chunks and vocabulary blocks that do not divide N or V (the
    last block has 1 column), and one tile for everything; every option, both orders of work, to rounding."""
    monkeypatch.setattr(hf_lsce.linear, "MIN_BLOCK_COLUMNS", block_columns)
    hidden, weight, bias, target, class_weight = make_head((10,), 6, 41)
    chunk_bytes = rows_per_chunk * 41 * 8
    extras = dict(logit_scale=1.3, logit_softcap=4.0)
    for options, w, recompute in itertools.product(OPTIONS[::5], [None, class_weight], [False, True]):
        if options["reduction"] == "none" and not recompute:
            continue
        expected = loss_and_grads(logits_path, hidden, weight, target, bias, w, **options, **extras)
        actual = loss_and_grads(
            linear_label_smoothed_cross_entropy,
            hidden,
            weight,
            target,
            bias,
            w,
            **options,
            **extras,
            chunk_bytes=chunk_bytes,
            recompute=recompute,
        )
        assert_all_close(actual, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rows_per_chunk", [1, 3], ids=lambda r: f"{r}rows")
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_chunks_within_tiles_on_the_thread_pool(monkeypatch, rows_per_chunk, dtype):
    """recompute=True works on each tile in chunks of rows (`hf_lsce.fused.DEFAULT_CHUNK_BYTES`), shared out to the
    thread pool when there are many: chunks of 1 and 3 rows (the last shorter). fp64: blocks of 16, 16 and 9 classes
    by row tiles of 25 and 5 counted rows, to rounding of the logits path; bf16: blocks of 21 and 20 classes by all
    30 counted rows, bit for bit as the tiles worked on whole (the chunks change no operation on any element)."""
    hidden, weight, bias, target, class_weight = make_head((40,), 6, 41, dtype=dtype)
    monkeypatch.setattr(hf_lsce.linear, "MIN_BLOCK_COLUMNS", 16)
    tile_bytes = 410 * 8 if dtype == torch.float64 else 640 * 2
    options = dict(label_smoothing=0.1, logit_scale=1.3, logit_softcap=4.0, recompute=True, chunk_bytes=tile_bytes)
    pools = []
    monkeypatch.setattr(
        hf_lsce.fused, "_pool", lambda workers, real=hf_lsce.fused._pool: pools.append(1) or real(workers)
    )
    shapes, real_product = set(), hf_lsce.linear._product

    def product(*args):
        shapes.add(tuple(args[0].shape[:1]) + tuple(args[1].shape[:1]))
        return real_product(*args)

    monkeypatch.setattr(hf_lsce.linear, "_product", product)
    whole = loss_and_grads(linear_label_smoothed_cross_entropy, hidden, weight, target, bias, class_weight, **options)
    assert not pools
    # The tiles the docstring describes: (rows, classes) of each product.
    expected = {(25, 16), (5, 16), (25, 9), (5, 9)} if dtype == torch.float64 else {(30, 21), (30, 20)}
    assert shapes == expected
    monkeypatch.setattr(hf_lsce.fused, "DEFAULT_CHUNK_BYTES", rows_per_chunk * 41 * 8)
    monkeypatch.setattr(hf_lsce.fused, "MIN_CHUNKS_PER_THREAD", 1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        chunked = loss_and_grads(
            linear_label_smoothed_cross_entropy, hidden, weight, target, bias, class_weight, **options
        )
    finally:
        torch.set_num_threads(threads)
    assert pools
    if dtype == torch.float64:
        expected = loss_and_grads(
            logits_path,
            hidden,
            weight,
            target,
            bias,
            class_weight,
            label_smoothing=0.1,
            logit_scale=1.3,
            logit_softcap=4.0,
        )
        assert_all_close(chunked, expected, rtol=1e-10, atol=1e-12)
    else:
        assert_all_close(chunked, whole, rtol=0, atol=0)


@pytest.mark.parametrize("incoming", ["negative", "mixed signs", "zeros"])
def test_negative_and_zero_incoming_gradients(linear, incoming):
    """The backward pass folds U into the exponential (exp(z - lse + log U)) only when no row's factor is negative:
    an incoming gradient of -2.5 (mean) or one per position with negatives takes the other way; zeros among positive
    ones (log 0 = -inf) stay exact zeros. All to rounding of the logits path."""
    reduction = "mean" if incoming == "negative" else "none"
    if not applicable(linear, dict(reduction=reduction)):
        pytest.skip("recompute=False has no reduction='none'")
    hidden, weight, bias, target, class_weight = make_head((4, 9), 5, 41)
    positions = torch.arange(36.0).reshape(4, 9)
    grad_output = {
        "negative": torch.tensor(-2.5),
        "mixed signs": positions.remainder(5).sub(2),
        "zeros": positions.remainder(3),
    }[incoming]
    for w in (None, class_weight):
        options = dict(reduction=reduction, label_smoothing=0.2, logit_softcap=3.0, grad_output=grad_output)
        expected = loss_and_grads(logits_path, hidden, weight, target, bias, w, **options)
        actual = loss_and_grads(linear, hidden, weight, target, bias, w, **options)
        assert_all_close(actual, expected, rtol=1e-10, atol=1e-12)


def test_default_tiles_are_capped_in_bytes(monkeypatch):
    """recompute=True's default tile is `DEFAULT_BLOCK_ROWS` rows of the logits, at most `DEFAULT_BLOCK_BYTES`, but
    all counted rows by `WIDE_BLOCK_COLUMNS` (or V / 16 if fewer) if that is more: 40 counted bf16 rows x V = 1000
    (192 rows would be 375 KiB) go in blocks of 204 columns with the cap at 16 KiB, of 62 (V / 16) with the cap at
    4 KiB, and of 51 (the cap) with `WIDE_BLOCK_COLUMNS` at 31; an explicit ``chunk_bytes`` is neither capped nor
    widened. The losses and gradients agree with one tile."""
    hidden, weight, bias, target, class_weight = make_head((40,), 6, 1000, ignored=0, dtype=torch.bfloat16)
    products, real_product = [], hf_lsce.linear._product

    def product(*args):
        products.append(real_product(*args))
        return products[-1]

    monkeypatch.setattr(hf_lsce.linear, "_product", product)
    monkeypatch.setattr(hf_lsce.linear, "MIN_BLOCK_COLUMNS", 16)

    def run(**chunk):
        products.clear()
        result = loss_and_grads(
            linear_label_smoothed_cross_entropy, hidden, weight, target, bias, recompute=True, **chunk
        )
        return result, {tuple(p.shape) for p in products}

    one_tile, shapes = run()
    assert shapes == {(40, 1000)}
    monkeypatch.setattr(hf_lsce.linear, "DEFAULT_BLOCK_BYTES", 16 << 10)
    capped, shapes = run()
    assert max(rows * columns * 2 for rows, columns in shapes) <= 16 << 10
    assert shapes == {(40, 204), (40, 184)}
    assert_all_close(capped, one_tile, rtol=2e-2, atol=2e-2)
    monkeypatch.setattr(hf_lsce.linear, "DEFAULT_BLOCK_BYTES", 4 << 10)
    _, shapes = run()
    assert shapes == {(40, 62), (40, 8)}
    monkeypatch.setattr(hf_lsce.linear, "WIDE_BLOCK_COLUMNS", 31)
    _, shapes = run()
    assert shapes == {(40, 51), (40, 31)}
    _, shapes = run(chunk_bytes=40 * 1000 * 2)
    assert shapes == {(40, 1000)}
    _, shapes = run(chunk_bytes=4 << 10)
    assert shapes == {(40, 51), (40, 31)}


def test_tiles_of_many_rows_and_blocks_in_fp32(monkeypatch):
    """fp32 and bf16 heads with row tiles and vocabulary blocks (their gradient sums over tiles) against the one-tile
    result."""
    monkeypatch.setattr(hf_lsce.linear, "MIN_BLOCK_COLUMNS", 16)
    for dtype in (torch.float32, torch.bfloat16):
        hidden, weight, bias, target, class_weight = make_head((50,), 24, 100, dtype=dtype)
        options = dict(label_smoothing=0.1, logit_softcap=3.0, recompute=True)
        one_tile = loss_and_grads(
            linear_label_smoothed_cross_entropy,
            hidden,
            weight,
            target,
            bias,
            class_weight,
            **options,
            chunk_bytes=1 << 30,
        )
        tiled = loss_and_grads(
            linear_label_smoothed_cross_entropy,
            hidden,
            weight,
            target,
            bias,
            class_weight,
            **options,
            chunk_bytes=16 * 7 * 10,
        )
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        assert_all_close(tiled, one_tile, rtol=tolerance, atol=tolerance)


def test_all_positions_ignored_gives_zero_not_nan(linear):
    hidden, weight, bias, _, class_weight = make_head((2, 3), 4, 9)
    target = torch.full((2, 3), -100)
    for reduction, w in itertools.product(("mean", "sum", "none"), (None, class_weight)):
        if not applicable(linear, dict(reduction=reduction)):
            continue
        loss, *grads = loss_and_grads(
            linear, hidden, weight, target, bias, w, reduction=reduction, label_smoothing=0.1
        )
        assert loss.abs().max() == 0
        assert all(g.abs().max() == 0 for g in grads)


def test_ignored_rows_cost_nothing_whatever_their_hidden_state(linear):
    """Rows whose label is ignore_index are left out: NaN or infinite hidden states there change nothing."""
    hidden, weight, bias, target, class_weight = make_head((12,), 5, 17, ignored=0)
    target[[2, 7]] = -100
    poisoned = hidden.clone()
    poisoned[2], poisoned[7] = float("nan"), float("inf")
    kept = [i for i in range(12) if i not in (2, 7)]
    options = dict(label_smoothing=0.2, weight_mode="example")
    actual = loss_and_grads(linear, poisoned, weight, target, bias, class_weight, **options)
    expected = loss_and_grads(linear, hidden[kept], weight, target[kept], bias, class_weight, **options)
    assert_all_close((actual[0], actual[2], actual[3]), (expected[0], expected[2], expected[3]))
    torch.testing.assert_close(actual[1][kept], expected[1])
    assert actual[1][[2, 7]].abs().max() == 0


def test_custom_ignore_index_and_integer_dtypes(linear):
    hidden, weight, _, target, class_weight = make_head((4, 6), 5, 7)
    target = target.masked_fill(target == -100, 3)
    expected = loss_and_grads(logits_path, hidden, weight, target, None, class_weight, ignore_index=3)
    for dtype in (torch.int64, torch.int32, torch.uint8):
        actual = loss_and_grads(linear, hidden, weight, target.to(dtype), None, class_weight, 3)
        assert_all_close(actual, expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Which gradients, tied weights, autograd


@pytest.mark.parametrize("frozen", ["hidden", "head_weight", "head_bias", "head"])
def test_only_requested_gradients(linear, frozen):
    hidden, weight, bias, target, class_weight = make_head((5, 4), 6, 30)
    leaves = {"hidden": hidden.clone(), "head_weight": weight.clone(), "head_bias": bias.clone()}
    frozen_names = {"head_weight", "head_bias"} if frozen == "head" else {frozen}
    for name, leaf in leaves.items():
        leaf.requires_grad_(name not in frozen_names)
    loss = linear(
        leaves["hidden"], leaves["head_weight"], target, leaves["head_bias"], class_weight, label_smoothing=0.1
    )
    loss.backward()
    expected = loss_and_grads(logits_path, hidden, weight, target, bias, class_weight, label_smoothing=0.1)
    for leaf, grad in zip(leaves.values(), expected[1:]):
        if leaf.requires_grad:
            torch.testing.assert_close(leaf.grad, grad, rtol=1e-10, atol=1e-12)
        else:
            assert leaf.grad is None


class TiedLM(torch.nn.Module):
    """A token embedding whose matrix is also the output head (GPT-2, Llama with tie_word_embeddings)."""

    def __init__(self, vocab_size, hidden_size):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, hidden_size)
        self.mix = torch.nn.Linear(hidden_size, hidden_size)
        self.head = torch.nn.Linear(hidden_size, vocab_size, bias=False)
        self.head.weight = self.embed.weight

    def hidden(self, input_ids):
        return torch.tanh(self.mix(self.embed(input_ids)))


def test_tied_head_receives_both_gradients(linear):
    torch.manual_seed(0)
    model = TiedLM(50, 8).double()
    input_ids = torch.randint(0, 50, (3, 11))
    labels = torch.roll(input_ids, -1, 1)
    labels[:, -1] = -100

    def gradients(loss_fn):
        model.zero_grad(set_to_none=True)
        loss_fn(model.hidden(input_ids)).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    options = dict(label_smoothing=0.1, logit_softcap=3.0)
    expected = gradients(lambda h: logits_path(h, model.head.weight, labels, **options))
    actual = gradients(lambda h: linear(h, model.head.weight, labels, **options))
    assert set(actual) == {"embed.weight", "mix.weight", "mix.bias"}  # the head's matrix is the embedding's
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-10, atol=1e-12)
    # Negative control: the head's part alone (the embedding's gradient left out) differs.
    head_only = gradients(lambda h: linear(h.detach(), model.head.weight, labels, **options))
    assert (head_only["embed.weight"] - expected["embed.weight"]).abs().max() > 1e-3


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck(linear, reduction):
    if not applicable(linear, dict(reduction=reduction)):
        pytest.skip("recompute=False has no reduction='none'")
    hidden, weight, bias, target, class_weight = make_head((3, 4), 5, 9)
    options = dict(reduction=reduction, label_smoothing=0.3, logit_softcap=2.5, logit_scale=0.8)
    for mode in ("torch", "example"):

        def loss(h, w, b, mode=mode):
            return linear(h, w, target, b, class_weight, weight_mode=mode, **options)

        inputs = tuple(t.clone().requires_grad_(True) for t in (hidden, weight, bias))
        assert torch.autograd.gradcheck(loss, inputs)


# ---------------------------------------------------------------------------------------------------------------
# Higher-order gradients and torch.func


def penalized_gradients(fn, hidden, head_weight, target, head_bias, *args, **kwargs):
    """Gradients of ``loss + |d loss / d (hidden, head_weight, head_bias)|^2`` (a gradient penalty), via
    ``torch.autograd.grad(..., create_graph=True)``, and of the loss alone."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, head_weight, head_bias)]
    loss = fn(leaves[0], leaves[1], target, leaves[2], *args, **kwargs)
    if loss.dim():
        loss = (loss * torch.arange(loss.numel()).remainder(5).add(1).reshape(loss.shape)).sum()
    first = torch.autograd.grad(loss, leaves, create_graph=True)
    penalty = sum(g.pow(2).sum() for g in first)
    return torch.autograd.grad(loss + penalty, leaves, retain_graph=True), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("head", ["plain", "scale+softcap"])
def test_gradient_penalty_equals_logits_path(linear, reduction, head):
    """create_graph=True: a gradient penalty's gradient (second-order terms included) equals the logits path's, in
    either order of the work. Negative control: the loss's gradient alone (what a once-differentiable backward gave,
    its gradient being a constant to autograd) is far from it."""
    if not applicable(linear, dict(reduction=reduction)):
        pytest.skip("recompute=False has no reduction='none'")
    hidden, weight, bias, target, class_weight = make_head((2, 6), 5, 70)
    extras = dict(logit_scale=0.7, logit_softcap=2.0) if head != "plain" else {}
    for mode in ("torch", "example"):
        options = dict(reduction=reduction, label_smoothing=0.2, weight_mode=mode, **extras)
        expected, first_order = penalized_gradients(logits_path, hidden, weight, target, bias, class_weight, **options)
        actual, _ = penalized_gradients(linear, hidden, weight, target, bias, class_weight, **options)
        for name, a, e, f in zip(("hidden", "head_weight", "head_bias"), actual, expected, first_order):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
            assert (f - e).abs().max() > 1e-3, name


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradgradcheck(linear, reduction):
    """Second derivatives against finite differences (torch.autograd.gradgradcheck, fp64), through the scale, the
    cap, class weights and ignored positions, with respect to the inputs and the incoming gradient."""
    if not applicable(linear, dict(reduction=reduction)):
        pytest.skip("recompute=False has no reduction='none'")
    hidden, weight, bias, target, class_weight = make_head((2, 3), 4, 7, ignored=0.3, seed=1)
    assert (target == -100).any() and (target != -100).any()
    options = dict(reduction=reduction, label_smoothing=0.3, logit_softcap=2.5, logit_scale=0.8)
    for mode in ("torch", "example"):

        def loss(h, w, b, mode=mode):
            return linear(h, w, target, b, class_weight, weight_mode=mode, **options)

        inputs = tuple(t.clone().requires_grad_(True) for t in (hidden, weight, bias))
        assert torch.autograd.gradgradcheck(loss, inputs)


def test_create_graph_with_some_inputs_frozen(linear):
    """Only the head's weight requires grad: its penalized gradient still equals the logits path's."""
    hidden, weight, bias, target, class_weight = make_head((3, 4), 5, 30)
    results = []
    for fn in (logits_path, linear):
        w = weight.clone().requires_grad_(True)
        loss = fn(hidden, w, target, bias, class_weight, label_smoothing=0.1, logit_softcap=3.0)
        (grad,) = torch.autograd.grad(loss, w, create_graph=True)
        results.append(torch.autograd.grad(loss + grad.pow(2).sum(), w)[0])
    torch.testing.assert_close(results[1], results[0], rtol=1e-10, atol=1e-12)


def test_torch_func_grad_and_vmap():
    """Under torch.func the loss runs (from materialized logits): torch.func.grad equals the tiled path's autograd
    gradient, vmap over sequences equals a loop, and per-sequence gradients of sums add up to the batch's."""
    hidden, weight, bias, target, class_weight = make_head((3, 4), 5, 40)
    options = dict(label_smoothing=0.1, logit_scale=0.7, logit_softcap=3.0)

    def loss(h, w, y, **extra):
        return linear_label_smoothed_cross_entropy(h, w, y, bias, class_weight, **options, **extra)

    expected = loss_and_grads(lambda h, w, y, b: loss(h, w, y), hidden, weight, target, bias)
    grad_hidden, grad_weight = torch.func.grad(loss, argnums=(0, 1))(hidden, weight, target)
    torch.testing.assert_close(grad_hidden, expected[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_weight, expected[2], rtol=1e-10, atol=1e-12)

    batched = torch.func.vmap(loss)(hidden, weight.expand(3, -1, -1), target)
    torch.testing.assert_close(batched, torch.stack([loss(h, weight, y) for h, y in zip(hidden, target)]))

    per_sequence = torch.func.vmap(torch.func.grad(functools.partial(loss, reduction="sum"), argnums=1), (0, None, 0))
    grads = per_sequence(hidden, weight, target)
    assert grads.shape == (3, *weight.shape)
    whole = loss_and_grads(lambda h, w, y, b: loss(h, w, y, reduction="sum"), hidden, weight, target, bias)[2]
    torch.testing.assert_close(grads.sum(0), whole, rtol=1e-10, atol=1e-12)
    # Negative control: one sequence's gradient is not the batch's.
    assert (grads[0] - whole).abs().max() > 1e-3


def test_torch_func_keeps_the_argument_checks():
    """Bad arguments raise the same errors under torch.func (label values are not read inside vmap)."""
    hidden, weight, _, target, _ = make_head((2, 4), 3, 6)
    with pytest.raises(ValueError, match=r"logit_scale must be a float in \(0, inf\), got -1.0"):
        torch.func.grad(lambda w: linear_label_smoothed_cross_entropy(hidden, w, target, logit_scale=-1.0))(weight)
    bad = target.clone()
    bad[0, 0] = 6
    with pytest.raises(ValueError, match=r"target must hold class indices in \[0, 6\)"):
        torch.func.grad(lambda w: linear_label_smoothed_cross_entropy(hidden, w, bad))(weight)


def test_no_grad_gives_the_same_value(linear):
    hidden, weight, bias, target, class_weight = make_head((4, 5), 6, 20)
    hidden.requires_grad_(True)
    expected = linear(hidden, weight, target, bias, class_weight, label_smoothing=0.1)
    with torch.no_grad():
        assert linear(hidden, weight, target, bias, class_weight, label_smoothing=0.1) == expected
    with torch.inference_mode():
        assert linear(hidden, weight, target, bias, class_weight, label_smoothing=0.1) == expected


def test_backward_twice(linear):
    """A second backward pass needs retain_graph=True on the first, as for any autograd graph, and then repeats the
    first's gradients."""
    hidden, weight, _, target, _ = make_head((4, 5), 6, 20)
    weight.requires_grad_(True)
    loss = linear(hidden, weight, target, label_smoothing=0.1)
    loss.backward(retain_graph=True)
    first = weight.grad.clone()
    loss.backward()
    torch.testing.assert_close(weight.grad, 2 * first)
    loss = linear(hidden, weight, target, label_smoothing=0.1)
    loss.backward()
    with pytest.raises(RuntimeError, match="backward"):
        loss.backward()


def test_scale_then_softcap_as_the_models_apply_them():
    """logit_scale multiplies the head's output (Cohere), logit_softcap caps the result (Gemma 2); the other order
    gives another loss (a negative control that the order is tested)."""
    hidden, weight, _, target, _ = make_head((8,), 4, 12)
    logits = F.linear(hidden, weight)
    expected = label_smoothed_cross_entropy(torch.tanh(logits * 3.0 / 2.0) * 2.0, target)
    other_order = label_smoothed_cross_entropy(torch.tanh(logits / 2.0) * 2.0 * 3.0, target)
    actual = linear_label_smoothed_cross_entropy(hidden, weight, target, logit_scale=3.0, logit_softcap=2.0)
    torch.testing.assert_close(actual, expected)
    assert (actual - other_order).abs() > 1e-2


@pytest.mark.parametrize("family", ["gemma2", "cohere"])
def test_transformers_heads(family):
    """The models' own logits: a Gemma 2 (final_logit_softcapping) and a Cohere (logit_scale) built from tiny configs;
    their loss of ``model(...).logits`` equals ours of the backbone's hidden states and ``lm_head``."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(
        vocab_size=97,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    if family == "gemma2":
        config = transformers.Gemma2Config(**common, final_logit_softcapping=5.0, attn_implementation="eager")
        model = transformers.Gemma2ForCausalLM(config)
        extras = dict(logit_softcap=config.final_logit_softcapping)
    else:
        config = transformers.CohereConfig(**common, logit_scale=0.25)
        model = transformers.CohereForCausalLM(config)
        extras = dict(logit_scale=config.logit_scale)
    model = model.double()
    input_ids = torch.randint(0, 97, (2, 7))
    labels = torch.randint(0, 97, (2, 7))
    expected = label_smoothed_cross_entropy(model(input_ids).logits, labels, label_smoothing=0.1)
    hidden = model.model(input_ids).last_hidden_state
    actual = linear_label_smoothed_cross_entropy(hidden, model.lm_head.weight, labels, label_smoothing=0.1, **extras)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# The module


def test_module_calls_the_function():
    hidden, weight, bias, target, class_weight = make_head((3, 4), 5, 11)
    options = dict(label_smoothing=0.1, smoothing_style="off_target", weight_mode="example", logit_softcap=3.0)
    module = LinearLabelSmoothedCrossEntropyLoss(class_weight, **options)
    expected = linear_label_smoothed_cross_entropy(hidden, weight, target, bias, class_weight, **options)
    torch.testing.assert_close(module(hidden, weight, target, bias), expected)
    torch.testing.assert_close(
        module(hidden, weight, target, bias, normalizer=2.0),
        linear_label_smoothed_cross_entropy(hidden, weight, target, bias, class_weight, normalizer=2.0, **options),
    )
    assert torch.equal(module.state_dict()["class_weight"], class_weight)
    assert "logit_softcap=3.0" in repr(module)
    with pytest.raises(ValueError, match="logit_softcap must be a float in"):
        LinearLabelSmoothedCrossEntropyLoss(logit_softcap=0.0)


# ---------------------------------------------------------------------------------------------------------------
# No (tokens, vocabulary) buffer: peak memory in a fresh process (the kernel's RSS high-water mark)

MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.nn.functional as F
    from hf_lsce import label_smoothed_cross_entropy, linear_label_smoothed_cross_entropy

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    variant, n, v, d = sys.argv[1], *map(int, sys.argv[2:])
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=generator).requires_grad_(True)
    weight = (torch.randn(v, d, generator=generator) / d**0.5).requires_grad_(True)
    target = torch.randint(0, v, (n,), generator=generator)
    target[::10] = -100
    class_weight = torch.rand(v, generator=generator) + 0.5
    torch.mm(hidden[:64].detach(), weight[:64].detach().T)  # the matrix library's workspace, made once per process
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    if variant == "logits":
        logits = torch.tanh(hidden @ weight.T / 30.0) * 30.0
        loss = label_smoothed_cross_entropy(logits, target, class_weight, label_smoothing=0.1)
    else:
        loss = linear_label_smoothed_cross_entropy(
            hidden, weight, target, class_weight=class_weight, label_smoothing=0.1, logit_softcap=30.0,
            recompute=variant == "recompute",
        )
    loss.backward()
    gradients = (hidden.numel() + weight.numel()) * 4
    print(json.dumps((status("VmHWM") - base - gradients) / (n * v * 4)))
    """
)


def peak_extra_memory(variant, n, v, d):
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, variant, str(n), str(v), str(d)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", ["forward", "recompute"])
def test_no_tokens_by_vocabulary_buffer(variant):
    """N = 4096 tokens x V = 65536 classes: fp32 logits would take 1 GiB; the peak memory beyond the inputs and
    the gradients of hidden and head_weight stays under 0.1x that (the default tiles are 32 MiB)."""
    extra = peak_extra_memory(variant, 4096, 65536, 16)
    assert extra < 0.1


def test_memory_probe_sees_a_logits_buffer():
    """Negative control of the probe: the logits path on a smaller case shows at least the logits' size."""
    assert peak_extra_memory("logits", 1024, 16384, 16) > 1.0


# ---------------------------------------------------------------------------------------------------------------
# Bad input

HIDDEN = torch.randn(4, 3)
WEIGHT = torch.randn(5, 3)
TARGET = torch.tensor([0, 4, -100, 1])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(hidden=torch.randint(0, 3, (4, 3))), TypeError, r"hidden must be a floating-point tensor"),
        (dict(hidden=torch.tensor(1.0)), ValueError, r"hidden must have at least one dimension"),
        (dict(head_weight=torch.randn(5, 4)), ValueError, r"head_weight must have shape \(V, 3\).*got \(5, 4\)"),
        (dict(head_weight=torch.randn(5)), ValueError, r"head_weight must have shape \(V, 3\).*got \(5,\)"),
        (dict(head_weight=torch.randn(1, 3), target=torch.zeros(4, dtype=torch.long)), ValueError, "at least 2 rows"),
        (
            dict(head_weight=WEIGHT.double()),
            TypeError,
            r"head_weight must have hidden's dtype torch.float32, got torch.float64",
        ),
        (dict(head_weight=WEIGHT.to("meta")), ValueError, r"head_weight must be on hidden's device cpu, got meta"),
        (dict(head_weight="W"), TypeError, r"head_weight must be a floating-point tensor of shape \(V, D\), got 'W'"),
        (dict(head_bias=torch.randn(4)), ValueError, r"head_bias must have shape \(5,\).*got \(4,\)"),
        (dict(head_bias=torch.randn(5).double()), TypeError, r"head_bias must have hidden's dtype"),
        (dict(head_bias=torch.randn(5, device="meta")), ValueError, r"head_bias must be on hidden's device"),
        (dict(head_bias=torch.ones(5, dtype=torch.long)), TypeError, r"head_bias must be a floating-point tensor"),
        (dict(target=torch.tensor([0, 1, 2])), ValueError, r"target must have shape \(4,\).*got \(3,\)"),
        (dict(target=torch.rand(4, 5)), TypeError, r"target must be an integer tensor.*probability targets"),
        (dict(target=torch.tensor([True, False, True, True])), TypeError, r"target must be an integer tensor"),
        (dict(target=TARGET.to("meta")), ValueError, r"target must be on hidden's device"),
        (
            dict(target=torch.tensor([0, 5, -100, 1])),
            ValueError,
            r"target must hold class indices in \[0, 5\) or ignore_index=-100, got 5",
        ),
        (dict(target=torch.tensor([0, -3, -100, 1])), ValueError, r"target must hold class indices.*got -3"),
        (
            dict(class_weight=torch.ones(4)),
            ValueError,
            r"class_weight must hold one weight per class \(5\), got shape \(4,\)",
        ),
        (
            dict(class_weight=torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0])),
            ValueError,
            r"class_weight must be finite and non-negative",
        ),
        (
            dict(class_weight=torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0])),
            ValueError,
            r"class_weight must be finite",
        ),
        (
            dict(class_weight=torch.ones(5, dtype=torch.long)),
            TypeError,
            r"class_weight must be a floating-point tensor",
        ),
        (dict(class_weight=torch.ones(5, device="meta")), ValueError, r"class_weight must be on hidden's device"),
        (dict(class_weight=torch.ones(5, requires_grad=True)), ValueError, r"no gradient for class_weight"),
        (dict(logit_softcap=0.0), ValueError, r"logit_softcap must be a float in \(0, inf\), got 0.0"),
        (dict(logit_softcap=-1), ValueError, r"logit_softcap must be a float in \(0, inf\), got -1"),
        (dict(logit_softcap=float("inf")), ValueError, r"logit_softcap must be a float in \(0, inf\), got inf"),
        (dict(logit_softcap="30"), TypeError, r"logit_softcap must be a float in \(0, inf\), got '30'"),
        (dict(logit_scale=float("nan")), ValueError, r"logit_scale must be a float in \(0, inf\), got nan"),
        (dict(logit_scale=float("inf")), ValueError, r"logit_scale must be a float in \(0, inf\), got inf"),
        (dict(logit_scale=0.0), ValueError, r"logit_scale must be a float in \(0, inf\), got 0.0"),
        (dict(logit_scale=-0.5), ValueError, r"logit_scale must be a float in \(0, inf\), got -0.5"),
        (dict(logit_scale=True), TypeError, r"logit_scale must be a float in \(0, inf\), got True"),
        (dict(chunk_bytes=0), ValueError, r"chunk_bytes must be an int > 0, got 0"),
        (dict(chunk_bytes=-5), ValueError, r"chunk_bytes must be an int > 0, got -5"),
        (dict(chunk_bytes=1.5), TypeError, r"chunk_bytes must be an int > 0, got 1.5"),
        (dict(recompute="yes"), TypeError, r"recompute must be a bool or None, got 'yes'"),
        (dict(recompute=False, reduction="none"), ValueError, r"recompute=False.*reduction='none'"),
        (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be a float in \[0, 1\], got 1.5"),
        (dict(reduction="avg"), ValueError, r"reduction must be one of 'mean', 'sum', 'none', got 'avg'"),
        (dict(weight_mode="class"), ValueError, r"weight_mode must be one of 'torch', 'example', got 'class'"),
        (dict(normalizer=0), ValueError, r"normalizer must be a float > 0, got 0"),
        (dict(normalizer=torch.tensor(2.0, device="meta")), ValueError, r"normalizer must be on hidden's device"),
    ],
)
def test_bad_input_raises(kwargs, error, match):
    arguments = dict(hidden=HIDDEN, head_weight=WEIGHT, target=TARGET) | kwargs
    with pytest.raises(error, match=match):
        linear_label_smoothed_cross_entropy(**arguments)
