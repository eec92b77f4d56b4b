"""SmoothingSFTTrainer (TRL's SFTTrainer with SmoothingTrainer's loss): exact steps, TRL's metrics, wrong orders.

The truth is `trainer_sft_tasks.full_batch_reference`: TRL prepares and collates the 8 prompt/completion examples
(plain `SFTTrainer`, prompts masked with -100), then one SGD step on the whole batch with `F.cross_entropy`.
"""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from conftest import check_matches_reference, run_two_processes  # noqa: E402
from transformers import LlamaForCausalLM, TrainingArguments  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

import hf_lsce.causal_lm  # noqa: E402
from hf_lsce import SmoothingSFTConfig, SmoothingSFTTrainer, SmoothingTrainer  # noqa: E402

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import trainer_sft_tasks as sft  # noqa: E402
import trainer_tasks as tasks  # noqa: E402

TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_references")
    return {mode: sft.full_batch_reference(root / mode, weight_mode=mode) for mode in ("example", "torch")}


@pytest.mark.parametrize(("batch_size", "grad_accum"), [(8, 1), (2, 4)])
def test_one_step_equals_full_batch(tmp_path, references, batch_size, grad_accum):
    # Smoothing, per-token class weights (weight_mode="example", the default) and TRL's prompt masks together.
    check_matches_reference(sft.run(tmp_path, batch_size, grad_accum), references["example"])


def test_one_step_equals_full_batch_in_torch_weight_mode(tmp_path, references):
    result = sft.run(tmp_path, 2, 4, config_kwargs={"weight_mode": "torch"})
    check_matches_reference(result, references["torch"])


def test_prompt_masks_are_in_the_truth(tmp_path, references):
    """The reference scores completions only: the prompts are -100, and scoring them too gives another step."""
    labels = references["example"]["labels"]
    prompt_lengths = [prompt for prompt, _ in sft.PAIRS]
    for row, prompt in zip(labels, prompt_lengths):
        assert (row[:prompt] == -100).all() and (row[prompt] != -100)
    unmasked = sft.full_batch_reference(tmp_path, mask_prompts=False)
    assert tasks.max_abs_diff(unmasked["params"], references["example"]["params"]) > 1e-3


def test_assistant_only_masks_equal_the_truth_on_the_assistant_tokens(tmp_path):
    """TRL's assistant_only_loss on multi-turn conversations (a chat template with {% generation %} markers): the
    step is the full-batch truth over the assistant tokens, built by hand from the turns, at batch 8 and 2 x 4."""
    data, batch = sft.conversations()
    prepared = sft.prepared_batch(tmp_path / "prepare", data, sft.chat_tokenizer(), assistant_only_loss=True)
    assert torch.equal(prepared["labels"], batch["labels"])  # TRL masks what the truth masks
    truth = sft.full_batch_reference(tmp_path / "truth", batch=batch)
    for batch_size, grad_accum in ((8, 1), (2, 4)):
        result = sft.run(
            tmp_path / f"{batch_size}x{grad_accum}", batch_size, grad_accum,
            config_kwargs={"assistant_only_loss": True},
            trainer_kwargs={"train_dataset": data, "processing_class": sft.chat_tokenizer()},
        )  # fmt: skip
        check_matches_reference(result, truth)
    # Control: without the masks every token is scored, and the step is another.
    unmasked = sft.run(
        tmp_path / "unmasked", 8, 1, trainer_kwargs={"train_dataset": data, "processing_class": sft.chat_tokenizer()}
    )
    assert tasks.max_abs_diff(unmasked["params"], truth["params"]) > 1e-3


def test_packing_and_padding_free_batches_equal_full_batch(tmp_path, references):
    # bfd packing puts all 8 examples in one row without padding (position_ids restart per example); TRL marks the
    # first token of every example -100, so no example is scored from the one before it.
    result = sft.run(tmp_path, 8, 1, config_kwargs={"packing": True})
    assert result["trainer"].padding_free
    check_matches_reference(result, references["example"])


