"""The fused path (hf_lsce/fused.py) beyond the shared parity tests: chunking, threads, in-place, dtypes, memory."""

import functools
import itertools
import json
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import hf_lsce.fused
from hf_lsce import LabelSmoothedCrossEntropyLoss, label_smoothed_cross_entropy

reference = functools.partial(label_smoothed_cross_entropy, implementation="reference")
fused = functools.partial(label_smoothed_cross_entropy, implementation="fused")


def make_batch(n, k, *, probabilities=False, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, k, generator=generator, dtype=torch.float64)
    if probabilities:
        target = torch.softmax(torch.randn(n, k, generator=generator, dtype=torch.float64), -1)
        target[0] = 0  # a row that counts nowhere
    else:
        target = torch.randint(0, k, (n,), generator=generator)
        target[torch.rand(n, generator=generator) < 0.25] = -100
    weight = torch.rand(k, generator=generator, dtype=torch.float64) + 0.1
    return logits.to(dtype), target.to(dtype) if probabilities else target, weight


def loss_and_grad(fn, logits, *args, **kwargs):
    logits = logits.detach().clone().requires_grad_(True)
    loss = fn(logits, *args, **kwargs)
    grad_output = torch.arange(loss.numel(), dtype=loss.dtype).remainder(5).add(1).reshape(loss.shape)
    loss.backward(grad_output)
    return loss.detach(), logits.grad


@pytest.fixture
def chunk_bytes(monkeypatch):
    def set_chunk(nbytes):
        monkeypatch.setattr(hf_lsce.fused, "DEFAULT_CHUNK_BYTES", nbytes)

    return set_chunk


OPTIONS = [
    dict(smoothing_style=style, weight_mode=mode, reduction=reduction, label_smoothing=eps)
    for style, mode, reduction, eps in itertools.product(
        ["uniform", "off_target"], ["torch", "example"], ["mean", "sum", "none"], [0.0, 0.2]
    )
]


@pytest.mark.parametrize("rows_per_chunk", [1, 3, 64], ids=lambda r: f"{r}rows")
@pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
def test_chunk_boundaries_match_reference(chunk_bytes, rows_per_chunk, probabilities):
    """N = 10 rows: chunks of 1 row, chunks that do not divide N, and one chunk for everything."""
    logits, target, weight = make_batch(10, 37, probabilities=probabilities)
    chunk_bytes(rows_per_chunk * 37 * 8)
    for options, w in itertools.product(OPTIONS, [None, weight]):
        expected = loss_and_grad(reference, logits, target, w, **options)
        actual = loss_and_grad(fused, logits, target, w, **options)
        torch.testing.assert_close(
            actual, expected, rtol=1e-12, atol=1e-12, msg=functools.partial("{}: {}".format, options)
        )


