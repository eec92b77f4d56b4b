"""Fused, memory-lean path of `label_smoothed_cross_entropy` for large class counts (vocabularies).

The reference path materializes ``log_softmax(input)`` in fp32 and autograd keeps it (and more) for the backward
pass: about 3x the logits' size in extra memory, and most of the time goes to page faults on that fresh memory and
to ``exp``. Here the rows are processed in chunks of about `DEFAULT_CHUNK_BYTES`; one pass over each chunk, in fp32
(fp64 for fp64 logits), gives the log-sum-exp, the loss terms and the gradient, which is kept for the backward
pass. With ``z = x - max(x)``, ``s = sum_c exp(z_c)``, ``p = exp(z) / s`` and the per-class factors
``u_c = v_c q_c`` of the module docstring of `hf_lsce.loss` (``U = sum_c u_c``):

    loss = -sum_c u_c (z_c - log s) = U log s - sum_c u_c z_c        d loss / dx = U p - u

For class-index targets ``u = v * (a one_hot(y) + b)`` has a closed form, so a chunk needs only ``z_y`` and one
sum (or one product with the weights) over the classes. Chunks stay small enough to be reused by the allocator
(no new page faults, and they live in cache between the few passes over them); the only full-size tensor is the
gradient, in the logits' dtype, or none at all with ``inplace_backward=True``, which writes the gradient into the
logits' own buffer. The backward pass only scales the stored gradient by the incoming one (and skips that when it
is 1, the usual case of ``loss.backward()``).
"""

from __future__ import annotations

import torch
from torch import Tensor

# One chunk of fp32 rows. Measured on the 2-core EPYC of this project (2 MiB L2 per core, benchmarks/): 256 KiB to
# 2 MiB are within noise of each other; larger chunks start to miss the cache, much smaller ones pay per-op overhead.
DEFAULT_CHUNK_BYTES = 1 << 20

# Below this many classes `implementation="auto"` keeps the reference path (see benchmarks/bench_loss.py).
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
    return _FusedCrossEntropy.apply(
        input, target, weight, denominator, ignore_index, reduction, a, b, weight_mode, inplace_backward, chunk_bytes
    )


class _FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, input, target, weight, denominator, ignore_index, reduction, a, b, weight_mode, inplace, chunk_bytes
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

        x = input.reshape(-1, num_classes)
        need_grad = ctx.needs_input_grad[0]
        step = max(1, (chunk_bytes or DEFAULT_CHUNK_BYTES) // (num_classes * dtype.itemsize))
        # fp32 (fp64) logits are computed where the gradient goes; others through one reused chunk-sized buffer,
        # so no full-size copy of bf16/fp16 logits is ever made.
        direct = need_grad and x.dtype == dtype
        grad = None
        if need_grad:
            grad = x if inplace else torch.empty_like(x, memory_format=torch.contiguous_format)
        scratch = None if direct else torch.empty((min(step, x.shape[0]), num_classes), dtype=dtype, device=x.device)
        losses = torch.empty(x.shape[0], dtype=dtype, device=x.device)
        for start in range(0, x.shape[0], step):
            end = min(start + step, x.shape[0])
            z = grad[start:end] if direct else scratch[: end - start]
            if not (direct and inplace):
                z.copy_(x[start:end])
            chunk = {name: value[start:end] for name, value in rows.items()}
            losses[start:end] = chunk_fn(z, **chunk, b=b, w=class_weight, scale=scale, need_grad=need_grad)
            if need_grad and not direct:
                grad[start:end].copy_(z)

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
        return (grad.view(ctx.input_shape),) + (None,) * 10


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


def _index_chunk(z, y, valid, g, r, total, b, w, scale, need_grad):
    """Loss of each row of the chunk ``z`` (logits, overwritten by the gradient times ``scale`` if needed)."""
    z.sub_(z.amax(1, keepdim=True))
    linear = g * z.gather(1, y).squeeze(1)
    if b:
        linear += b * r * (z.sum(1) if w is None else z @ w)
    z.exp_()
    sum_exp = z.sum(1)
    # Ignored rows cost 0 whatever their logits (inf or NaN included), as in the reference path.
    loss = torch.where(valid, total * sum_exp.log() - linear, 0)
    if need_grad:
        if scale is not None:
            g, r, total = g * scale, r * scale, total * scale
        z.mul_((total / sum_exp)[:, None])
        if b and w is None:
            z.sub_((b * r)[:, None])
        elif b:
            z.addcmul_(r[:, None], w, value=-b)
        z.scatter_add_(1, y, -g[:, None])
    return loss


def _probability_chunk(z, t, alpha, beta, total, b, w, scale, need_grad):
    """`_index_chunk` for probability targets (``t`` is the chunk's targets)."""
    t = t.to(z.dtype)
    if w is not None:
        t = t * w
    z.sub_(z.amax(1, keepdim=True))
    linear = alpha * (t * z).sum(1) + beta * (z.sum(1) if w is None else z @ w)
    z.exp_()
    sum_exp = z.sum(1)
    loss = total * sum_exp.log() - linear
    if need_grad:
        if scale is not None:
            alpha, beta, total = alpha * scale, beta * scale, total * scale
        z.mul_((total / sum_exp)[:, None])
        z.addcmul_(t, alpha[:, None], value=-1)
        if w is None:
            z.sub_(beta[:, None])
        else:
            z.addcmul_(beta[:, None], w, value=-1)
    return loss
