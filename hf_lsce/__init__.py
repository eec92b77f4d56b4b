"""hf_lsce: class-weighted, label-smoothed cross-entropy for Hugging Face Transformers."""

from hf_lsce.loss import LabelSmoothedCrossEntropyLoss, label_smoothed_cross_entropy, mean_denominator

__version__ = "0.1.0"

__all__ = [
    "LabelSmoothedCrossEntropyLoss",
    "__version__",
    "label_smoothed_cross_entropy",
    "mean_denominator",
]
