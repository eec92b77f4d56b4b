"""hf_lsce: class-weighted, label-smoothed cross-entropy for Hugging Face Transformers."""

from hf_lsce.class_weights import compute_class_weights
from hf_lsce.linear import LinearLabelSmoothedCrossEntropyLoss, linear_label_smoothed_cross_entropy
from hf_lsce.loss import LabelSmoothedCrossEntropyLoss, label_smoothed_cross_entropy, mean_denominator
from hf_lsce.trainer import SmoothingTrainer
from hf_lsce.training_args import SmoothingTrainingArguments

__version__ = "0.1.0"

__all__ = [
    "LabelSmoothedCrossEntropyLoss",
    "LinearLabelSmoothedCrossEntropyLoss",
    "SmoothingTrainer",
    "SmoothingTrainingArguments",
    "__version__",
    "compute_class_weights",
    "label_smoothed_cross_entropy",
    "linear_label_smoothed_cross_entropy",
    "mean_denominator",
]
