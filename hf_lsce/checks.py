"""The option vocabulary and the argument checks every hf_lsce module shares.

This module is the ground floor: it imports torch and the standard library only, so the loss, the trainer, the class
weights and the evaluation helpers all build on it without depending on one another. Each rule lives here once, with
one message: an error names the argument, what is allowed and the value received.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

IGNORE_INDEX = -100
# SmoothingTrainer's eps when nothing sets it (the loss function itself defaults to 0, as F.cross_entropy does).
DEFAULT_LABEL_SMOOTHING = 0.1

IMPLEMENTATIONS = ("auto", "reference", "fused")
REDUCTIONS = ("mean", "sum", "none")
SMOOTHING_STYLES = ("uniform", "off_target")
WEIGHT_MODES = ("torch", "example")

# Up to this many class weights are read to the host in one call; more are reduced to their minimum and maximum
# first. One read costs less than a reduction and two reads (~15 us of a 250 us loss call at K = 2).
_READ_WEIGHTS_AT_ONCE = 64
_SHOWN_WEIGHTS = 8


def describe(value: object) -> str:
    """A short description of a received value for error messages: a tensor's dtype and shape, else its repr."""
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Raises a ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")


def is_real(value: object) -> bool:
    """A real number that is not a bool. The exact-type test first: the ABC check costs microseconds per call."""
    return type(value) in (float, int) or (not isinstance(value, bool) and isinstance(value, numbers.Real))


def is_integer(value: object) -> bool:
    """An integer that is not a bool (exact type first, as in `is_real`)."""
    return type(value) is int or (not isinstance(value, bool) and isinstance(value, numbers.Integral))


def check_number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
    """Raises unless ``value`` is a number (an int with ``integer=True``; never a bool) within the given bounds.

    A value of the wrong type raises a TypeError, one out of range (NaN included) a ValueError; both read, e.g.,
    ``label_smoothing must be a float in [0, 1], got 1.5``.
    """
    ok_type = is_integer(value) if integer else is_real(value)
    if ok_type:
        above = low is None or (value > low if low_open else value >= low)
        below = high is None or (value < high if high_open else value <= high)
        if above and below:
            return
    kind = "an int" if integer else "a float"
    if low is not None and high is not None:
        rule = f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        rule = f" {'>' if low_open else '>='} {low}"
    elif high is not None:
        rule = f" {'<' if high_open else '<='} {high}"
    else:
        rule = ""
    message = f"{name} must be {kind}{rule}, got {describe(value)}"
    raise ValueError(message) if ok_type else TypeError(message)


def check_device(name: str, value: object, device: torch.device, *, other: str = "input") -> None:
    """Raises a ValueError if ``value`` is a tensor on another device than ``device``, that of the tensor ``other``."""
    if isinstance(value, Tensor) and value.device != device:
        raise ValueError(f"{name} must be on {other}'s device {device}, got {value.device}")


def check_labels(
    labels: Tensor, num_classes: int, ignore_index: int | None = IGNORE_INDEX, *, name: str = "labels"
) -> None:
    """Raises a ValueError unless every entry of the integer tensor ``labels`` is a class in ``[0, num_classes)``
    or ``ignore_index`` (pass None when no label may be ignored).

    This reads tensor values (a host synchronization on GPUs): one reduction in the usual case, every label a class.
    """
    if labels.numel() == 0:
        return
    low, high = (value.item() for value in torch.aminmax(labels))
    if 0 <= low <= high < num_classes:
        return
    if ignore_index is not None:
        if low == high == ignore_index:
            return
        labels = labels.masked_fill(labels == ignore_index, 0)
        low, high = (value.item() for value in torch.aminmax(labels))
        if 0 <= low <= high < num_classes:
            return
    value = int(labels[(labels < 0) | (labels >= num_classes)].flatten()[0])
    allowed = f"[0, {num_classes})" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")
    raise ValueError(f"{name} must hold class indices in {allowed}, got {value}")


