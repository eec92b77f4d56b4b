"""Tiny, deterministic training setups shared by tests/test_trainer*.py and the torchrun worker.

Three tasks built from configs (no Hub): a BERT sequence classifier, a BERT token classifier and a GPT-2 causal LM,
each on 8 examples of different lengths, so that micro-batches differ in padding, in labelled positions and in the
sum of their class weights. Models are fp64 and dropout-free so that runs split differently agree to ~1e-12; the
optimizer is SGD with a constant learning rate and the sampler is sequential, so one step is a pure function of the
gradient.
"""

from __future__ import annotations

import copy
import json

import torch
import torch.nn.functional as F
from tiny_models import tiny_bert_config
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from torch.utils.data import SequentialSampler
from transformers import (
    BertForSequenceClassification,
    BertForTokenClassification,
    DataCollatorForSeq2Seq,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
    Trainer,
)

from hf_lsce import SmoothingTrainer, SmoothingTrainingArguments

TASKS = ("seq_cls", "token_cls", "causal_lm")  # the invariants' tasks; "seq2seq" (tiny T5) is also available
LENGTHS = (3, 11, 5, 8, 2, 12, 6, 4)
VOCAB_SIZE = 24
NUM_LABELS = {"seq_cls": 3, "token_cls": 4, "causal_lm": VOCAB_SIZE, "seq2seq": VOCAB_SIZE}
LEARNING_RATE = 0.5
EPSILON = 0.1
# Per-example weights of the 8 examples (`sample_weight`): unequal, one of them 0, exact in fp32.
SAMPLE_WEIGHTS = (0.5, 2.0, 1.0, 0.0, 1.5, 0.25, 3.0, 1.0)


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, VOCAB_SIZE)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


def class_weights(task: str) -> list[float]:
    """Fixed, unequal weights (not a monotone function of the class index)."""
    k = NUM_LABELS[task]
    return [0.5 + 1.5 * ((7 * c) % k) / (k - 1) for c in range(k)]


def examples(task: str, lengths=LENGTHS, sample_weights=None, label_key=None) -> list[dict]:
    """The task's examples; ``sample_weights`` adds each one's ``sample_weight``, ``label_key`` renames the labels."""
    generator = torch.Generator().manual_seed(1234)
    rows = []
    for i, length in enumerate(lengths):
        ids = torch.randint(2, VOCAB_SIZE, (length,), generator=generator).tolist()
        row = {"input_ids": ids, "attention_mask": [1] * length}
        if task == "seq_cls":
            row["label"] = (i * 2 + length) % NUM_LABELS[task]
        elif task == "token_cls":
            labels = torch.randint(0, NUM_LABELS[task], (length,), generator=generator).tolist()
            # Sub-word continuations are labelled -100, as `DataCollatorForTokenClassification` users do.
            row["labels"] = [label if j % 3 != 1 else -100 for j, label in enumerate(labels)]
        elif task == "seq2seq":
            target_length = 1 + (5 * length) % 7
            row["labels"] = torch.randint(2, VOCAB_SIZE, (target_length,), generator=generator).tolist()
        else:
            row["labels"] = list(ids)
        if sample_weights is not None:
            row["sample_weight"] = sample_weights[i]
        if label_key is not None:
            row[label_key] = row.pop("label" if task == "seq_cls" else "labels")
        rows.append(row)
    return rows


