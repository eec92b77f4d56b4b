"""Fused, memory-lean path of `label_smoothed_cross_entropy` for large class counts (vocabularies).

The reference path materializes ``log_softmax(input)`` in fp32 and autograd keeps it (and more) for the backward
pass: about 3x the logits' size in extra memory, and on CPUs most of the time goes to page faults on that fresh
memory and to ``exp``. Here the rows are processed in chunks of about `DEFAULT_CHUNK_BYTES`, computed in fp32 (fp64
for fp64 logits); a few passes over each chunk, while it sits in cache, give the log-sum-exp, the loss and the
gradient, which is kept for the backward pass. With ``p = softmax(x)``, ``lse = logsumexp(x)`` and the per-class
factors ``u_c = v_c q_c`` of `hf_lsce.loss`'s module docstring (``U = sum_c u_c``):

    loss = -sum_c u_c (x_c - lse) = U lse - sum_c u_c x_c        d loss / dx = U p - u

For class-index targets ``u = v * (a one_hot(y) + b)`` has a closed form, so a chunk needs ``x_y``, one sum (or one
product with the weights) over the classes and the softmax, computed in place. ``lse`` comes almost for free: with
the row's maximum ``m`` and the softmax's largest value ``p_max = exp(m - lse)``, at least ``1 / K`` (two reductions
without indices), ``lse = m - log(p_max)`` loses nothing to underflow.

Memory: the chunks are small (reused by the allocator: no new page faults), so the only full-size tensor is the
gradient, in the logits' dtype, or none at all with ``inplace_backward=True``, which writes the gradient into the
logits' own buffer. The backward pass only scales the stored gradient by the incoming one, and skips even that for
a scalar 1 (``loss.backward()``). On CPU the gradient's memory is kept and reused by the next call once nothing
references it (`_gradient_buffer`), which saves the page faults of fresh memory; `empty_cache` releases it.

Higher-order gradients: a backward pass with ``create_graph=True`` does not use the stored gradient, a constant to
autograd, but recomputes ``U p - u`` from the saved logits with differentiable PyTorch operations (`_gradient_graph`),
so that gradient penalties and double backward are exact; ``inplace_backward=True`` overwrote those logits, and
raises there. `torch.func` transforms cannot run this Function: ``implementation="auto"`` avoids it under them.

Threads: on CPU, when there are many chunks (`MIN_CHUNKS_PER_THREAD`), they are shared out to a small pool of
Python threads, each running PyTorch single-threaded. Letting every operation fork and join PyTorch's own OpenMP
threads costs a barrier per operation, and a barrier waits for the slowest core; whole chunks per thread need no
barrier, and a thread slowed by another process simply takes fewer chunks. With few chunks, PyTorch's own threads
cost less. Other devices run the chunks in order (their kernels are asynchronous: nothing in the loop waits for
the device).
"""

from __future__ import annotations

import math
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
from torch import Tensor

from hf_lsce.checks import functorch_transforms_active

# One chunk of fp32 rows per thread. Each chunk costs ~10 PyTorch calls (~50 us of Python and dispatch, more when
# threads contend for the GIL), so chunks must be large; small enough that all threads' chunks stay in the
# last-level cache. On the project's 2-core EPYC VM (1 MiB L2 per core, 32 MiB L3), N = 4096, K = 32768, fp32, in
# place: 128 KiB chunks 690 ms, 512 KiB 245 ms, 2 MiB 155 ms, 8 MiB 205 ms (ad-hoc runs, medians of 4).
DEFAULT_CHUNK_BYTES = 1 << 21

# The thread pool takes over from PyTorch's own threads from this many chunks per thread. N = 4096, 2 MiB chunks, the
# 2-core VM, pool / PyTorch's threads (ad-hoc runs): K = 1024 (8 chunks) 11.7 / 8.0 ms; K = 4096 bf16 (32 chunks)
# 28 / 25 ms; K = 8192 (64 chunks) 49 / 60 ms; K = 32768 (256 chunks) 213 / 301 ms.
MIN_CHUNKS_PER_THREAD = 16

