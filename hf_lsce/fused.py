"""Fused, memory-lean path of `label_smoothed_cross_entropy` for large class counts (vocabularies).

The reference path materializes ``log_softmax(input)`` in fp32 and autograd keeps it (and more) for the backward
pass: about 3x the logits' size in extra memory, and on CPUs most of the time goes to page faults on that fresh
memory and to ``exp``. Here the rows are processed in chunks of about `DEFAULT_CHUNK_BYTES`, computed in fp32 (fp64
for fp64 logits); a few passes over each chunk, while it sits in cache, give the log-sum-exp, the loss and the
gradient, which is kept for the backward pass. With ``p = softmax(x)``, ``lse = logsumexp(x)`` and the per-class
factors ``u_c = v_c q_c`` of `hf_lsce.loss`'s module docstring (``U = sum_c u_c``):

    loss = -sum_c u_c (x_c - lse) = U lse - sum_c u_c x_c        d loss / dx = U p - u

For class-index targets ``u = v * (a one_hot(y) + b)`` has a closed form, so a chunk needs ``x_y``, one sum (or one
product with the weights) over the classes and the softmax, computed in place. ``lse`` comes for free from the
softmax: at the row's maximum ``m``, ``p_max = exp(m - lse)`` is at least ``1 / K``, so ``lse = m - log(p_max)``
loses nothing to underflow.

Memory: the chunks are small (reused by the allocator: no new page faults), so the only full-size tensor is the
gradient, in the logits' dtype, or none at all with ``inplace_backward=True``, which writes the gradient into the
logits' own buffer. The backward pass only scales the stored gradient by the incoming one, and skips even that for
a scalar 1 (``loss.backward()``).

Threads: on CPU the chunks are shared out to a small pool of Python threads, each running PyTorch single-threaded.
Letting every small operation fork and join PyTorch's own OpenMP threads costs a barrier per operation, and a
barrier waits for the slowest core; whole chunks per thread need no barrier, and a thread slowed by another process
simply takes fewer chunks. Other devices run the chunks in order (their kernels are
asynchronous: nothing in the loop waits for the device).
"""

from __future__ import annotations

import ctypes
import os
import queue
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

# One chunk of fp32 rows per thread; it and the chunk of the gradient it writes should stay in that core's L2 cache
# (2 MiB on the project's EPYC machines); much smaller chunks pay per-operation overhead (see benchmarks/).
DEFAULT_CHUNK_BYTES = 1 << 19

# Below this many classes `implementation="auto"` keeps the reference path, which is PyTorch's own kernel for the
# common options. benchmarks/bench_loss.py measures K = 1024 (the reference path is as fast or faster) and K = 32768
# (the fused path takes 0.2-0.4x the time); 4096 lies between them and was only checked in an ad-hoc run.
FUSED_MIN_CLASSES = 4096


def fused_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    denominator: Tensor | None,
    ignore_index: int,
    reduction: str,
    a: float,
    b: float,
    weight_mode: str,
    inplace_backward: bool = False,
    chunk_bytes: int | None = None,
) -> Tensor:
    """Fused loss on validated arguments; `label_smoothed_cross_entropy` with ``implementation="fused"`` calls it.

    Args:
        input (`torch.Tensor` of shape `(..., K)`): logits. With ``inplace_backward=True`` and a gradient needed,
            its buffer is overwritten by the gradient (when it is contiguous; otherwise a reshaped copy is).
        target (`torch.Tensor`): class indices `(...)` or probabilities `(..., K)`, which get no gradient.
        weight (`torch.Tensor` of shape `(K,)`, *optional*): class weights, which get no gradient.
        denominator (`torch.Tensor`, *optional*): 0-d, what ``reduction="mean"`` divides by (0 gives a 0 loss and
            zero gradients); None for the other reductions.
        ignore_index (`int`): label of positions that count nowhere.
        reduction (`str`): ``"mean"``, ``"sum"`` or ``"none"``.
        a (`float`), b (`float`): the smoothed target is ``q = a * one_hot(y) + b`` (``a * t + b * sum(t)``).
        weight_mode (`str`): ``"torch"`` or ``"example"``.
        inplace_backward (`bool`, *optional*, defaults to `False`): write the gradient into the logits' buffer.
        chunk_bytes (`int`, *optional*): bytes of one fp32 (fp64) chunk of rows; at least one row is processed at a
            time. Defaults to `DEFAULT_CHUNK_BYTES`.
    """
    for name, tensor in (("target", target), ("weight", weight), ("normalizer", denominator)):
        if isinstance(tensor, Tensor) and tensor.requires_grad:
            raise ValueError(
                f"implementation='fused' computes no gradient for {name}, which requires grad; "
                "use implementation='reference'"
            )
    # Function.apply reports requires_grad even under torch.no_grad(): the gradient (and the overwrite) is skipped
    # only if we ask.
    need_grad = torch.is_grad_enabled() and input.requires_grad
    return _FusedCrossEntropy.apply(
        input,
        target,
        weight,
        denominator,
        ignore_index,
        reduction,
        a,
        b,
        weight_mode,
        inplace_backward,
        chunk_bytes,
        need_grad,
    )


