"""`SmoothingTrainingArguments`: the options of `SmoothingTrainer`, parsed like every `TrainingArguments` field.

The options are the fields of the dataclass mixin `SmoothingArguments`, so that any arguments class
(`TrainingArguments`, `Seq2SeqTrainingArguments`, TRL's `SFTConfig`) can take them:
``@dataclass class C(SmoothingArguments, Base)``.
Each option has its default here, once, and is validated by one rule, in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum

from transformers import Seq2SeqTrainingArguments, TrainingArguments

from hf_lsce.checks import (
    DEFAULT_LABEL_SMOOTHING,
    SMOOTHING_STYLES,
    WEIGHT_MODES,
    check_auto_switch,
    check_choice,
    check_number,
)
from hf_lsce.class_weights import check_class_weights

SMOOTHING_OPTIONS = ("label_smoothing", "smoothing_style", "weight_mode", "class_weights", "fused_linear")
# Metrics this library reports (``eval_nll`` from the trainer, the rest from `hf_lsce.evaluation`) for which lower is
# better. Transformers minimizes only names ending in "loss" when ``greater_is_better`` is unset.
MINIMIZED_METRICS = ("nll", "ece", "brier", "aurc", "error_at_80_coverage")


def is_minimized_metric(name: str | None) -> bool:
    """Whether ``metric_for_best_model`` names one of `MINIMIZED_METRICS`: ``"nll"``, ``"eval_nll"``, or with an
    evaluation set's name (``"eval_valid_nll"``, as `Trainer` names the metrics of a dict of evaluation sets)."""
    return name is not None and any(name == metric or name.endswith(f"_{metric}") for metric in MINIMIZED_METRICS)


