"""Classification, calibration and entity-level metrics as NumPy functions (no Hub, no `evaluate`).

Every metric on the Hugging Face Hub (``evaluate.load("accuracy")``) needs the Hub, so hf_lsce ships its own. These
functions are the one implementation; :mod:`hf_lsce.evaluation.evaluate_metrics` wraps them as ``evaluate.Metric``s.

* :func:`classification_metrics`: accuracy, macro-F1, MCC, and the calibration metrics NLL, ECE and Brier score
  (plus binary F1 when there are two classes), from logits.
* :func:`reliability_bins`: the equal-width confidence bins that ECE is computed from, for reliability diagrams.
* :func:`risk_coverage_curve` and :func:`selective_risk`: selective prediction (abstain on the least confident), whose
  area AURC and error at 80 % coverage :func:`classification_metrics` also reports.
* :func:`entity_metrics`: entity-level precision, recall and F1 over BIO/IOB spans (the conlleval / ``seqeval``
  default convention) plus token accuracy, for token classification.

This module needs NumPy (and PyTorch, a core dependency, for the shared label check): importing it loads neither
Transformers, ``datasets`` nor ``evaluate``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import torch

from hf_lsce.checks import check_labels, check_number

__all__ = [
    "classification_metrics",
    "entity_metrics",
    "entity_spans",
    "reliability_bins",
    "risk_coverage_curve",
    "selective_risk",
    "softmax",
]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of `logits` of shape `(N, K)`, computed in float64 (same as `torch.softmax(x, dim=-1)`)."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _check_inputs(scores: np.ndarray, labels: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError(f"{name} must have shape (N, K) with N > 0, got shape {scores.shape}")
    if labels.shape != (scores.shape[0],):
        raise ValueError(f"labels must have shape ({scores.shape[0]},) to match {name}, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    # Ignored positions (-100) must be dropped by the caller: every label here is scored.
    check_labels(torch.from_numpy(labels), scores.shape[1], ignore_index=None)
    return scores, labels


def reliability_bins(probs: np.ndarray, labels: np.ndarray, *, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Groups predictions into `n_bins` equal-width bins of confidence (the maximum probability).

    Bin `b` holds the predictions whose confidence lies in `(b / n_bins, (b + 1) / n_bins]` (closed on the right,
    as in Guo et al. 2017); a confidence of exactly 0 would go to the first bin, though a softmax never gives one.
    This is the binning :func:`classification_metrics` computes ECE from.

    Args:
        probs (`np.ndarray` of shape `(N, K)`):
            Predicted class probabilities (rows sum to 1).
        labels (`np.ndarray` of shape `(N,)`):
            True classes in `[0, K)`.
        n_bins (`int`, *optional*, defaults to 15):
            Number of equal-width bins over `[0, 1]`.

    Returns:
        `dict[str, np.ndarray]`, each of shape `(n_bins,)`: `bin_lower` and `bin_upper` (the bin edges),
        `confidence` (mean confidence in the bin), `accuracy` (fraction of correct argmax predictions in the bin) and
        `count` (number of predictions, int64). `confidence` and `accuracy` are NaN for empty bins.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    probs, labels = _check_inputs(probs, labels, "probs")
    confidence = probs.max(axis=1).astype(np.float64)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)

    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left" puts a confidence equal to an inner edge into the bin below it: bins are (lower, upper].
    index = np.searchsorted(edges[1:-1], confidence, side="left")
    count = np.bincount(index, minlength=n_bins).astype(np.int64)
    conf_sum = np.bincount(index, weights=confidence, minlength=n_bins)
    correct_sum = np.bincount(index, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.where(count > 0, conf_sum / count, np.nan)
        accuracy = np.where(count > 0, correct_sum / count, np.nan)
    return {
        "bin_lower": edges[:-1],
        "bin_upper": edges[1:],
        "confidence": mean_confidence,
        "accuracy": accuracy,
        "count": count,
    }


def _expected_calibration_error(bins: dict[str, np.ndarray]) -> float:
    count = bins["count"]
    filled = count > 0
    gaps = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float((count[filled] * gaps).sum() / count.sum())


def _matthews_corrcoef(confusion: np.ndarray) -> float:
    # The multi-class MCC of Gorodkin (2004), which is what scikit-learn computes; 0 when it is undefined
    # (all predictions or all labels in one class).
    n = confusion.sum()
    true_per_class = confusion.sum(axis=1)
    pred_per_class = confusion.sum(axis=0)
    cov_true_pred = np.trace(confusion) * n - true_per_class @ pred_per_class
    cov_pred_pred = n * n - pred_per_class @ pred_per_class
    cov_true_true = n * n - true_per_class @ true_per_class
    denominator = cov_pred_pred * cov_true_true
    if denominator == 0:
        return 0.0
    return float(cov_true_pred / np.sqrt(denominator))


def _f1_per_class(confusion: np.ndarray) -> np.ndarray:
    true_positive = np.diag(confusion)
    # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (support + predicted); 0 when the class is neither present nor predicted.
    denominator = confusion.sum(axis=0) + confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2.0 * true_positive / denominator, 0.0)


def _risk_coverage(predictions: np.ndarray, confidence: np.ndarray, labels: np.ndarray) -> np.ndarray:
    # Selective risk r_k for k = 1..N, ties averaged over their orders (see risk_coverage_curve).
    order = np.argsort(-confidence, kind="stable")
    confidence = confidence[order]
    errors = (predictions[order] != labels[order]).astype(np.float64)
    starts = np.flatnonzero(np.r_[True, confidence[1:] != confidence[:-1]])  # first position of each tie group
    sizes = np.diff(np.r_[starts, len(errors)])
    group_errors = np.add.reduceat(errors, starts)
    errors_before = np.cumsum(group_errors) - group_errors
    group = np.repeat(np.arange(len(starts)), sizes)
    kept = np.arange(1, len(errors) + 1)
    # Keeping m of a tie group of g members with e errors keeps m * e / g errors on average over its g! orders.
    kept_errors = errors_before[group] + (kept - starts[group]) * group_errors[group] / sizes[group]
    return kept_errors / kept


def _kept_count(n: int, coverage: float) -> int:
    # Exact for decimal coverages: 0.8 * n is computed as 4n / 5, so no float error moves the ceiling.
    return max(1, math.ceil(Fraction(coverage).limit_denominator(10**6) * n))


def risk_coverage_curve(logits: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """The risk-coverage curve of selective classification (Geifman & El-Yaniv 2017), at every coverage `k / N`.

    The classifier predicts the argmax and abstains on its least confident examples, confidence being the maximum
    softmax probability. Sorted by decreasing confidence, the selective risk at coverage `k / N` is the error rate of
    the `k` most confident predictions: `r_k = (1 / k) * sum_{j <= k} 1[prediction_j != label_j]`. Predictions with
    exactly equal confidence have no order, so a tie group is counted as the average over all its orders: keeping `m`
    of a group of `g` predictions with `e` errors counts `m * e / g` errors. The curve then depends neither on the
    input order nor on a sort's tie-breaking, and without ties it is the plain sorted one.

    The area under it, AURC (Geifman, Uziel & El-Yaniv 2019), is `risk.mean()`: the mean of `r_k` over `k = 1..N`,
    the discrete area with one point per coverage `k / N`. Lower is better; it mixes the error rate with how well
    confidence ranks right above wrong predictions (0 when every prediction is right; the error rate when confidence
    is constant).

    Args:
        logits (`np.ndarray` of shape `(N, K)`):
            Unnormalized scores; the prediction is `logits.argmax(1)`, the confidence `softmax(logits).max(1)` in
            float64.
        labels (`np.ndarray` of shape `(N,)`):
            True classes in `[0, K)`, integers.

    Returns:
        `dict[str, np.ndarray]`, each of shape `(N,)`: `coverage` (`k / N` for `k = 1..N`) and `risk` (`r_k`).
    """
    logits, labels = _check_inputs(logits, labels, "logits")
    # The same confidences as classification_metrics (exp of the log-softmax), so that ties agree to the bit.
    risk = _risk_coverage(logits.argmax(axis=1), np.exp(_log_softmax(logits)).max(axis=1), labels)
    return {"coverage": np.arange(1, len(labels) + 1) / len(labels), "risk": risk}


def selective_risk(logits: np.ndarray, labels: np.ndarray, *, coverage: float) -> float:
    """Error rate of the `k = ceil(coverage * N)` most confident predictions: the risk-coverage curve at `k / N`.

    `k` is the smallest count whose coverage reaches `coverage` (at least 1), computed without float error for
    decimal coverages (`coverage=0.8`, `N=35` keeps 28). Ties at the cut are counted as in
    :func:`risk_coverage_curve`.

    Args:
        logits (`np.ndarray` of shape `(N, K)`): Unnormalized scores.
        labels (`np.ndarray` of shape `(N,)`): True classes in `[0, K)`, integers.
        coverage (`float`): Fraction of predictions kept, in `(0, 1]`.
    """
    check_number("coverage", coverage, low=0, high=1, low_open=True)
    curve = risk_coverage_curve(logits, labels)
    return float(curve["risk"][_kept_count(len(labels), coverage) - 1])


def classification_metrics(logits: np.ndarray, labels: np.ndarray, *, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, macro-F1, MCC, the calibration metrics NLL, ECE and Brier score, and selective-prediction metrics.

    Args:
        logits (`np.ndarray` of shape `(N, K)`):
            Unnormalized scores (what a Transformers classifier returns); probabilities are `softmax(logits)`.
        labels (`np.ndarray` of shape `(N,)`):
            True classes in `[0, K)`, integers.
        n_bins (`int`, *optional*, defaults to 15):
            Number of equal-width confidence bins for ECE (see :func:`reliability_bins`).

    Returns:
        `dict[str, float]` with:

        - `accuracy`: fraction of examples whose argmax equals the label.
        - `macro_f1`: unweighted mean of the per-class F1 over the classes that occur in the labels or the
          predictions (scikit-learn's `f1_score(average="macro")`).
        - `mcc`: Matthews correlation coefficient, multi-class form (scikit-learn's `matthews_corrcoef`).
        - `nll`: mean over examples of `-log softmax(logits)[label]`, natural log (scikit-learn's `log_loss`, and
          `F.cross_entropy(logits, labels)` in PyTorch).
        - `ece`: expected calibration error, `sum_b (n_b / N) * |accuracy_b - confidence_b|` over `n_bins`
          equal-width bins of the maximum probability.
        - `brier`: mean over examples of `sum_c (p_c - onehot(label)_c) ** 2`, the original multi-class Brier score
          (range [0, 2]). For two classes this is twice scikit-learn's default binary `brier_score_loss`, which
          only scores the positive class (equal with `scale_by_half=False`).
        - `aurc`: area under the risk-coverage curve, confidence = maximum softmax probability, the mean of the
          selective risks at the coverages `k / N`, `k = 1..N`, ties averaged over their orders (see
          :func:`risk_coverage_curve`).
        - `error_at_80_coverage`: error rate of the `ceil(0.8 * N)` most confident predictions (see
          :func:`selective_risk`).
        - `f1` (only when K == 2): binary F1 of the positive class 1.
    """
    logits, labels = _check_inputs(logits, labels, "logits")
    num_classes = logits.shape[1]
    log_probs = _log_softmax(logits)
    probs = np.exp(log_probs)
    predictions = logits.argmax(axis=1)
    risk = _risk_coverage(predictions, probs.max(axis=1), labels)

    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    f1 = _f1_per_class(confusion)
    present = (confusion.sum(axis=0) + confusion.sum(axis=1)) > 0
    one_hot = np.eye(num_classes)[labels]

    metrics = {
        "accuracy": float((predictions == labels).mean()),
        "macro_f1": float(f1[present].mean()),
        "mcc": _matthews_corrcoef(confusion),
        "nll": float(-log_probs[np.arange(len(labels)), labels].mean()),
        "ece": _expected_calibration_error(reliability_bins(probs, labels, n_bins=n_bins)),
        "brier": float(((probs - one_hot) ** 2).sum(axis=1).mean()),
        "aurc": float(risk.mean()),
        "error_at_80_coverage": float(risk[_kept_count(len(labels), 0.8) - 1]),
    }
    if num_classes == 2:
        metrics["f1"] = float(f1[1])
    return metrics


