"""SmoothingTrainer with fused_linear: causal LMs train without their logits, with the logits path's loss and gradient.

The truth is the logits path (``fused_linear=False``, itself tested against `F.cross_entropy` in test_trainer.py) at
batch 8: the linear path must give the same loss and every parameter's gradient (fp32, 1e-5 relative) at batch 8, 2 x
accumulation 4 and 2 processes x 4 (torchrun, gloo), for Llama, Qwen2, Mistral, GPT-2 (tied head), Gemma 2 (soft cap),
Cohere (logit scale), Granite (logits scaling) and a LoRA Llama, and must call the head without producing logits (its
output is ``(..., 1)``). ``"balanced"`` class weights are computed alike and give the same step. A subprocess shows
that a training step allocates far less than the logits.
"""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import has_module, run_two_processes
from transformers import BertForSequenceClassification, HfArgumentParser, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import hf_lsce.causal_lm
from hf_lsce import SmoothingTrainer, SmoothingTrainingArguments, compute_class_weights

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import trainer_linear_tasks as lt  # noqa: E402
import trainer_tasks as tasks  # noqa: E402

RTOL = 1e-5  # of the loss, and of each gradient relative to its largest entry


def _needs(name):
    if name == "llama_lora":
        pytest.importorskip("peft")


def _check_equal(result, reference):
    assert result["loss"] == pytest.approx(reference["loss"], rel=RTOL)
    assert result["grads"].keys() == reference["grads"].keys() and reference["grads"]
    for name, grad in reference["grads"].items():
        torch.testing.assert_close(result["grads"][name], grad, rtol=RTOL, atol=RTOL * grad.abs().max().item())


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    root = tmp_path_factory.mktemp("linear_references")
    cache = {}

    def reference(name):
        if name not in cache:
            cache[name] = lt.run(name, root / name, 8, 1, fused_linear=False)
            # The logits path made (..., V) logits; the linear path below must not.
            assert set(cache[name]["head_widths"]) == {tasks.VOCAB_SIZE}
        return cache[name]

    return reference


@pytest.mark.parametrize("name", lt.MODELS)
def test_batch_8_equals_logits_path(tmp_path, references, name):
    _needs(name)
    result = lt.run(name, tmp_path, 8, 1)
    assert result["head_widths"] == [1]
    _check_equal(result, references(name))


@pytest.mark.parametrize("name", lt.SPLIT_MODELS)
def test_accumulation_2x4_equals_logits_path_at_batch_8(tmp_path, references, name):
    _needs(name)
    result = lt.run(name, tmp_path, 2, 4)
    assert result["head_widths"] == [1] * 4
    _check_equal(result, references(name))


@pytest.mark.parametrize("name", ["gemma2", "cohere", "granite"])
def test_negative_control_without_the_head_post_processing(tmp_path, references, name, monkeypatch):
    """Dropping the soft cap / scale from the table changes the step: the checks above see the post-processing."""
    monkeypatch.setitem(hf_lsce.causal_lm.HEAD_POST_PROCESSING, lt.model(name).__class__.__name__, lambda m: {})
    result = lt.run(name, tmp_path, 8, 1)
    reference = references(name)
    assert abs(result["loss"] - reference["loss"]) > 1e-3
    with pytest.raises(AssertionError):
        _check_equal(result, reference)


def test_activation_checkpointing(tmp_path, references):
    _check_equal(lt.run("llama_checkpointing", tmp_path, 2, 4), references("llama"))


def test_torch_weight_mode_and_no_weights(tmp_path):
    for kwargs in ({"weight_mode": "torch"}, {"class_weights": None, "label_smoothing": 0.0}):
        reference = lt.run("llama", tmp_path / "ref", 8, 1, fused_linear=False, **kwargs)
        _check_equal(lt.run("llama", tmp_path / "lin", 2, 4, **kwargs), reference)


def test_sample_weights(tmp_path, references):
    """Per-example weights (a ``sample_weight`` column) scale every position of their example on both paths."""
    data = tasks.weighted_dataset("causal_lm")
    reference = lt.run("llama", tmp_path / "ref", 8, 1, fused_linear=False, train_dataset=data)
    assert abs(reference["loss"] - references("llama")["loss"]) > 1e-3
    for batch_size, grad_accum in ((8, 1), (2, 4)):
        result = lt.run("llama", tmp_path / f"{batch_size}", batch_size, grad_accum, train_dataset=data)
        assert result["head_widths"] == [1] * grad_accum
        _check_equal(result, reference)