def functorch_transforms_active() -> bool:
    """Whether a `torch.func` transform (vmap, grad, jvp, ...) is running."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


def vmap_active() -> bool:
    """Whether a `torch.func.vmap` is running, under which no tensor value can be read (``.item()`` fails)."""
    if not functorch_transforms_active():
        return False
    try:
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    except ImportError:  # private modules; without them, assume the transform might be vmap
        return True
    return any(interpreter.key() == TransformType.Vmap for interpreter in retrieve_all_functorch_interpreters())


def check_loss_options(label_smoothing, reduction, smoothing_style, weight_mode, ignore_index) -> None:
    """Checks the loss's arguments that do not depend on tensors (the loss functions and their modules)."""
    check_number("label_smoothing", label_smoothing, low=0, high=1)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("smoothing_style", smoothing_style, SMOOTHING_STYLES)
    check_choice("weight_mode", weight_mode, WEIGHT_MODES)
    if not is_integer(ignore_index):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def check_target_values(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raises unless every label is a class or ``ignore_index`` (every probability finite and non-negative)."""
    if target.is_floating_point():
        if not bool(((target >= 0) & torch.isfinite(target)).all()):
            raise ValueError("probability target must be finite and non-negative")
        return
    check_labels(target, num_classes, ignore_index, name="target")


def check_normalizer(normalizer, reduction: str, validate: bool) -> None:
    """Raises unless ``normalizer`` is None, or a number or 0-d tensor > 0 (its value read only with ``validate``)
    given with ``reduction="mean"``."""
    if normalizer is None:
        return
    if reduction != "mean":
        raise ValueError(f"normalizer replaces the denominator of reduction='mean', got reduction={reduction!r}")
    if isinstance(normalizer, Tensor):
        if normalizer.dim() != 0:
            raise ValueError(f"normalizer must be a number or a 0-d tensor, got shape {tuple(normalizer.shape)}")
        if validate:
            check_number("normalizer", normalizer.item(), low=0, low_open=True)
    elif is_real(normalizer):
        check_number("normalizer", normalizer, low=0, low_open=True)
    else:
        raise TypeError(f"normalizer must be a number or a 0-d tensor, got {describe(normalizer)}")


def _show(weights: Tensor | Sequence) -> str:
    values = weights[:_SHOWN_WEIGHTS].tolist() if isinstance(weights, Tensor) else list(weights[:_SHOWN_WEIGHTS])
    if len(weights) <= _SHOWN_WEIGHTS:
        return "[" + ", ".join(map(repr, values)) + "]"
    return "[" + ", ".join(map(repr, values)) + f", ...] ({len(weights)} weights)"


def check_class_weight_values(
    weights: Tensor | Sequence,
    num_classes: int | None = None,
    *,
    name: str = "class_weights",
    source: str | None = None,
    read_values: bool = True,
) -> None:
    """The rule for class weights, wherever they come from: one per class, finite, non-negative, not all zero.

    Args:
        weights (`torch.Tensor` of shape `(K,)` or a sequence of numbers): the weights (a floating-point tensor, or
            numbers as given in Python, on the command line once converted, or read from a file).
        num_classes (`int`, *optional*): ``K``; when None, at least 2 weights are required.
        name (`str`, *optional*, defaults to `"class_weights"`): the argument named in errors.
        source (`str`, *optional*): where the weights were read from (e.g. a file), put in front of every error.
        read_values (`bool`, *optional*, defaults to `True`): False checks the count alone (a tensor's values are
            then not read, which would synchronize with a GPU).

    Raises:
        `ValueError`: a wrong count, a NaN, infinite or negative weight, or weights that are all zero.
        `TypeError`: an entry of a sequence that is not a number.
    """
    where = f"{source}: " if source else ""
    is_tensor = isinstance(weights, Tensor)
    count = (weights.shape[0] if weights.dim() == 1 else None) if is_tensor else len(weights)
    if count is None or (count < 2 if num_classes is None else count != num_classes):
        expected = "at least 2" if num_classes is None else num_classes
        got = f"shape {tuple(weights.shape)}" if is_tensor else _show(weights)
        raise ValueError(f"{where}{name} must hold one weight per class ({expected}), got {got}")
    if not read_values:
        return
    if is_tensor:
        if count <= _READ_WEIGHTS_AT_ONCE:
            values = weights.tolist()
        else:  # NaN propagates through the minimum and maximum
            values = [value.item() for value in torch.aminmax(weights.detach())]
    else:
        if not all(is_real(value) for value in weights):
            raise TypeError(f"{where}{name} must hold numbers, got {_show(weights)}")
        values = weights
    if not all(0 <= value < math.inf for value in values):  # NaN fails every comparison
        raise ValueError(f"{where}{name} must be finite and non-negative, got {_show(weights)}")
    if not any(value > 0 for value in values):
        raise ValueError(f"{where}{name} must not be all zero, got {_show(weights)}")


def check_weight_tensor(name: str, weight: object, num_classes: int | None, *, validate: bool) -> None:
    """Raises unless ``weight`` is None or a floating-point tensor of class weights that meets
    `check_class_weight_values` (``num_classes`` None: at least 2; its values read only with ``validate``)."""
    if weight is None:
        return
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of one weight per class, got {describe(weight)}")
    check_class_weight_values(weight, num_classes, name=name, read_values=validate)


def check_auto_switch(name: str, value: object) -> bool | str:
    """``value`` as ``"auto"``, True or False, the values of a switch whose default decides by itself.

    The strings ``"true"`` and ``"false"`` (any case, as a command line gives them) are read as the bools; anything
    else (1 and 0 included) raises a ValueError.
    """
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, bool) or (isinstance(value, str) and value == "auto"):
        return value
    raise ValueError(f"{name} must be one of 'auto', True, False, got {describe(value)}")