# Below this many classes `implementation="auto"` keeps the reference path, PyTorch's own kernel for the common
# options, whose fixed cost is lower. Forward + backward, N = 4096, eps = 0.1, class weights, as a multiple of
# F.cross_entropy (2-core VM, medians of 11 interleaved rounds, ad-hoc runs): K = 16: reference 1.5x, fused 2.2x;
# K = 64: 1.7x / 1.4x; K = 256: 1.2x / 1.1x (bf16: 2.5x / 1.3x); K = 1024: see benchmarks/bench_loss.py.
FUSED_MIN_CLASSES = 64


class FusedOptions(NamedTuple):
    """The fused path's options, validated by the caller (`label_smoothed_cross_entropy`).

    The smoothed target is ``q = a * one_hot(y) + b`` for class indices and ``a * t + b * sum(t)`` for
    probabilities ``t``; ``weight_mode`` is ``"torch"`` or ``"example"``; ``inplace`` writes the gradient into the
    logits' buffer. Chunks of rows hold `DEFAULT_CHUNK_BYTES` of fp32 (fp64) logits (at least one row each).
    """

    ignore_index: int
    reduction: str
    a: float
    b: float
    weight_mode: str
    inplace: bool = False


class RowTerms(NamedTuple):
    """Per-row factors of the loss ``U lse - sum_c u_c x_c`` (module docstring), one entry per row.

    ``target`` is the column of class indices (N, 1) or the probabilities (N, K); ``valid`` marks the rows that
    count (None for probabilities, whose rows summing to 0 have all-zero factors); ``picked`` is the coefficient of
    ``x_y`` (of ``sum_c t_c v_c x_c`` for probabilities), ``spread`` that of ``sum_c v_c x_c``, ``total`` is ``U``.
    """

    target: Tensor
    valid: Tensor | None
    picked: Tensor
    spread: Tensor
    total: Tensor


class GradientFactors(NamedTuple):
    """Columns (rows x 1) of per-row factors already scaled by the reduction, from which `process_chunk` writes the
    gradient ``total * p - picked * target * v - spread * v``; ``spread`` is None when ``b = 0``, ``total`` where
    ``hf_lsce.linear`` folded it into the exponential."""

    total: Tensor | None
    picked: Tensor  # negated
    spread: Tensor | None

    def rows(self, start: int, end: int) -> GradientFactors:
        """The factors of rows ``start:end``."""
        total, picked, spread = (None if f is None else f[start:end] for f in self)
        return GradientFactors(total, picked, spread)


def fused_cross_entropy(
    input: Tensor, target: Tensor, weight: Tensor | None, denominator: Tensor | None, options: FusedOptions
) -> Tensor:
    """Fused loss on validated arguments; `label_smoothed_cross_entropy` with ``implementation="fused"`` calls it.

    Args:
        input (`torch.Tensor` of shape `(..., K)`): logits. With ``options.inplace`` and a gradient needed, its
            buffer is overwritten by the gradient (when it is contiguous; otherwise a reshaped copy is).
        target (`torch.Tensor`): class indices `(...)` or probabilities `(..., K)`, which get no gradient.
        weight (`torch.Tensor` of shape `(K,)`, *optional*): class weights, which get no gradient.
        denominator (`torch.Tensor`, *optional*): 0-d, what ``reduction="mean"`` divides by (0 gives a 0 loss and
            zero gradients); None for the other reductions.
        options (`FusedOptions`): ``ignore_index``, ``reduction``, the smoothing ``a`` and ``b``, ``weight_mode``,
            ``inplace``.
    """
    if functorch_transforms_active():
        raise ValueError(
            "implementation='fused' does not run under torch.func transforms (vmap, grad, jacrev, ...); "
            "use implementation='auto' (which then takes the reference path) or 'reference'"
        )
    for name, tensor in (("target", target), ("weight", weight), ("normalizer", denominator)):
        if isinstance(tensor, Tensor) and tensor.requires_grad:
            raise ValueError(
                f"implementation='fused' computes no gradient for {name}, which requires grad; "
                "use implementation='reference'"
            )
    # Function.apply reports requires_grad even under torch.no_grad(): the gradient (and the overwrite) is skipped
    # only if we ask.
    need_grad = torch.is_grad_enabled() and input.requires_grad
    return _FusedCrossEntropy.apply(input, target, weight, denominator, options, need_grad)


