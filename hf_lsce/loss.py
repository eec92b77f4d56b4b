"""Class-weighted, label-smoothed cross-entropy: the one implementation of the loss.

Notation used throughout (K classes, logits ``x`` of one position, ``logp = log_softmax(x)``):

* ``smoothing_style="uniform"``: target distribution ``q = (1 - eps) * one_hot(y) + eps / K``
  (PyTorch, Transformers' ``LabelSmoother``, Szegedy et al. 2016).
* ``smoothing_style="off_target"``: ``q_y = 1 - eps`` and ``q_c = eps / (K - 1)`` for every ``c != y``
  (fairseq, the seed notebook). It is exactly ``uniform`` with ``eps * K / (K - 1)``, which is how it is computed.

Both are ``q = a * one_hot(y) + b`` with ``a = 1 - eps'`` and ``b = eps' / K``, so the per-position loss
``-sum_c v_c q_c logp_c`` needs only ``logp_y`` and one reduction over the classes; no ``(..., K)`` target is built.
``v_c`` is the class weight ``w_c`` (``weight_mode="torch"``) or the true class's weight ``w_y`` for every ``c``
(``weight_mode="example"``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hf_lsce.checks import (
    IGNORE_INDEX,
    IMPLEMENTATIONS,
    WEIGHT_MODES,
    check_choice,
    check_device,
    check_labels,
    check_loss_options,
    check_normalizer,
    check_target_values,
    check_weight_tensor,
    describe,
    functorch_transforms_active,
    vmap_active,
)
from hf_lsce.fused import FUSED_MIN_CLASSES, FusedOptions, fused_cross_entropy


def _check_implementation(implementation: str, inplace_backward: bool) -> None:
    check_choice("implementation", implementation, IMPLEMENTATIONS)
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    if inplace_backward and implementation == "reference":
        raise ValueError(
            "inplace_backward=True needs implementation='fused' or 'auto' (which then uses the fused path), "
            "got implementation='reference'"
        )


def _use_fused(implementation: str, input: Tensor, target: Tensor, weight, normalizer, inplace_backward) -> bool:
    if implementation != "auto":
        return implementation == "fused"
    if functorch_transforms_active():
        return False  # torch.func.grad, vmap, ...: the reference path is made of operations they know
    # Measured, and so chosen by default, on CPU only (no GPU was available to this project); "fused" works anywhere.
    if input.shape[-1] < FUSED_MIN_CLASSES or not (input.is_cpu or inplace_backward):
        return False
    # The fused path gives no gradient to the target, the weights or the normalizer.
    return not (target.requires_grad or any(isinstance(t, Tensor) and t.requires_grad for t in (weight, normalizer)))


def smoothing_coefficients(num_classes: int, label_smoothing: float, smoothing_style: str) -> tuple[float, float]:
    """Returns ``(a, b)`` with the smoothed target ``q = a * one_hot(y) + b`` (``b`` on every class) for ``eps`` in
    either style (`label_smoothed_cross_entropy`)."""
    eps = float(label_smoothing)
    if smoothing_style == "off_target":
        eps = eps * num_classes / (num_classes - 1)
    return 1.0 - eps, eps / num_classes


def _compute_dtype(input: Tensor) -> torch.dtype:
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def _check_tensors(input: Tensor, target: Tensor) -> None:
    """Raises on logits or targets of the wrong type or shape (values: `check_target_values`)."""
    if not isinstance(input, Tensor) or not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor of logits (..., K), got {describe(input)}")
    if input.dim() == 0:
        raise ValueError("input must have at least one dimension (the classes, last), got a 0-d tensor")
    num_classes = input.shape[-1]
    if num_classes < 2:
        raise ValueError(f"input must have at least 2 classes in its last dimension, got K={num_classes}")
    if not isinstance(target, Tensor) or target.dtype == torch.bool or target.is_complex():
        raise TypeError(
            "target must be an integer tensor of class indices or a floating-point tensor of probabilities, "
            f"got {describe(target)}"
        )
    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError(
                f"probability target must have the input's shape {tuple(input.shape)}, got {tuple(target.shape)}"
            )
    elif target.shape != input.shape[:-1]:
        raise ValueError(
            f"target must have shape {tuple(input.shape[:-1])} (input's shape without its last, class, dimension), "
            f"got {tuple(target.shape)}"
        )


def _kernel_cross_entropy(x: Tensor, y: Tensor, w: Tensor | None, ignore_index: int, **options) -> Tensor:
    """``F.cross_entropy`` on (N, K) logits, with its out-of-range label error (CPU) as our ValueError."""
    try:
        return F.cross_entropy(x, y, w, ignore_index=ignore_index, **options)
    except IndexError:
        check_labels(y, x.shape[-1], ignore_index, name="target")
        raise


def mean_denominator(
    target: Tensor, weight: Tensor | None = None, ignore_index: int = IGNORE_INDEX, *, weight_mode: str = "torch"
) -> Tensor:
    """What ``reduction="mean"`` divides by, as a 0-d float tensor.

    For class-index targets this is ``sum_i w[y_i]`` over the positions whose label is not ``ignore_index``
    (their count when ``weight`` is None), in both weight modes; it equals the denominator of
    ``F.cross_entropy(..., weight=weight, reduction="mean")``. For probability targets it is the number of rows
    with a positive sum in ``weight_mode="torch"`` (PyTorch divides by the batch size) and ``sum_i w . t_i`` in
    ``weight_mode="example"``. Summing it over micro-batches and processes gives the full-batch denominator to
    pass as ``normalizer``.

    Args:
        target (`torch.Tensor`): class indices ``(...)`` or probabilities ``(..., K)``.
        weight (`torch.Tensor`, *optional*): class weights ``(K,)``.
        ignore_index (`int`, *optional*, defaults to `-100`): label of positions that count nowhere.
        weight_mode (`str`, *optional*, defaults to `"torch"`): see `label_smoothed_cross_entropy`.
    """
    check_choice("weight_mode", weight_mode, WEIGHT_MODES)
    check_device("weight", weight, target.device, other="target")
    dtype = weight.dtype if weight is not None and weight.dtype == torch.float64 else torch.float32
    if target.is_floating_point():
        if weight is None or weight_mode == "torch":
            return (target.sum(-1) > 0).sum().to(dtype)
        return (target.to(dtype) @ weight.to(dtype)).sum()
    valid = target != ignore_index
    if weight is None:
        return valid.sum().to(dtype)
    return torch.where(valid, weight.to(dtype)[target.where(valid, 0)], 0).sum()


def label_smoothed_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    smoothing_style: str = "uniform",
    weight_mode: str = "torch",
    normalizer: float | Tensor | None = None,
    validate: bool = True,
    implementation: str = "auto",
    inplace_backward: bool = False,
) -> Tensor:
    """Label-smoothed, class-weighted cross-entropy over logits whose classes are in the last dimension.

    With ``smoothing_style="uniform"`` and ``weight_mode="torch"`` this equals
    ``F.cross_entropy(input.flatten(0, -2), target.flatten(), weight, ignore_index=ignore_index,
    reduction=reduction, label_smoothing=label_smoothing)`` (reshaped back for ``reduction="none"``), except that a
    batch whose positions are all ignored gives 0 with zero gradients instead of NaN.

    The per-position loss is ``-sum_c v_c q_c log_softmax(input)_c`` where ``q`` is the smoothed target:

    * ``"uniform"``: ``q = (1 - eps) * one_hot(y) + eps / K``;
    * ``"off_target"``: ``q_y = 1 - eps`` and ``eps / (K - 1)`` on each other class, i.e. ``"uniform"`` with
      ``eps * K / (K - 1)``;

    and ``v_c = weight[c]`` (``weight_mode="torch"``, PyTorch's semantics: the weights also re-shape the smoothing
    mass) or ``v_c = weight[y]`` (``weight_mode="example"``: the whole smoothed loss of a position is scaled by its
    true class's weight). ``reduction="mean"`` divides the sum by `mean_denominator`: ``sum_i weight[y_i]`` over
    non-ignored positions (their count without weights), for both modes.

    Logits in fp16/bf16 are computed in fp32 and the loss is fp32 (fp64 stays fp64); the input's gradient has the
    input's dtype. No ``(..., K)`` one-hot or smoothed target is built for class-index targets.

    Args:
        input (`torch.Tensor` of shape `(..., K)`): unnormalized logits, classes last (the Transformers layout).
        target (`torch.Tensor`): integer class indices of shape `(...)`, where ``ignore_index`` marks padding; or
            floating-point probabilities of shape `(..., K)`, where rows that sum to 0 are ignored (smoothing then
            mixes ``eps / K`` times the row's sum into each class, which is PyTorch's rule for rows summing to 1).
        weight (`torch.Tensor` of shape `(K,)`, *optional*): non-negative class weights.
        ignore_index (`int`, *optional*, defaults to `-100`): label that costs nothing and counts nowhere.
        reduction (`str`, *optional*, defaults to `"mean"`): ``"mean"``, ``"sum"`` or ``"none"`` (shape of the
            positions, 0 at ignored ones).
        label_smoothing (`float`, *optional*, defaults to `0.0`): ``eps`` in [0, 1].
        smoothing_style (`str`, *optional*, defaults to `"uniform"`): ``"uniform"`` or ``"off_target"``.
        weight_mode (`str`, *optional*, defaults to `"torch"`): ``"torch"`` or ``"example"``.
        normalizer (`float` or 0-d `torch.Tensor`, *optional*): with ``reduction="mean"``, divide the sum by this
            instead of `mean_denominator` (e.g. the denominator summed over an accumulation window and all
            processes). Must be > 0.
        validate (`bool`, *optional*, defaults to `True`): check label range, weight and normalizer values. These
            checks read tensor values, which synchronizes with the GPU; pass False in a hot loop once inputs are
            trusted. Inside `torch.func.vmap`, which cannot read values, they are skipped.
        implementation (`str`, *optional*, defaults to `"auto"`): ``"reference"``: the expression above, through
            PyTorch's own ``F.cross_entropy`` kernel where it computes this loss (class indices, ``weight_mode=
            "torch"`` or no weights; ``label_smoothing = b * K``; its own mean when that is finite).
            ``"fused"``: `hf_lsce.fused`, rows processed in small chunks that compute the loss and the gradient in
            one pass; extra memory is the gradient alone (on CPU kept for the next call's gradient until
            `hf_lsce.fused.empty_cache`), no fp32 copy of fp16/bf16 logits; no gradient for
            ``target``, ``weight`` or ``normalizer``; not under `torch.func` transforms (a ValueError). A backward
            pass with ``create_graph=True`` (e.g. a gradient penalty) recomputes its gradient with differentiable
            operations, so higher-order gradients are exact (that backward pass then costs the reference path's
            memory). ``"auto"``: fused for logits with at least ``hf_lsce.fused.FUSED_MIN_CLASSES`` classes on CPU
            (with ``inplace_backward=True``, on any device) when only ``input`` requires grad and no `torch.func`
            transform (``grad``, ``vmap``, ...) is running. The fused path is plain PyTorch and runs on any
            device, but it was measured and tested on CPU only; on GPUs ``"auto"`` keeps the reference path unless
            asked. Both give the same values up to floating-point rounding.
        inplace_backward (`bool`, *optional*, defaults to `False`): fused path only: write the input's gradient
            into the input's own buffer during the forward pass, so the loss needs no extra memory of the logits'
            size. **The logits tensor is overwritten and must not be used afterwards** (nor be saved for backward
            by the operation that produced it: autograd then raises). Logits are only overwritten when a gradient
            is needed and the fused path runs (with ``"auto"``, from ``FUSED_MIN_CLASSES`` classes).

    Returns:
        `torch.Tensor`: 0-d for ``"mean"`` and ``"sum"``, the positions' shape for ``"none"``; fp32 (fp64 for fp64
        input).
    """
    check_loss_options(label_smoothing, reduction, smoothing_style, weight_mode, ignore_index)
    _check_tensors(input, target)
    # Under torch.func.vmap no value can be read: the value checks are skipped, as with validate=False.
    readable = not vmap_active()
    validate = validate and readable
    check_device("weight", weight, input.device)
    check_device("normalizer", normalizer, input.device)
    check_weight_tensor("weight", weight, input.shape[-1], validate=validate)
    check_normalizer(normalizer, reduction, validate)
    _check_implementation(implementation, inplace_backward)

    if not target.is_floating_point() and target.dtype != torch.int64:
        target = target.long()  # the index type of PyTorch's kernels; lossless for every integer dtype
    a, b = smoothing_coefficients(input.shape[-1], label_smoothing, smoothing_style)
    # On CPU a host read synchronizes nothing, so reads that spare work are made even with validate=False.
    read_values = readable and (validate or input.device.type == "cpu")
    options = _Options(ignore_index, reduction, a, b, weight_mode, normalizer, validate, read_values)
    if _use_fused(implementation, input, target, weight, normalizer, inplace_backward):
        return _fused_loss(input, target, weight, options, inplace_backward)
    # PyTorch's own kernel computes exactly this loss (one log-softmax, no per-class products) for class indices
    # with its weight semantics: smoothing (a, b) is its label_smoothing b * K (off_target included).
    if not target.is_floating_point() and (weight is None or weight_mode == "torch") and a >= 0:
        return _kernel_loss(input, target, weight, options)
    return _expression_loss(input, target, weight, options)


class _Options(NamedTuple):
    """The validated options every path takes; ``q = a * one_hot(y) + b`` is the smoothed target."""

    ignore_index: int
    reduction: str
    a: float
    b: float
    weight_mode: str
    normalizer: float | Tensor | None
    validate: bool  # value checks
    read_values: bool  # host reads that spare work: with validate, or on CPU (where they synchronize nothing)


def _fused_loss(input: Tensor, target: Tensor, weight: Tensor | None, options: _Options, inplace: bool) -> Tensor:
    """`hf_lsce.fused`: loss and gradient in one pass over chunks of rows."""
    if options.validate:
        check_target_values(target, input.shape[-1], options.ignore_index)
    fused_options = FusedOptions(
        options.ignore_index, options.reduction, options.a, options.b, options.weight_mode, inplace
    )
    return fused_cross_entropy(input, target, weight, _denominator(input, target, weight, options), fused_options)


def _kernel_loss(input: Tensor, target: Tensor, weight: Tensor | None, options: _Options) -> Tensor:
    """PyTorch's ``F.cross_entropy`` kernel, for class indices with its weight semantics (``weight_mode="torch"``
    or no weights) and a smoothing it can express (``a >= 0``: its ``label_smoothing`` is ``b * K``)."""
    num_classes = input.shape[-1]
    # On CPU the kernel rejects bad labels itself (its error is translated): no separate pass over them.
    if options.validate and not input.is_cpu:
        check_target_values(target, num_classes, options.ignore_index)
    dtype = _compute_dtype(input)
    w = None if weight is None else weight.to(dtype)
    # Skipping no-op reshapes and casts matters at small sizes: each is a node in the autograd graph.
    x = input if input.dim() == 2 else input.reshape(-1, num_classes)
    x = x if x.dtype == dtype else x.to(dtype)
    y = target if target.dim() == 1 else target.reshape(-1)
    x = _without_ignored_logits(x, y, options.ignore_index, options.read_values)
    smoothing = min(options.b * num_classes, 1.0)
    # PyTorch's "mean" divides by the same sum_i w[y_i]; it differs only where that is 0, and then it is not finite
    # (a host read, hence only with validate).
    if options.reduction == "mean" and options.normalizer is None and options.validate:
        loss = _kernel_cross_entropy(x, y, w, options.ignore_index, reduction="mean", label_smoothing=smoothing)
        if math.isfinite(loss.item()):
            return loss
        # Nothing counts (0 / 0), or the logits are not finite; the rule below gives 0 for the former.
    reduction = "none" if options.reduction == "none" else "sum"
    losses = _kernel_cross_entropy(x, y, w, options.ignore_index, reduction=reduction, label_smoothing=smoothing)
    if options.reduction == "none":
        return losses.reshape(target.shape)
    return losses if options.reduction == "sum" else safe_divide(losses, _denominator(input, target, weight, options))


def _expression_loss(input: Tensor, target: Tensor, weight: Tensor | None, options: _Options) -> Tensor:
    """The general expression ``-sum_c v_c q_c log_softmax(input)_c`` (module docstring), in PyTorch operations."""
    num_classes = input.shape[-1]
    if options.validate:
        check_target_values(target, num_classes, options.ignore_index)
    a, b = options.a, options.b
    dtype = _compute_dtype(input)
    w = None if weight is None else weight.to(dtype)
    x = input.reshape(-1, num_classes).to(dtype)
    if target.is_floating_point():
        logp = F.log_softmax(x, dim=-1)
        t = target.reshape(-1, num_classes).to(dtype)
        q = a * t + b * t.sum(-1, keepdim=True)
        if w is None:
            losses = -(q * logp).sum(-1)
        elif options.weight_mode == "torch":
            losses = -(q * logp) @ w
        else:
            losses = -(t @ w) * (q * logp).sum(-1)
        positions = input.shape[:-1]
    else:
        y = target.reshape(-1)
        logp = F.log_softmax(_without_ignored_logits(x, y, options.ignore_index, options.read_values), dim=-1)
        valid = y != options.ignore_index
        y = y.where(valid, 0)
        logp_y = logp.gather(1, y[:, None]).squeeze(1)
        if w is None:
            losses = -(a * logp_y + b * logp.sum(-1))
        else:
            w_y = w[y]
            smooth = logp @ w if options.weight_mode == "torch" else w_y * logp.sum(-1)
            losses = -(a * w_y * logp_y + b * smooth)
        losses = torch.where(valid, losses, 0)
        positions = target.shape

    if options.reduction == "none":
        return losses.reshape(positions)
    total = losses.sum()
    return total if options.reduction == "sum" else safe_divide(total, _denominator(input, target, weight, options))


def _denominator(input: Tensor, target: Tensor, weight: Tensor | None, options: _Options) -> Tensor | None:
    """What ``reduction="mean"`` divides the sum by: ``normalizer`` or `mean_denominator` (None for the others)."""
    if options.reduction != "mean":
        return None
    value = options.normalizer
    if value is None:
        value = mean_denominator(target, weight, options.ignore_index, weight_mode=options.weight_mode)
    return torch.as_tensor(value, dtype=_compute_dtype(input), device=input.device)


def _without_ignored_logits(x: Tensor, y: Tensor, ignore_index: int, read_values: bool) -> Tensor:
    """``x`` (N, K) with the rows whose label is ``ignore_index`` set to 0, so that their gradient is exactly 0.

    log_softmax's backward is ``g - softmax * sum(g)``: NaN in a row that holds a NaN or +inf logit even where the
    incoming gradient ``g`` is 0. With ``read_values`` the rows are replaced only when some logit is not finite (one
    reduction and a host read; the usual, finite case then adds no operation to the graph).
    """
    if read_values and math.isfinite(x.sum().item()):
        return x
    return torch.where((y != ignore_index)[:, None], x, 0)


def safe_divide(total: Tensor, denominator: Tensor) -> Tensor:
    """``total / denominator``, or 0 with zero gradients when nothing counts (PyTorch returns NaN there)."""
    positive = denominator > 0
    return torch.where(positive, total / torch.where(positive, denominator, 1), 0)


class LabelSmoothedCrossEntropyLoss(nn.Module):
    """Module form of `label_smoothed_cross_entropy`; it validates its arguments and calls the function.

    ``weight`` is a buffer: it moves with ``.to()`` and is saved in ``state_dict``. With the defaults this is
    ``nn.CrossEntropyLoss(weight, ignore_index=..., label_smoothing=...)`` for logits with classes last.

    Args:
        weight (`torch.Tensor` of shape `(K,)`, *optional*): non-negative class weights.
        ignore_index (`int`, *optional*, defaults to `-100`): label that costs nothing and counts nowhere.
        reduction (`str`, *optional*, defaults to `"mean"`): ``"mean"``, ``"sum"`` or ``"none"``.
        label_smoothing (`float`, *optional*, defaults to `0.0`): ``eps`` in [0, 1].
        smoothing_style (`str`, *optional*, defaults to `"uniform"`): ``"uniform"`` or ``"off_target"``.
        weight_mode (`str`, *optional*, defaults to `"torch"`): ``"torch"`` or ``"example"``.
        validate (`bool`, *optional*, defaults to `True`): value checks that synchronize with the GPU.
        implementation (`str`, *optional*, defaults to `"auto"`): ``"auto"``, ``"reference"`` or ``"fused"``.
        inplace_backward (`bool`, *optional*, defaults to `False`): fused path only; the logits passed to
            ``forward`` are overwritten by their gradient and must not be used afterwards.
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        smoothing_style: str = "uniform",
        weight_mode: str = "torch",
        validate: bool = True,
        implementation: str = "auto",
        inplace_backward: bool = False,
    ) -> None:
        super().__init__()
        check_loss_options(label_smoothing, reduction, smoothing_style, weight_mode, ignore_index)
        _check_implementation(implementation, inplace_backward)
        check_weight_tensor("weight", weight, None, validate=True)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.smoothing_style = smoothing_style
        self.weight_mode = weight_mode
        self.validate = validate
        self.implementation = implementation
        self.inplace_backward = inplace_backward

    def forward(self, input: Tensor, target: Tensor, *, normalizer: float | Tensor | None = None) -> Tensor:
        return label_smoothed_cross_entropy(
            input,
            target,
            self.weight,
            self.ignore_index,
            self.reduction,
            self.label_smoothing,
            smoothing_style=self.smoothing_style,
            weight_mode=self.weight_mode,
            normalizer=normalizer,
            validate=self.validate,
            implementation=self.implementation,
            inplace_backward=self.inplace_backward,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, "
            f"smoothing_style={self.smoothing_style!r}, weight_mode={self.weight_mode!r}"
        )
