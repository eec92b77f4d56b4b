"""A causal LM's output head for `linear_label_smoothed_cross_entropy`: training steps without the logits.

`SmoothingTrainer` with ``fused_linear`` on scores a causal LM's training batch from the hidden states that enter the
output head and the head's parameters, so the (tokens, vocabulary) logits are never made. The model still runs its
own ``forward`` (through every wrapper: DDP, PEFT, `torch.compile`), so that everything it does before the head stays
exactly as it is (embedding scales, masks, position ids of padding-free batches, adapters); only the head's
``forward`` is replaced for the duration of one call (`head_loss`). The replacement computes the loss from its input
and returns, in place of the logits, a view of that 0-d loss of shape ``(..., 1)``: it ties the output to every
parameter that has a gradient, so DDP with ``find_unused_parameters=True`` syncs them all, and it costs nothing.
(Calling the backbone itself, ``model.model``, would bypass DDP's forward, whose bookkeeping the gradient
synchronization needs, and a PEFT model's own forward.)

What the head does after its matrix product depends on the model class, and is reproduced from a table
(`HEAD_POST_PROCESSING`) rather than guessed: models whose class is not in it, whose head is not a plain
`torch.nn.Linear` (a LoRA adapter on the head, a quantized layer) or whose adapters change the inputs (PEFT prompt
learning) are refused with the reason (`find_linear_head`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

# fused_linear="auto" takes the linear path on CPU from this vocabulary size up, where it was measured faster than the
# logits path (it always uses less memory). `python -m benchmarks.bench_trainer --wide` (a Llama, 2 layers, hidden
# 256, batch 8 x 256, the 2-core VM with no other job; docs/performance.md), step time of the linear path over the
# logits path's: 1.06x at V = 1024, 0.94x at 4096, 0.91x at 8192, 0.89x at 16384, 0.92x at 32768, 0.76x at 131072.
# Under other jobs' load (1-minute load average 4-8) the tiles suffer most: 1.45x at 16384, 1.31x at 32768, 0.96x at
# 131072 in earlier runs. Not 4096: a lead of 6 % is within the VM's run-to-run variation.
LINEAR_MIN_VOCABULARY = 8192


def _plain(model: nn.Module) -> dict:
    return {}


def _gemma2(model: nn.Module) -> dict:
    # Gemma 2: logits = cap * tanh(logits / cap) when final_logit_softcapping is set.
    return {"logit_softcap": model.config.final_logit_softcapping}


def _cohere(model: nn.Module) -> dict:
    # Cohere: logits = logits * self.logit_scale (copied from the config at construction).
    return {"logit_scale": model.logit_scale}


def _granite(model: nn.Module) -> dict:
    # Granite: logits = logits / config.logits_scaling.
    return {"logit_scale": 1 / model.config.logits_scaling}


# Model class -> the keyword arguments of `linear_label_smoothed_cross_entropy` that reproduce what its forward does to
# the head's output (checked against each class's ``forward`` in Transformers 5.25; tests/test_trainer_linear.py
# compares losses and gradients with the logits path). Exact classes only: a subclass may change its forward.
HEAD_POST_PROCESSING: dict[str, Callable[[nn.Module], dict]] = {
    "CohereForCausalLM": _cohere,
    "GPT2LMHeadModel": _plain,
    "Gemma2ForCausalLM": _gemma2,
    "GraniteForCausalLM": _granite,
    "LlamaForCausalLM": _plain,
    "MistralForCausalLM": _plain,
    "Qwen2ForCausalLM": _plain,
}


@dataclass(frozen=True)
class LinearHead:
    """The output head of a supported causal LM and what its model does to the head's output.

    Attributes:
        head (`torch.nn.Linear`): the module whose ``forward`` makes the logits (``get_output_embeddings()``).
        model_class (`str`): the class of the Transformers model, for messages.
        logit_options (`dict`): ``logit_scale`` and/or ``logit_softcap`` for `linear_label_smoothed_cross_entropy`.
    """

    head: nn.Linear
    model_class: str
    logit_options: dict


def transformers_model(model: nn.Module) -> nn.Module:
    # A PEFT model (PeftModel -> LoraModel -> the Transformers model) decides nothing itself.
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _unsupported(model: nn.Module) -> str | None:
    """Why ``model``'s head cannot be fed to the linear loss, or None when it can."""
    inner = transformers_model(model)
    name = type(inner).__name__
    if name not in HEAD_POST_PROCESSING or not type(inner).__module__.startswith("transformers.models."):
        return (
            f"its head's post-processing is known for {', '.join(sorted(HEAD_POST_PROCESSING))} only, got "
            f"{type(inner).__module__}.{name}"
        )
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and any(getattr(c, "is_prompt_learning", False) for c in peft_config.values()):
        return f"{name} is wrapped in a PEFT prompt-learning adapter, which changes the inputs the head sees"
    head = inner.get_output_embeddings()
    if type(head) is nn.Linear and (hasattr(head, "_hf_hook") or "forward" in vars(head)):
        return f"{name}'s output head has a hook that replaces its forward (accelerate's device_map or offloading)"
    if type(head) is not nn.Linear:
        kind = "no output head" if head is None else f"a {type(head).__module__}.{type(head).__name__}"
        return (
            f"{name}'s output head must be a plain torch.nn.Linear (get_output_embeddings()), got {kind}: a LoRA "
            "adapter or a saved copy on the head (PEFT target_modules / modules_to_save with lm_head) or a quantized "
            "head is not supported"
        )
    return None


def find_linear_head(model: nn.Module) -> LinearHead:
    """The output head of ``model`` (a Transformers causal LM, possibly inside a PEFT model) and its post-processing.

    Raises:
        `ValueError`: the model's class is not in `HEAD_POST_PROCESSING`, its head is not a plain `torch.nn.Linear`,
            or a PEFT prompt-learning adapter wraps it; the message names the class and the reason.
    """
    reason = _unsupported(model)
    inner = transformers_model(model)
    if reason is not None:
        raise ValueError(f"fused_linear=True cannot train {type(inner).__name__} without its logits: {reason}")
    options = {k: v for k, v in HEAD_POST_PROCESSING[type(inner).__name__](inner).items() if v is not None}
    return LinearHead(inner.get_output_embeddings(), type(inner).__name__, options)


def resolve_linear_head(model: nn.Module, fused_linear: bool | str, device: torch.device) -> LinearHead | None:
    """The head to train through the linear loss under ``fused_linear``, or None for the logits path.

    ``True`` raises where `find_linear_head` does; ``"auto"`` takes the linear path for supported models on CPU
    whose vocabulary has at least `LINEAR_MIN_VOCABULARY` entries and otherwise logs one line saying why not;
    ``False`` never takes it. (The trainer asks only for causal LMs.)
    """
    if fused_linear is False:
        return None
    if fused_linear is True:
        return find_linear_head(model)
    reason = _unsupported(model)
    inner = transformers_model(model)
    if reason is None:
        vocabulary = inner.get_output_embeddings().weight.shape[0]
        if device.type != "cpu":
            reason = f"the linear path was measured on CPU only, and training runs on {device.type}"
        elif vocabulary < LINEAR_MIN_VOCABULARY:
            reason = (
                f"its vocabulary ({vocabulary}) is smaller than {LINEAR_MIN_VOCABULARY}, where the logits path is "
                "faster"
            )
    if reason is not None:
        logger.info(f"fused_linear='auto': {type(inner).__name__} trains through its logits ({reason})")
        return None
    return find_linear_head(model)


@dataclass
class _HeadCall:
    loss: Tensor | None = None
    calls: int = 0


@contextmanager
def head_loss(linear_head: LinearHead, loss: Callable[..., Tensor]) -> Iterator[_HeadCall]:
    """Within the block, the head's ``forward(hidden)`` computes ``loss(hidden, weight, bias, **logit_options)``.

    The result is stored in the yielded object's ``loss``; the model gets a ``(..., 1)`` view of it in place of its
    ``(..., V)`` logits. Under autocast the head's inputs are cast to the autocast dtype first, as `F.linear` would.

    Raises:
        `RuntimeError` (on leaving the block): the model called its head other than once, which the table of model
            classes does not expect.
    """
    head = linear_head.head
    record = _HeadCall()

    def forward(hidden: Tensor) -> Tensor:
        record.calls += 1
        weight, bias = head.weight, head.bias
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            value = loss(hidden, weight, bias, **linear_head.logit_options)
        record.loss = value
        return value.reshape((1,) * hidden.dim()).expand(*hidden.shape[:-1], 1)

    head.forward = forward
    try:
        yield record
    finally:
        del head.forward
    if record.calls != 1:
        raise RuntimeError(
            f"{linear_head.model_class}'s forward called its output head {record.calls} times in one step (expected "
            "once); train it with fused_linear=False"
        )