def _every_token_as_a_label() -> list[dict]:
    """Causal-LM examples of `tasks.LENGTHS` whose shifted labels hold every vocabulary id, unevenly ("balanced"
    weights need a count for each class)."""
    generator = torch.Generator().manual_seed(5)
    labelled = sum(length - 1 for length in tasks.LENGTHS)
    pool = torch.cat([torch.arange(tasks.VOCAB_SIZE), torch.randint(tasks.VOCAB_SIZE, (labelled - tasks.VOCAB_SIZE,),
                                                                    generator=generator)])  # fmt: skip
    pool = pool[torch.randperm(labelled, generator=generator)].tolist()
    rows = []
    for length in tasks.LENGTHS:
        ids = [int(torch.randint(tasks.VOCAB_SIZE, (), generator=generator))] + pool[: length - 1]
        pool = pool[length - 1 :]
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": ids})
    return rows


def test_balanced_class_weights(tmp_path):
    data = _every_token_as_a_label()
    reference = lt.run(
        "llama", tmp_path / "ref", 8, 1, fused_linear=False, class_weights="balanced", train_dataset=data
    )
    weights = reference["trainer"].class_weights
    shifted = torch.tensor([label for row in data for label in row["labels"][1:]])
    torch.testing.assert_close(weights, compute_class_weights(shifted, tasks.VOCAB_SIZE).to(weights.dtype))
    assert weights.unique().numel() > 1  # unequal counts, so the weights matter
    unweighted = lt.run("llama", tmp_path / "none", 8, 1, fused_linear=False, class_weights=None, train_dataset=data)
    assert abs(unweighted["loss"] - reference["loss"]) > 1e-3  # control: the weights change the step
    for batch_size, grad_accum in ((8, 1), (2, 4)):
        result = lt.run("llama", tmp_path / f"{batch_size}", batch_size, grad_accum, class_weights="balanced",
                        train_dataset=data)  # fmt: skip
        assert result["head_widths"] == [1] * grad_accum
        torch.testing.assert_close(result["trainer"].class_weights, weights, rtol=0, atol=0)
        _check_equal(result, reference)


def test_resume(tmp_path):
    """4 steps with a checkpoint at 2, resumed on the linear path = the logits path throughout."""
    common = {"save_strategy": "steps", "save_steps": 2, "steps": 4}
    full = lt.run("llama", tmp_path / "full", 2, 1, fused_linear=False, **common)
    checkpoint = str(tmp_path / "full" / "checkpoint-2")
    resumed = lt.run("llama", tmp_path / "resumed", 2, 1, resume_from_checkpoint=checkpoint, **common)
    assert resumed["head_widths"] == [1, 1]  # steps 3 and 4
    assert resumed["logged"] == pytest.approx(full["logged"], rel=RTOL)
    assert tasks.max_abs_diff(resumed["params"], full["params"]) <= 1e-6
    torch.testing.assert_close(resumed["trainer"].class_weights, full["trainer"].class_weights)


def test_model_init_replaces_the_model_and_its_head(tmp_path, references):
    """`Trainer.train` builds a new model with ``model_init``: the linear path follows it to the new head."""
    recorder = lt.GradientRecorder()
    args = tasks.training_args(tmp_path, 8, 1, fused_linear=True, weight_mode="example",
                               class_weights=tasks.class_weights("causal_lm"))  # fmt: skip
    trainer = tasks.OrderedSmoothingTrainer(
        model_init=lambda: lt.model("llama"), args=args, train_dataset=tasks.examples("causal_lm"),
        data_collator=tasks.collator("causal_lm"), callbacks=[recorder],
    )  # fmt: skip
    first_head = trainer._linear_head.head
    loss = trainer.train().training_loss
    assert trainer._linear_head.head is trainer.model.lm_head is not first_head
    _check_equal({"loss": loss, "grads": recorder.grads}, references("llama"))