class _FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, target, weight, denominator, options: FusedOptions, need_grad: bool):
        num_classes = input.shape[-1]
        dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        w = None if weight is None else weight.to(dtype)
        # Folding 1 / denominator into the gradient here leaves nothing to do in backward for loss.backward(). The
        # same safe rule as `hf_lsce.loss.safe_divide`: a 0 denominator gives 0 and zero gradients.
        scale = None
        if options.reduction == "mean":
            positive = denominator > 0
            scale = torch.where(positive, 1 / torch.where(positive, denominator, 1), 0).to(dtype)

        a, b, weight_mode = options.a, options.b, options.weight_mode
        if target.is_floating_point():
            terms = probability_terms(target.reshape(-1, num_classes), w, a, b, weight_mode, dtype)
        else:
            terms = index_terms(target.reshape(-1), w, options.ignore_index, num_classes, a, b, weight_mode, dtype)
        # Only a weight that varies over the classes needs a product with the chunk; otherwise v is per row.
        class_weight = w if w is not None and weight_mode == "torch" else None
        factors = None
        if need_grad:
            # The gradient's per-row factors, scaled once here rather than per chunk.
            s = 1 if scale is None else scale
            spread_factor = None if b == 0 else (terms.spread * s)[:, None]
            factors = GradientFactors((terms.total * s)[:, None], (-terms.picked * s)[:, None], spread_factor)

        x = input.detach().reshape(-1, num_classes)
        num_rows = x.shape[0]
        step = max(1, DEFAULT_CHUNK_BYTES // (num_classes * dtype.itemsize))
        # fp32 (fp64) logits are computed where the gradient goes; others through a chunk-sized buffer per thread,
        # so no full-size copy of bf16/fp16 logits is ever made.
        direct = need_grad and x.dtype == dtype
        grad = None
        if need_grad:
            grad = x if options.inplace else _gradient_buffer(x)
        # Per row: sum_c target_c x_c, sum_c v_c x_c, max_c x_c and max_c p_c, filled chunk by chunk.
        stats = torch.empty(4, num_rows, 1, dtype=dtype, device=x.device)
        buffers = ChunkBuffers()

        def work(start, end):
            source = x[start:end]
            z = grad[start:end] if direct else buffers.take((end - start, num_classes), dtype, x.device)
            if source.dtype != dtype:
                # The chunk's fp32 copy; softmax has no fp32 output for half input on CPU.
                source = z.copy_(source)
            process_chunk(
                source,
                z,
                terms.target[start:end],
                class_weight,
                stats[:, start:end],
                b != 0,
                None if factors is None else factors.rows(start, end),
            )
            if need_grad and not direct:
                grad[start:end].copy_(z)

        run_row_chunks(num_rows, step, work, x.device)
        if need_grad and terms.valid is not None:
            # An ignored row's factors are 0, and 0 times a finite softmax is 0. A row holding NaN or +inf (its
            # maximum is not finite) has a NaN softmax: those of ignored rows are set to 0 here, which costs nothing
            # when there are none (a parallel pass over the gradient would cost an OpenMP barrier).
            poisoned = (~terms.valid & ~stats[2, :, 0].isfinite()).nonzero().squeeze(1)
            if poisoned.numel():
                grad.index_fill_(0, poisoned, 0)

        picked, spread, top, peak = stats.squeeze(2)
        # At the row's maximum p = exp(max - lse) >= 1 / K: this log-sum-exp loses nothing to underflow.
        losses = terms.total * (top - peak.log()) - terms.picked * picked
        if b:
            losses -= terms.spread * spread
        if terms.valid is not None:
            # Ignored rows cost 0 whatever their logits (inf or NaN included), as in the reference path.
            losses = torch.where(terms.valid, losses, 0)

        ctx.grad = grad
        ctx.reduction = options.reduction
        ctx.input_shape = input.shape
        if need_grad and not options.inplace:
            # Read only by a backward pass that builds a graph (create_graph=True, `_gradient_graph`). The cost: the
            # logits live until the backward pass beside their gradient, even where the caller has dropped them.
            ctx.save_for_backward(input)
            ctx.graph_terms = (terms, class_weight, scale, dtype)
        if options.reduction == "none":
            return losses.reshape(input.shape[:-1])
        total = losses.sum()
        return total if options.reduction == "sum" else total * scale

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            # create_graph=True (e.g. a gradient penalty): the stored gradient would be a constant to autograd, so
            # the second-order term would be lost; it is recomputed from the logits with differentiable operations.
            return _gradient_graph(ctx, grad_output), None, None, None, None, None
        grad = ctx.grad
        if grad is None:
            raise RuntimeError(
                "the fused loss's gradient was already used by a backward pass; pass retain_graph=True to the first "
                "one to call backward twice"
            )
        # The stored gradient is handed over (scaled in place) unless the graph is kept for another backward pass,
        # where it must stay intact, at the cost of a new tensor.
        keep = keep_graph()
        if not keep:
            ctx.grad = None
        scale = grad_output.reshape(-1, 1) if ctx.reduction == "none" else grad_output
        # One host read here (not in the loop) saves a full pass over the gradient in the usual case, a scalar 1.
        if ctx.reduction == "none" or not bool(grad_output == 1):
            grad = grad * scale if keep else grad.mul_(scale)
        # One gradient per argument of forward: input, target, weight, denominator, options, need_grad.
        return grad.view(ctx.input_shape), None, None, None, None, None


def _gradient_graph(ctx, grad_output: Tensor) -> Tensor:
    """The input's gradient ``s * grad_output * (U p - u)`` as differentiable PyTorch operations on the saved logits.

    This is what a backward pass with ``create_graph=True`` returns: autograd can differentiate it again, so every
    higher-order gradient is exact. It costs the reference path's memory (a few tensors of the logits' size).
    """
    if not ctx.saved_tensors:
        raise RuntimeError(
            "inplace_backward=True overwrote the logits with their gradient, so no higher-order gradient "
            "(create_graph=True) can be computed; use inplace_backward=False"
        )
    (input,) = ctx.saved_tensors
    terms, class_weight, scale, dtype = ctx.graph_terms
    num_classes = input.shape[-1]
    x = input.reshape(-1, num_classes).to(dtype)
    if terms.valid is not None:
        # Ignored rows get exactly 0, whatever their logits hold (a NaN row would make p, and 0 * p, NaN).
        x = torch.where(terms.valid[:, None], x, 0)
    grad = smoothed_gradient(x, terms, class_weight)
    if scale is not None:
        grad = grad * scale
    grad = grad * (grad_output.reshape(-1, 1) if ctx.reduction == "none" else grad_output)
    return grad.reshape(ctx.input_shape).to(input.dtype)


def smoothed_gradient(x: Tensor, terms: RowTerms, class_weight: Tensor | None) -> Tensor:
    """``U softmax(x) - u`` for logits ``x`` (N, K) and the rows' `RowTerms`, in differentiable PyTorch operations:
    the gradient of the unreduced losses with respect to ``x`` (``v`` is ``class_weight`` or 1)."""
    v = x.new_ones(x.shape[1]) if class_weight is None else class_weight
    u = terms.spread[:, None] * v
    if terms.target.is_floating_point():
        u = u + terms.picked[:, None] * terms.target.to(x.dtype) * v
    else:
        u = u.scatter_add(1, terms.target, terms.picked[:, None])
    return terms.total[:, None] * torch.softmax(x, 1) - u


def _gradient_buffer(x: Tensor) -> Tensor:
    """An uninitialized contiguous tensor like ``x`` for the gradient; on CPU, in the spare buffer when it is free.

    On CPU the first write to freshly allocated memory costs a page fault per 4 KiB page (glibc maps every
    allocation above 32 MiB afresh and unmaps it when freed): on the project's VM ~170 ms for the 512 MiB gradient
    of 4096 x 32768 fp32 logits, more than the rest of the loss. So the memory of the last gradient is kept, and
    reused by a later call once nothing references it any more (its storage's reference count is 1, ours): after
    the backward pass and the optimizer step have let go of it, as in every training step. A gradient that
    autograd stored as a leaf's ``.grad`` is still referenced, so it is never written to; `empty_cache` releases the
    spare. Other devices have their own caching allocators and get ``torch.empty_like``.
    """
    global _SPARE
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if x.device.type != "cpu" or use_count is None or x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    nbytes = x.numel() * x.element_size()
    with _SPARE_LOCK:
        spare = _SPARE
        if spare is None or spare.nbytes() < nbytes or use_count(spare._cdata) != 1:
            # Busy, too small or none: a fresh buffer, kept in its place (the old one lives on while it is used).
            # Plain pages: asking for transparent huge pages made the first touch of 512 MiB erratic on the
            # project's VM after other large frees (60-900 ms against a steady 150-200 ms), so none are asked for.
            spare = _SPARE = torch.UntypedStorage(nbytes)
        # Made while the lock is held, so that no other call can take the same memory.
        return torch.empty(0, dtype=x.dtype).set_(spare, 0, x.shape)


def empty_cache() -> None:
    """Releases the CPU memory kept for the fused path's next gradient (as `torch.cuda.empty_cache` does on GPUs).

    The memory is returned to the system when no gradient still uses it; the next call allocates afresh.
    """
    global _SPARE
    with _SPARE_LOCK:
        _SPARE = None


_SPARE: torch.UntypedStorage | None = None
_SPARE_LOCK = threading.Lock()


def keep_graph() -> bool:
    """Whether the running backward pass keeps the graph (``retain_graph=True``, e.g. in gradcheck)."""
    # A private accessor; a torch without it gets the fast path: the gradient over, and a second backward pass raises.
    getter = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return bool(getter()) if getter is not None else False


def index_terms(y, w, ignore_index, num_classes, a, b, weight_mode, dtype) -> RowTerms:
    """Per-row factors for class indices ``y`` (N,): ``u = g * one_hot(y) + b * r * v`` with ``U = sum_c u_c``.

    ``v`` is the weight vector ``w`` in weight_mode="torch" (``r`` is then the 0/1 validity) and 1 otherwise (``r``
    then carries ``w_y``); ignored rows have ``g = r = U = 0``. Returned as the coefficients of `process_chunk`'s
    sums: ``picked = g`` (of ``x_y``) and ``spread = b * r`` (of ``sum_c v_c x_c``).
    """
    valid = y != ignore_index
    y = y.where(valid, 0)
    r = valid.to(dtype)
    if w is not None:
        w_y = w[y] * r
        if weight_mode == "torch":
            total = a * w_y + b * w.sum() * r
            return RowTerms(y[:, None], valid, picked=a * w_y, spread=b * r, total=total)
        r = w_y
    total = (a + b * num_classes) * r
    return RowTerms(y[:, None], valid, picked=a * r, spread=b * r, total=total)


def probability_terms(t, w, a, b, weight_mode, dtype) -> RowTerms:
    """Per-row factors for probabilities: ``u = alpha * t * v + beta * v`` with ``U = sum_c u_c = total``.

    ``v`` is the weight vector in weight_mode="torch" and 1 otherwise (example mode puts ``r = w . t`` into
    ``alpha`` and ``beta``); rows summing to 0 get all-zero factors. ``picked = alpha`` is the coefficient of
    ``sum_c t_c v_c x_c``, ``spread = beta`` that of ``sum_c v_c x_c``.
    """
    num_classes = t.shape[-1]
    mass = t.sum(-1, dtype=dtype)
    alpha = torch.full_like(mass, a)
    if w is None:
        return RowTerms(t, None, picked=alpha, spread=b * mass, total=(a + b * num_classes) * mass)
    # One extra pass over the targets; probability targets are as large as the logits anyway.
    r = t.to(dtype) @ w
    if weight_mode == "torch":
        return RowTerms(t, None, picked=alpha, spread=b * mass, total=a * r + b * w.sum() * mass)
    total = (a + b * num_classes) * mass * r
    return RowTerms(t, None, picked=a * r, spread=b * mass * r, total=total)


def process_chunk(x, z, target, w, stats, spread, factors) -> None:
    """One chunk of rows: fills ``stats`` (4 x rows x 1) and, with ``factors``, writes the gradient into ``z``.

    ``stats`` receives ``sum_c target_c v_c x_c`` (``x_y`` for class indices), ``sum_c v_c x_c`` (when ``spread``),
    ``max_c x_c`` and ``max_c softmax(x)_c``; ``v`` is ``w`` or 1. ``z`` (which may be ``x`` itself) receives
    ``softmax(x)``, then with `GradientFactors` the gradient.
    """
    picked, spread_sum, top, peak = stats
    if target.is_floating_point():
        target = target.to(z.dtype)
        if w is not None:
            target = target * w
        torch.sum(target * x, 1, keepdim=True, out=picked)
    else:
        torch.gather(x, 1, target, out=picked)
    if spread:
        if w is None:
            torch.sum(x, 1, keepdim=True, out=spread_sum)
        else:
            torch.mm(x, w[:, None], out=spread_sum)
    # Reductions without indices: max() with its argmax takes as long as the softmax itself.
    torch.amax(x, 1, keepdim=True, out=top)
    _softmax_into(x, z)
    torch.amax(z, 1, keepdim=True, out=peak)
    if factors is None:
        return
    total, picked_factor, spread_factor = factors
    # Products with a column of per-row factors, one operation each: addcmul with two broadcast columns is 5-8x
    # slower than mul_ and sub_ on CPU.
    z.mul_(total)
    if spread_factor is not None:
        if w is None:
            z.sub_(spread_factor)
        else:
            z.addcmul_(spread_factor, w, value=-1)
    if target.is_floating_point():
        z.add_(target * picked_factor)
    else:
        z.scatter_add_(1, target, picked_factor)


def _softmax_into(x: Tensor, z: Tensor) -> None:
    """Writes ``softmax(x)`` into ``z`` (which may be ``x``).

    PyTorch's softmax kernel computes max, exp and sum row by row while the row is in cache. On CPU its output
    may alias its input: each element is read before it is written (tests/test_fused.py checks this). Elsewhere,
    where that is unchecked, an aliased call goes through a chunk-sized temporary.
    """
    if x.device.type == "cpu" or not z.is_set_to(x):
        torch.softmax(x, 1, out=z)
    else:
        z.copy_(torch.softmax(x, 1))


def run_row_chunks(num_rows: int, step: int, work, device: torch.device) -> None:
    """Calls ``work(start, end)`` for the chunks of ``step`` rows among ``num_rows`` (`_run_chunks`: on the pool's
    threads when there are many), in the caller's autograd and inference modes."""
    inference = torch.is_inference_mode_enabled()

    def run(starts):
        # Worker threads start with autograd on and outside inference mode: take the caller's state.
        with torch.no_grad(), torch.inference_mode(inference):
            for start in starts:
                work(start, min(start + step, num_rows))

    _run_chunks(range(0, num_rows, step), run, device)


class ChunkBuffers:
    """Buffers reused from chunk to chunk, one per name and thread (each worker of `run_row_chunks` has its own),
    handed out as views of a given shape."""

    def __init__(self):
        self._buffers: dict[tuple[int, str], Tensor] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, name: str = "") -> Tensor:
        numel = math.prod(shape)
        key = (threading.get_ident(), name)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)


