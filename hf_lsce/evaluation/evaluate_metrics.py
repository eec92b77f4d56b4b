"""`evaluate.Metric` wrappers of :mod:`hf_lsce.evaluation.metrics`, usable offline.

Use them directly (``ClassificationMetric().compute(predictions=logits, references=labels)``) or load this file with
``evaluate.load(hf_lsce.evaluation.evaluate_metrics.__file__)``, which returns :class:`ClassificationMetric`
(``evaluate`` picks the first metric class of a module). Both return exactly what the NumPy functions return.

This module needs ``evaluate`` and ``datasets`` (``pip install "hf-lsce[evaluation]"``); it is the only module of
hf_lsce that imports them.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

from hf_lsce.evaluation.metrics import classification_metrics, entity_metrics

__all__ = ["ClassificationMetric", "EntityMetric"]


_CITATION = """\
@inproceedings{guo2017calibration,
  title={On Calibration of Modern Neural Networks},
  author={Guo, Chuan and Pleiss, Geoff and Sun, Yu and Weinberger, Kilian Q.},
  booktitle={ICML},
  year={2017}
}
@inproceedings{geifman2017selective,
  title={Selective Classification for Deep Neural Networks},
  author={Geifman, Yonatan and El-Yaniv, Ran},
  booktitle={NeurIPS},
  year={2017}
}
"""


class ClassificationMetric(evaluate.Metric):
    """`evaluate` wrapper of :func:`classification_metrics`: `predictions` are logits `(N, K)`, `references` labels.

    `compute(predictions=..., references=..., n_bins=15)` returns the same dict as :func:`classification_metrics`.
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Accuracy, macro-F1, MCC, NLL, ECE (equal-width bins), Brier score, AURC and the error at "
            "80 % coverage from logits.",
            citation=_CITATION,
            inputs_description="predictions: logits, a list of K floats per example; references: int labels.",
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, n_bins: int = 15) -> dict[str, float]:
        return classification_metrics(np.asarray(predictions), np.asarray(references), n_bins=n_bins)


class EntityMetric(evaluate.Metric):
    """`evaluate` wrapper of :func:`entity_metrics`: `predictions` and `references` are lists of tag strings."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Entity-level precision, recall and F1 over BIO spans (conlleval convention).",
            citation="",
            inputs_description="predictions, references: one list of tag strings per sequence.",
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string")),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        return entity_metrics(predictions, references)
