"""`SmoothingTrainer`: `transformers.Trainer` with the class-weighted, label-smoothed loss, exact under accumulation.

What the mean divides by, the one thing this file exists to get right: for every optimizer step the loss is

    sum over the window's positions i of loss_i  /  sum over the same positions of w[y_i]

where the window is all micro-batches of the gradient-accumulation step on all processes, and positions labelled
-100 count nowhere. With per-example weights (a ``sample_weight`` batch key), loss_i and w[y_i] are both multiplied
by the weight of position i's example. Its gradient and the logged loss are therefore those of one big batch, whatever
the split into micro-batches and processes. The base `Trainer` cannot give this: it divides by a label count (not a
weight sum), and in Transformers 5.x it skips its ÷accumulation for models whose ``forward`` takes ``**kwargs`` even
when the loss was not computed by the model, so the usual ``compute_loss`` override reports a loss (and gradients)
accumulation-steps times too large.

The logic lives in `SmoothingTrainerMixin`, which any `Trainer` subclass can take as its first base
(``class T(SmoothingTrainerMixin, SomeTrainer)``); `SmoothingTrainer` is the mixin on `transformers.Trainer`.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType
from torch import Tensor, nn
from transformers import Trainer, TrainingArguments
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer_utils import get_last_checkpoint
from transformers.training_args import OptimizerNames
from transformers.utils import logging

from hf_lsce._io import write_atomic
from hf_lsce.causal_lm import LinearHead, find_linear_head, head_loss, resolve_linear_head, transformers_model
from hf_lsce.checks import IGNORE_INDEX, check_class_weight_values, check_labels, describe
from hf_lsce.class_weights import compute_class_weights
from hf_lsce.fused import empty_cache
from hf_lsce.linear import linear_label_smoothed_cross_entropy
from hf_lsce.loss import label_smoothed_cross_entropy, mean_denominator
from hf_lsce.training_args import SMOOTHING_OPTIONS, SmoothingArguments, SmoothingTrainingArguments

logger = logging.get_logger(__name__)

# Written next to the model in every checkpoint (and by `save_model`), so that a resumed run uses the same weights.
CLASS_WEIGHTS_NAME = "class_weights.json"
# The batch key (dataset column) of per-example weights: one non-negative float per example.
SAMPLE_WEIGHT_KEY = "sample_weight"


def _warn_if_weights_reshape_smoothing(args: SmoothingArguments) -> None:
    if args.weight_mode == "torch" and args.label_smoothing > 0 and args.class_weights is not None:
        logger.warning(
            f"weight_mode='torch' with label_smoothing={args.label_smoothing} and class weights: as in "
            "F.cross_entropy(weight=...), the weights also multiply each class's term of the smoothed target, so the "
            "smoothing mass moves towards heavily weighted classes (for one example the loss is minimized at "
            "p_c proportional to w_c * q_c, q the smoothed target), which can make a model predict the rarest class "
            "everywhere. weight_mode='example' (the default) scales each example's loss by its class's weight and "
            "keeps the smoothed target."
        )


# Methods whose version must be the mixin's (or a subclass's of it): another one first in the method order would
# bypass the window's normalization or the evaluation totals.
_OWNED_METHODS = ("compute_loss", "training_step", "get_batch_samples", "evaluation_loop", "prediction_step")


class SmoothingTrainerMixin:
    """The loss of `SmoothingTrainer` for any `transformers.Trainer` subclass: ``class T(SmoothingTrainerMixin, B)``.

    For one optimizer step, the loss, its gradients and the logged ``loss`` equal those of
    ``label_smoothed_cross_entropy(logits, labels, weight, reduction="mean", label_smoothing=eps, ...)`` on the
    concatenation of every micro-batch of the accumulation window on every process: the mean divides by
    ``sum_i w[y_i]`` over all of them (the count of labels without weights), gathered across processes once per
    step. With ``label_smoothing=0`` and no weights this is ``F.cross_entropy`` over the full batch, i.e. what plain
    `Trainer` computes with ``gradient_accumulation_steps=1`` on one process.

    The mixin must come before the `Trainer` class in the bases: a class whose method order puts another trainer's
    ``compute_loss``, ``training_step``, ``get_batch_samples``, ``evaluation_loop`` or ``prediction_step`` before
    the mixin's (e.g. ``class T(SFTTrainer, SmoothingTrainer)``) raises a TypeError when it is defined, and a parent
    whose constructor replaces the arguments by a class without the smoothing options raises at construction.
    ``args_class`` names the arguments class the options are resolved into: set it to a dataclass that combines
    `SmoothingArguments` with the base trainer's own arguments class (`SmoothingSFTTrainer` and
    `SmoothingSeq2SeqTrainer` do).

    Tasks (the head decides, labels -100 are ignored everywhere):

    * sequence classification: logits ``(B, K)``, labels ``(B,)``;
    * token classification: logits ``(B, T, K)``, labels ``(B, T)``;
    * causal LM: logits ``(B, T, V)`` predict ``labels[:, 1:]`` (shifted by one, as Transformers does). The shift is
      detected as `Trainer` detects it (the model's class is in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``); a batch key
      ``shift_labels`` (padding-free collators) is used as the already-shifted target;
    * seq2seq: decoder logits against ``labels`` (no shift); ``decoder_input_ids`` are built from the labels when the
      collator did not provide them.

    Per-example weights: a batch key ``sample_weight`` (one finite, non-negative float per example, shape ``(B,)``;
    the dataset column survives ``remove_unused_columns``) multiplies every counted position of its example, in the
    sum and in the denominator: the step is ``sum_i s_i loss_i / sum_i s_i w[y_i]`` over the window. Present in every
    batch or in none. The targets are read from ``labels``, or from the one key ``args.label_names`` names; that key
    and ``sample_weight`` never reach the model.

    Multi-label (``problem_type="multi_label_classification"``) and regression (``num_labels=1``) heads raise at
    construction, as does ``compute_loss_func``: this trainer owns the loss.

    Evaluation reports ``eval_loss``, the same smoothed, weighted loss normalized over the whole evaluation set
    (``sum of losses / sum of w[y_i]``), and ``eval_nll``, the plain cross-entropy (no smoothing, no weights, mean
    over labelled positions), comparable across runs with different ``eps``.

    Args:
        model, args, **kwargs: as for `transformers.Trainer`. ``args`` is resolved once, at construction, into
            ``args_class`` (`SmoothingTrainingArguments`) with `SmoothingArguments.from_arguments`: a plain
            `TrainingArguments` is converted (every field kept), the keyword options below override into a copy and
            are validated by the same rule, and the trainer reads ``self.args`` only after that. The defaults are the
            fields' (``label_smoothing=0.1``, ``"uniform"``, ``"example"``, no weights); a base
            ``label_smoothing_factor > 0`` alone is used as ``label_smoothing`` (`Trainer`'s own `LabelSmoother`
            never runs); both > 0 is an error.
        label_smoothing (`float`, *optional*): overrides ``args.label_smoothing``.
        smoothing_style (`str`, *optional*): overrides ``args.smoothing_style``.
        weight_mode (`str`, *optional*): overrides ``args.weight_mode``.
        class_weights (`list[float]`, `torch.Tensor` or `"balanced"`, *optional*): overrides ``args.class_weights``.
            ``"balanced"`` computes `compute_class_weights` once from ``train_dataset``'s labels (tokens for token
            tasks, shifted labels for causal LMs); the weights are logged, written to ``class_weights.json`` in every
            checkpoint, and read back from it when training resumes.
        shift_labels (`bool`, *optional*): force (True) or forbid (False) the causal-LM shift; None detects it.
        fused_linear (`bool` or `str`, *optional*): overrides ``args.fused_linear``: train a causal LM without its
            logits (`hf_lsce.causal_lm`; the same loss and gradients, by `linear_label_smoothed_cross_entropy`).
            Training steps and loss-only evaluation steps (``evaluate()`` without ``compute_metrics``; not in
            subclasses that override `_record_batch_metrics`) take that path, and `_record_batch_metrics` then gets
            ``logits=None``; evaluation with ``compute_metrics``,
            ``predict`` and a direct ``compute_loss(..., return_outputs=True)`` compute the logits.
    """

    # The arguments class the options are resolved into (a `TrainingArguments` subclass with `SmoothingArguments`).
    args_class: type[SmoothingArguments] = SmoothingTrainingArguments
    # Why the targets must be under "labels" (a base trainer or its collators read that key), or None when
    # `label_names` may name another key.
    fixed_label_name_reason: str | None = None
    # This trainer owns `training_step`; the flag tells any Transformers code that reads it that `compute_loss`
    # returns a loss already normalized over the accumulation window.
    loss_is_scaled_for_ga = True

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for name in _OWNED_METHODS:
            owner = next(klass for klass in cls.__mro__ if name in vars(klass))
            if not issubclass(owner, SmoothingTrainerMixin):
                raise TypeError(
                    f"{cls.__name__}: {owner.__name__}.{name} comes before SmoothingTrainerMixin.{name} in the method "
                    f"order, so the smoothed, weighted loss and its normalization would not run. Put the smoothing "
                    f"class first (class {cls.__name__}(SmoothingTrainerMixin, {owner.__name__}) or "
                    f"class {cls.__name__}(SmoothingTrainer, ...)), or use hf_lsce.SmoothingSFTTrainer or "
                    "hf_lsce.SmoothingSeq2SeqTrainer; to change the loss, override compute_loss in a subclass"
                )

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        *trainer_args,
        label_smoothing: float | None = None,
        smoothing_style: str | None = None,
        weight_mode: str | None = None,
        class_weights: list[float] | Tensor | str | None = None,
        shift_labels: bool | None = None,
        fused_linear: bool | str | None = None,
        **kwargs,
    ) -> None:
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("SmoothingTrainer computes the loss itself; compute_loss_func must be None")
        if shift_labels not in (None, True, False):
            raise ValueError(f"shift_labels must be None (detect), True or False, got {shift_labels!r}")
        # Resolved and validated once, before the (slow) base constructor, so bad input fails fast; from here on the
        # options are read from `self.args` only.
        args = self.args_class.from_arguments(
            args,
            label_smoothing=label_smoothing,
            smoothing_style=smoothing_style,
            weight_mode=weight_mode,
            class_weights=class_weights,
            fused_linear=fused_linear,
        )
        _warn_if_weights_reshape_smoothing(args)
        self.label_name = self._check_label_names(args.label_names)

        try:
            super().__init__(model, args, *trainer_args, **kwargs)
        except TypeError as error:
            if not any(f"'{name}'" in str(error) for name in SMOOTHING_OPTIONS):
                raise
            raise TypeError(
                f"{type(self).__name__}: a parent class rebuilt the arguments as a class without the smoothing "
                f"options ({error}); set args_class to a dataclass combining SmoothingArguments and that class, or "
                "use hf_lsce.SmoothingSFTTrainer / SmoothingSeq2SeqTrainer"
            ) from None
        if not isinstance(self.args, SmoothingArguments):
            raise TypeError(
                f"{type(self).__name__}: a parent class replaced the arguments by a {type(self.args).__name__}, which "
                "has no smoothing options; set args_class to a dataclass combining SmoothingArguments and "
                f"{type(self.args).__name__}, or use hf_lsce.SmoothingSFTTrainer / SmoothingSeq2SeqTrainer"
            )
        self._loss_calls = 0
        self._window_denominator: float | None = None
        self._eval_totals: Tensor | None = None
        self._weights_on_device: dict[torch.device, Tensor] = {}
        # Whether batches carry `sample_weight`, by mode ("train", "eval"): set by the first batch, then checked.
        self._sample_weight_presence: dict[str, bool] = {}
        self._prediction_sample_weight: Tensor | None = None

        self._is_encoder_decoder = False
        self._is_causal_lm = False
        self.shift_labels = bool(shift_labels)
        self.num_classes: int | None = None
        if self.model is not None:
            self._inspect_model(shift_labels)
        self._linear_head = None
        self._loss_only_prediction = False
        if self.model is not None and (self._is_causal_lm or self.args.fused_linear is True):
            self._linear_head = self._resolve_linear_head(self.args.fused_linear)

        class_weights = self.args.class_weights
        self.class_weights_method = "balanced" if class_weights == "balanced" else "given"
        self.class_weights: Tensor | None = None
        if class_weights == "balanced":
            self._set_class_weights(self._balanced_weights())
            logger.info(f"Balanced class weights from the training set: {self.class_weights.tolist()}")
        elif class_weights is not None:
            self._set_class_weights(torch.tensor(class_weights, dtype=torch.float64))

    def _resolve_linear_head(self, fused_linear: bool | str) -> LinearHead | None:
        """The head that training steps feed to the linear loss under ``fused_linear``, or None for the logits path
        (`hf_lsce.causal_lm.resolve_linear_head`); called once, at construction, for causal LMs and for True."""
        return resolve_linear_head(self.accelerator.unwrap_model(self.model), fused_linear, self.args.device)

    # The options as the trainer uses them (read-only views of `self.args`).

    @property
    def label_smoothing(self) -> float:
        return self.args.label_smoothing

    @property
    def smoothing_style(self) -> str:
        return self.args.smoothing_style

    @property
    def weight_mode(self) -> str:
        return self.args.weight_mode

    # ---- Construction ----

    def _check_label_names(self, label_names: list[str] | None) -> str:
        """The batch key of the targets: ``label_names``' one entry, "labels" when it is None."""
        if label_names is None:
            return "labels"
        if not (isinstance(label_names, (list, tuple)) and len(label_names) == 1 and isinstance(label_names[0], str)):
            raise ValueError(
                f"label_names must name the one batch key that holds the class labels (e.g. ['target']), as "
                f"{type(self).__name__} scores one label tensor per batch; got {label_names!r}"
            )
        if label_names[0] != "labels" and self.fixed_label_name_reason is not None:
            raise ValueError(
                f"label_names must be None or ['labels'] with {type(self).__name__} "
                f"({self.fixed_label_name_reason}), got {label_names!r}"
            )
        return label_names[0]

    def _unwrapped_model(self) -> nn.Module:
        # A PEFT model wraps the Transformers model whose class decides the task.
        return transformers_model(self.accelerator.unwrap_model(self.model))

    def _inspect_model(self, shift_labels: bool | None) -> None:
        model = self._unwrapped_model()
        config = getattr(model, "config", None)
        problem_type = getattr(config, "problem_type", None)
        if problem_type == "multi_label_classification":
            raise ValueError(
                "SmoothingTrainer needs single-label targets (one class index per position), but the model has "
                "problem_type='multi_label_classification'; use a BCE-based loss for multi-label heads"
            )
        self._is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        is_causal = model._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        self._is_causal_lm = is_causal
        self.shift_labels = is_causal if shift_labels is None else shift_labels
        generates = is_causal or self._is_encoder_decoder or self.shift_labels
        if problem_type == "regression" or (not generates and getattr(config, "num_labels", 2) == 1):
            raise ValueError(
                f"SmoothingTrainer needs a classifier head with K >= 2 classes, but the model has a regression head "
                f"(problem_type={problem_type!r}, num_labels={getattr(config, 'num_labels', None)})"
            )
        if generates:
            embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            if embeddings is not None and getattr(embeddings, "weight", None) is not None:
                self.num_classes = embeddings.weight.shape[0]
            elif config is not None:
                text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
                self.num_classes = getattr(text_config, "vocab_size", None)
        elif config is not None:
            self.num_classes = config.num_labels

    def _set_class_weights(self, weights: Tensor) -> None:
        if self.num_classes is not None and weights.shape[0] != self.num_classes:
            raise ValueError(
                f"class_weights must have one weight per class of the model's head ({self.num_classes}), "
                f"got {weights.shape[0]}"
            )
        # fp64: the weights are exact whatever the model's dtype; the loss casts them to its compute dtype.
        self.class_weights = weights.to(torch.float64)
        self._weights_on_device = {}

    def _balanced_weights(self) -> Tensor:
        dataset = self.train_dataset
        if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise ValueError(
                "class_weights='balanced' needs a map-style train_dataset with labels; pass explicit weights instead"
            )
        if self.num_classes is None:
            raise ValueError("class_weights='balanced' needs the model's number of classes; pass explicit weights")
        # `DataCollatorWithPadding` and the default collator rename a "label" column to "labels".
        candidates = ("labels", "label") if self.label_name == "labels" else (self.label_name,)

        def label_key(keys) -> str | None:
            return next((key for key in candidates if key in keys), None)

        column_names = getattr(dataset, "column_names", None)
        if column_names is not None:
            name = label_key(column_names)
            labels = dataset[name] if name is not None else None
        else:
            labels = []
            for example in dataset:
                name = label_key(example)
                if name is None:
                    break
                labels.append(example[name])
        if name is None:
            raise ValueError(
                f"class_weights='balanced' needs a {' (or '.join(repr(key) for key in candidates)}"
                f"{')' if len(candidates) > 1 else ''} column in train_dataset; pass explicit weights when the "
                "collator creates the labels"
            )
        if self.shift_labels:
            # Position 0 of each sequence is never a target of a causal LM.
            labels = [example[1:] for example in labels]
        return compute_class_weights(labels, self.num_classes, ignore_index=IGNORE_INDEX)

    # ---- Loss ----

    def _weight_on(self, device: torch.device) -> Tensor | None:
        if self.class_weights is None:
            return None
        if device not in self._weights_on_device:
            self._weights_on_device[device] = self.class_weights.to(device)
        return self._weights_on_device[device]

    def _targets(self, labels: Tensor, shift_target: Tensor | None = None) -> Tensor:
        """The label each logit is scored against, for `compute_loss` and the window's denominator alike.

        For causal LMs position t predicts ``labels[t + 1]`` and the last position nothing (-100): padding the targets
        rather than slicing the logits keeps the logits contiguous, so the loss makes no copy of them. A batch's
        ``shift_labels`` (from padding-free collators) are the targets as they are.
        """
        if shift_target is not None:
            return shift_target
        return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX) if self.shift_labels else labels

    def _check_sample_weight(self, value, targets: Tensor, mode: str | None, check_values: bool) -> Tensor | None:
        """A batch's ``sample_weight`` as an fp64 ``(B,)`` tensor on the targets' device, or None if it has none.

        One weight per example (the targets' first dimension); with ``check_values``, finite and non-negative.
        ``mode`` "train" (the whole training run) or "eval" (one evaluation loop): present in every batch or in none.
        """
        if mode is not None:
            present = value is not None
            if mode not in self._sample_weight_presence:
                self._sample_weight_presence[mode] = present
                columns = getattr(self.train_dataset, "column_names", None) or ()
                if mode == "train" and not present and SAMPLE_WEIGHT_KEY in columns:
                    raise ValueError(
                        f"train_dataset has a {SAMPLE_WEIGHT_KEY!r} column, but the training batches do not: the data "
                        f"collator dropped it; use one that keeps the key (DataCollatorWithPadding, "
                        "DataCollatorForTokenClassification and DataCollatorForSeq2Seq do)"
                    )
            elif self._sample_weight_presence[mode] != present:
                where = "training" if mode == "train" else "evaluation"
                raise ValueError(
                    f"{SAMPLE_WEIGHT_KEY!r} is in some {where} batches and not in others: give every example a "
                    "weight, or none"
                )
        if value is None:
            return None
        if not isinstance(value, Tensor) or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{SAMPLE_WEIGHT_KEY} must be a tensor of real numbers, got {describe(value)}")
        if value.shape != targets.shape[:1]:
            raise ValueError(
                f"{SAMPLE_WEIGHT_KEY} must hold one weight per example, shape ({targets.shape[0]},) for labels of "
                f"shape {tuple(targets.shape)}, got shape {tuple(value.shape)}"
            )
        value = value.to(device=targets.device, dtype=torch.float64)
        if check_values:
            bad = value[~(value.isfinite() & (value >= 0))]
            if bad.numel():
                raise ValueError(
                    f"{SAMPLE_WEIGHT_KEY} must be finite and non-negative, got {', '.join(map(str, bad[:8].tolist()))}"
                )
        return value

    def _denominator(self, targets: Tensor, weight: Tensor | None, sample_weight: Tensor | None) -> Tensor:
        """What the mean divides by for one micro-batch: `mean_denominator`, each example's share times its weight.

        Without sample weights this is ``sum_i w[y_i]`` over the labelled positions; with them
        ``sum_b sample_weight[b] * (sum_i w[y_i] over example b's labelled positions)``.
        """
        mode = self.args.weight_mode
        if sample_weight is None:
            return mean_denominator(targets, weight, IGNORE_INDEX, weight_mode=mode)
        per_example = torch.func.vmap(lambda row: mean_denominator(row, weight, IGNORE_INDEX, weight_mode=mode))
        return per_example(targets).to(sample_weight.dtype) @ sample_weight

    def get_batch_samples(self, epoch_iterator, num_batches, *args, **kwargs):
        """Fetches one accumulation window (as `Trainer` does) and computes its global weight sum.

        The sum of ``w[y_i]`` (times the example's ``sample_weight`` where batches have one) over every micro-batch
        of the window is reduced across processes once per optimizer step; `compute_loss` divides by it. Labels and
        sample weights are checked here, once. ``num_items_in_batch`` is passed through untouched and not used.
        """
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, *args, **kwargs)
        device = self.args.device
        total = torch.zeros((), dtype=torch.float64, device=device)
        for batch in batch_samples:
            if batch.get(self.label_name) is None:
                raise ValueError(f"{type(self).__name__} needs {self.label_name!r} in every training batch")
            targets = self._targets(batch[self.label_name], batch.get("shift_labels")).to(device)
            self._check_label_range(targets)
            sample_weight = self._check_sample_weight(batch.get(SAMPLE_WEIGHT_KEY), targets, "train", True)
            total += self._denominator(targets, self._weight_on(device), sample_weight)
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        # One host sync per optimizer step: the reduce above has synchronized anyway.
        self._window_denominator = float(total)
        return batch_samples, num_items_in_batch

    def _check_label_range(self, targets: Tensor) -> None:
        # Once per window, so that `compute_loss` can skip the loss's own per-call value checks.
        if self.num_classes is not None and not targets.is_floating_point():
            check_labels(targets, self.num_classes, IGNORE_INDEX)

    def _set_signature_columns_if_needed(self) -> None:
        # `remove_unused_columns` keeps the dataset columns the model's `forward` takes; the sample weights are ours.
        super()._set_signature_columns_if_needed()
        if SAMPLE_WEIGHT_KEY not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, SAMPLE_WEIGHT_KEY]

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, object]:
        """The smoothed, weighted loss of one micro-batch, normalized over the whole accumulation window.

        In training (inside `Trainer.train`) this is ``sum_i s_i loss_i / (sum of s_i w[y_i] over the window on all
        processes) * num_processes``, with ``s_i`` the ``sample_weight`` of position i's example (1 without one):
        summed over the window's micro-batches and averaged over processes by DDP it is the full-batch weighted mean.
        Elsewhere (evaluation, a direct call) it is the micro-batch's own weighted mean. ``num_items_in_batch`` (a
        label count) is accepted for signature compatibility and ignored. The labels (the key ``label_names`` names,
        "labels" by default) and ``sample_weight`` are popped from ``inputs``, so the model never computes its own
        loss.
        """
        if inputs.get(self.label_name) is None:
            raise ValueError(f"{type(self).__name__} needs {self.label_name!r} in every batch")
        inputs = dict(inputs)
        labels = inputs.pop(self.label_name)
        shift_target = inputs.pop("shift_labels", None)
        # In prediction steps `prediction_step` has set the weights aside before the base class saw the batch.
        sample_weight = inputs.pop(SAMPLE_WEIGHT_KEY, self._prediction_sample_weight)
        if (
            self._is_encoder_decoder
            and inputs.get("decoder_input_ids") is None
            and "decoder_inputs_embeds" not in inputs
        ):
            # Seq2seq models build these from `labels` inside `forward`; the labels no longer go there.
            inputs["decoder_input_ids"] = self._unwrapped_model().prepare_decoder_input_ids_from_labels(labels=labels)
        self._loss_calls += 1
        targets = self._targets(labels, shift_target)
        in_window = model.training and self._window_denominator is not None
        mode = "train" if in_window else "eval" if self._eval_totals is not None else None
        # In the window, `get_batch_samples` has checked the values already.
        sample_weight = self._check_sample_weight(sample_weight, targets, mode, check_values=not in_window)
        if self._linear_head is not None and (self._loss_only_prediction or (model.training and not return_outputs)):
            # The head's forward computes the loss from its input: no logits (see hf_lsce.causal_lm).
            linear_head = self._current_linear_head(model)
            loss = functools.partial(self._linear_loss, targets, sample_weight, model.training)
            with head_loss(linear_head, loss) as head:
                model(**inputs)
            self._record_batch_metrics(inputs, None, targets)
            # A loss-only prediction step reads no outputs.
            return (head.loss, {}) if return_outputs else head.loss
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        loss = self._smoothed_loss(logits, targets, in_training=model.training, sample_weight=sample_weight)
        self._record_batch_metrics(inputs, logits, targets)

        if not return_outputs:
            return loss
        if not isinstance(outputs, dict):
            # Tuple outputs: `Trainer.prediction_step` expects the loss first, as a model computing it would return.
            outputs = (loss, *outputs)
        return loss, outputs

    def _smoothed_loss(
        self,
        logits: Tensor | None,
        targets: Tensor,
        in_training: bool,
        sample_weight: Tensor | None = None,
        score: Callable[..., Tensor] | None = None,
    ) -> Tensor:
        """The loss of one micro-batch: normalized over the window in training, its own weighted mean elsewhere.

        With ``sample_weight`` (``(B,)``) every position of example b is scaled by ``sample_weight[b]``, in the sum
        and in what the mean divides by (`_denominator`). In evaluation the sums behind ``eval_loss`` and
        ``eval_nll`` are added up as well (``eval_nll`` stays unweighted). ``score(targets, weight, ignore_index,
        reduction, eps, **options)`` replaces ``label_smoothed_cross_entropy(logits, ...)`` where the logits do not
        exist (`_linear_loss`).
        """
        if score is None:
            score = functools.partial(label_smoothed_cross_entropy, logits)
        weight = self._weight_on(targets.device)
        eps = self.args.label_smoothing
        options = {"smoothing_style": self.args.smoothing_style, "weight_mode": self.args.weight_mode}
        in_window = in_training and self._window_denominator is not None
        # Dividing by (global sum / num_processes) scales each process's loss by num_processes, which DDP's gradient
        # averaging (and the mean over processes of the logged loss) undoes. An all-padding (or all-zero-weight)
        # window has a zero sum; then every local sum is zero too, and the loss is 0 with zero gradients, no NaN.
        normalizer = self._window_denominator / self.accelerator.num_processes if in_window else None
        if sample_weight is None and in_window:
            return score(
                targets, weight, IGNORE_INDEX, "mean", eps, normalizer=normalizer or None, validate=False, **options
            )
        if sample_weight is None:
            total = score(targets, weight, IGNORE_INDEX, "sum", eps, **options)
        else:
            # reduction="none" is exact on every implementation of the loss; the weights then scale whole examples.
            losses = score(targets, weight, IGNORE_INDEX, "none", eps, validate=not in_window, **options)
            total = losses.reshape(sample_weight.shape[0], -1).sum(1) @ sample_weight.to(losses.dtype)
            if in_window:
                return total / normalizer if normalizer else total * 0
        denominator = self._denominator(targets, weight, sample_weight)
        if self._eval_totals is not None:
            with torch.no_grad():
                nll = score(targets, None, IGNORE_INDEX, "sum", 0.0)
            count = mean_denominator(targets, None, IGNORE_INDEX)
            sums = torch.stack([total.detach().double(), denominator.double(), nll.double(), count.double()])
            self._eval_totals += sums.to(self._eval_totals.device)
        return total / denominator if denominator > 0 else total * 0

    def _current_linear_head(self, model: nn.Module):
        """The head found at construction, or found again when the model was replaced since (``model_init``)."""
        model = self.accelerator.unwrap_model(model)
        if transformers_model(model).get_output_embeddings() is not self._linear_head.head:
            self._linear_head = find_linear_head(model)
        return self._linear_head

    def _linear_loss(
        self,
        targets: Tensor,
        sample_weight: Tensor | None,
        in_training: bool,
        hidden: Tensor,
        head_weight: Tensor,
        head_bias: Tensor | None,
        **head_options,
    ) -> Tensor:
        """`_smoothed_loss` from the head's input and parameters (``head_options``: the head's logit scale or soft
        cap) by `linear_label_smoothed_cross_entropy`: in training, and in loss-only evaluation steps."""

        def score(target, weight, *args, **options):
            return linear_label_smoothed_cross_entropy(
                hidden, head_weight, target, head_bias, weight, *args, **options, **head_options
            )

        return self._smoothed_loss(None, targets, in_training, sample_weight, score)

    def _record_batch_metrics(self, inputs: dict[str, Tensor], logits: Tensor, targets: Tensor) -> None:
        """Called after each loss with the model's inputs (labels removed), logits and targets; a hook for subclasses
        that log per-batch metrics (`SmoothingSFTTrainer` logs TRL's). ``logits`` is None on the linear head path
        (``fused_linear``), which makes none."""

    def _score_outputs(self, outputs, labels: Tensor, shift_labels: bool = False) -> Tensor:
        # `Seq2SeqTrainer.prediction_step` scores a generating evaluation step with `self.label_smoother(outputs,
        # labels)` when one is set, else with the model's own loss: `prediction_step` below sets this there.
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        targets = self._targets(labels)
        mode = "eval" if self._eval_totals is not None else None
        sample_weight = self._check_sample_weight(self._prediction_sample_weight, targets, mode, check_values=True)
        return self._smoothed_loss(logits, targets, in_training=False, sample_weight=sample_weight)

    def training_step(
        self, model: nn.Module, inputs: dict[str, Tensor], num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        """Forward and backward of one micro-batch; returns the detached loss that `Trainer` adds up for logging.

        Unlike the base method this never divides by the accumulation steps: `compute_loss` already divides by the
        window's weight sum. (The base rule for that division changed across Transformers releases and, in 5.x,
        depends on whether the model's ``forward`` takes ``**kwargs``.)
        """
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        calls = self._loss_calls
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        del inputs
        if self._loss_calls == calls:
            raise TypeError(
                f"{type(self).compute_loss.__qualname__} did not call SmoothingTrainerMixin.compute_loss, so the "
                "smoothed, weighted loss did not run; an override must call super().compute_loss(...)"
            )
        if self.args.n_gpu > 1:
            loss = loss.mean()  # `nn.DataParallel` returns one value per device.
        kwargs = {}
        if self.args.optim in (OptimizerNames.LOMO, OptimizerNames.ADALOMO):
            kwargs["learning_rate"] = self._get_learning_rate()
        # `Accelerator.backward` divides by its own gradient_accumulation_steps (Transformers < 4.48 sets it to the
        # accumulation steps, later releases to 1): undo it, the loss is final. DeepSpeed's engine would divide by
        # its accumulation steps instead; it is told not to, as the base Trainer does (untested here: no DeepSpeed).
        scale = self.accelerator.gradient_accumulation_steps
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            scale, kwargs["scale_wrt_gas"] = 1, False
        self.accelerator.backward(loss * scale, **kwargs)
        return loss.detach()

    # ---- Evaluation ----

    def prediction_step(self, model: nn.Module, inputs: dict, prediction_loss_only: bool, *args, **kwargs):
        """The base class's `prediction_step`, with its loss always this trainer's (also when it generates).

        `Trainer.prediction_step` calls `compute_loss`. `Seq2SeqTrainer.prediction_step` with
        ``predict_with_generate=True`` runs the model itself and takes its loss from ``self.label_smoother`` (else
        the model's own): the smoothed, weighted loss is put there for the call, so ``eval_loss`` and ``eval_nll``
        stay this trainer's. With ``fused_linear`` on, a loss-only step (``prediction_loss_only``) computes the loss
        without the logits, except in subclasses that override `_record_batch_metrics`.
        """
        inputs = dict(inputs)
        # Not a model input: `Seq2SeqTrainer` would pass it to `generate` and to the model; the loss reads it here.
        self._prediction_sample_weight = inputs.pop(SAMPLE_WEIGHT_KEY, None)
        self.label_smoother = self._score_outputs
        # A loss-only step (`evaluate()` without compute_metrics) needs no logits: the linear head path serves it,
        # unless a subclass logs metrics from the logits (`SmoothingSFTTrainer`: TRL's entropy and accuracy).
        self._loss_only_prediction = (
            bool(prediction_loss_only)
            and self._linear_head is not None
            and type(self)._record_batch_metrics is SmoothingTrainerMixin._record_batch_metrics
        )
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, *args, **kwargs)
        finally:
            self.label_smoother = None
            self._loss_only_prediction = False
            self._prediction_sample_weight = None

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """`Trainer.evaluation_loop`, with ``{prefix}_loss`` normalized over the whole set and ``{prefix}_nll`` added.

        The base loop averages per-batch losses weighted by batch size, which is not the weighted mean when batches
        differ in padding or weight sums. Here ``{prefix}_loss = sum of smoothed weighted losses / sum of w[y_i]`` and
        ``{prefix}_nll = sum of -log p(y_i) / number of labelled positions``, both reduced across processes.
        """
        self._eval_totals = torch.zeros(4, dtype=torch.float64, device=self.args.device)
        self._sample_weight_presence.pop("eval", None)
        try:
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
            totals = self._eval_totals
        finally:
            self._eval_totals = None
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        loss_sum, denominator, nll_sum, count = totals.tolist()
        if count > 0:
            output.metrics[f"{metric_key_prefix}_loss"] = loss_sum / denominator if denominator > 0 else 0.0
            output.metrics[f"{metric_key_prefix}_nll"] = nll_sum / count
        return output

    # ---- Checkpoints ----

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, plus ``class_weights.json`` next to the model when the trainer has class weights.

        The file is written whole, with the permissions of the other checkpoint files (`hf_lsce._io.write_atomic`).
        """
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.class_weights is not None and self.args.should_save:
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            record = {"method": self.class_weights_method, "class_weights": self.class_weights.tolist()}
            write_atomic(os.path.join(output_dir, CLASS_WEIGHTS_NAME), json.dumps(record, indent=2))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`; when resuming, balanced class weights are read back from the checkpoint.

        On return, the CPU memory that the fused loss keeps for its next gradient is released
        (`hf_lsce.fused.empty_cache`).

        Weights computed with ``"balanced"`` are replaced by the checkpoint's, so a resumed run optimizes the same
        loss even if the training set changed. Explicitly given weights are kept (with a warning if they differ).
        """
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, (str, os.PathLike)):
            self._load_class_weights(checkpoint)
        # Whether batches carry sample weights is decided by this run's first batch.
        self._sample_weight_presence.pop("train", None)
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            # A later direct `compute_loss` call must not divide by the last window's sum.
            self._window_denominator = None
            # The fused path keeps the last gradient's memory for the next step; training is over.
            empty_cache()

    def _load_class_weights(self, checkpoint: str | os.PathLike) -> None:
        path = os.path.join(checkpoint, CLASS_WEIGHTS_NAME)
        if not os.path.isfile(path):
            if self.class_weights_method == "balanced" and self.class_weights is not None:
                logger.warning(
                    f"{checkpoint} has no {CLASS_WEIGHTS_NAME}: the 'balanced' class weights are recomputed from the "
                    f"training data ({self.class_weights.tolist()}), which may differ from those the checkpoint was "
                    "trained with"
                )
            return
        if self.class_weights is None:
            logger.warning(f"{path} holds class weights, but this trainer has none: they are not used")
            return
        stored = torch.tensor(_read_class_weights(path, self.num_classes), dtype=torch.float64)
        if self.class_weights_method == "balanced":
            self._set_class_weights(stored)
            logger.info(f"Resuming with the class weights stored in {path}: {stored.tolist()}")
        elif stored.shape != self.class_weights.shape or not torch.allclose(stored, self.class_weights):
            logger.warning(f"The class weights given differ from those stored in {path}; using the given ones")


class SmoothingTrainer(SmoothingTrainerMixin, Trainer):
    """`transformers.Trainer` whose loss is `hf_lsce.label_smoothed_cross_entropy`, normalized over the full batch.

    Everything is `SmoothingTrainerMixin`'s (the loss and what its mean divides by, the tasks, ``eval_loss`` and
    ``eval_nll``, the options and their resolution into `SmoothingTrainingArguments`, class weights in
    checkpoints); this class applies it to `transformers.Trainer`:

    ```python
    trainer = SmoothingTrainer(model=model, args=TrainingArguments("out"), train_dataset=train, label_smoothing=0.1,
                               class_weights="balanced")
    ```
    """


def _read_class_weights(path: str, num_classes: int | None) -> list[float]:
    """The weights of a ``class_weights.json``, checked by the rule given weights follow; errors name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read the class weights ({error})") from None
    weights = record.get("class_weights") if isinstance(record, dict) else None
    if not isinstance(weights, list):
        raise ValueError(f"{path}: expected a JSON object with a 'class_weights' list, got {describe(record)}")
    check_class_weight_values(weights, num_classes, source=path)
    return [float(weight) for weight in weights]