class _FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        input,
        target,
        weight,
        denominator,
        ignore_index,
        reduction,
        a,
        b,
        weight_mode,
        inplace,
        chunk_bytes,
        need_grad,
    ):
        num_classes = input.shape[-1]
        dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        w = None if weight is None else weight.to(dtype)
        # Folding 1 / denominator into the gradient here leaves nothing to do in backward for loss.backward(). The
        # same safe rule as the reference path's `_safe_divide`: a 0 denominator gives 0 and zero gradients.
        scale = None
        if reduction == "mean":
            positive = denominator > 0
            scale = torch.where(positive, 1 / torch.where(positive, denominator, 1), 0).to(dtype)

        if target.is_floating_point():
            chunk_fn = _probability_chunk
            rows = _probability_rows(target.reshape(-1, num_classes), w, a, b, weight_mode, dtype)
        else:
            chunk_fn = _index_chunk
            rows = _index_rows(target.reshape(-1), w, ignore_index, num_classes, a, b, weight_mode, dtype)
        # Only a weight that varies over the classes needs a product with the chunk; otherwise v is per row.
        class_weight = w if w is not None and weight_mode == "torch" else None

        x = input.detach().reshape(-1, num_classes)
        num_rows = x.shape[0]
        step = max(1, (chunk_bytes or DEFAULT_CHUNK_BYTES) // (num_classes * dtype.itemsize))
        # fp32 (fp64) logits are computed where the gradient goes; others through a chunk-sized buffer per thread,
        # so no full-size copy of bf16/fp16 logits is ever made.
        direct = need_grad and x.dtype == dtype
        grad = None
        if need_grad:
            grad = x if inplace else _empty_gradient(x)
        losses = torch.empty(num_rows, dtype=dtype, device=x.device)
        inference = torch.is_inference_mode_enabled()

        def work(starts):
            # Worker threads start with autograd on and outside inference mode: take the caller's state.
            with torch.no_grad(), torch.inference_mode(inference):
                scratch = None
                for start in starts:
                    end = min(start + step, num_rows)
                    source = x[start:end]
                    if direct:
                        z = grad[start:end]
                    else:
                        if scratch is None:
                            scratch = torch.empty((min(step, num_rows), num_classes), dtype=dtype, device=x.device)
                        z = scratch[: end - start]
                    if source.dtype != dtype:
                        # The chunk's fp32 copy; softmax has no fp32 output for half input on CPU.
                        source = z.copy_(source)
                    chunk = {name: value[start:end] for name, value in rows.items()}
                    losses[start:end] = chunk_fn(
                        source, z, **chunk, b=b, w=class_weight, scale=scale, need_grad=need_grad
                    )
                    if need_grad and not direct:
                        grad[start:end].copy_(z)

        _run_chunks(range(0, num_rows, step), work, x.device)

        ctx.grad = grad
        ctx.reduction = reduction
        ctx.input_shape = input.shape
        if reduction == "none":
            return losses.reshape(input.shape[:-1])
        total = losses.sum()
        return total if reduction == "sum" else total * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError(
                "the fused loss's gradient was already used by a backward pass; pass retain_graph=True to the first "
                "one to call backward twice"
            )
        # The stored gradient is handed over (scaled in place) unless the graph is kept for another backward pass,
        # where it must stay intact, at the cost of a new tensor.
        keep = _keep_graph()
        if not keep:
            ctx.grad = None
        scale = grad_output.reshape(-1, 1) if ctx.reduction == "none" else grad_output
        # One host read here (not in the loop) saves a full pass over the gradient in the usual case, a scalar 1.
        if ctx.reduction == "none" or not bool(grad_output == 1):
            grad = grad * scale if keep else grad.mul_(scale)
        return (grad.view(ctx.input_shape),) + (None,) * 11


def _keep_graph() -> bool:
    """Whether the running backward pass keeps the graph (``retain_graph=True``, e.g. in gradcheck)."""
    # A private accessor; a torch without it gets the fast path: the gradient over, and a second backward pass raises.
    getter = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return bool(getter()) if getter is not None else False


def _index_rows(y, w, ignore_index, num_classes, a, b, weight_mode, dtype):
    """Per-row factors for class indices: ``u = g * one_hot(y) + b * r * v`` with ``U = sum_c u_c = total``.

    ``v`` is the weight vector in weight_mode="torch" (``r`` is then the 0/1 validity) and 1 otherwise (``r`` then
    carries ``w_y``); ignored rows have ``g = r = total = 0``.
    """
    valid = y != ignore_index
    y = y.where(valid, 0)
    r = valid.to(dtype)
    if w is not None:
        w_y = w[y] * r
        if weight_mode == "torch":
            return {"y": y[:, None], "valid": valid, "g": a * w_y, "r": r, "total": a * w_y + b * w.sum() * r}
        r = w_y
    return {"y": y[:, None], "valid": valid, "g": a * r, "r": r, "total": (a + b * num_classes) * r}


def _probability_rows(t, w, a, b, weight_mode, dtype):
    """Per-row factors for probabilities: ``u = alpha * t * v + beta * v`` with ``U = sum_c u_c = total``.

    ``v`` is the weight vector in weight_mode="torch" and 1 otherwise (example mode puts ``r = w . t`` into
    ``alpha`` and ``beta``); rows summing to 0 get all-zero factors.
    """
    num_classes = t.shape[-1]
    mass = t.sum(-1, dtype=dtype)
    alpha = torch.full_like(mass, a)
    if w is None:
        return {"t": t, "alpha": alpha, "beta": b * mass, "total": (a + b * num_classes) * mass}
    # One extra pass over the targets; probability targets are as large as the logits anyway.
    r = t.to(dtype) @ w
    if weight_mode == "torch":
        return {"t": t, "alpha": alpha, "beta": b * mass, "total": a * r + b * w.sum() * mass}
    return {"t": t, "alpha": a * r, "beta": b * mass * r, "total": (a + b * num_classes) * mass * r}


def _index_chunk(x, z, y, valid, g, r, total, b, w, scale, need_grad):
    """Losses of the rows of the chunk ``x``; ``z`` (which may be ``x`` itself) receives the gradient of their sum
    times ``scale`` (or is scratch when no gradient is needed)."""
    linear = g * x.gather(1, y).squeeze(1)
    if b:
        linear += b * r * (x.sum(1, dtype=z.dtype) if w is None else x @ w)
    lse = _softmax_into(x, z)
    # Ignored rows cost 0 whatever their logits (inf or NaN included), as in the reference path.
    loss = torch.where(valid, total * lse - linear, 0)
    if need_grad:
        if scale is not None:
            g, r, total = g * scale, r * scale, total * scale
        if b and w is None:
            torch.addcmul((-b * r)[:, None], z, total[:, None], out=z)
        else:
            z.mul_(total[:, None])
            if b:
                z.addcmul_(r[:, None], w, value=-b)
        z.scatter_add_(1, y, -g[:, None])
    return loss


def _probability_chunk(x, z, t, alpha, beta, total, b, w, scale, need_grad):
    """`_index_chunk` for probability targets (``t`` is the chunk's targets)."""
    t = t.to(z.dtype)
    if w is not None:
        t = t * w
    linear = alpha * (t * x).sum(1) + beta * (x.sum(1, dtype=z.dtype) if w is None else x @ w)
    lse = _softmax_into(x, z)
    loss = total * lse - linear
    if need_grad:
        if scale is not None:
            alpha, beta, total = alpha * scale, beta * scale, total * scale
        z.mul_(total[:, None])
        z.addcmul_(t, alpha[:, None], value=-1)
        if w is None:
            z.sub_(beta[:, None])
        else:
            z.addcmul_(beta[:, None], w, value=-1)
    return loss


def _softmax_into(x: Tensor, z: Tensor) -> Tensor:
    """Writes ``softmax(x)`` into ``z`` (which may be ``x``) and returns the rows' log-sum-exp.

    PyTorch's softmax kernel computes max, exp and sum row by row while the row is in cache. On CPU its output
    may alias its input: each element is read before it is written (tests/test_fused.py checks this). Elsewhere,
    where that is unchecked, an aliased call goes through a chunk-sized temporary.
    """
    top, where = x.max(1, keepdim=True)
    if x.device.type == "cpu" or not z.is_set_to(x):
        torch.softmax(x, 1, out=z)
    else:
        z.copy_(torch.softmax(x, 1))
    return (top - z.gather(1, where).log()).squeeze(1).to(z.dtype)


def _run_chunks(starts: range, work, device: torch.device) -> None:
    """Calls ``work(iterable of chunk starts)`` on as many threads as PyTorch uses (CPU), sharing the chunks out."""
    workers = min(torch.get_num_threads(), len(starts)) if device.type == "cpu" else 1
    if workers <= 1:
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


_HUGE_PAGE = 2 << 20


def _empty_gradient(x: Tensor) -> Tensor:
    """``torch.empty_like(x)``, backed by transparent huge pages on Linux CPUs where the kernel allows it.

    Every fresh 4 KiB page costs a page fault when first written; 2 MiB pages need 512x fewer. Only this buffer,
    which the loss itself allocates, is advised.
    """
    grad = torch.empty_like(x, memory_format=torch.contiguous_format)
    nbytes = grad.numel() * grad.element_size()
    if grad.device.type == "cpu" and nbytes >= 4 * _HUGE_PAGE and _madvise() is not None:
        first = -(-grad.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        last = (grad.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        _madvise()(first, last - first, 14)  # MADV_HUGEPAGE; a refusal only leaves the default pages
    return grad


def _madvise():
    if not hasattr(_madvise, "function"):
        _madvise.function = None
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                _madvise.function = libc.madvise
            except (OSError, AttributeError):
                pass
    return _madvise.function