def test_normalizer_and_large_class_count(chunk_bytes):
    """K larger than a chunk (one row at a time), a normalizer, fp32 against an fp64 truth."""
    chunk_bytes(1)
    logits, target, weight = make_batch(6, 50_000)
    for mode in ("torch", "example"):
        options = dict(label_smoothing=0.1, weight_mode=mode, normalizer=7.5)
        truth = loss_and_grad(reference, logits, target, weight, **options)
        actual = loss_and_grad(fused, logits.float(), target, weight.float(), **options)
        torch.testing.assert_close(actual[0].double(), truth[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(actual[1].double(), truth[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rows_per_chunk, pooled", [(1, True), (26, False)])
def test_same_result_on_one_or_several_threads(chunk_bytes, monkeypatch, rows_per_chunk, pooled):
    """103 chunks go to the thread pool, 4 to PyTorch's own threads; either way as on one thread, bit for bit."""
    chunk_bytes(rows_per_chunk * 512 * 4)
    logits, target, weight = make_batch(103, 512, dtype=torch.float32)
    pools = []
    monkeypatch.setattr(
        hf_lsce.fused, "_pool", lambda workers, real=hf_lsce.fused._pool: pools.append(1) or real(workers)
    )
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = loss_and_grad(fused, logits, target, weight, label_smoothing=0.1, reduction="none")
        assert not pools
        torch.set_num_threads(max(2, threads))
        several = loss_and_grad(fused, logits, target, weight, label_smoothing=0.1, reduction="none")
    finally:
        torch.set_num_threads(threads)
    assert bool(pools) == pooled
    assert torch.equal(one[0], several[0]) and torch.equal(one[1], several[1])


def test_softmax_may_write_into_its_input():
    """`_softmax_into` relies on PyTorch's softmax reading each element before writing it (in-place path)."""
    x = 5 * torch.randn(7, 3000)
    expected = torch.softmax(x, 1)
    z = x.clone()
    hf_lsce.fused._softmax_into(z, z)
    torch.testing.assert_close(z, expected)


def test_chunk_log_sum_exp_survives_underflow():
    """lse = max(x) - log(max(softmax(x))) stays exact where most probabilities underflow to 0."""
    x = torch.randn(3, 500, dtype=torch.float64).float()
    x[1, 7] = 2000.0  # every other p underflows
    x[2] -= 1e4  # far from 0: a naive log(sum(exp(x))) gives -inf
    stats = torch.empty(4, 3, 1)
    z = x.clone()
    hf_lsce.fused.process_chunk(z, z, torch.zeros(3, 1, dtype=torch.long), None, stats, False, None)
    _, _, top, peak = stats.squeeze(2)
    torch.testing.assert_close(top - peak.log(), torch.logsumexp(x.double(), 1).float())
    assert torch.isinf(x[2].exp().sum().log())  # the control: the naive formula fails on row 2


# ---------------------------------------------------------------------------------------------------------------
# In place


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_inplace_backward_gives_the_same_gradient(dtype, reduction):
    logits, target, weight = make_batch(9, 300, dtype=dtype)
    options = dict(label_smoothing=0.1, reduction=reduction)
    expected = loss_and_grad(fused, logits, target, weight, **options)
    actual = loss_and_grad(fused, logits, target, weight, inplace_backward=True, **options)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_inplace_backward_overwrites_the_logits_buffer():
    logits, target, weight = make_batch(9, 300, dtype=torch.float32)
    x = logits.clone().requires_grad_(True)
    loss = label_smoothed_cross_entropy(x, target, weight, label_smoothing=0.1, inplace_backward=True)
    assert not torch.equal(x.detach(), logits)  # already the gradient, before backward
    loss.backward()
    assert x.grad.data_ptr() == x.data_ptr()
    torch.testing.assert_close(x.grad, loss_and_grad(reference, logits, target, weight, label_smoothing=0.1)[1])


def test_inplace_backward_below_the_fused_threshold_keeps_the_logits():
    """With implementation="auto", few classes take the reference path, which pays less and writes nothing."""
    k = hf_lsce.fused.FUSED_MIN_CLASSES
    for num_classes, overwritten in ((k - 1, False), (k, True)):
        logits, target, weight = make_batch(9, num_classes, dtype=torch.float32)
        x = logits.clone().requires_grad_(True)
        label_smoothed_cross_entropy(x, target, weight, label_smoothing=0.1, inplace_backward=True).backward()
        assert (x.grad.data_ptr() == x.data_ptr()) == overwritten
        assert torch.equal(x.detach(), logits) != overwritten
        torch.testing.assert_close(x.grad, loss_and_grad(reference, logits, target, weight, label_smoothing=0.1)[1])


def test_inplace_backward_leaves_logits_alone_without_gradient():
    logits, target, weight = make_batch(9, 300, dtype=torch.float32)
    x = logits.clone()
    expected = reference(logits, target, weight, label_smoothing=0.1)
    torch.testing.assert_close(
        label_smoothed_cross_entropy(x, target, weight, inplace_backward=True, label_smoothing=0.1), expected
    )
    with torch.no_grad():
        leaf = logits.clone().requires_grad_(True)
        label_smoothed_cross_entropy(leaf, target, weight, inplace_backward=True)
    assert torch.equal(x, logits) and torch.equal(leaf.detach(), logits)


def test_inplace_backward_through_a_matmul():
    """The usual case: logits = hidden @ lm_head; the gradients reaching both equal the reference path's."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(12, 16, generator=generator, requires_grad=True)
    head = torch.randn(16, 500, generator=generator, requires_grad=True)
    target = torch.randint(0, 500, (12,), generator=generator)
    grads = []
    for fn in (reference, functools.partial(label_smoothed_cross_entropy, inplace_backward=True)):
        hidden.grad = head.grad = None
        fn(hidden @ head, target, label_smoothing=0.1).backward()
        grads.append((hidden.grad, head.grad))
    torch.testing.assert_close(grads[1], grads[0])


def test_inplace_backward_on_logits_saved_for_backward_raises():
    """exp saves its output for backward: overwriting it must fail loudly, not give a wrong gradient."""
    h = torch.randn(4, 300, requires_grad=True)
    loss = label_smoothed_cross_entropy(h.exp(), torch.randint(0, 300, (4,)), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inplace_backward_needs_the_fused_path():
    logits, target, _ = make_batch(3, 5, dtype=torch.float32)
    with pytest.raises(ValueError, match="inplace_backward=True needs implementation='fused' or 'auto'"):
        label_smoothed_cross_entropy(logits, target, implementation="reference", inplace_backward=True)
    with pytest.raises(ValueError, match="inplace_backward=True needs"):
        LabelSmoothedCrossEntropyLoss(implementation="reference", inplace_backward=True)
    with pytest.raises(ValueError, match="implementation must be one of 'auto', 'reference', 'fused', got 'triton'"):
        label_smoothed_cross_entropy(logits, target, implementation="triton")


# ---------------------------------------------------------------------------------------------------------------
# Dtypes, dispatch, autograd corner cases


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradient_keeps_the_logits_dtype(dtype, chunk_bytes):
    chunk_bytes(2 * 700 * 4)
    logits, target, weight = make_batch(11, 700, dtype=dtype)
    loss, grad = loss_and_grad(fused, logits, target, weight, label_smoothing=0.1)
    truth, truth_grad = loss_and_grad(reference, logits.double(), target, weight, label_smoothing=0.1)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss.double(), truth, rtol=1e-6, atol=1e-6)  # computed in fp32 on the same logits
    torch.testing.assert_close(grad.double(), truth_grad, rtol=1e-2, atol=1e-5)  # rounded once, to the dtype


def test_no_full_size_fp32_copy_of_half_logits():
    """Allocations while computing bf16 logits: the bf16 gradient, chunk-sized buffers and per-row vectors only."""
    n, k = 256, 4096
    logits, target, weight = make_batch(n, k, dtype=torch.bfloat16)
    x = logits.requires_grad_(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the profiler sees this thread's allocations
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            fused(x, target, weight, label_smoothing=0.1).backward()
    finally:
        torch.set_num_threads(threads)
    sizes = sorted(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)
    assert sizes[-1] == n * k * 2  # the gradient, in bf16
    assert sizes[-2] <= hf_lsce.fused.DEFAULT_CHUNK_BYTES


def test_auto_picks_fused_for_large_class_counts():
    k = hf_lsce.fused.FUSED_MIN_CLASSES
    for num_classes in (k - 1, k):
        logits = torch.randn(4, num_classes, requires_grad=True)
        name = type(label_smoothed_cross_entropy(logits, torch.zeros(4, dtype=torch.long)).grad_fn).__name__
        assert ("Fused" in name) == (num_classes >= k), name
    # A target that needs a gradient keeps the reference path, which gives it one.
    probabilities = torch.rand(4, k, requires_grad=True)
    label_smoothed_cross_entropy(torch.randn(4, k), probabilities).backward()
    assert probabilities.grad is not None
    with pytest.raises(ValueError, match="computes no gradient for target"):
        fused(torch.randn(4, k), probabilities)


def test_backward_twice_needs_retain_graph():
    logits, target, weight = make_batch(5, 300, dtype=torch.float32)
    x = logits.requires_grad_(True)
    loss = fused(x, target, weight, label_smoothing=0.1)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first)
    with pytest.raises(RuntimeError, match="already used by a backward pass"):
        loss.backward()


# ---------------------------------------------------------------------------------------------------------------
# Higher-order gradients and torch.func

SECOND_ORDER_OPTIONS = [
    dict(label_smoothing=0.1),
    dict(label_smoothing=0.1, weight_mode="example", reduction="sum"),
    dict(label_smoothing=0.2, smoothing_style="off_target", reduction="none"),
]


@pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("options", SECOND_ORDER_OPTIONS, ids=["mean", "example-sum", "off_target-none"])
def test_gradient_penalty_through_the_default_path_equals_the_reference(options, probabilities):
    """A gradient penalty ||d loss / d W||^2 of a head's weight W with K = 70 (the default takes the fused path).

    The penalty depends on W only through the logits' gradient, so a first-order-only backward pass (the stored
    gradient, a constant) gives a zero gradient: the reference's is far from zero (the control)."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(12, 8, generator=generator, dtype=torch.float64)
    _, target, weight = make_batch(12, 70, probabilities=probabilities)
    start = torch.randn(70, 8, generator=generator, dtype=torch.float64)
    results = {}
    for name, implementation in [("reference", "reference"), ("default", "auto")]:
        head = start.clone().requires_grad_(True)
        loss = label_smoothed_cross_entropy(hidden @ head.T, target, weight, implementation=implementation, **options)
        assert ("Fused" in type(loss.grad_fn).__name__) == (name == "default")
        loss = loss if loss.dim() == 0 else (loss * torch.arange(12)).sum()
        (grad,) = torch.autograd.grad(loss, head, create_graph=True)
        grad.pow(2).sum().backward()
        results[name] = (grad.detach(), head.grad)
    torch.testing.assert_close(results["default"], results["reference"])
    assert results["reference"][1].abs().max() > 1e-2


@pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradgradcheck(probabilities, reduction):
    logits, target, weight = make_batch(5, 7, probabilities=probabilities)
    x = logits.requires_grad_(True)
    for weight_mode in ("torch", "example"):
        options = dict(label_smoothing=0.2, weight_mode=weight_mode, reduction=reduction)
        assert torch.autograd.gradgradcheck(functools.partial(fused, target=target, weight=weight, **options), (x,))


def test_create_graph_after_inplace_backward_raises():
    x = torch.randn(4, 300, requires_grad=True)
    loss = label_smoothed_cross_entropy(x * 1, torch.randint(0, 300, (4,)), inplace_backward=True)
    with pytest.raises(RuntimeError, match="no higher-order gradient .* use inplace_backward=False"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_torch_func_grad_and_vmap_on_the_default_path_equal_the_reference():
    k = 70
    logits, target, weight = make_batch(6, k)
    target[1] = 3  # vmap's rows below must count
    options = dict(label_smoothing=0.1, weight_mode="example")
    grad = torch.func.grad(lambda x: label_smoothed_cross_entropy(x, target, weight, **options))(logits)
    _, expected = loss_and_grad(reference, logits, target, weight, reduction="sum", **options)
    denominator = hf_lsce.mean_denominator(target, weight)
    torch.testing.assert_close(grad, expected / denominator)
    rows = torch.func.vmap(lambda x, y: label_smoothed_cross_entropy(x, y, weight, **options))(
        logits[:, None], target[:, None]
    )
    torch.testing.assert_close(
        rows, torch.stack([reference(x, y, weight, **options) for x, y in zip(logits[:, None], target[:, None])])
    )
    per_row = torch.func.vmap(torch.func.grad(lambda x, y: label_smoothed_cross_entropy(x, y, weight, **options)))
    torch.testing.assert_close(
        per_row(logits[:, None], target[:, None]),
        torch.stack(
            [loss_and_grad(reference, x, y, weight, **options)[1] for x, y in zip(logits[:, None], target[:, None])]
        ),
    )
    with pytest.raises(ValueError, match="implementation='fused' does not run under torch.func transforms"):
        torch.func.grad(lambda x: fused(x, target, weight))(logits)


def test_gradient_memory_is_reused_only_once_nothing_holds_it():
    hf_lsce.fused.empty_cache()
    logits, target, weight = make_batch(16, 300, dtype=torch.float32)
    expected = loss_and_grad(reference, logits, target, weight, label_smoothing=0.1)[1]

    def step():
        x = logits.clone().requires_grad_(True)
        fused(x, target, weight, label_smoothing=0.1).backward()
        torch.testing.assert_close(x.grad, expected)
        return x.grad

    first = step()
    spare = hf_lsce.fused._SPARE
    assert first.untyped_storage().data_ptr() == spare.data_ptr()
    # Still referenced (a leaf's .grad, then only a view of it): a second buffer, the first left intact.
    second = step()
    assert second.untyped_storage().data_ptr() != spare.data_ptr()
    view = first[3]
    del first
    third = step()
    assert third.untyped_storage().data_ptr() != view.untyped_storage().data_ptr()
    torch.testing.assert_close(view, expected[3])
    # Released: the spare (the latest buffer) is written again, and its gradient is right.
    spare = hf_lsce.fused._SPARE
    del second, third, view
    reused = step()
    assert hf_lsce.fused._SPARE is spare and reused.untyped_storage().data_ptr() == spare.data_ptr()
    del reused
    # A smaller gradient fits into the spare; a larger one replaces it.
    x = logits[:4].clone().requires_grad_(True)
    fused(x, target[:4], weight).backward()
    assert hf_lsce.fused._SPARE is spare and x.grad.untyped_storage().data_ptr() == spare.data_ptr()
    del x
    larger, larger_target, _ = make_batch(32, 300, dtype=torch.float32)
    x = larger.requires_grad_(True)
    fused(x, larger_target, weight).backward()
    assert hf_lsce.fused._SPARE is not spare and x.grad.untyped_storage().data_ptr() == hf_lsce.fused._SPARE.data_ptr()
    del x
    hf_lsce.fused.empty_cache()
    assert hf_lsce.fused._SPARE is None
    step()
    assert hf_lsce.fused._SPARE is not spare


def test_gradient_buffers_of_concurrent_calls_are_distinct():
    """Threads computing losses at once (each keeping every gradient) never share a buffer."""
    batches = [make_batch(32, 300, dtype=torch.float32, seed=seed) for seed in range(4)]
    expected = [loss_and_grad(reference, *batch, label_smoothing=0.1)[1] for batch in batches]
    barrier = threading.Barrier(len(batches))

    def run(index):
        logits, target, weight = batches[index]
        barrier.wait()
        grads = []
        for _ in range(10):
            x = logits.clone().requires_grad_(True)
            fused(x, target, weight, label_smoothing=0.1).backward()
            grads.append(x.grad)
        return grads

    with ThreadPoolExecutor(len(batches)) as pool:
        results = list(pool.map(run, range(len(batches))))
    pointers = {grad.untyped_storage().data_ptr() for grads in results for grad in grads}
    assert len(pointers) == 10 * len(batches)
    for grads, grad in zip(results, expected):
        for result in grads:
            torch.testing.assert_close(result, grad)


def test_inference_mode_empty_and_non_contiguous_input():
    logits, target, weight = make_batch(8, 300, dtype=torch.float32)
    with torch.inference_mode():
        torch.testing.assert_close(fused(logits, target, weight), reference(logits, target, weight))
    empty = torch.zeros(0, 300, requires_grad=True)
    loss = fused(empty, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and empty.grad.shape == (0, 300)
    strided = logits.t().contiguous().t()  # same values, column-major
    torch.testing.assert_close(
        loss_and_grad(fused, strided, target, weight, label_smoothing=0.2),
        loss_and_grad(reference, logits, target, weight, label_smoothing=0.2),
    )


# ---------------------------------------------------------------------------------------------------------------
# Peak memory, measured by the kernel in a fresh process (RSS high-water mark)

PROBE = textwrap.dedent(
    """
    import json, sys, torch
    from hf_lsce import label_smoothed_cross_entropy
    n, k, inplace = 1024, 32768, sys.argv[1] == "1"
    x = torch.randn(n, k, requires_grad=True)
    y = torch.randint(0, k, (n,))
    w = torch.rand(k) + 0.5
    label_smoothed_cross_entropy(x[:64], y[:64], w, label_smoothing=0.1).backward()  # lazy initialisation
    x.grad = None
    def status(field):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))
    open("/proc/self/clear_refs", "w").write("5")
    base = status("VmRSS")
    label_smoothed_cross_entropy(x, y, w, label_smoothing=0.1, inplace_backward=inplace).backward()
    print(json.dumps((status("VmHWM") - base) / (n * k * 4)))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("inplace, limit", [(False, 1.05), (True, 0.05)], ids=["separate", "inplace"])
def test_peak_extra_memory(inplace, limit):
    done = subprocess.run([sys.executable, "-c", PROBE, str(int(inplace))], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) <= limit
