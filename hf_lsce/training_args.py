"""`SmoothingTrainingArguments`: the options of `SmoothingTrainer`, parsed like every `TrainingArguments` field."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from hf_lsce.checks import DEFAULT_LABEL_SMOOTHING, SMOOTHING_STYLES, WEIGHT_MODES, check_choice, check_number
from hf_lsce.class_weights import check_class_weights


def check_smoothing_options(label_smoothing: object, smoothing_style: object, weight_mode: object) -> None:
    """Raises a ValueError (TypeError for a non-number) naming the option, what is allowed and the value received."""
    check_number("label_smoothing", label_smoothing, low=0, high=1)
    check_choice("smoothing_style", smoothing_style, SMOOTHING_STYLES)
    check_choice("weight_mode", weight_mode, WEIGHT_MODES)


def check_no_double_smoothing(label_smoothing: float, label_smoothing_factor: float) -> None:
    # Transformers' own `LabelSmoother` reads `label_smoothing_factor`; both set would smooth (or at least read) twice.
    if label_smoothing > 0 and label_smoothing_factor > 0:
        raise ValueError(
            f"label_smoothing={label_smoothing} and label_smoothing_factor={label_smoothing_factor} are both set: "
            "SmoothingTrainer smooths with label_smoothing; set label_smoothing_factor=0"
        )


@dataclass
class SmoothingTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the options of `SmoothingTrainer`'s loss.

    Every field has ``metadata={"help": ...}``, so `HfArgumentParser` reads them from the command line
    (``--label_smoothing 0.1 --class_weights balanced`` or ``--class_weights 1.0 2.5``) and from YAML/JSON files.

    Args:
        label_smoothing (`float`, *optional*, defaults to `0.1`): ``eps`` in [0, 1] of
            `hf_lsce.label_smoothed_cross_entropy`. It replaces the base ``label_smoothing_factor``: setting both
            above 0 raises a ValueError.
        smoothing_style (`str`, *optional*, defaults to `"uniform"`): ``"uniform"`` (PyTorch, Transformers'
            `LabelSmoother`) or ``"off_target"`` (fairseq).
        weight_mode (`str`, *optional*, defaults to `"example"`): ``"example"`` (each position's smoothed loss scaled
            by its true class's weight: an example counts by its class's weight and the smoothed target stays what
            ``label_smoothing`` says) or ``"torch"`` (``F.cross_entropy(weight=...)``'s semantics, in which the
            weights also re-shape the smoothing mass towards heavily weighted classes).
        class_weights (`list[float]` or `str`, *optional*): one non-negative weight per class; ``"balanced"`` to
            compute ``w_c = n / (K * n_c)`` from the training set (see `hf_lsce.compute_class_weights`); None for
            no weights.
    """

    label_smoothing: float = field(
        default=DEFAULT_LABEL_SMOOTHING,
        metadata={
            "help": "Label smoothing epsilon in [0, 1] of SmoothingTrainer's loss (0 disables smoothing). "
            "Replaces label_smoothing_factor: do not set both."
        },
    )
    smoothing_style: str = field(
        default="uniform",
        metadata={
            "help": "How the smoothing mass is spread: 'uniform' (eps/K on every class, PyTorch and Transformers) or "
            "'off_target' (eps/(K-1) on every wrong class, fairseq).",
            "choices": list(SMOOTHING_STYLES),
        },
    )
    weight_mode: str = field(
        default="example",
        metadata={
            "help": "How class weights enter the smoothed loss: 'example' (each position's whole loss scaled by the "
            "weight of its true class; the default) or 'torch' (as F.cross_entropy(weight=...), which also moves the "
            "smoothing mass towards heavily weighted classes).",
            "choices": list(WEIGHT_MODES),
        },
    )
    # Typed as a list of strings so that HfArgumentParser accepts both `--class_weights balanced` and
    # `--class_weights 1.0 2.5` (nargs="+"); `__post_init__` turns it into "balanced" or a list of floats.
    class_weights: list[str] | None = field(
        default=None,
        metadata={
            "help": "Class weights of the loss: one non-negative float per class (e.g. --class_weights 1.0 2.5), "
            "'balanced' to compute n / (K * n_c) from the training set labels, or unset for no weights."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        check_smoothing_options(self.label_smoothing, self.smoothing_style, self.weight_mode)
        self.class_weights = check_class_weights(self.class_weights)
        check_no_double_smoothing(self.label_smoothing, self.label_smoothing_factor)
