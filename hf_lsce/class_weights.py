"""Class weights from label counts: the ``"balanced"`` rule of scikit-learn, over examples or tokens."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from hf_lsce.checks import check_class_weight_values, check_labels, is_integer

CLASS_WEIGHT_METHODS = ("balanced",)


def _flatten_labels(labels: Tensor | Iterable) -> Tensor:
    """Turns a tensor, array or (nested, ragged) list of integer labels into one flat int64 tensor."""
    if isinstance(labels, (str, bytes)) or (isinstance(labels, Tensor) and labels.is_floating_point()):
        raise TypeError(f"labels must hold integer class indices, got {labels!r}")
    if is_integer(labels):
        return torch.tensor([int(labels)])
    try:
        # Flat or rectangular input converts in one call; ragged token labels fall through to one call per example.
        flat = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        flat = None
    if flat is not None:
        if flat.is_floating_point() or flat.dtype == torch.bool or flat.is_complex():
            raise TypeError(f"labels must hold integer class indices, got {flat.dtype} values")
        return flat.reshape(-1).long()
    if not isinstance(labels, Iterable):
        raise TypeError(f"labels must hold integer class indices, got an element of type {type(labels).__name__}")
    parts = [_flatten_labels(item) for item in labels]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def compute_class_weights(
    labels: Tensor | Sequence, num_classes: int, method: str = "balanced", ignore_index: int = -100
) -> Tensor:
    """Class weights from the labels of a training set.

    ``method="balanced"`` gives ``w_c = n / (K * n_c)``, where ``n`` counts the labels that are not ``ignore_index``
    and ``n_c`` those equal to ``c``: scikit-learn's
    ``compute_class_weight("balanced", classes=np.arange(K), y=labels[labels != ignore_index])``. A class seen as often
    as the average class gets weight 1, and ``sum_c n_c * w_c = n``, so the weighted mean over the training set
    divides by the same ``n`` as the unweighted one.

    Args:
        labels (`torch.Tensor` or nested sequence of `int`): class indices of every example (sequence tasks) or every
            token (token tasks: one list per example, lengths may differ); ``ignore_index`` entries are skipped.
        num_classes (`int`): ``K``, the number of classes of the model's head.
        method (`str`, *optional*, defaults to `"balanced"`): only ``"balanced"``.
        ignore_index (`int`, *optional*, defaults to `-100`): label of padding and sub-word positions.

    Returns:
        `torch.Tensor` of shape `(K,)` and dtype float64.

    Raises:
        `ValueError`: if a class has no example (its weight would be infinite: pass explicit weights instead, or drop
            the class from the head), if a label is outside ``[0, K)``, or if there is no label at all.
    """
    if method not in CLASS_WEIGHT_METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, CLASS_WEIGHT_METHODS))}, got {method!r}")
    if not is_integer(num_classes) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    flat = _flatten_labels(labels)
    check_labels(flat, num_classes, ignore_index)
    flat = flat[flat != ignore_index]
    if flat.numel() == 0:
        raise ValueError(f"labels hold no class index (all are ignore_index={ignore_index}): cannot balance classes")
    counts = torch.bincount(flat, minlength=num_classes).to(torch.float64)
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise ValueError(
            f"class_weights='balanced' needs at least one example of every class, but classes [{shown}] "
            f"({len(missing)} of {num_classes}) have none; pass explicit class weights instead"
        )
    return flat.numel() / (num_classes * counts)


def check_class_weights(
    class_weights: object, field: str = "class_weights", source: str | None = None
) -> list[float] | str | None:
    """Validates a ``class_weights`` option: None, ``"balanced"``, or one finite non-negative number per class, not
    all zero (`hf_lsce.checks.check_class_weight_values`). ``source`` (e.g. a file's path) is named in errors.

    Numbers given as strings (the command line gives ``["1.0", "2.5"]``) are converted. Returns the normalized value.
    """
    if class_weights is None:
        return None
    if isinstance(class_weights, str):
        class_weights = [class_weights]
    if isinstance(class_weights, Tensor):
        class_weights = class_weights.tolist()
    if not isinstance(class_weights, Sequence) or len(class_weights) == 0:
        raise ValueError(
            f'{field} must be None, "balanced" or a list of non-negative floats (one per class), got {class_weights!r}'
        )
    if len(class_weights) == 1 and class_weights[0] in CLASS_WEIGHT_METHODS:
        return class_weights[0]
    values = []
    for value in class_weights:
        try:
            if isinstance(value, bool):
                raise TypeError
            values.append(float(value))
        except (TypeError, ValueError):
            where = f"{source}: " if source else ""
            raise ValueError(
                f'{where}{field} must be None, "balanced" or a list of non-negative floats (one per class), '
                f"got {class_weights!r}"
            ) from None
    check_class_weight_values(values, name=field, source=source)
    return values
