"""Temperature scaling (Guo et al. 2017): one scalar ``T > 0`` that divides the logits after training.

``T`` is fitted on held-out data (a validation split) by minimizing the negative log-likelihood of
``softmax(logits / T)``. Dividing every row by the same positive number does not change its argmax, so accuracy is
untouched; only the confidence moves. With ``T = 1`` the model is unchanged, which is what a calibrated model gets.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from hf_lsce.checks import check_labels, is_real

# The search runs on log T within these bounds: T in [exp(-7), exp(7)] ~ [1e-3, 1e3] covers every sane model,
# and bounding keeps a degenerate fit (e.g. all validation predictions correct, where NLL keeps falling as T -> 0)
# finite and reproducible.
LOG_T_BOUNDS = (-7.0, 7.0)


def _as_float64_tensor(logits) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(logits) if not isinstance(logits, torch.Tensor) else logits)
    return tensor.detach().to(device="cpu", dtype=torch.float64)


def _check_inputs(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, K) with K >= 2, got {tuple(logits.shape)}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("logits must hold at least one example, got N=0")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits must be finite")
    check_labels(labels, logits.shape[1], ignore_index=None)


def temperature_nll(logits, labels, temperature: float) -> float:
    """Mean negative log-likelihood of ``softmax(logits / temperature)``.

    Args:
        logits (`np.ndarray` or `torch.Tensor` of shape `(N, K)`): Unnormalized scores.
        labels (`np.ndarray` or `torch.Tensor` of shape `(N,)`): Class indices.
        temperature (`float`): The divisor, `> 0`.

    Returns:
        `float`: `F.cross_entropy(logits / temperature, labels)` in float64 (the mean divides by `N`).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits_t = _as_float64_tensor(logits)
    labels_t = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).long()
    _check_inputs(logits_t, labels_t)
    return float(F.cross_entropy(logits_t / temperature, labels_t))


def fit_temperature(logits, labels, *, max_iter: int = 100) -> float:
    """Fits the temperature ``T > 0`` that minimizes the validation NLL of ``softmax(logits / T)``.

    The search is over ``log T`` (so ``T`` stays positive without a constraint), in float64, with L-BFGS and a
    strong-Wolfe line search from ``T = 1``; it is deterministic. The NLL is convex in ``1 / T``, so the single
    minimum L-BFGS finds is the global one. ``log T`` is clamped to `LOG_T_BOUNDS`.

    Args:
        logits (`np.ndarray` or `torch.Tensor` of shape `(N, K)`): Validation logits of the trained model.
        labels (`np.ndarray` or `torch.Tensor` of shape `(N,)`): Validation class indices.
        max_iter (`int`, *optional*, defaults to `100`): L-BFGS iterations.

    Returns:
        `float`: The fitted temperature. `T > 1` softens an over-confident model, `T < 1` sharpens an
        under-confident one (e.g. one trained with strong label smoothing).
    """
    logits_t = _as_float64_tensor(logits)
    labels_t = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).long()
    _check_inputs(logits_t, labels_t)

    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-12, line_search_fn="strong_wolfe"
    )
    low, high = LOG_T_BOUNDS

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        # Clamping inside the objective keeps the line search from evaluating absurd temperatures.
        loss = F.cross_entropy(logits_t / log_t.clamp(low, high).exp(), labels_t)
        loss.backward()
        return loss

    optimizer.step(closure)
    value = float(log_t.detach().clamp(low, high))
    if not math.isfinite(value):
        # Cannot happen with finite logits, but a NaN temperature would silently poison every metric after it.
        raise RuntimeError("temperature fit did not converge to a finite value")
    return math.exp(value)


def apply_temperature(logits, temperature: float):
    """Divides the logits by the temperature; the argmax (and so accuracy) is unchanged.

    Args:
        logits (`np.ndarray` or `torch.Tensor` of shape `(..., K)`): Unnormalized scores.
        temperature (`float`): The divisor from `fit_temperature`, `> 0`.

    Returns:
        The scaled logits, of the input's type (`np.ndarray` or `torch.Tensor`).
    """
    if not is_real(temperature) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if isinstance(logits, torch.Tensor):
        return logits / temperature
    return np.asarray(logits, dtype=np.float64) / temperature
