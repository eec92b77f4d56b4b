"""A tiny TRL SFT setup shared by tests/test_trainer_ecosystem.py and the torchrun worker (needs TRL).

A one-layer Llama (fp64, eager attention, no dropout) built from a config, a word-level tokenizer built in code (no
Hub), and 8 prompt/completion pairs of different lengths: TRL tokenizes them, appends the EOS token and masks the
prompt tokens with -100 (completion-only loss), so every micro-batch differs in padding and in labelled tokens.
"""

from __future__ import annotations

import copy
import os

import datasets
import torch
import torch.nn.functional as F
from tiny_models import TINY_DECODER
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from trainer_tasks import EPSILON, LEARNING_RATE, SequentialSamplerMixin
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

from hf_lsce import SmoothingSFTConfig, SmoothingSFTTrainer

VOCAB_SIZE = 32
EOS = 2
# (prompt tokens, completion tokens) of the 8 examples
PAIRS = ((3, 2), (5, 4), (2, 6), (4, 1), (6, 3), (1, 5), (3, 3), (2, 2))


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": EOS, **{f"w{i}": i for i in range(3, VOCAB_SIZE)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def dataset(sample_weights=None) -> datasets.Dataset:
    """The 8 prompt/completion pairs; ``sample_weights`` adds a ``sample_weight`` column."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for prompt, completion in PAIRS:
        ids = torch.randint(3, VOCAB_SIZE, (prompt + completion,), generator=generator).tolist()
        words = [f"w{i}" for i in ids]
        rows.append({"prompt": " ".join(words[:prompt]), "completion": " " + " ".join(words[prompt:])})
    if sample_weights is not None:
        rows = [{**row, "sample_weight": weight} for row, weight in zip(rows, sample_weights)]
    return datasets.Dataset.from_list(rows)


# Assistant turns, and their end-of-turn token, inside `{% generation %}` markers: TRL's assistant_only_loss then
# scores those tokens only. The [EOS] the template writes after each assistant turn is the turn's stop token.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }} "
    "[EOS]{% endgeneration %}{% else %}{{ message['content'] }}{% endif %} {% endfor %}"
)
# Words per message of the 8 conversations (user, assistant, user, assistant, ...).
TURNS = ((2, 3, 1, 1), (1, 2), (3, 1, 2, 2), (2, 4), (1, 1, 1, 3), (4, 2), (2, 2, 3, 1), (1, 5))


def chat_tokenizer() -> PreTrainedTokenizerFast:
    """`tokenizer()` with `CHAT_TEMPLATE`."""
    chat = tokenizer()
    chat.chat_template = CHAT_TEMPLATE
    return chat


def conversations() -> tuple[datasets.Dataset, dict]:
    """The 8 conversations (a ``messages`` column), and the batch they make with assistant-only labels, built here
    from the turns: every word is one token, each assistant turn is followed by [EOS], and only the assistant's tokens
    and that [EOS] are labelled; rows padded on the right."""
    generator = torch.Generator().manual_seed(1)
    rows, token_rows, label_rows = [], [], []
    for turns in TURNS:
        messages, tokens, labels = [], [], []
        for index, count in enumerate(turns):
            ids = torch.randint(3, VOCAB_SIZE, (count,), generator=generator).tolist()
            assistant = index % 2 == 1
            messages.append({"role": "assistant" if assistant else "user", "content": " ".join(f"w{i}" for i in ids)})
            ids = ids + [EOS] if assistant else ids
            tokens += ids
            labels += ids if assistant else [-100] * len(ids)
        rows.append({"messages": messages})
        token_rows.append(tokens)
        label_rows.append(labels)
    width = max(map(len, token_rows))
    batch = {
        "input_ids": torch.tensor([row + [0] * (width - len(row)) for row in token_rows]),
        "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in token_rows]),
        "labels": torch.tensor([row + [-100] * (width - len(row)) for row in label_rows]),
    }
    return datasets.Dataset.from_list(rows), batch


def class_weights() -> list[float]:
    """One weight per vocabulary token, unequal and not monotone in the token id."""
    return [0.5 + 1.5 * ((7 * c) % VOCAB_SIZE) / (VOCAB_SIZE - 1) for c in range(VOCAB_SIZE)]


def model(dtype=torch.float64) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        **TINY_DECODER, vocab_size=VOCAB_SIZE, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
        bos_token_id=None, eos_token_id=EOS,
    )  # fmt: skip
    return LlamaForCausalLM(config).to(dtype)


def config(output_dir, batch_size: int, grad_accum: int, *, config_cls=SmoothingSFTConfig, **kwargs):
    defaults = dict(
        output_dir=str(output_dir), per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
        max_steps=1, learning_rate=LEARNING_RATE, optim="sgd", lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        seed=0, disable_tqdm=True, dataloader_num_workers=0, bf16=False, max_length=64,
    )  # fmt: skip
    if config_cls is SmoothingSFTConfig:
        defaults["label_smoothing"] = EPSILON
    defaults.update(kwargs)
    return config_cls(**defaults)


class OrderedSmoothingSFTTrainer(SequentialSamplerMixin, SmoothingSFTTrainer):
    pass


def run(output_dir, batch_size, grad_accum, *, weights=True, config_kwargs=None, trainer_kwargs=None,
        net=None, sample_weights=None) -> dict:  # fmt: skip
    """One optimizer step of SmoothingSFTTrainer; returns the parameters after it, the losses and the log.

    ``trainer_kwargs`` may replace the data (``train_dataset``, ``processing_class``)."""
    kwargs = dict(config_kwargs or {})
    if weights:
        kwargs.setdefault("class_weights", class_weights())
    trainer = OrderedSmoothingSFTTrainer(
        model=net if net is not None else model(),
        args=config(output_dir, batch_size, grad_accum, **kwargs),
        **{"train_dataset": dataset(sample_weights), "processing_class": tokenizer(), **(trainer_kwargs or {})},
    )
    output = trainer.train()
    params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"params": params, "training_loss": output.training_loss, "logged": logged, "trainer": trainer,
            "log_history": trainer.state.log_history}  # fmt: skip


def prepared_batch(output_dir, train_dataset=None, processing_class=None, **config_kwargs) -> dict:
    """All 8 examples as TRL prepares and collates them (plain `SFTTrainer`, no hf_lsce code), in one batch."""
    trainer = SFTTrainer(
        model=model(), args=config(output_dir, 8, 1, config_cls=SFTConfig, **config_kwargs),
        train_dataset=dataset() if train_dataset is None else train_dataset,
        processing_class=processing_class or tokenizer(),
    )  # fmt: skip
    return trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])


def full_batch_reference(output_dir, weight_mode="example", weights=True, epsilon=EPSILON, mask_prompts=True,
                         sample_weights=None, batch=None) -> dict:  # fmt: skip
    """One SGD step on the whole batch with `F.cross_entropy`: the truth every split must match.

    ``weight_mode="example"``: each token's unweighted smoothed loss times ``w[y]``, summed, over ``sum w[y]``;
    ``"torch"``: ``F.cross_entropy(weight=w)``. ``mask_prompts=False`` scores the prompt tokens too (a control).
    ``sample_weights`` (example mode): each token's term also times its example's weight, in both sums. ``batch``
    replaces TRL's batch of the 8 prompt/completion pairs (`conversations`' hand-built batch).
    """
    batch = dict(batch) if batch is not None else prepared_batch(os.path.join(output_dir, "prepare"))
    labels = batch.pop("labels")
    if not mask_prompts:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    net = model()
    reference = copy.deepcopy(net)
    logits = net(**batch).logits[:, :-1].flatten(0, 1)
    targets = labels[:, 1:].flatten()
    weight = torch.tensor(class_weights(), dtype=torch.float64) if weights else None
    if weight_mode == "example" and weight is not None:
        counted = targets != -100
        example_weight = weight[targets.clamp(min=0)] * counted
        if sample_weights is not None:
            per_example = torch.tensor(sample_weights, dtype=torch.float64)[:, None]
            example_weight = example_weight * per_example.expand_as(labels[:, 1:]).flatten()
        per_token = F.cross_entropy(logits, targets, reduction="none", label_smoothing=epsilon)
        loss = (per_token * example_weight).sum() / example_weight.sum()
    else:
        loss = F.cross_entropy(logits, targets, weight=weight, label_smoothing=epsilon)
    loss.backward()
    with torch.no_grad():
        for p_ref, p in zip(reference.parameters(), net.parameters()):
            p_ref -= LEARNING_RATE * p.grad
    return {"params": dict(reference.named_parameters()), "loss": loss.item(), "labels": labels}