def test_plain_sft_config_with_keyword_options(tmp_path, references):
    config = sft.config(tmp_path, 2, 4, config_cls=SFTConfig)
    trainer = sft.OrderedSmoothingSFTTrainer(
        model=sft.model(), args=config, train_dataset=sft.dataset(), processing_class=sft.tokenizer(),
        label_smoothing=tasks.EPSILON, class_weights=sft.class_weights(),
    )  # fmt: skip
    assert type(trainer.args) is SmoothingSFTConfig and trainer.args.max_length == 64
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert tasks.max_abs_diff(params, references["example"]["params"]) <= TOLERANCE


def test_label_smoothing_factor_alone_is_the_eps_and_trl_smoother_never_runs(tmp_path):
    config = sft.config(tmp_path, 8, 1, config_cls=SFTConfig, label_smoothing_factor=0.2)
    trainer = SmoothingSFTTrainer(
        model=sft.model(), args=config, train_dataset=sft.dataset(), processing_class=sft.tokenizer()
    )
    assert (trainer.args.label_smoothing, trainer.args.label_smoothing_factor) == (0.2, 0.0)
    assert trainer.label_smoother is None


class OrderedSFTTrainer(tasks.SequentialSamplerMixin, SFTTrainer):
    pass


def test_trl_metrics_are_kept_and_equal_trls(tmp_path):
    ours = sft.run(tmp_path / "ours", 2, 4, weights=False, config_kwargs={"label_smoothing": 0.0})
    trl_trainer = OrderedSFTTrainer(
        model=sft.model(), args=sft.config(tmp_path / "trl", 2, 4, config_cls=SFTConfig), train_dataset=sft.dataset(),
        processing_class=sft.tokenizer(),
    )  # fmt: skip
    trl_trainer.train()
    (mine,) = [entry for entry in ours["log_history"] if "loss" in entry]
    (theirs,) = [entry for entry in trl_trainer.state.log_history if "loss" in entry]
    # Without smoothing and weights the two losses are the same cross-entropy; the metrics are computed alike.
    assert mine["loss"] == pytest.approx(theirs["loss"], abs=TOLERANCE)
    for key in ("entropy", "mean_token_accuracy", "num_tokens"):
        assert key in mine
        assert mine[key] == pytest.approx(theirs[key], abs=1e-6), key
    assert mine["num_tokens"] == sum(prompt + completion + 1 for prompt, completion in sft.PAIRS)
    # ... and in evaluation, next to eval_loss and eval_nll.
    metrics = ours["trainer"].evaluate(sft.dataset())
    trl_metrics = trl_trainer.evaluate(sft.dataset())
    for key in ("eval_entropy", "eval_mean_token_accuracy"):
        assert metrics[key] == pytest.approx(trl_metrics[key], abs=1e-6), key
    assert metrics["eval_nll"] == pytest.approx(metrics["eval_loss"], abs=1e-9)  # eps = 0, no weights


def _large_vocabulary_llama():
    """`sft.model()`'s Llama with the vocabulary from which ``fused_linear="auto"`` takes the linear path on CPU."""
    config = sft.model().config
    config.vocab_size = hf_lsce.causal_lm.LINEAR_MIN_VOCABULARY
    torch.manual_seed(0)
    return LlamaForCausalLM(config).double()


def _sft_log_lines(caplog):
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "hf_lsce.sft"]


def test_auto_keeps_the_logits_and_trls_metrics_for_a_large_vocabulary(tmp_path, caplog):
    # Control: SmoothingTrainer's "auto" would train this model without its logits.
    plain = SmoothingTrainer(model=_large_vocabulary_llama(), args=tasks.training_args(tmp_path / "plain", 8, 1))
    assert plain.args.fused_linear == "auto" and plain._linear_head is not None
    with caplog.at_level(logging.INFO, logger="hf_lsce.sft"):
        result = sft.run(tmp_path / "sft", 8, 1, weights=False, net=_large_vocabulary_llama())
    trainer = result["trainer"]
    assert trainer.args.fused_linear == "auto" and trainer._linear_head is None
    (line,) = _sft_log_lines(caplog)
    assert line == (logging.INFO, "fused_linear='auto': SmoothingSFTTrainer trains through the logits, which TRL's "
                    "entropy and mean_token_accuracy need; fused_linear=True trains without them (and without those "
                    "metrics)")  # fmt: skip
    (logged,) = [entry for entry in result["log_history"] if "loss" in entry]
    assert {"entropy", "mean_token_accuracy", "num_tokens"} <= logged.keys()


