"""hf_lsce: class-weighted, label-smoothed cross-entropy for Hugging Face Transformers."""

import importlib
from typing import TYPE_CHECKING

from hf_lsce.class_weights import compute_class_weights
from hf_lsce.linear import LinearLabelSmoothedCrossEntropyLoss, linear_label_smoothed_cross_entropy
from hf_lsce.loss import LabelSmoothedCrossEntropyLoss, label_smoothed_cross_entropy, mean_denominator
from hf_lsce.trainer import SmoothingTrainer, SmoothingTrainerMixin
from hf_lsce.training_args import SmoothingArguments, SmoothingSeq2SeqTrainingArguments, SmoothingTrainingArguments

if TYPE_CHECKING:
    from hf_lsce.seq2seq import SmoothingSeq2SeqTrainer
    from hf_lsce.sft import SmoothingSFTConfig, SmoothingSFTTrainer

__version__ = "0.1.0"

# Imported on first use: the SFT classes import TRL (an optional extra), which is slow to import.
_LAZY = {
    "SmoothingSFTConfig": "hf_lsce.sft",
    "SmoothingSFTTrainer": "hf_lsce.sft",
    "SmoothingSeq2SeqTrainer": "hf_lsce.seq2seq",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_lsce' has no attribute {name!r}")


__all__ = [
    "LabelSmoothedCrossEntropyLoss",
    "LinearLabelSmoothedCrossEntropyLoss",
    "SmoothingArguments",
    "SmoothingSFTConfig",
    "SmoothingSFTTrainer",
    "SmoothingSeq2SeqTrainer",
    "SmoothingSeq2SeqTrainingArguments",
    "SmoothingTrainer",
    "SmoothingTrainerMixin",
    "SmoothingTrainingArguments",
    "__version__",
    "compute_class_weights",
    "label_smoothed_cross_entropy",
    "linear_label_smoothed_cross_entropy",
    "mean_denominator",
]