def model(task: str, dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    if task == "seq2seq":
        config = T5Config(
            vocab_size=VOCAB_SIZE, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
            dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )  # fmt: skip
        return T5ForConditionalGeneration(config).to(dtype)
    if task == "causal_lm":
        config = GPT2Config(
            vocab_size=VOCAB_SIZE, n_embd=16, n_layer=1, n_head=2, n_positions=32,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=1,
            # Transformers < 4.48's SDPA mask builder overflows in fp64; eager attention is exact in both.
            attn_implementation="eager",
        )  # fmt: skip
        return GPT2LMHeadModel(config).to(dtype)
    config = tiny_bert_config(
        vocab_size=VOCAB_SIZE, hidden_size=16, num_hidden_layers=1, intermediate_size=32, max_position_embeddings=32,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=NUM_LABELS[task],
    )  # fmt: skip
    head = BertForSequenceClassification if task == "seq_cls" else BertForTokenClassification
    return head(config).to(dtype)


def collator(task: str):
    if task == "seq_cls":
        return DataCollatorWithPadding(tokenizer())
    if task == "seq2seq":
        # No `model=`: the trainer must build `decoder_input_ids` from the labels itself.
        return DataCollatorForSeq2Seq(tokenizer())
    # Pads `labels` with -100, which is what the causal LM needs too.
    return DataCollatorForTokenClassification(tokenizer())


class SequentialSamplerMixin:
    """Feeds examples in order, so that differently split runs see the same examples in one step."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class OrderedSmoothingTrainer(SequentialSamplerMixin, SmoothingTrainer):
    pass


class PerMicroBatchMeanTrainer(SequentialSamplerMixin, Trainer):
    """Negative control: the usual override, a weighted mean per micro-batch, then ÷ accumulation steps."""

    loss_is_scaled_for_ga = False

    def __init__(self, *args, weight=None, shift=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight, self.shift = weight, shift

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        logits = model(**inputs).logits
        if self.shift:
            logits, labels = logits[..., :-1, :], labels[..., 1:]
        weight = None if self.weight is None else torch.tensor(self.weight, dtype=logits.dtype)
        return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), weight=weight, label_smoothing=EPSILON)


class OrderedTrainer(SequentialSamplerMixin, Trainer):
    pass


class OrderedModelMeanTrainer(OrderedTrainer):
    """Plain `Trainer` that leaves the loss to the model's own mean (no ``num_items_in_batch``).

    Needed for GPT-2 in Transformers 5.x: `GPT2LMHeadModel` has ``loss_type=None``, so `Trainer` does not know its
    loss shifts the labels and counts ``num_items_in_batch`` over unshifted labels (one per sequence too many), which
    makes the plain Trainer's causal-LM loss too small by ``(n - B) / n`` even without accumulation.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False


def training_args(
    output_dir, batch_size: int, grad_accum: int, steps: int = 1, **kwargs
) -> SmoothingTrainingArguments:
    defaults = dict(
        output_dir=str(output_dir), per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
        max_steps=steps, learning_rate=LEARNING_RATE, optim="sgd", lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        seed=0, disable_tqdm=True, dataloader_num_workers=0, label_smoothing=EPSILON,
        # The reference is `F.cross_entropy(weight=w, label_smoothing=eps)`, i.e. PyTorch's semantics.
        weight_mode="torch",
    )  # fmt: skip
    defaults.update(kwargs)
    return SmoothingTrainingArguments(**defaults)


def run(task, output_dir, batch_size, grad_accum, *, trainer_cls=OrderedSmoothingTrainer, steps=1, lengths=LENGTHS,
        weights=True, args_kwargs=None, dtype=torch.float64, resume_from_checkpoint=None, eval_dataset=None,
        args=None, train_dataset=None, **trainer_kwargs) -> dict:  # fmt: skip
    """Trains ``steps`` optimizer steps; returns the final parameters, the training loss and the logged losses.

    ``args`` replaces the arguments built from ``batch_size``, ``grad_accum``, ``steps`` and ``args_kwargs``;
    ``train_dataset`` replaces ``examples(task, lengths)``.
    """
    net = model(task, dtype)
    kwargs = dict(args_kwargs or {})
    if weights and trainer_cls is not PerMicroBatchMeanTrainer:
        kwargs.setdefault("class_weights", class_weights(task))
    if trainer_cls is PerMicroBatchMeanTrainer:
        trainer_kwargs.update(weight=class_weights(task) if weights else None, shift=task == "causal_lm")
        kwargs["label_smoothing"] = 0.0
    if args is None:
        args = training_args(output_dir, batch_size, grad_accum, steps=steps, **kwargs)
    trainer = trainer_cls(
        model=net, args=args, eval_dataset=eval_dataset,
        train_dataset=examples(task, lengths) if train_dataset is None else train_dataset,
        **{"data_collator": collator(task), **trainer_kwargs},
    )  # fmt: skip
    output = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"params": params, "training_loss": output.training_loss, "logged": logged, "trainer": trainer}