def test_true_trains_without_the_logits_and_says_the_metrics_are_not_logged(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="hf_lsce.sft"):
        result = sft.run(tmp_path, 8, 1, weights=False, net=_large_vocabulary_llama(),
                         config_kwargs={"fused_linear": True})  # fmt: skip
    assert result["trainer"]._linear_head is not None
    (line,) = _sft_log_lines(caplog)
    assert line[0] == logging.WARNING and "entropy and mean_token_accuracy are not logged in training" in line[1]
    (logged,) = [entry for entry in result["log_history"] if "loss" in entry]
    assert logged["num_tokens"] > 0 and not {"entropy", "mean_token_accuracy"} & logged.keys()
    # Evaluation keeps the logits, and the two metrics.
    metrics = result["trainer"].evaluate(sft.dataset())
    assert {"eval_entropy", "eval_mean_token_accuracy", "eval_nll"} <= metrics.keys()


def test_wrong_method_order_raises_when_the_class_is_defined():
    with pytest.raises(TypeError, match=r"SFTTrainer.compute_loss comes before SmoothingTrainerMixin.compute_loss"):

        class WrongOrder(SFTTrainer, SmoothingTrainer):
            pass


def test_parent_that_rebuilds_the_arguments_raises_at_construction(tmp_path):
    class LosesOptions(SmoothingTrainer, SFTTrainer):
        """Our loss runs first, but SFTTrainer converts SmoothingTrainingArguments into a plain SFTConfig."""

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(TypeError, match="a parent class rebuilt the arguments as a class without the smoothing"):
        LosesOptions(model=sft.model(), args=args, train_dataset=sft.dataset(), processing_class=sft.tokenizer())


def test_loss_types_other_than_nll_are_refused(tmp_path):
    with pytest.raises(ValueError, match="loss_type must be 'nll' with SmoothingSFTTrainer .*got 'dft'"):
        sft.config(tmp_path, 8, 1, loss_type="dft")


def test_peft_lora_causal_lm(tmp_path, references):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    base = sft.model()
    frozen = {name: p.detach().clone() for name, p in base.named_parameters()}
    result = sft.run(tmp_path, 2, 4, trainer_kwargs={"peft_config": lora}, net=base)
    trainer = result["trainer"]
    assert trainer._unwrapped_model() is base
    # LoRA's B starts at zero, so the first step's loss is the base model's: the full-batch truth.
    assert result["training_loss"] == pytest.approx(references["example"]["loss"], abs=TOLERANCE)
    # The adapters trained (LoRA's B leaves zero) while the base model's weights stayed as they were.
    lora_b = [p for name, p in trainer.model.named_parameters() if "lora_B" in name]
    assert lora_b and all((p != 0).any() for p in lora_b)
    for name, p in base.named_parameters():
        if "lora_" not in name:
            torch.testing.assert_close(p, frozen[name.replace("base_layer.", "")], rtol=0, atol=0)


def test_import_without_trl_works_and_the_classes_say_what_is_missing():
    code = (
        "import sys; sys.modules['trl'] = None\n"
        "import hf_lsce\n"
        "from hf_lsce import SmoothingSFTTrainer, SmoothingSFTConfig, SmoothingTrainer\n"
        "for cls in (SmoothingSFTTrainer, SmoothingSFTConfig):\n"
        "    try:\n"
        "        cls(output_dir='x')\n"
        "    except ImportError as error:\n"
        "        print(error)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.strip().splitlines()
    assert len(lines) == 2
    assert all("needs TRL, which is not installed: pip install 'hf-lsce[trl]'" in line for line in lines)


# ---- two processes ----


@pytest.mark.distributed
def test_two_processes_equal_full_batch(tmp_path, references):
    out = tmp_path / "results.pt"
    results = run_two_processes("trainer_worker.py", out, "sft", timeout=900)
    for split in ("2x4", "2x2x2"):
        check_matches_reference(results[f"sft/{split}"], references["example"])