def entity_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Entity spans `(type, start, end)` (end exclusive) in one sequence of BIO/IOB tags.

    Follows conlleval and `seqeval`'s default mode: a chunk starts at `B-X`, and also at an `I-X` that does not
    continue a chunk of type `X` (so `O I-PER` is a `PER` entity); it ends before `O`, `B-*`, or a tag of another type.
    `E-`/`S-` (IOBES) tags are read as in conlleval. Tags without a prefix (e.g. `PER`) are read as `I-PER`.
    """
    spans = set()
    start, kind = None, None
    for position, tag in enumerate([*tags, "O"]):
        prefix, _, tag_type = tag.partition("-") if "-" in tag else ("I" if tag != "O" else "O", "", tag)
        starts = prefix in ("B", "S") or (prefix in ("I", "E") and tag_type != kind)
        if kind is not None and (prefix == "O" or starts):
            spans.add((kind, start, position))
            start, kind = None, None
        if prefix != "O" and starts:
            start, kind = position, tag_type
        if kind is not None and prefix in ("E", "S"):
            spans.add((kind, start, position + 1))
            start, kind = None, None
    return spans


def entity_metrics(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1 (micro-averaged over entities), plus token accuracy.

    An entity counts as correct only if its type and both boundaries match a reference entity exactly (see
    :func:`entity_spans` for how tags form entities). This equals `seqeval.metrics.classification_report` in its
    default mode, micro average.

    Args:
        predictions (`Sequence[Sequence[str]]`):
            Predicted tags, one list per sequence, ignored positions (sub-words, padding) already removed.
        references (`Sequence[Sequence[str]]`):
            True tags, same lengths.

    Returns:
        `dict[str, float]`: `precision`, `recall`, `f1` (0 when undefined), `accuracy` (over tokens), and
        `<type>_f1` for every entity type in the references or predictions.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references must have the same length, got {len(predictions)} and {len(references)}"
        )
    true_spans, pred_spans = set(), set()
    correct_tokens = total_tokens = 0
    for index, (predicted, reference) in enumerate(zip(predictions, references)):
        if len(predicted) != len(reference):
            raise ValueError(
                f"sequence {index} has {len(predicted)} predicted tags and {len(reference)} reference tags"
            )
        true_spans |= {(index, *span) for span in entity_spans(reference)}
        pred_spans |= {(index, *span) for span in entity_spans(predicted)}
        correct_tokens += sum(p == r for p, r in zip(predicted, reference))
        total_tokens += len(reference)

    def scores(true: set, pred: set) -> tuple[float, float, float]:
        hits = len(true & pred)
        precision = hits / len(pred) if pred else 0.0
        recall = hits / len(true) if true else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        return precision, recall, f1

    precision, recall, f1 = scores(true_spans, pred_spans)
    metrics = {"precision": precision, "recall": recall, "f1": f1, "accuracy": correct_tokens / max(total_tokens, 1)}
    for kind in sorted({span[1] for span in true_spans | pred_spans}):
        of_kind = [{span for span in spans if span[1] == kind} for spans in (true_spans, pred_spans)]
        metrics[f"{kind}_f1"] = scores(*of_kind)[2]
    return metrics