def test_shift_labels_batch_key_is_the_target(tmp_path, references):
    """A collator's ``shift_labels`` (TRL's padding-free batches) are the targets on both paths."""

    def collate(rows):
        batch = tasks.collator("causal_lm")(rows)
        shifted = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
        shifted[:, ::3] = -100  # unlike the trainer's own shift, so that using them shows
        batch["shift_labels"] = shifted
        return batch

    reference = lt.run("llama", tmp_path / "ref", 8, 1, fused_linear=False, data_collator=collate)
    assert abs(reference["loss"] - references("llama")["loss"]) > 1e-3
    _check_equal(lt.run("llama", tmp_path / "lin", 2, 4, data_collator=collate), reference)


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "sample_weight"])
def test_loss_only_evaluation_takes_the_linear_path_and_predict_keeps_the_logits(tmp_path, weighted):
    """``evaluate()`` without compute_metrics needs no logits: eval_loss and eval_nll as on the logits path. With
    compute_metrics, and in ``predict``, the logits are computed."""
    eval_set = tasks.weighted_dataset("causal_lm") if weighted else tasks.examples("causal_lm")
    metrics = {}
    for fused_linear in (False, True):
        net = lt.model("llama")
        widths = lt.HeadOutputs(net.lm_head)
        weights = tasks.class_weights("causal_lm")
        args = tasks.training_args(tmp_path / str(fused_linear), 4, 1, fused_linear=fused_linear,
                                   per_device_eval_batch_size=3, class_weights=weights)  # fmt: skip
        trainer = SmoothingTrainer(model=net, args=args, data_collator=tasks.collator("causal_lm"))
        metrics[fused_linear] = trainer.evaluate(eval_set)
        assert set(widths.widths) == {1 if fused_linear else tasks.VOCAB_SIZE}
        widths.widths.clear()
        trainer.compute_metrics = lambda prediction: {"logits_width": prediction.predictions.shape[-1]}
        assert trainer.evaluate(eval_set)["eval_logits_width"] == tasks.VOCAB_SIZE
        assert trainer.predict(eval_set).predictions.shape[-1] == tasks.VOCAB_SIZE
        assert set(widths.widths) == {tasks.VOCAB_SIZE}
    for name in ("eval_loss", "eval_nll"):
        assert metrics[True][name] == pytest.approx(metrics[False][name], rel=1e-6)
    # eps = 0.1 and class weights: the smoothed, weighted loss is not the plain cross-entropy.
    assert abs(metrics[True]["eval_loss"] - metrics[True]["eval_nll"]) > 1e-2


def test_bf16_autocast_on_cpu(tmp_path):
    reference = lt.run("llama", tmp_path / "ref", 8, 1, fused_linear=False, bf16=True)
    result = lt.run("llama", tmp_path / "lin", 8, 1, bf16=True)
    assert result["head_widths"] == [1]
    assert result["loss"] == pytest.approx(reference["loss"], rel=1e-2)


def test_sft_trainer_equals_full_batch_and_keeps_token_count(tmp_path):
    pytest.importorskip("trl")
    import trainer_sft_tasks as sft

    reference = sft.full_batch_reference(tmp_path / "reference", weight_mode="example")
    result = sft.run(tmp_path / "run", 2, 4, config_kwargs={"fused_linear": True},
                     trainer_kwargs={"eval_dataset": sft.dataset()})  # fmt: skip
    assert result["trainer"]._linear_head is not None
    assert tasks.max_abs_diff(result["params"], reference["params"]) <= 1e-6
    assert result["training_loss"] == pytest.approx(reference["loss"], abs=1e-6)
    # TRL's token count is logged; entropy and accuracy, which need logits, are not.
    logged = result["trainer"].state.log_history[0]
    assert logged["num_tokens"] > 0 and "entropy" not in logged and "mean_token_accuracy" not in logged
    # Its evaluation keeps the logits, even loss-only, so that TRL's metrics are there.
    metrics = result["trainer"].evaluate()
    assert "eval_entropy" in metrics and "eval_mean_token_accuracy" in metrics


# ---- the option ----


@pytest.mark.parametrize(("given", "resolved"), [("auto", "auto"), (True, True), ("True", True), ("false", False)])
def test_option_values(given, resolved):
    assert SmoothingTrainingArguments("out", fused_linear=given).fused_linear is resolved


@pytest.mark.parametrize("bad", [1, 0, "yes", None])
def test_bad_option_names_the_argument(bad):
    with pytest.raises(ValueError, match=r"fused_linear must be one of 'auto', True, False, got "):
        SmoothingTrainingArguments("out", fused_linear=bad)


def test_command_line():
    (args,) = HfArgumentParser(SmoothingTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "out", "--fused_linear", "false"]
    )
    assert args.fused_linear is False


def _opt():
    config = OPTConfig(vocab_size=tasks.VOCAB_SIZE, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                       num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=32)  # fmt: skip
    return OPTForCausalLM(config)


class CustomCausalLM(LlamaForCausalLM):
    pass


def _unsupported_models():
    models = {
        "BertForSequenceClassification": lambda: BertForSequenceClassification(tasks.model("seq_cls").config),
        "CustomCausalLM": lambda: CustomCausalLM(lt.model("llama").config),
        "OPTForCausalLM": _opt,
    }
    try:
        import peft
    except ImportError:
        return models

    def lora_head():
        config = peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"], lora_dropout=0.0)
        return peft.get_peft_model(lt.model("llama"), config)

    models["LlamaForCausalLM"] = lora_head  # a LoRA on the head
    return models


