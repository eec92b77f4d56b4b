"""`SmoothingSFTTrainer`: TRL's `SFTTrainer` with `SmoothingTrainer`'s loss and TRL's own logged metrics.

TRL is an optional extra (``pip install "hf-lsce[trl]"``): without it this module still imports, and the two classes
raise an ImportError that says so when they are used.
"""

from __future__ import annotations

import copy
import functools
import inspect
import types
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.utils import logging

from hf_lsce.checks import IGNORE_INDEX
from hf_lsce.trainer import SAMPLE_WEIGHT_KEY, SmoothingTrainerMixin
from hf_lsce.training_args import SmoothingArguments

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as error:  # the optional extra is not installed
    _TRL_IMPORT_ERROR: ImportError | None = error
else:
    _TRL_IMPORT_ERROR = None

logger = logging.get_logger(__name__)

# Rows of logits turned into probabilities at a time for the entropy metric: bounds its extra memory (K floats each).
_METRIC_ROWS = 1024


def _split_sample_weight(examples: list[dict]) -> tuple[list[dict], Tensor | None]:
    """The examples without ``sample_weight``, and the weights as a ``(B,)`` fp64 tensor (None when none has one)."""
    weights = [example.get(SAMPLE_WEIGHT_KEY) for example in examples]
    stripped = [{k: v for k, v in example.items() if k != SAMPLE_WEIGHT_KEY} for example in examples]
    if all(weight is None for weight in weights):
        return stripped, None
    if any(weight is None for weight in weights):
        raise ValueError(f"{SAMPLE_WEIGHT_KEY} is None for some examples of a batch: give every example a weight")
    return stripped, torch.tensor(weights, dtype=torch.float64)


def _collate_with_sample_weight(collate, examples: list[dict], *args, **kwargs) -> dict:
    # ``collate`` sees the examples without their weights; the batch gets them back as one tensor.
    stripped, weights = _split_sample_weight(examples)
    batch = collate(stripped, *args, **kwargs)
    return batch if weights is None else {**batch, SAMPLE_WEIGHT_KEY: weights}


class _CarriesSampleWeight:
    """Mixed into a collator's own class: its batches also hold the examples' ``sample_weight``.

    TRL's collators build their batch from the keys they know and drop any other. A subclass (rather than a wrapper)
    keeps ``isinstance`` checks on the collator, which TRL makes, true.
    """

    def __call__(self, examples: list[dict], *args, **kwargs) -> dict:
        return _collate_with_sample_weight(super().__call__, examples, *args, **kwargs)


def _carrying_sample_weight(collator):
    """``collator`` (a copy) whose batches keep ``sample_weight``; a plain function is wrapped instead."""
    if isinstance(collator, _CarriesSampleWeight):
        return collator
    if isinstance(collator, types.FunctionType):
        return functools.partial(_collate_with_sample_weight, collator)
    carrier = copy.copy(collator)
    carrier.__class__ = type(type(collator).__name__, (_CarriesSampleWeight, type(collator)), {})
    return carrier


def _has_sample_weight_column(dataset) -> bool:
    datasets = dataset.values() if isinstance(dataset, dict) else [dataset]
    return any(SAMPLE_WEIGHT_KEY in (getattr(d, "column_names", None) or ()) for d in datasets)


def _requires_trl(name: str) -> type:
    def fail(*args, **kwargs):
        raise ImportError(
            f"{name} needs TRL, which is not installed: pip install 'hf-lsce[trl]' ({_TRL_IMPORT_ERROR})"
        )

    return type(name, (), {"__init__": fail, "__init_subclass__": classmethod(fail), "__doc__": f"Needs TRL: {name}."})


if _TRL_IMPORT_ERROR is not None:
    SmoothingSFTConfig = _requires_trl("SmoothingSFTConfig")
    SmoothingSFTTrainer = _requires_trl("SmoothingSFTTrainer")
