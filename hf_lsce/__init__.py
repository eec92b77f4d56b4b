"""hf_lsce: class-weighted, label-smoothed cross-entropy for Hugging Face Transformers.

The loss functions import as light as torch itself. The trainers and their arguments need Transformers (and
`datasets` through it; the SFT classes need TRL), so they are imported on first use (PEP 562).
"""

import importlib
from typing import TYPE_CHECKING

from hf_lsce.class_weights import compute_class_weights
from hf_lsce.linear import LinearLabelSmoothedCrossEntropyLoss, linear_label_smoothed_cross_entropy
from hf_lsce.loss import LabelSmoothedCrossEntropyLoss, label_smoothed_cross_entropy, mean_denominator

if TYPE_CHECKING:
    from hf_lsce.seq2seq import SmoothingSeq2SeqTrainer
    from hf_lsce.sft import SmoothingSFTConfig, SmoothingSFTTrainer
    from hf_lsce.trainer import SmoothingTrainer, SmoothingTrainerMixin
    from hf_lsce.training_args import (
        SmoothingArguments,
        SmoothingSeq2SeqTrainingArguments,
        SmoothingTrainingArguments,
    )

__version__ = "0.1.0"

# Name -> module that defines it, imported on first use.
_LAZY = {
    "SmoothingArguments": "hf_lsce.training_args",
    "SmoothingSFTConfig": "hf_lsce.sft",
    "SmoothingSFTTrainer": "hf_lsce.sft",
    "SmoothingSeq2SeqTrainer": "hf_lsce.seq2seq",
    "SmoothingSeq2SeqTrainingArguments": "hf_lsce.training_args",
    "SmoothingTrainer": "hf_lsce.trainer",
    "SmoothingTrainerMixin": "hf_lsce.trainer",
    "SmoothingTrainingArguments": "hf_lsce.training_args",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_lsce' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


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