@pytest.mark.parametrize("name", sorted(_unsupported_models()))
def test_true_on_unsupported_model_raises_naming_the_class(tmp_path, name):
    net = _unsupported_models()[name]()
    args = tasks.training_args(tmp_path, 8, 1, fused_linear=True)
    with pytest.raises(ValueError, match=rf"fused_linear=True cannot train {name} without its logits: "):
        SmoothingTrainer(model=net, args=args)


@pytest.mark.parametrize("name", ["OPTForCausalLM", "small vocabulary"])
def test_auto_falls_back_with_one_log_line(tmp_path, caplog, name):
    net = _opt() if name == "OPTForCausalLM" else lt.model("llama")
    with caplog.at_level(logging.INFO, logger="hf_lsce.causal_lm"):
        trainer = SmoothingTrainer(model=net, args=tasks.training_args(tmp_path, 8, 1, fused_linear="auto"))
    assert trainer._linear_head is None
    lines = [r.getMessage() for r in caplog.records if r.name == "hf_lsce.causal_lm"]
    assert len(lines) == 1 and lines[0].startswith(
        f"fused_linear='auto': {type(net).__name__} trains through its logits"
    )
    assert ("OPTForCausalLM" if name == "OPTForCausalLM" else "smaller than") in lines[0]


def test_auto_takes_the_linear_path_for_a_large_vocabulary_on_cpu(tmp_path, caplog):
    config = lt.model("llama").config
    config.vocab_size = hf_lsce.causal_lm.LINEAR_MIN_VOCABULARY
    with caplog.at_level(logging.INFO, logger="hf_lsce.causal_lm"):
        trainer = SmoothingTrainer(model=LlamaForCausalLM(config), args=tasks.training_args(tmp_path, 8, 1))
    assert trainer.args.fused_linear == "auto" and trainer._linear_head is not None
    assert not [r for r in caplog.records if r.name == "hf_lsce.causal_lm"]


def test_auto_says_nothing_for_classifiers(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="hf_lsce.causal_lm"):
        trainer = SmoothingTrainer(model=tasks.model("seq_cls"), args=tasks.training_args(tmp_path, 8, 1))
    assert trainer._linear_head is None and not caplog.records


# ---- memory ----

_MEMORY_SCRIPT = """
import json, resource, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer
from hf_lsce import SmoothingTrainer, SmoothingTrainingArguments
tokens, vocabulary = 8 * 256, 131072
torch.manual_seed(0)
config = LlamaConfig(vocab_size=vocabulary, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, max_position_embeddings=256)
model = LlamaForCausalLM(config)
ids = torch.randint(vocabulary, (8, 256))
data = [{"input_ids": row, "labels": row} for row in ids]
args = SmoothingTrainingArguments("out", per_device_train_batch_size=8, max_steps=1, optim="sgd", report_to=[],
                                  use_cpu=True, save_strategy="no", fused_linear=sys.argv[1] == "on")
trainer = SmoothingTrainer(model=model, args=args, train_dataset=data)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
trainer.train()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_extra": after - before, "logits": tokens * vocabulary * 4,
                  "linear": trainer._linear_head is not None}))
"""


def test_training_step_allocates_far_less_than_the_logits(tmp_path):
    """Peak RSS during one step (beyond what the process had reached before) against the fp32 logits' 1 GiB; the
    logits path, as a control, allocates more than the logits themselves."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    results = {}
    for mode in ("on", "off"):
        completed = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, mode], cwd=tmp_path, env=env,
                                   capture_output=True, text=True, timeout=600)  # fmt: skip
        assert completed.returncode == 0, completed.stderr[-3000:]
        results[mode] = json.loads(completed.stdout.strip().splitlines()[-1])
    on, off = results["on"], results["off"]
    assert on["linear"] and not off["linear"]
    assert on["peak_extra"] < 0.25 * on["logits"], results
    assert off["peak_extra"] > 1.0 * off["logits"], results


# ---- two processes ----


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    names = [name for name in (*lt.SPLIT_MODELS, "llama_checkpointing") if name != "llama_lora" or has_module("peft")]
    out = tmp_path_factory.mktemp("torchrun_linear") / "results.pt"
    return run_two_processes("trainer_linear_worker.py", out, *names, timeout=900)


@pytest.mark.distributed
@pytest.mark.parametrize("name", [*lt.SPLIT_MODELS, "llama_checkpointing"])
def test_two_processes_x4_equal_logits_path_at_batch_8(two_process_results, references, name):
    _needs(name)
    result = two_process_results[name]
    assert result["head_widths"] == [1]
    _check_equal(result, references(lt.VARIANTS.get(name, (name,))[0]))