else:

    @dataclass
    class SmoothingSFTConfig(SmoothingArguments, SFTConfig):
        __doc__ = (
            "TRL's `SFTConfig` plus the options of `SmoothingTrainer`'s loss (the fields of `SmoothingArguments`), "
            'for `SmoothingSFTTrainer`. ``loss_type`` must be ``"nll"``, the loss this trainer smooths.\n'
            + SmoothingArguments.__doc__.split("\n", 1)[1]
        )

        def __post_init__(self):
            super().__post_init__()
            if self.loss_type != "nll":
                raise ValueError(
                    f"loss_type must be 'nll' with SmoothingSFTTrainer (its smoothed, weighted cross-entropy replaces "
                    f"TRL's loss), got {self.loss_type!r}"
                )

    class SmoothingSFTTrainer(SmoothingTrainerMixin, SFTTrainer):
        """TRL's `SFTTrainer` whose loss is `SmoothingTrainer`'s (see `SmoothingTrainerMixin`).

        The causal-LM loss scores ``logits[:, t]`` against ``labels[:, t + 1]`` (or a batch's ``shift_labels``) with
        label smoothing and per-token class weights, divided by the sum of the weights of the labelled tokens over the
        accumulation window on all processes. TRL's masks are the labels' -100s, so completion-only and
        assistant-only training, packing and padding-free batches (``position_ids``) keep their meaning exactly.
        TRL's logged metrics stay: ``entropy`` and ``mean_token_accuracy`` over the labelled tokens, and
        ``num_tokens``, computed from the full logits this loss needs (TRL's own fused head does not build them).
        So ``fused_linear="auto"`` (the default) keeps the logits here, whatever the vocabulary; ``fused_linear=True``
        trains without them (`hf_lsce.causal_lm`), and then logs ``num_tokens`` but not ``entropy`` and
        ``mean_token_accuracy`` in training (one warning at construction says so).

        ``args`` is resolved into `SmoothingSFTConfig`: a plain `SFTConfig` (or `TrainingArguments`) is converted,
        and the keyword options ``label_smoothing``, ``smoothing_style``, ``weight_mode`` and ``class_weights``
        override into it. A ``sample_weight`` column (one non-negative float per example) scales every token of its
        example (see `SmoothingTrainerMixin`); it cannot be combined with packing or padding-free batches.
        ``label_names`` must stay None or ``["labels"]``. TRL's ``label_smoothing_factor`` alone is taken as
        ``label_smoothing`` (TRL's extra forward pass for it never runs). Mixture-of-experts router losses are not
        supported.
        """

        args_class = SmoothingSFTConfig
        fixed_label_name_reason = "TRL's collators put the targets under 'labels'"

        def __init__(self, model, args=None, *trainer_args, **kwargs) -> None:
            given = {
                **inspect.signature(SFTTrainer.__init__).bind_partial(None, model, args, *trainer_args).arguments,
                **kwargs,
            }
            weighted = [
                name for name in ("train_dataset", "eval_dataset") if _has_sample_weight_column(given.get(name))
            ]
            if weighted and (getattr(args, "packing", False) or getattr(args, "padding_free", False)):
                # Packed rows and padding-free batches mix examples in one row; TRL's packing drops other columns.
                raise ValueError(
                    f"{' and '.join(weighted)} have a {SAMPLE_WEIGHT_KEY!r} column, which SmoothingSFTTrainer cannot "
                    "apply with packing or padding_free (one row holds several examples); set packing=False and "
                    "padding_free=False, or drop the column"
                )
            super().__init__(model, args, *trainer_args, **kwargs)
            self.data_collator = _carrying_sample_weight(self.data_collator)
            if self.aux_loss_enabled:
                raise ValueError(
                    "SmoothingSFTTrainer does not add a mixture-of-experts router loss; set router_aux_loss_coef=0 in "
                    "the model's config or use TRL's SFTTrainer"
                )

        def _resolve_linear_head(self, fused_linear):
            # TRL's entropy and mean_token_accuracy need the logits: "auto" keeps them, only True gives them up.
            if fused_linear == "auto":
                logger.info(
                    "fused_linear='auto': SmoothingSFTTrainer trains through the logits, which TRL's entropy and "
                    "mean_token_accuracy need; fused_linear=True trains without them (and without those metrics)"
                )
                return None
            head = super()._resolve_linear_head(fused_linear)
            if head is not None:
                logger.warning(
                    "fused_linear=True: SmoothingSFTTrainer trains without the logits, so TRL's entropy and "
                    "mean_token_accuracy are not logged in training (num_tokens is; evaluation keeps them)"
                )
            return head

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # As TRL does: the key-value cache is of no use in a training or scoring forward pass.
            return super().compute_loss(model, {**inputs, "use_cache": False}, return_outputs, num_items_in_batch)

        def training_step(self, *args, **kwargs):
            with self.maybe_activation_offload_context:
                return super().training_step(*args, **kwargs)

        def _record_batch_metrics(self, inputs: dict[str, Tensor], logits: Tensor, targets: Tensor) -> None:
            """TRL's metrics of one batch, as `SFTTrainer.compute_loss` records them.

            ``entropy``: mean over labelled tokens of the entropy of ``softmax(logits)``; ``mean_token_accuracy``:
            share of labelled tokens whose label is the first argmax of the logits; both over all processes.
            ``num_tokens``: tokens seen in training so far (attention-mask sum, or packed length when padding-free).
            """
            mode = "train" if self.model.training else "eval"
            gather = self.accelerator.gather_for_metrics
            # The linear head path (fused_linear) makes no logits: entropy and accuracy are not logged there.
            if logits is not None:
                with torch.no_grad():
                    rows = logits.detach().flatten(0, -2)
                    labels = targets.flatten()
                    counted = (labels != IGNORE_INDEX).nonzero().flatten()
                    dtype = torch.promote_types(rows.dtype, torch.float32)
                    entropy_sum = torch.zeros((), dtype=dtype, device=rows.device)
                    correct = torch.zeros((), dtype=torch.long, device=rows.device)
                    for index in counted.split(_METRIC_ROWS):
                        chunk = rows[index].to(dtype)
                        log_p = chunk.log_softmax(-1)
                        entropy_sum -= (log_p.exp() * log_p).sum()
                        correct += (chunk.argmax(-1) == labels[index]).sum()
                    num_valid = gather(counted.new_tensor(counted.numel())).sum()
                    entropy_sum = gather(entropy_sum).sum()
                    correct = gather(correct).sum()
                self._metrics[mode]["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
                accuracy = (correct / num_valid).item() if num_valid > 0 else 0.0
                self._metrics[mode]["mean_token_accuracy"].append(accuracy)
            if mode == "train":
                if "attention_mask" in inputs:
                    num_tokens = gather(inputs["attention_mask"].sum()).sum().item()
                elif "position_ids" in inputs:
                    position_ids = inputs["position_ids"]
                    num_tokens = gather(torch.tensor(position_ids.size(1), device=position_ids.device)).sum().item()
                else:
                    raise ValueError("SmoothingSFTTrainer expects 'attention_mask' or 'position_ids' in every batch")
                self._total_train_tokens += num_tokens // self._tp_size
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
