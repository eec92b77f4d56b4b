"""Label-smoothed cross-entropy of a linear output head, without the (tokens, vocabulary) logits.

For a language model the logits ``z = hidden @ head_weight.T (+ head_bias)`` (tokens N x vocabulary V) are the
largest tensor of a training step. `linear_label_smoothed_cross_entropy` takes the hidden states and the head's
parameters instead and computes `hf_lsce.loss.label_smoothed_cross_entropy` of those logits (every option: both
smoothing conventions, class weights in both modes, the normalizer, ``ignore_index``) on tiles of logits whose size
is bounded in bytes, so that no tensor of shape (N, V) ever exists.

The math is that of `hf_lsce.fused`: with the per-row factors ``u = v * q`` of the smoothed target (``U = sum_c u_c``),
``p = softmax(z)`` and ``lse = logsumexp(z)``, ``loss = U lse - sum_c u_c z_c`` and ``d loss / dz = U p - u``. The
logits may first be scaled and soft-capped, in this order, ``z -> cap * tanh(z * scale / cap)``, whose derivative
``scale * (1 - tanh^2)`` multiplies the gradient. The gradient ``G`` of the tile's logits then gives
``grad_hidden = G @ head_weight``, ``grad_head_weight = G.T @ hidden`` and ``grad_head_bias = sum_rows G``.

Two ways to order the work, both exact (``recompute``):

* Gradients in the forward pass (Liger Kernel's idea; ``recompute=False``): chunks of rows with the whole vocabulary.
  A chunk's softmax is complete, so its gradient is known at once and goes straight into the three matrix products:
  three products in all, as for the logits path. The head's gradient accumulates over the chunks: in its own memory
  for fp32/fp64 heads, in an fp32 buffer of the head's size for bf16/fp16 heads. The backward pass only scales the
  stored gradients by the incoming scalar, hence ``reduction="none"`` (a gradient per position) cannot use it.
* Recomputation in the backward pass (Cut Cross-Entropy's idea; ``recompute=True``): tiles of a block of the
  vocabulary by all counted rows, blocks outermost. The forward pass joins each block's log-sum-exp to the row's
  running one and keeps one per row; the backward pass computes each tile's logits again, so each block of the head's
  gradient is finished by one product over all rows (no accumulator of the head's size) and only the hidden states'
  gradient accumulates, in fp32, for the counted rows. Four products in all. A tile is the head's product in the
  inputs' dtype; the fp32 work on it goes in chunks of rows small enough to stay in cache (those of `hf_lsce.fused`,
  on its thread pool), and the backward pass writes each chunk's gradient over the product, in the inputs' dtype,
  which then enters the two products. So a bf16 tile costs 2 bytes per logit, not 2 + 4.

Higher-order gradients: a backward pass with ``create_graph=True`` (a gradient penalty, double backward) does not
use the tiles' gradients, constants to autograd, but recomputes the three gradients from the saved inputs with
differentiable PyTorch operations (`_gradient_graph`), in either order; this materializes the counted rows' logits,
as the logits path would. `torch.func` transforms (``grad``, ``vmap``, ...) cannot run the autograd function: under
them the loss is computed from materialized logits by `hf_lsce.loss.label_smoothed_cross_entropy`'s reference path.

Rows whose label is ``ignore_index`` are left out of every product (their loss and gradient are 0 whatever their
hidden state). Logits, softmax and loss are computed in fp32 (fp64 for fp64 inputs); the matrix products run in the
inputs' dtype, as the model's own head does (on CPU a bf16 product accumulates in fp32 and rounds its result once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hf_lsce.fused
from hf_lsce.checks import (
    IGNORE_INDEX,
    check_device,
    check_loss_options,
    check_normalizer,
    check_number,
    check_target_values,
    check_weight_tensor,
    describe,
    functorch_transforms_active,
    vmap_active,
)
from hf_lsce.fused import (
    ChunkBuffers,
    GradientFactors,
    RowTerms,
    index_terms,
    keep_graph,
    process_chunk,
    run_row_chunks,
    smoothed_gradient,
)
from hf_lsce.loss import label_smoothed_cross_entropy, mean_denominator, safe_divide, smoothing_coefficients

# recompute=False: a tile's buffers (fp32 logits, their bf16/fp16 product, the soft-cap's derivative) are as large as
# this many rows of fp32 logits, 128 MiB at V = 131072, whatever the number of tokens. bf16 in tiles of 128 rows'
# worth instead of 256 took 1.6x the time in bench_linear (its fp32 accumulator of the head's gradient, 0.5x the bf16
# logits at N = 4096, is most of its memory anyway).
# The matrix products need a few hundred rows to run at speed: on the project's 2-core VM (MKL), hidden @ W.T for
# 1024 rows, D = 1024, V = 32768, fp32, in tiles of 64 / 128 / 256 / 512 / 1024 rows took 4.2 / 2.9 / 2.5 / 2.2 /
# 2.0 s (ad-hoc runs, medians of 3), and the forward-pass order with 64-row tiles was 1.4x eager PyTorch's time.
DEFAULT_CHUNK_ROWS = 256

# recompute=True: a tile, the head's product in the inputs' dtype, is as large as this many rows of it, ...
# bf16, N = 4096, D = 1024, 10 % ignored, against 256 rows (ad-hoc runs on the 2-core VM, medians of 3-7 interleaved
# rounds): V = 32768 0.83 / 0.80 s and 0.14x / 0.20x the logits in extra memory.
DEFAULT_BLOCK_ROWS = 192

# ... and at most this many bytes: at large V narrower blocks are faster, or as fast with less memory. Same runs,
# V = 131072, medians of 4 rounds: bf16 tiles of 48 (192 rows) / 32 / 24 / 16 / 12 MiB took 3.39 / 3.35 / 3.11 /
# 3.12 / 3.16 s with 0.079x / 0.069x / 0.066x / 0.050x / 0.035x the logits in extra memory; after the bf16 head
# gradient's products changed (`_recompute_tiles`), 24 / 16 / 12 MiB 2.63 / 2.59 / 2.59 s with 0.069x / 0.063x /
# 0.064x. fp32 tiles of 96 (192 rows) / 48 / 24 MiB took 13.0 s each, with 0.059x / 0.030x / 0.021x; at V = 32768,
# 24 (192 rows) / 16 / 12 MiB 3.22 / 3.24 / 3.46 s.
DEFAULT_BLOCK_BYTES = 16 << 20

# Whatever the two above allow, a tile holds all counted rows by blocks of this many columns (or V / 16 if fewer):
# every block is one more pass over the hidden states' fp32 gradient sum (counted rows x D), so with many rows the
# blocks must not narrow. This widening keeps a tile within 1/16 of the logits. bf16, D = 1024, V = 131072, 10 %
# ignored (ad hoc, one tile unless said): N = 16384 tiles of 16 MiB (545 columns) / 30 MiB (1024) / 48 MiB (1638)
# took 14.8 / 10.9 / 11.9 s; N = 65536 48 MiB (409 columns) / 118 MiB (1024) 64 / 50 s, and 16 MiB (256 columns by
# 2 row tiles) 94 s.
WIDE_BLOCK_COLUMNS = 1024

# Blocks of the vocabulary (recompute=True) are at least this wide: narrower ones make the matrix products slow.
MIN_BLOCK_COLUMNS = 256


def linear_label_smoothed_cross_entropy(
    hidden: Tensor,
    head_weight: Tensor,
    target: Tensor,
    head_bias: Tensor | None = None,
    class_weight: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    smoothing_style: str = "uniform",
    weight_mode: str = "torch",
    normalizer: float | Tensor | None = None,
    validate: bool = True,
    logit_softcap: float | None = None,
    logit_scale: float | None = None,
    chunk_bytes: int | None = None,
    recompute: bool | None = None,
) -> Tensor:
    """Label-smoothed, class-weighted cross-entropy of a linear head's logits, computed without the logits.

    This equals ``label_smoothed_cross_entropy(z, target, class_weight, ignore_index, reduction, label_smoothing,
    smoothing_style=..., weight_mode=..., normalizer=...)`` with ``z = F.linear(hidden, head_weight, head_bias)``,
    then ``z = z * logit_scale`` if given, then ``z = logit_softcap * tanh(z / logit_softcap)`` if given; with the
    defaults it is ``F.cross_entropy(F.linear(hidden, head_weight, head_bias).flatten(0, -2), target.flatten(),
    class_weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)``, except that a
    batch whose positions are all ignored gives 0 instead of NaN. ``reduction="mean"`` divides the sum by
    ``sum_i class_weight[target_i]`` over the positions whose label is not ``ignore_index`` (their count without
    weights), or by ``normalizer``.

    No tensor of shape (tokens, vocabulary) is made: the logits are computed in tiles of about ``chunk_bytes`` bytes
    (see the module docstring), and gradients go to ``hidden``, ``head_weight`` and ``head_bias`` (those that require
    grad; a head tied to the input embeddings gets this gradient added to the embedding's by autograd). Logits,
    softmax and loss are computed in fp32 (fp64 for fp64 inputs); the matrix products run in the inputs' dtype, as in
    the model's own head, and a bf16/fp16 head's gradient is accumulated in fp32. The loss is fp32 (fp64); the
    gradients have their inputs' dtypes. Higher-order gradients are exact: a backward pass with ``create_graph=True``
    and `torch.func` transforms (``grad``, ``vmap``, ...) compute from materialized logits (see the module docstring),
    so only first-order training is free of the (tokens, vocabulary) tensor.

    Transformers applies either a scale (Cohere: ``logits * logit_scale``; Granite: ``logits / logits_scaling``,
    i.e. ``logit_scale = 1 / logits_scaling``) or a soft cap (Gemma 2 and 3: ``final_logit_softcapping``) to the
    head's output; no model family there applies both, and here the scale comes first so that the cap bounds the
    final logits.

    Args:
        hidden (`torch.Tensor` of shape `(..., D)`): the hidden states that enter the head.
        head_weight (`torch.Tensor` of shape `(V, D)`): the head's weight (``lm_head.weight``), same dtype and device
            as ``hidden``.
        target (`torch.Tensor` of shape `(...)`): integer class indices (``hidden``'s shape without its last
            dimension), where ``ignore_index`` marks padding. Probability targets are refused: a (tokens, vocabulary)
            target is the very tensor this function avoids; use `hf_lsce.label_smoothed_cross_entropy` on logits.
        head_bias (`torch.Tensor` of shape `(V,)`, *optional*): the head's bias.
        class_weight (`torch.Tensor` of shape `(V,)`, *optional*): non-negative class weights (``weight`` of
            `hf_lsce.label_smoothed_cross_entropy`); they get no gradient.
        ignore_index (`int`, *optional*, defaults to `-100`): label that costs nothing and counts nowhere.
        reduction (`str`, *optional*, defaults to `"mean"`): ``"mean"``, ``"sum"`` or ``"none"`` (the positions'
            shape, 0 at ignored ones).
        label_smoothing (`float`, *optional*, defaults to `0.0`): ``eps`` in [0, 1].
        smoothing_style (`str`, *optional*, defaults to `"uniform"`): ``"uniform"`` or ``"off_target"``.
        weight_mode (`str`, *optional*, defaults to `"torch"`): ``"torch"`` or ``"example"``.
        normalizer (`float` or 0-d `torch.Tensor`, *optional*): with ``reduction="mean"``, divide the sum by this
            instead (e.g. the denominator summed over an accumulation window and all processes). Must be > 0.
        validate (`bool`, *optional*, defaults to `True`): check label range, class weights and normalizer values
            (reads tensor values, which synchronizes with a GPU). Inside `torch.func.vmap`, which cannot read
            values, they are skipped.
        logit_softcap (`float`, *optional*): ``cap > 0``: logits become ``cap * tanh(z / cap)``.
        logit_scale (`float`, *optional*): a finite multiplier > 0 of the logits, applied before the cap.
        chunk_bytes (`int`, *optional*): about the bytes of one tile: its logits in the inputs' dtype
            (``recompute=True``), or its fp32 logits with their bf16/fp16 product and the cap's derivative
            (``recompute=False``); a tile holds at least one row of the vocabulary (``recompute=False``) or
            ``MIN_BLOCK_COLUMNS`` columns. Defaults to `DEFAULT_BLOCK_ROWS` rows of the logits in the inputs' dtype
            and at most `DEFAULT_BLOCK_BYTES`, or all counted rows by `WIDE_BLOCK_COLUMNS` (or V / 16) if more, a
            widening of at most 1/16 of the logits (``recompute=True``); or `DEFAULT_CHUNK_ROWS` rows of fp32 logits
            (``recompute=False``), which does not grow with the number of tokens.
        recompute (`bool`, *optional*): ``False``: gradients computed during the forward pass and kept until the
            backward pass (three matrix products; ``reduction="mean"`` or ``"sum"`` only). ``True``: logits
            recomputed in the backward pass (four products; nothing of the head's size is accumulated). None (the
            default) recomputes for ``reduction="none"`` and when a bf16/fp16 head needs its gradient (whose fp32
            accumulator would be as large as the head), and otherwise computes the gradients in the forward pass.

    Returns:
        `torch.Tensor`: 0-d for ``"mean"`` and ``"sum"``, ``target``'s shape for ``"none"``; fp32 (fp64 for fp64
        inputs).
    """
    check_loss_options(label_smoothing, reduction, smoothing_style, weight_mode, ignore_index)
    _check_head_tensors(hidden, head_weight, head_bias, target)
    # Under torch.func.vmap no value can be read: the value checks are skipped, as with validate=False.
    validate = validate and not vmap_active()
    num_classes = head_weight.shape[0]
    check_device("class_weight", class_weight, hidden.device, other="hidden")
    check_device("normalizer", normalizer, hidden.device, other="hidden")
    check_weight_tensor("class_weight", class_weight, num_classes, validate=validate)
    check_normalizer(normalizer, reduction, validate)
    _check_head_options(logit_softcap, logit_scale, chunk_bytes, recompute, reduction)
    for name, tensor in (("class_weight", class_weight), ("normalizer", normalizer)):
        if isinstance(tensor, Tensor) and tensor.requires_grad:
            raise ValueError(
                f"linear_label_smoothed_cross_entropy computes no gradient for {name}, which requires grad"
            )

    if functorch_transforms_active():
        # torch.func cannot run an autograd.Function without setup_context; the logits path is made of operations
        # it knows (and materializes the logits).
        logits = _final_logits(hidden, head_weight, head_bias, logit_scale, logit_softcap)
        return label_smoothed_cross_entropy(
            logits,
            target,
            class_weight,
            ignore_index,
            reduction,
            label_smoothing,
            smoothing_style=smoothing_style,
            weight_mode=weight_mode,
            normalizer=normalizer,
            validate=validate,
            implementation="reference",
        )

    labels = target.reshape(-1)
    if labels.dtype != torch.int64:
        labels = labels.long()
    if validate:
        check_target_values(labels, num_classes, ignore_index)
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    a, b = smoothing_coefficients(num_classes, label_smoothing, smoothing_style)
    if reduction == "mean":
        denominator = (
            mean_denominator(labels, class_weight, ignore_index, weight_mode=weight_mode)
            if normalizer is None
            else normalizer
        )
        denominator = torch.as_tensor(denominator, dtype=dtype, device=hidden.device)
        # 1 / denominator, folded into the gradient's factors; nothing counts (a 0 denominator) gives 0.
        reduction_scale = safe_divide(torch.ones_like(denominator), denominator)
    else:
        reduction_scale = None

    grad_enabled = torch.is_grad_enabled()
    needs = tuple(grad_enabled and t is not None and t.requires_grad for t in (hidden, head_weight, head_bias))
    if recompute is None:
        half_head = head_weight.dtype not in (torch.float32, torch.float64)
        recompute = reduction == "none" or (needs[1] and half_head)
    options = _Options(
        num_classes=num_classes,
        dtype=dtype,
        a=a,
        b=b,
        ignore_index=ignore_index,
        weight_mode=weight_mode,
        reduction=reduction,
        softcap=None if logit_softcap is None else float(logit_softcap),
        scale=None if logit_scale is None or float(logit_scale) == 1.0 else float(logit_scale),
        chunk_bytes=None if chunk_bytes is None else int(chunk_bytes),
        recompute=recompute,
        needs=needs,
        positions=tuple(target.shape),
    )
    return _LinearCrossEntropy.apply(hidden, head_weight, head_bias, labels, class_weight, reduction_scale, options)


class LinearLabelSmoothedCrossEntropyLoss(nn.Module):
    """Module form of `linear_label_smoothed_cross_entropy`; it validates its options and calls the function.

    ``class_weight`` is a buffer (it moves with ``.to()`` and is saved in ``state_dict``). ``forward(hidden,
    head_weight, target, head_bias=None, *, normalizer=None)`` takes the head's parameters at each call, so the
    module holds none of them (pass ``model.lm_head.weight``).

    Args:
        class_weight (`torch.Tensor` of shape `(V,)`, *optional*): non-negative class weights.
        ignore_index (`int`, *optional*, defaults to `-100`): label that costs nothing and counts nowhere.
        reduction (`str`, *optional*, defaults to `"mean"`): ``"mean"``, ``"sum"`` or ``"none"``.
        label_smoothing (`float`, *optional*, defaults to `0.0`): ``eps`` in [0, 1].
        smoothing_style (`str`, *optional*, defaults to `"uniform"`): ``"uniform"`` or ``"off_target"``.
        weight_mode (`str`, *optional*, defaults to `"torch"`): ``"torch"`` or ``"example"``.
        validate (`bool`, *optional*, defaults to `True`): value checks that synchronize with a GPU.
        logit_softcap (`float`, *optional*): soft cap of the logits.
        logit_scale (`float`, *optional*): multiplier of the logits, before the cap.
        chunk_bytes (`int`, *optional*): bytes of one tile of logits.
        recompute (`bool`, *optional*): see `linear_label_smoothed_cross_entropy`.
    """

    def __init__(
        self,
        class_weight: Tensor | None = None,
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        smoothing_style: str = "uniform",
        weight_mode: str = "torch",
        validate: bool = True,
        logit_softcap: float | None = None,
        logit_scale: float | None = None,
        chunk_bytes: int | None = None,
        recompute: bool | None = None,
    ) -> None:
        super().__init__()
        check_loss_options(label_smoothing, reduction, smoothing_style, weight_mode, ignore_index)
        _check_head_options(logit_softcap, logit_scale, chunk_bytes, recompute, reduction)
        check_weight_tensor("class_weight", class_weight, None, validate=True)
        self.register_buffer("class_weight", class_weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.smoothing_style = smoothing_style
        self.weight_mode = weight_mode
        self.validate = validate
        self.logit_softcap = logit_softcap
        self.logit_scale = logit_scale
        self.chunk_bytes = chunk_bytes
        self.recompute = recompute

    def forward(
        self,
        hidden: Tensor,
        head_weight: Tensor,
        target: Tensor,
        head_bias: Tensor | None = None,
        *,
        normalizer: float | Tensor | None = None,
    ) -> Tensor:
        return linear_label_smoothed_cross_entropy(
            hidden,
            head_weight,
            target,
            head_bias,
            self.class_weight,
            self.ignore_index,
            self.reduction,
            self.label_smoothing,
            smoothing_style=self.smoothing_style,
            weight_mode=self.weight_mode,
            normalizer=normalizer,
            validate=self.validate,
            logit_softcap=self.logit_softcap,
            logit_scale=self.logit_scale,
            chunk_bytes=self.chunk_bytes,
            recompute=self.recompute,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, "
            f"smoothing_style={self.smoothing_style!r}, weight_mode={self.weight_mode!r}, "
            f"logit_softcap={self.logit_softcap}, logit_scale={self.logit_scale}"
        )


# ---------------------------------------------------------------------------------------------------------------
# Checks


def _check_head_tensors(hidden, head_weight, head_bias, target) -> None:
    if not isinstance(hidden, Tensor) or not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating-point tensor of shape (..., D), got {describe(hidden)}")
    if hidden.dim() == 0:
        raise ValueError("hidden must have at least one dimension (the hidden size, last), got a 0-d tensor")
    if not isinstance(head_weight, Tensor) or not head_weight.is_floating_point():
        raise TypeError(f"head_weight must be a floating-point tensor of shape (V, D), got {describe(head_weight)}")
    hidden_size = hidden.shape[-1]
    if head_weight.dim() != 2 or head_weight.shape[1] != hidden_size:
        raise ValueError(
            f"head_weight must have shape (V, {hidden_size}) (hidden's last dimension is {hidden_size}), "
            f"got {tuple(head_weight.shape)}"
        )
    if head_weight.shape[0] < 2:
        raise ValueError(f"head_weight must have at least 2 rows (classes), got shape {tuple(head_weight.shape)}")
    if head_weight.dtype != hidden.dtype:
        raise TypeError(f"head_weight must have hidden's dtype {hidden.dtype}, got {head_weight.dtype}")
    check_device("head_weight", head_weight, hidden.device, other="hidden")
    if head_bias is not None:
        if not isinstance(head_bias, Tensor) or not head_bias.is_floating_point():
            raise TypeError(f"head_bias must be a floating-point tensor of shape (V,), got {describe(head_bias)}")
        if tuple(head_bias.shape) != (head_weight.shape[0],):
            raise ValueError(
                f"head_bias must have shape ({head_weight.shape[0]},) (head_weight's rows), "
                f"got {tuple(head_bias.shape)}"
            )
        if head_bias.dtype != hidden.dtype:
            raise TypeError(f"head_bias must have hidden's dtype {hidden.dtype}, got {head_bias.dtype}")
        check_device("head_bias", head_bias, hidden.device, other="hidden")
    if not isinstance(target, Tensor) or target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must be an integer tensor of class indices, got {describe(target)}")
    if target.is_floating_point():
        raise TypeError(
            f"target must be an integer tensor of class indices, got {describe(target)}: probability targets "
            "are (tokens, vocabulary) tensors themselves; use hf_lsce.label_smoothed_cross_entropy on logits"
        )
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"target must have shape {tuple(hidden.shape[:-1])} (hidden's shape without its last dimension), "
            f"got {tuple(target.shape)}"
        )
    check_device("target", target, hidden.device, other="hidden")


def _check_head_options(logit_softcap, logit_scale, chunk_bytes, recompute, reduction) -> None:
    if logit_softcap is not None:
        check_number("logit_softcap", logit_softcap, low=0, high=math.inf, low_open=True, high_open=True)
    if logit_scale is not None:
        # Cohere's logit_scale and Granite's 1 / logits_scaling are > 0: 0 or a sign flip is a mistake, not a model.
        check_number("logit_scale", logit_scale, low=0, high=math.inf, low_open=True, high_open=True)
    if chunk_bytes is not None:
        check_number("chunk_bytes", chunk_bytes, low=0, low_open=True, integer=True)
    if recompute is not None and not isinstance(recompute, bool):
        raise TypeError(f"recompute must be a bool or None, got {describe(recompute)}")
    if recompute is False and reduction == "none":
        raise ValueError(
            "recompute=False keeps gradients scaled by one number, which reduction='none' does not give; "
            "use recompute=True or None"
        )


# ---------------------------------------------------------------------------------------------------------------
# The autograd function


@dataclass(frozen=True)
class _Options:
    """Everything the autograd function needs besides tensors, resolved once."""

    num_classes: int
    dtype: torch.dtype  # of logits, softmax, loss and accumulators
    a: float  # smoothed target q = a * one_hot(y) + b
    b: float
    ignore_index: int
    weight_mode: str
    reduction: str
    softcap: float | None
    scale: float | None
    chunk_bytes: int | None  # None: the defaults of `_row_tile_logits` and `_block_tile`
    recompute: bool
    needs: tuple[bool, bool, bool]  # gradients of hidden, head_weight, head_bias
    positions: tuple[int, ...]  # target's shape


@dataclass(frozen=True)
class _Rows:
    """The rows that count (label not ignore_index) and their per-row factors (`hf_lsce.fused.index_terms`)."""

    index: Tensor | None  # positions of the counted rows among all rows; None when every row counts
    target: Tensor  # (M, 1) class index of each counted row
    total: Tensor  # (M,) U = sum_c u_c
    picked: Tensor  # (M,) coefficient of z_y
    spread: Tensor  # (M,) coefficient of sum_c v_c z_c

    def __len__(self) -> int:
        return self.target.shape[0]

    def hidden(self, x: Tensor, start: int, end: int) -> Tensor:
        """Hidden states of counted rows ``start:end``."""
        return x[start:end] if self.index is None else x.index_select(0, self.index[start:end])


def _counted_rows(labels: Tensor, class_weight: Tensor | None, options: _Options) -> _Rows:
    terms = index_terms(
        labels,
        class_weight,
        options.ignore_index,
        options.num_classes,
        options.a,
        options.b,
        options.weight_mode,
        options.dtype,
    )
    if bool(terms.valid.all()):
        return _Rows(None, terms.target, terms.total, terms.picked, terms.spread)
    index = terms.valid.nonzero().squeeze(1)
    return _Rows(index, terms.target[index], terms.total[index], terms.picked[index], terms.spread[index])


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, class_weight, reduction_scale, options):
        dtype = options.dtype
        x = hidden.detach().reshape(-1, hidden.shape[-1])
        head_weight, head_bias = weight.detach(), None if bias is None else bias.detach()
        w = None if class_weight is None else class_weight.detach().to(dtype)
        rows = _counted_rows(labels, w, options)
        # Only a class weight that varies over the classes enters the tiles; otherwise v is per row.
        tile_weight = w if w is not None and options.weight_mode == "torch" else None
        # Per-row factors of the gradient: the reduction's 1 / denominator and the logits' scale folded in once.
        factor = 1.0 if options.scale is None else options.scale
        if reduction_scale is not None:
            factor = reduction_scale * factor
        in_forward = any(options.needs) and not options.recompute

        grads = None
        if in_forward:
            grads = _Gradients(x, head_weight, head_bias, rows, options, by_blocks=False)
            picked, spread, lse = _statistics_by_rows(
                x, head_weight, head_bias, rows, tile_weight, options, grads, factor
            )
        else:
            picked, spread, lse = _statistics_by_blocks(x, head_weight, head_bias, rows, tile_weight, options)
        losses = rows.total * lse - rows.picked * picked
        if options.b:
            losses -= rows.spread * spread

        ctx.options = options
        if any(options.needs):
            # The inputs themselves, not copies: read by the recomputation and by a backward pass that builds a graph
            # (create_graph=True, `_gradient_graph`), which must differentiate through them.
            ctx.save_for_backward(hidden, weight, bias, class_weight, reduction_scale)
            ctx.rows, ctx.lse = rows, lse
        if in_forward:
            ctx.grads = grads.finish(hidden.shape)
        if options.reduction == "none":
            if rows.index is not None:
                losses = torch.zeros(labels.shape[0], dtype=dtype, device=x.device).index_copy_(0, rows.index, losses)
            return losses.reshape(options.positions)
        total = losses.sum()
        return total if reduction_scale is None else total * reduction_scale

    @staticmethod
    def backward(ctx, grad_output):
        options = ctx.options
        if torch.is_grad_enabled():
            # create_graph=True (e.g. a gradient penalty): the tiles' gradients would be constants to autograd and
            # the second-order term would be lost; they are recomputed with differentiable operations.
            grads = _gradient_graph(ctx, grad_output)
        elif options.recompute:
            grads = _recompute_gradients(ctx, grad_output)
        else:
            grads = ctx.grads
            if grads is None:
                raise RuntimeError(
                    "the linear loss's gradients were already used by a backward pass; pass retain_graph=True to "
                    "the first one to call backward twice"
                )
            # Handed over (scaled in place) unless the graph is kept for another backward pass.
            keep = keep_graph()
            if not keep:
                ctx.grads = None
            if not bool(grad_output == 1):
                grads = tuple(None if g is None else (g * grad_output if keep else g.mul_(grad_output)) for g in grads)
        return (*grads, None, None, None, None)


def _statistics_by_rows(x, weight, bias, rows: _Rows, tile_weight, options: _Options, grads, factor):
    """``z_y``, ``sum_c v_c z_c`` and ``lse`` of every counted row, from chunks of rows with the whole vocabulary; with
    ``grads`` (a `_Gradients` by rows) each chunk's gradient, scaled by ``factor``, goes into it."""
    stats = torch.empty(4, len(rows), 1, dtype=options.dtype, device=x.device)
    step = max(1, _row_tile_logits(x.dtype, options, grads is not None) // options.num_classes)
    buffers = ChunkBuffers()
    for start in range(0, len(rows), step):
        end = min(start + step, len(rows))
        h = rows.hidden(x, start, end)
        product = _product(h, weight, bias, buffers)
        z = product if product.dtype == options.dtype else buffers.take(product.shape, options.dtype, x.device, "z")
        z, derivative = _final(z.copy_(product) if z is not product else z, options, buffers, grads is not None)
        factors = None
        if grads is not None:
            factors = GradientFactors(
                (rows.total[start:end] * factor)[:, None],
                (-rows.picked[start:end] * factor)[:, None],
                None if options.b == 0 else (rows.spread[start:end] * factor)[:, None],
            )
        process_chunk(z, z, rows.target[start:end], tile_weight, stats[:, start:end], options.b != 0, factors)
        if grads is not None:
            if derivative is not None:
                z.mul_(derivative)
            _add_row_chunk(grads, z, h, weight, start, end, buffers)
    picked, spread, top, peak = stats.squeeze(2)
    # At the row's maximum p = exp(max - lse) >= 1 / V: this log-sum-exp loses nothing to underflow.
    return picked, spread, top - peak.log()


def _row_tile_logits(input_dtype: torch.dtype, options: _Options, with_gradient: bool) -> int:
    """How many logits a chunk of rows holds (``recompute=False``): ``chunk_bytes``, by default `DEFAULT_CHUNK_ROWS`
    rows of fp32 logits, over the bytes per logit of its buffers (fp32 logits, their bf16/fp16 product, the cap's
    derivative)."""
    nbytes = options.dtype.itemsize
    if input_dtype != options.dtype:
        nbytes += input_dtype.itemsize
    if options.softcap is not None and with_gradient:
        nbytes += options.dtype.itemsize
    budget = options.chunk_bytes
    if budget is None:
        budget = DEFAULT_CHUNK_ROWS * options.num_classes * options.dtype.itemsize
    return budget // nbytes


def _block_tile(options: _Options, num_rows: int, dtype: torch.dtype) -> int:
    """Logits in a tile of `_Blocks`: ``chunk_bytes``' worth, by default `DEFAULT_BLOCK_ROWS` rows of the logits and
    at most `DEFAULT_BLOCK_BYTES`, or ``num_rows`` rows by `WIDE_BLOCK_COLUMNS` (V / 16 if fewer) if that is more."""
    if options.chunk_bytes is not None:
        return options.chunk_bytes // dtype.itemsize
    tile = min(DEFAULT_BLOCK_ROWS * options.num_classes, DEFAULT_BLOCK_BYTES // dtype.itemsize)
    return max(tile, num_rows * min(WIDE_BLOCK_COLUMNS, options.num_classes // 16))


def _statistics_by_blocks(x, weight, bias, rows: _Rows, tile_weight, options: _Options):
    """What `_statistics_by_rows` returns (without gradients), from the tiles of `_Blocks`: each chunk's
    log-sum-exp joined to its rows' running one."""
    dtype = options.dtype
    picked = torch.zeros(len(rows), dtype=dtype, device=x.device)
    spread = torch.zeros_like(picked)
    lse = torch.full_like(picked, -math.inf)
    plan = _Blocks(x, rows, options)
    buffers = ChunkBuffers()
    for index, first, last in plan.blocks():
        block_weight = None if tile_weight is None else tile_weight[first:last]
        for start, end, targets in plan.tiles():
            product = _product(plan.hidden(x, start, end), weight[first:last], _rows_of(bias, first, last), buffers)
            found, columns = targets.in_block(index, first)
            # Each row's own logit, before a chunk computed in place overwrites it.
            picked[start:end][found] = _final(product[found, columns].to(dtype), options, None, False)[0]

            def work(begin, stop, start=start, product=product, block_weight=block_weight):
                z, _ = _chunk_logits(product[begin:stop], options, buffers, False)
                tile_rows = slice(start + begin, start + stop)
                if options.b:
                    spread[tile_rows] += z.sum(1) if block_weight is None else z @ block_weight
                # max + log(sum(exp(z - max))): the sum is at least 1 (the maximum's term), so nothing underflows;
                # three passes over the chunk where a softmax and two maxima took five.
                top = z.amax(1, keepdim=True)
                chunk_lse = z.sub_(top).exp_().sum(1).log_().add_(top[:, 0])
                torch.logaddexp(lse[tile_rows], chunk_lse, out=lse[tile_rows])

            run_row_chunks(end - start, _chunk_rows(last - first, dtype), work, x.device)
    return picked, spread, lse


class _Blocks:
    """Tiles of vocabulary blocks x counted rows (``recompute=True``): a tile is the head's product in the inputs'
    dtype, as many logits as `_block_tile` says, worked on in chunks of rows of `DEFAULT_CHUNK_BYTES` of
    fp32. Blocks are as wide as that allows with all counted rows in one tile, so that one product over all rows
    finishes each block of the head's gradient; more rows than that are split into row tiles."""

    def __init__(self, x: Tensor, rows: _Rows, options: _Options):
        num_rows, self.num_classes = len(rows), options.num_classes
        tile = _block_tile(options, num_rows, x.dtype)
        self.columns = min(self.num_classes, max(MIN_BLOCK_COLUMNS, tile // max(1, num_rows)))
        step = max(1, min(num_rows, tile // self.columns))
        self.row_tiles = [(start, min(start + step, num_rows)) for start in range(0, num_rows, step)]
        self.one_tile = len(self.row_tiles) == 1
        self.rows = rows
        # The counted rows' hidden states, gathered once when they make one tile.
        self.h_all = rows.hidden(x, 0, num_rows) if self.one_tile else None
        self.targets = [
            _TargetColumns(rows.target[start:end, 0], self.columns, self.num_classes) for start, end in self.row_tiles
        ]

    def blocks(self):
        """(index, first class, end class) of each block."""
        for index, first in enumerate(range(0, self.num_classes if self.row_tiles else 0, self.columns)):
            yield index, first, min(first + self.columns, self.num_classes)

    def tiles(self):
        """(first row, end row, `_TargetColumns`) of each row tile."""
        for (start, end), targets in zip(self.row_tiles, self.targets):
            yield start, end, targets

    def hidden(self, x: Tensor, start: int, end: int) -> Tensor:
        """Hidden states of counted rows ``start:end`` (a row tile)."""
        return self.h_all if self.one_tile else self.rows.hidden(x, start, end)


class _TargetColumns:
    """Where the rows' classes fall among blocks of ``columns`` classes (rows sorted by class, found once)."""

    def __init__(self, target: Tensor, columns: int, num_classes: int):
        self.columns, self.order = target.sort()
        edges = torch.arange(0, num_classes + columns, columns, device=target.device).clamp_(max=num_classes)
        # One read for all blocks.
        self.bounds = torch.searchsorted(self.columns, edges).tolist()

    def in_block(self, index: int, first: int) -> tuple[Tensor, Tensor]:
        """The rows whose class is in block ``index`` (starting at class ``first``), and that class's column in it."""
        low, high = self.bounds[index], self.bounds[index + 1]
        return self.order[low:high], self.columns[low:high] - first


def _chunk_rows(columns: int, dtype: torch.dtype) -> int:
    """Rows of ``columns`` logits in a chunk of `hf_lsce.fused.DEFAULT_CHUNK_BYTES` (at least one)."""
    return max(1, hf_lsce.fused.DEFAULT_CHUNK_BYTES // (columns * dtype.itemsize))


def _product(h: Tensor, weight: Tensor, bias: Tensor | None, buffers: ChunkBuffers) -> Tensor:
    """``F.linear(h, weight, bias)``, the product the model's own head computes, in the inputs' dtype, in a reused
    buffer."""
    out = buffers.take((h.shape[0], weight.shape[0]), h.dtype, h.device, "product")
    return torch.mm(h, weight.T, out=out) if bias is None else torch.addmm(bias, h, weight.T, out=out)


def _rows_of(tensor: Tensor | None, first: int, last: int) -> Tensor | None:
    """``tensor[first:last]``, or None for None (a bias that is not there)."""
    return None if tensor is None else tensor[first:last]


def _chunk_logits(product: Tensor, options: _Options, buffers: ChunkBuffers, derivative: bool):
    """A chunk of a tile's final logits in ``options.dtype`` (`_final`): the product's own rows for fp32/fp64, else
    an fp32 copy in this thread's buffer."""
    z = product
    if product.dtype != options.dtype:
        z = buffers.take(product.shape, options.dtype, product.device, "chunk").copy_(product)
    return _final(z, options, buffers, derivative)


def _final(z: Tensor, options: _Options, buffers: ChunkBuffers | None, derivative: bool):
    """Scales and soft-caps the logits ``z`` in place (as `_final_logits`); with ``derivative`` and a cap, also
    returns ``1 - tanh^2`` (the cap's derivative; the scale's is folded into the per-row factors)."""
    if options.scale is not None:
        z.mul_(options.scale)
    if options.softcap is None:
        return z, None
    z.div_(options.softcap).tanh_()
    cap_derivative = None
    if derivative:
        out = torch.empty_like(z) if buffers is None else buffers.take(z.shape, z.dtype, z.device, "derivative")
        cap_derivative = torch.mul(z, z, out=out).neg_().add_(1)
    z.mul_(options.softcap)
    return z, cap_derivative


class _Gradients:
    """The three gradients, built tile by tile; a sum over tiles of bf16/fp16 products is made in fp32.

    Chunks of rows with the whole vocabulary (``by_blocks=False``) finish hidden's rows one chunk at a time (written
    in its dtype) and add up the head's gradient over the chunks (in fp32 for a bf16/fp16 head: an accumulator of the
    head's size). Blocks of the vocabulary over all rows (``by_blocks=True``) finish the head's rows one block at a
    time and add up hidden's gradient over the blocks, for the counted rows only (in fp32 for bf16/fp16 hidden states),
    which `finish` spreads over all positions.
    """

    def __init__(self, x: Tensor, weight: Tensor, bias: Tensor | None, rows: _Rows, options: _Options, by_blocks):
        need_hidden, need_weight, need_bias = options.needs
        dtype = options.dtype
        self.rows = rows
        self.positions = x.shape[0]
        self.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        # Row i of self.hidden is counted row i (else position i: ignored rows stay 0, counted ones written by index).
        self.compact = by_blocks or rows.index is None
        self.hidden = None
        if need_hidden:
            shape, hidden_dtype = ((len(rows), x.shape[1]), dtype) if by_blocks else (x.shape, x.dtype)
            self.hidden = torch.zeros(shape, dtype=hidden_dtype, device=x.device)
        self.weight = None
        if need_weight:
            # By blocks every row is written (or zeroed) block by block when any row counts.
            make = torch.empty if by_blocks and len(rows) else torch.zeros
            self.weight = make(weight.shape, dtype=weight.dtype if by_blocks else dtype, device=x.device)
        self.bias = torch.zeros(weight.shape[0], dtype=dtype, device=x.device) if need_bias else None

    def add_hidden(self, start: int, end: int, g: Tensor, block: Tensor, buffers: ChunkBuffers) -> None:
        """Adds ``g @ block`` to the gradient of counted rows ``start:end``."""
        if self.compact:
            _add_product(self.hidden[start:end], g, block, buffers)
            return
        # Chunks of rows (each finished by one product) with ignored rows in between.
        product = buffers.take((end - start, block.shape[1]), g.dtype, g.device, "hidden_product")
        self.hidden.index_copy_(0, self.rows.index[start:end], torch.mm(g, block, out=product))

    def finish(self, hidden_shape: torch.Size) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The gradients in their inputs' dtypes, hidden's in ``hidden_shape``."""
        # The fp32 sums are let go as soon as they are converted.
        hidden, self.hidden = self.hidden, None
        if hidden is not None:
            hidden = hidden.to(self.dtypes[0])
            if hidden.shape[0] != self.positions:
                counted = hidden
                hidden = counted.new_zeros(self.positions, counted.shape[1]).index_copy_(0, self.rows.index, counted)
            hidden = hidden.view(hidden_shape)
        weight = None if self.weight is None else self.weight.to(self.dtypes[1])
        bias = None if self.bias is None else self.bias.to(self.dtypes[2])
        return hidden, weight, bias


def _add_row_chunk(grads: _Gradients, g: Tensor, h: Tensor, weight: Tensor, start: int, end: int, buffers) -> None:
    """Adds the gradient ``g`` of rows ``start:end`` x the whole vocabulary (``h``: those rows' hidden states)."""
    g_product = g if g.dtype == weight.dtype else buffers.take(g.shape, weight.dtype, g.device, "product").copy_(g)
    if grads.hidden is not None:
        # One product over the whole vocabulary finishes these rows.
        grads.add_hidden(start, end, g_product, weight, buffers)
    if grads.weight is not None:
        _add_product(grads.weight, g_product.T, h, buffers)
    if grads.bias is not None:
        grads.bias += g.sum(0)


def _add_product(out: Tensor, a: Tensor, b: Tensor, buffers: ChunkBuffers) -> None:
    """``out += a @ b``; a bf16/fp16 product goes through a temporary and is added to ``out`` in ``out``'s dtype."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
        return
    # In blocks of out's rows, so that the temporary stays small (1 M elements).
    step = max(1, (1 << 20) // b.shape[1])
    for start in range(0, out.shape[0], step):
        end = min(start + step, out.shape[0])
        product = torch.mm(a[start:end], b, out=buffers.take((end - start, b.shape[1]), a.dtype, a.device, "sum"))
        _add_converted(out[start:end], product, buffers)


def _add_converted(out: Tensor, low: Tensor, buffers: ChunkBuffers) -> None:
    """``out += low`` for fp32 ``out`` and a bf16/fp16 ``low``, converted through a small buffer: PyTorch's CPU
    kernels would convert all of ``low`` into a temporary of ``out``'s size first."""
    step = max(1, (1 << 18) // out.shape[1])
    for start in range(0, out.shape[0], step):
        end = min(start + step, out.shape[0])
        out[start:end] += buffers.take((end - start, out.shape[1]), out.dtype, out.device, "converted").copy_(
            low[start:end]
        )


def _recompute_gradients(ctx, grad_output):
    """The backward pass of ``recompute=True``: the logits again, in the tiles of `_Blocks`."""
    hidden, weight, bias, class_weight, reduction_scale = ctx.saved_tensors
    options, rows, lse = ctx.options, ctx.rows, ctx.lse
    dtype = options.dtype
    x = hidden.detach().reshape(-1, hidden.shape[-1])
    weight, bias = weight.detach(), None if bias is None else bias.detach()
    w = None if class_weight is None else class_weight.to(dtype)
    tile_weight = w if w is not None and options.weight_mode == "torch" else None

    # Per-row factors: the reduction's, the scale's and the incoming gradient (one per position for "none").
    factor = grad_output.to(dtype)
    if options.reduction == "none":
        factor = factor.reshape(-1)
        factor = factor if rows.index is None else factor[rows.index]
    if reduction_scale is not None:
        factor = factor * reduction_scale
    if options.scale is not None:
        factor = factor * options.scale
    total, picked, spread = rows.total * factor, rows.picked * factor, rows.spread * factor
    # U p = exp(z - lse + log U) when no U is negative (one read): the product is folded into the exponential.
    fold = bool((total >= 0).all())
    shift = (lse - total.log() if fold else lse)[:, None]
    factors = GradientFactors(
        None if fold else total[:, None], -picked[:, None], spread[:, None] if options.b else None
    )
    grads = _Gradients(x, weight, bias, rows, options, by_blocks=True)
    if len(rows):
        _recompute_tiles(grads, x, weight, bias, tile_weight, shift, factors, options)
    return grads.finish(hidden.shape)


def _recompute_tiles(grads, x, weight, bias, tile_weight, shift: Tensor, factors: GradientFactors, options) -> None:
    """Adds every tile's gradient ``G = U p - u`` (times the cap's derivative) to ``grads``, from the logits less
    ``shift`` (``lse``, or ``lse - log U`` where ``factors.total`` is None), in the tiles of `_Blocks`: each chunk of
    the tile's product is replaced by its gradient, in the inputs' dtype, which then enters the products."""
    dtype = options.dtype
    plan = _Blocks(x, grads.rows, options)
    buffers = ChunkBuffers()
    # A block of the head's gradient as (h.T @ G).T with a contiguous copy of h.T, in bf16 on CPU, where oneDNN's
    # G.T @ h (a transposed left operand) took ~2x as long: at D = 1024, 3686 rows, blocks of 1706 / 3413 classes,
    # 11.5 / 24.7 ms against 7.1 / 16.8 ms with the copy of the transposed result (ad-hoc runs on the 2-core VM);
    # fp32 and fp16 gained nothing.
    h_t = None
    if grads.weight is not None and plan.one_tile and x.dtype == torch.bfloat16 and x.device.type == "cpu":
        h_t = plan.h_all.T.contiguous()
    for index, first, last in plan.blocks():
        block = weight[first:last]
        block_weight = None if tile_weight is None else tile_weight[first:last]
        weight_sum = None
        if grads.weight is not None and not plan.one_tile:
            # The block's gradient summed over row tiles: in place for fp32/fp64 heads, else in an fp32 buffer.
            weight_sum = grads.weight[first:last]
            if weight_sum.dtype != dtype:
                weight_sum = buffers.take(block.shape, dtype, x.device, "weight_sum")
            weight_sum.zero_()
        for start, end, targets in plan.tiles():
            h = plan.hidden(x, start, end)
            g = _product(h, block, _rows_of(bias, first, last), buffers)
            tile_shift, tile_factors = shift[start:end], factors.rows(start, end)
            found, columns = targets.in_block(index, first)
            # The gradient at each row's own class, from its logit before a chunk computed in place overwrites it.
            own = _own_class_gradient(
                g[found, columns], found, columns, tile_shift, tile_factors, block_weight, options
            )

            def work(begin, stop, g=g, tile_shift=tile_shift, tile_factors=tile_factors, block_weight=block_weight):
                z, derivative = _chunk_logits(g[begin:stop], options, buffers, True)
                total, _, spread = tile_factors.rows(begin, stop)
                z.sub_(tile_shift[begin:stop]).exp_()
                if total is not None:
                    z.mul_(total)
                if spread is not None:
                    if block_weight is None:
                        z.sub_(spread)
                    else:
                        z.addr_(spread[:, 0], block_weight, alpha=-1)
                if derivative is not None:
                    z.mul_(derivative)
                if z.dtype != g.dtype:
                    g[begin:stop].copy_(z)

            run_row_chunks(end - start, _chunk_rows(last - first, dtype), work, x.device)
            g[found, columns] = own.to(g.dtype)
            if grads.hidden is not None:
                grads.add_hidden(start, end, g, block, buffers)
            if grads.weight is not None:
                if h_t is not None:
                    product = buffers.take((h_t.shape[0], last - first), h_t.dtype, x.device, "weight_t")
                    grads.weight[first:last] = torch.mm(h_t, g, out=product).T
                elif plan.one_tile:
                    # One product over all rows finishes the block (a bf16/fp16 product accumulates in fp32).
                    torch.mm(g.T, h, out=grads.weight[first:last])
                else:
                    _add_product(weight_sum, g.T, h, buffers)
            if grads.bias is not None:
                grads.bias[first:last] += g.sum(0, dtype=dtype)
        if weight_sum is not None and weight_sum.dtype != grads.weight.dtype:
            grads.weight[first:last] = weight_sum


def _own_class_gradient(product, found, columns, shift, factors: GradientFactors, block_weight, options) -> Tensor:
    """``G`` at the given rows' own classes from their products there, in the order of the chunks' operations with
    the picked term added after the total's."""
    z, derivative = _final(product.to(options.dtype), options, None, True)
    total, picked, spread = (None if f is None else f[found, 0] for f in factors)
    g = (z - shift[found, 0]).exp_()
    if total is not None:
        g.mul_(total)
    g.add_(picked)
    if spread is not None:
        g.sub_(spread if block_weight is None else spread * block_weight[columns])
    if derivative is not None:
        g.mul_(derivative)
    return g


def _final_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, scale: float | None, softcap: float | None):
    """The head's logits as the tiles hold them, in differentiable operations: ``F.linear`` in the inputs' dtype,
    then in fp32 (fp64) scaled and soft-capped."""
    z = F.linear(hidden, weight, bias)
    z = z.to(torch.float64 if z.dtype == torch.float64 else torch.float32)
    if scale is not None:
        z = z * scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return z


def _gradient_graph(ctx, grad_output: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients of hidden, head_weight and head_bias as differentiable PyTorch operations on the saved inputs.

    This is what a backward pass with ``create_graph=True`` returns, in either order (``recompute``): autograd can
    differentiate it again, with respect to the inputs and to ``grad_output``, so every higher-order gradient is
    exact. The counted rows' logits (and a few tensors of their size) are materialized, as on the logits path.
    """
    hidden, weight, bias, class_weight, reduction_scale = ctx.saved_tensors
    options, rows = ctx.options, ctx.rows
    dtype = options.dtype
    x = hidden.reshape(-1, hidden.shape[-1])
    h = rows.hidden(x, 0, len(rows))
    # The tiles' logits as a graph. g = d loss / d z is multiplied by the final logits' derivative with respect to the
    # head's output: the scale (in the per-row factor) and the cap's 1 - tanh^2.
    z = _final_logits(h, weight, bias, options.scale, options.softcap)
    derivative = None if options.softcap is None else 1 - (z / options.softcap) ** 2
    tile_weight = None
    if class_weight is not None and options.weight_mode == "torch":
        tile_weight = class_weight.to(dtype)
    terms = RowTerms(rows.target, None, picked=rows.picked, spread=rows.spread, total=rows.total)
    g = smoothed_gradient(z, terms, tile_weight)
    if derivative is not None:
        g = g * derivative
    factor = grad_output.to(dtype)
    if options.reduction == "none":
        factor = factor.reshape(-1)
        factor = (factor if rows.index is None else factor[rows.index])[:, None]
    if reduction_scale is not None:
        factor = factor * reduction_scale
    if options.scale is not None:
        factor = factor * options.scale
    g = g * factor

    need_hidden, need_weight, need_bias = options.needs
    grad_hidden = grad_weight = grad_bias = None
    if need_hidden:
        grad_rows = g @ weight.to(dtype)
        if rows.index is not None:
            # Ignored rows get exactly 0.
            grad_rows = grad_rows.new_zeros(x.shape).index_copy(0, rows.index, grad_rows)
        grad_hidden = grad_rows.to(hidden.dtype).view(hidden.shape)
    if need_weight:
        grad_weight = (g.T @ h.to(dtype)).to(weight.dtype)
    if need_bias:
        grad_bias = g.sum(0).to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias
