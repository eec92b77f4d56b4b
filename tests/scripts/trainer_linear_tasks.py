"""Tiny causal LMs for the fused_linear tests (tests/test_trainer_linear.py and its torchrun worker).

Each model is built from a config (no Hub), fp32, dropout-free, and trains one SGD step on `trainer_tasks`' causal-LM
examples (8 sequences of different lengths, per-token class weights, eps = 0.1). `run` returns the loss and every
parameter's gradient just before the optimizer step (after the accumulation window and the processes' all-reduce).
The head post-processing is made to matter: a soft cap, a scale or a logits scaling of the size of the logits
themselves (the defaults barely change the small logits of a randomly initialized model).
"""

from __future__ import annotations

import torch
import trainer_tasks as tasks
from tiny_models import TINY_DECODER
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    TrainerCallback,
)

MODELS = ("llama", "qwen2", "mistral", "gpt2", "gemma2", "cohere", "granite", "llama_lora")
# The grid the issue asks for (Cohere and Granite are checked at batch 8 as well).
SPLIT_MODELS = ("llama", "qwen2", "mistral", "gpt2", "gemma2", "llama_lora")

# Runs of a model with other training arguments: activation checkpointing also makes DDP run with
# find_unused_parameters=False (Trainer's choice), the other way its reducer is driven.
VARIANTS = {"llama_checkpointing": ("llama", {"activation_checkpointing": True})}

_SHAPE = dict(
    TINY_DECODER, vocab_size=tasks.VOCAB_SIZE, num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0,
    bos_token_id=1, eos_token_id=1,
)  # fmt: skip


def model(name: str, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "gpt2":  # the head is tied to the input embeddings
        net = tasks.model("causal_lm", dtype)
        assert net.lm_head.weight is net.transformer.wte.weight
        return net
    if name in ("llama", "llama_lora"):
        net = LlamaForCausalLM(LlamaConfig(**_SHAPE))
    elif name == "qwen2":
        net = Qwen2ForCausalLM(Qwen2Config(**_SHAPE))
    elif name == "mistral":
        net = MistralForCausalLM(MistralConfig(**_SHAPE))
    elif name == "gemma2":
        config = Gemma2Config(**_SHAPE, head_dim=8, query_pre_attn_scalar=8, final_logit_softcapping=0.1)
        net = Gemma2ForCausalLM(config)
    elif name == "cohere":
        net = CohereForCausalLM(CohereConfig(**_SHAPE, logit_scale=4.0))
    elif name == "granite":
        net = GraniteForCausalLM(GraniteConfig(**_SHAPE, logits_scaling=0.25))
    else:
        raise ValueError(f"unknown model {name!r}")
    net = net.to(dtype)
    if name == "llama_lora":
        import peft

        # Random B as well as A, so that both get a gradient at the first step.
        lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                               init_lora_weights=False)  # fmt: skip
        net = peft.get_peft_model(net, lora)
    return net


class GradientRecorder(TrainerCallback):
    """Keeps a copy of every gradient just before the optimizer step."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


class HeadOutputs(TrainerCallback):
    """Records the last dimension of every output of the model's head during training (1 on the linear path)."""

    def __init__(self, head: torch.nn.Module):
        self.widths: list[int] = []
        head.register_forward_hook(lambda module, args, output: self.widths.append(output.shape[-1]))


def run(name: str, output_dir, batch_size: int, grad_accum: int, *, fused_linear=True, weight_mode="example", net=None,
        resume_from_checkpoint=None, data_collator=None, train_dataset=None, **args_kwargs) -> dict:  # fmt: skip
    """Trains `SmoothingTrainer` (one step unless ``steps`` is given); the loss, the last step's gradients, the
    parameters after training and the widths of the head's outputs."""
    if name in VARIANTS:
        name, extra = VARIANTS[name]
        args_kwargs = {**extra, **args_kwargs}
    net = model(name) if net is None else net
    recorder = GradientRecorder()
    head = (net.get_base_model() if hasattr(net, "get_base_model") else net).get_output_embeddings()
    widths = HeadOutputs(head)
    args_kwargs.setdefault("class_weights", tasks.class_weights("causal_lm"))
    args = tasks.training_args(
        output_dir, batch_size, grad_accum, fused_linear=fused_linear, weight_mode=weight_mode, **args_kwargs
    )
    trainer = tasks.OrderedSmoothingTrainer(
        model=net, args=args, train_dataset=train_dataset or tasks.examples("causal_lm"),
        data_collator=data_collator or tasks.collator("causal_lm"), callbacks=[recorder],
    )  # fmt: skip
    output = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"loss": output.training_loss, "grads": recorder.grads, "params": params, "logged": logged,
            "head_widths": widths.widths, "trainer": trainer}  # fmt: skip
