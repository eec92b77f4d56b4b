"""`SmoothingSeq2SeqTrainer`: `transformers.Seq2SeqTrainer` with `SmoothingTrainer`'s loss, also when it generates."""

from __future__ import annotations

from transformers import Seq2SeqTrainer

from hf_lsce.trainer import SmoothingTrainerMixin
from hf_lsce.training_args import SmoothingSeq2SeqTrainingArguments


class SmoothingSeq2SeqTrainer(SmoothingTrainerMixin, Seq2SeqTrainer):
    """`transformers.Seq2SeqTrainer` whose loss is `SmoothingTrainer`'s (see `SmoothingTrainerMixin`).

    The decoder's logits are scored against ``labels`` (no shift); ``decoder_input_ids`` are built from the labels
    when the collator did not provide them. With ``predict_with_generate=True`` evaluation generates (for
    ``compute_metrics``) and ``eval_loss`` stays the smoothed, weighted loss over the whole evaluation set, with
    ``eval_nll`` the plain cross-entropy, both from the teacher-forced forward pass that `Seq2SeqTrainer` runs
    besides generating.

    ``args`` is resolved into `SmoothingSeq2SeqTrainingArguments`: a plain `Seq2SeqTrainingArguments` (or
    `TrainingArguments`) is converted, and the keyword options ``label_smoothing``, ``smoothing_style``,
    ``weight_mode`` and ``class_weights`` override into it. A ``sample_weight`` column (one non-negative float per
    example) scales every target token of its example, in training and in ``eval_loss``, also when generating.
    ``label_names`` must stay None or ``["labels"]``.
    """

    args_class = SmoothingSeq2SeqTrainingArguments
    fixed_label_name_reason = "DataCollatorForSeq2Seq pads 'labels' and Seq2SeqTrainer's generation reads them"