def full_batch_reference(task, lengths=LENGTHS, weights=True, epsilon=EPSILON, weight_mode="torch",
                         sample_weights=None) -> dict:  # fmt: skip
    """One SGD step on the whole batch, computed with `F.cross_entropy` directly: the truth every split must match.

    ``weight_mode="example"``: each position's unweighted smoothed loss times ``w[y]``, summed, over ``sum w[y]``.
    ``sample_weights`` (one per example): each position's loss (``F.cross_entropy(weight=w, reduction="none")``, or
    the example mode's) also times its example's weight ``s``, over ``sum s * w[y]`` of the labelled positions.
    """
    net = model(task)
    reference = copy.deepcopy(net)
    batch = collator(task)(examples(task, lengths))
    labels = batch.pop("labels")
    # T5 builds its decoder inputs from the labels; its loss is not used.
    logits = net(**batch, labels=labels).logits if task == "seq2seq" else net(**batch).logits
    if task == "causal_lm":
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    weight = torch.tensor(class_weights(task), dtype=torch.float64) if weights else None
    if sample_weights is not None:
        example_weight = torch.tensor(sample_weights, dtype=torch.float64)
        per_position = example_weight.reshape(-1, *[1] * (labels.dim() - 1)).expand_as(labels).flatten()
    logits, labels = logits.flatten(0, -2), labels.flatten()
    if sample_weights is not None:
        counted = labels != -100
        class_weight = weight[labels.clamp(min=0)] if weight is not None else torch.ones_like(per_position)
        if weight_mode == "example":
            losses = F.cross_entropy(logits, labels, reduction="none", label_smoothing=epsilon) * class_weight
        else:
            losses = F.cross_entropy(logits, labels, weight=weight, reduction="none", label_smoothing=epsilon)
        loss = (losses * per_position).sum() / (class_weight * per_position * counted).sum()
    elif weight_mode == "example" and weight is not None:
        per_position = F.cross_entropy(logits, labels, reduction="none", label_smoothing=epsilon)
        counted = labels != -100
        example_weight = weight[labels.clamp(min=0)] * counted
        loss = (per_position * example_weight).sum() / example_weight.sum()
    else:
        loss = F.cross_entropy(logits, labels, weight=weight, label_smoothing=epsilon)
    loss.backward()
    with torch.no_grad():
        for p_ref, p in zip(reference.parameters(), net.parameters()):
            p_ref -= LEARNING_RATE * p.grad
    return {"params": dict(reference.named_parameters()), "loss": loss.item()}


def max_abs_diff(params_a: dict, params_b: dict) -> float:
    assert params_a.keys() == params_b.keys()
    return max((params_a[name].detach() - params_b[name].detach()).abs().max().item() for name in params_a)


def dump(path, results: dict) -> None:
    """Writes results without the trainer objects: tensors with torch.save, the rest in a JSON sidecar."""
    torch.save({key: {k: v for k, v in value.items() if k != "trainer"} for key, value in results.items()}, path)
    with open(str(path) + ".json", "w") as f:
        json.dump({key: {"training_loss": value["training_loss"], "logged": value["logged"]} for key, value in
                   results.items()}, f)  # fmt: skip


def weighted_dataset(task: str, sample_weights=SAMPLE_WEIGHTS):
    """The task's examples with a ``sample_weight`` column, as a `datasets.Dataset`: `Trainer` then removes the columns
    the model's ``forward`` does not take, which must not include ``sample_weight``."""
    import datasets

    return datasets.Dataset.from_list(examples(task, sample_weights=sample_weights))