def _run_chunks(starts: range, work, device: torch.device) -> None:
    """Calls ``work(iterable of chunk starts)`` on as many threads as PyTorch uses (CPU), sharing the chunks out."""
    workers = min(torch.get_num_threads(), len(starts)) if device.type == "cpu" else 1
    # Few chunks: PyTorch's own threads, which split each operation, cost less than handing out whole chunks.
    if workers <= 1 or len(starts) < MIN_CHUNKS_PER_THREAD * workers:
        work(starts)
        return
    # A queue, not a static split: a thread slowed by another process just takes fewer chunks.
    pending = queue.SimpleQueue()
    for start in starts:
        pending.put(start)

    def drain():
        try:
            while True:
                yield pending.get_nowait()
        except queue.Empty:
            return

    futures = [_pool(workers).submit(work, drain()) for _ in range(workers)]
    for future in futures:
        future.result()


_POOL: tuple[tuple[int, int], ThreadPoolExecutor] | None = None
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """A thread pool whose threads run PyTorch single-threaded; recreated after a fork or a change of size."""
    global _POOL
    key = (os.getpid(), workers)
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != key:
            _POOL = (key, ThreadPoolExecutor(workers, "hf_lsce", initializer=torch.set_num_threads, initargs=(1,)))
        return _POOL[1]