@dataclass
class SmoothingArguments:
    """The options of `SmoothingTrainer`'s loss, as dataclass fields for any `TrainingArguments` subclass.

    Every field has ``metadata={"help": ...}``, so `HfArgumentParser` reads them from the command line
    (``--label_smoothing 0.1 --class_weights balanced`` or ``--class_weights 1.0 2.5``) and from YAML/JSON files.

    Args:
        label_smoothing (`float`, *optional*, defaults to `0.1`): ``eps`` in [0, 1] of
            `hf_lsce.label_smoothed_cross_entropy`. None (not given) resolves to the base ``label_smoothing_factor``
            when that is > 0, else to 0.1. It replaces ``label_smoothing_factor``: both > 0 raises a ValueError. After
            ``__post_init__`` it holds the eps in use and ``label_smoothing_factor`` is 0, so Transformers'
            `LabelSmoother` never runs as well.
        smoothing_style (`str`, *optional*, defaults to `"uniform"`): ``"uniform"`` (PyTorch, Transformers'
            `LabelSmoother`) or ``"off_target"`` (fairseq).
        weight_mode (`str`, *optional*, defaults to `"example"`): ``"example"`` (each position's smoothed loss scaled
            by its true class's weight: an example counts by its class's weight and the smoothed target stays what
            ``label_smoothing`` says) or ``"torch"`` (``F.cross_entropy(weight=...)``'s semantics, in which the
            weights also re-shape the smoothing mass towards heavily weighted classes).
        class_weights (`list[float]` or `str`, *optional*): one non-negative weight per class; ``"balanced"`` to
            compute ``w_c = n / (K * n_c)`` from the training set (see `hf_lsce.compute_class_weights`); None for
            no weights.
        fused_linear (`bool` or `str`, *optional*, defaults to `"auto"`): train a causal LM without its logits:
            each training step feeds the hidden states that enter the output head and the head's parameters to
            `hf_lsce.linear_label_smoothed_cross_entropy` (same loss, gradients and normalization; no (tokens,
            vocabulary) tensor). True requires it (a model whose head it cannot reproduce raises at construction),
            False never uses it, ``"auto"`` uses it on CPU for supported models whose vocabulary has at least
            `hf_lsce.causal_lm.LINEAR_MIN_VOCABULARY` entries. Loss-only evaluation takes it too;
            evaluation with ``compute_metrics`` and ``predict`` compute the logits.

    Model selection: ``metric_for_best_model`` naming a metric where lower is better (``nll``, ``ece``, ``brier``,
    ``aurc`` or ``error_at_80_coverage``, with or without the ``eval_`` prefix) resolves an unset
    ``greater_is_better`` to False, where `TrainingArguments` would resolve it to True (it minimizes only names
    ending in "loss"). ``greater_is_better=True`` with such a metric is a ValueError; as a converted plain
    `TrainingArguments` has already resolved an unset value to True, that case is an error too (pass
    ``greater_is_better=False``).
    """

    label_smoothing: float | None = field(
        default=None,
        metadata={
            "help": f"Label smoothing epsilon in [0, 1] of SmoothingTrainer's loss (0 disables smoothing; default "
            f"{DEFAULT_LABEL_SMOOTHING}, or label_smoothing_factor when only that is set). Replaces "
            "label_smoothing_factor: do not set both above 0."
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

    # A str field, so that HfArgumentParser passes "auto", "true" or "false" through; `__post_init__` makes the
    # latter two bools.
    fused_linear: str = field(
        default="auto",
        metadata={
            "help": "Train causal LMs without their logits (hidden states and head straight into the loss): 'auto' "
            "(on CPU for supported models with a large vocabulary), true (required; unsupported models raise) or "
            "false."
        },
    )

    def __post_init__(self):
        if self.greater_is_better is None and is_minimized_metric(self.metric_for_best_model):
            # Decided before the base class, which would resolve it to True (not a name ending in "loss").
            self.greater_is_better = False
        super().__post_init__()
        if self.greater_is_better and is_minimized_metric(self.metric_for_best_model):
            raise ValueError(
                f"metric_for_best_model={self.metric_for_best_model!r} is lower-is-better, but greater_is_better=True "
                "would keep the checkpoint where it is highest; set greater_is_better=False or leave it unset (a "
                "plain TrainingArguments resolves an unset greater_is_better to True for every metric not ending in "
                "'loss', so pass greater_is_better=False there)"
            )
        factor = self.label_smoothing_factor
        check_number("label_smoothing_factor", factor, low=0, high=1)
        if self.label_smoothing is not None:
            check_number("label_smoothing", self.label_smoothing, low=0, high=1)
        if factor > 0:
            # The base option keeps its `Trainer` meaning (smoothing of that size), applied by our loss instead of
            # Transformers' `LabelSmoother`; an explicit 0 does not cancel it (it is what the base option replaces).
            if self.label_smoothing:
                raise ValueError(
                    f"label_smoothing={self.label_smoothing} and label_smoothing_factor={factor} are both set: "
                    "SmoothingTrainer smooths with label_smoothing; set label_smoothing_factor=0"
                )
            self.label_smoothing = factor
        elif self.label_smoothing is None:
            self.label_smoothing = DEFAULT_LABEL_SMOOTHING
        # Resolved once: the arguments now say what runs, and building them again from their fields gives the same.
        self.label_smoothing_factor = 0.0
        check_choice("smoothing_style", self.smoothing_style, SMOOTHING_STYLES)
        check_choice("weight_mode", self.weight_mode, WEIGHT_MODES)
        self.class_weights = check_class_weights(self.class_weights)
        self.fused_linear = check_auto_switch("fused_linear", self.fused_linear)

    @classmethod
    def from_arguments(cls, args: TrainingArguments | None, **options) -> SmoothingArguments:
        """``args`` with the smoothing ``options`` that are not None overriding its own, as arguments with every field
        of this class.

        Arguments that already have the smoothing options and every field of this class (e.g.
        `SmoothingSeq2SeqTrainingArguments` for `SmoothingTrainingArguments`) keep their class: they are returned as
        they are when there is nothing to override, else copied with the options applied. Any other
        `TrainingArguments` (a plain one, an `SFTConfig` for `SmoothingSFTConfig`) is converted into this class, as
        TRL's `SFTTrainer` converts arguments into `SFTConfig`: every field is carried over (secrets such as
        ``hub_token`` included, which ``to_dict()`` would hide) and the new object is validated by
        ``__post_init__``. None gives this class's defaults with the options.

        Raises:
            `TypeError`: an unknown option, or ``args`` with fields this class lacks (e.g. a
                `Seq2SeqTrainingArguments` given to `SmoothingTrainer`: use `SmoothingSeq2SeqTrainer`), which the
                conversion would drop.
        """
        unknown = sorted(set(options) - set(SMOOTHING_OPTIONS))
        if unknown:
            raise TypeError(f"unknown smoothing options {unknown}; allowed: {', '.join(SMOOTHING_OPTIONS)}")
        options = {name: value for name, value in options.items() if value is not None}
        if args is None:
            return cls(**options)
        if not isinstance(args, TrainingArguments):
            raise TypeError(f"args must be a TrainingArguments (or None), got {type(args).__name__}")
        own = {f.name for f in dataclasses.fields(cls) if f.init}
        given = {f.name for f in dataclasses.fields(args) if f.init}
        target = type(args) if isinstance(args, SmoothingArguments) and own <= given else cls
        if target is type(args) and not options:
            return args
        lacking = sorted(given - own) if target is cls else []
        if lacking:
            shown = ", ".join(lacking[:5]) + (", ..." if len(lacking) > 5 else "")
            raise TypeError(
                f"args is a {type(args).__name__}, whose fields {shown} {cls.__name__} does not have; use a trainer "
                "whose arguments have them (SmoothingSeq2SeqTrainer for Seq2SeqTrainingArguments, "
                "SmoothingSFTTrainer for SFTConfig) or set args_class to a dataclass combining SmoothingArguments and "
                f"{type(args).__name__}"
            )
        values = {name: _plain(getattr(args, name)) for name in given}
        return target(**{**values, **options})


def _plain(value: object) -> object:
    # `__post_init__` turns strings into enums; the constructor takes either, as `to_dict()` gives them.
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list) and value and isinstance(value[0], Enum):
        return [item.value for item in value]
    return value


@dataclass
class SmoothingTrainingArguments(SmoothingArguments, TrainingArguments):
    __doc__ = (
        "`TrainingArguments` plus the options of `SmoothingTrainer`'s loss (the fields of `SmoothingArguments`).\n"
        + SmoothingArguments.__doc__.split("\n", 1)[1]
    )


@dataclass
class SmoothingSeq2SeqTrainingArguments(SmoothingArguments, Seq2SeqTrainingArguments):
    __doc__ = (
        "`Seq2SeqTrainingArguments` plus the options of `SmoothingTrainer`'s loss (the fields of "
        "`SmoothingArguments`), for `SmoothingSeq2SeqTrainer`.\n" + SmoothingArguments.__doc__.split("\n", 1)[1]
    )
