"""The README's "With TRL, PEFT and Seq2Seq" snippets run as written.

Each fenced python block under that heading is executed as is (no text substituted). Like the README's other trainer
snippet, the blocks start from objects a user already has (``model``, ``tokenizer`` and the datasets); the test
provides them as tiny offline stand-ins, chosen by the trainer class the block imports: a one-layer Llama with a
prompt/completion dataset (with a ``sample_weight`` column) for TRL, a one-layer T5 with source/target pairs for
Seq2Seq. Outputs go to a temporary working directory. Nothing else is changed: the SFT block sets ``bf16=False``
itself, as a user without a bf16 GPU must (TRL's configs default to bf16).
"""

import math
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import trainer_tasks as tasks  # noqa: E402

HEADING = "With TRL, PEFT and Seq2Seq"


def snippets() -> list[str]:
    """The python blocks between the heading (level 3) and the next heading of level 1 to 3."""
    text = (REPO / "README.md").read_text()
    assert f"\n### {HEADING}\n" in text, f"README.md has no '### {HEADING}' section"
    section = re.split(r"^#{1,3} ", text.split(f"\n### {HEADING}\n", 1)[1], maxsplit=1, flags=re.M)[0]
    return re.findall(r"^```python\n(.*?)^```", section, re.M | re.S)


def _sft_names() -> dict:
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    import trainer_sft_tasks as sft

    return {"model": sft.model(), "tokenizer": sft.tokenizer(), "dataset": sft.dataset(tasks.SAMPLE_WEIGHTS)}


def _seq2seq_names() -> dict:
    return {
        "model": tasks.model("seq2seq"), "tokenizer": tasks.tokenizer(), "train": tasks.examples("seq2seq"),
        "validation": tasks.examples("seq2seq", lengths=(4, 9, 2)),
    }  # fmt: skip


def test_the_section_has_one_block_per_trainer():
    blocks = snippets()
    assert len(blocks) == 2
    assert "SmoothingSFTTrainer(" in blocks[0] and "SmoothingSeq2SeqTrainer(" in blocks[1]


def test_sft_with_peft_snippet_runs(tmp_path, monkeypatch):
    names = _sft_names()
    monkeypatch.chdir(tmp_path)
    exec(snippets()[0], names)
    trainer = names["trainer"]
    from peft import PeftModel

    from hf_lsce import SmoothingSFTTrainer

    assert type(trainer) is SmoothingSFTTrainer and isinstance(trainer.model, PeftModel)
    assert trainer.args.label_smoothing == 0.1 and trainer.state.global_step > 0
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    # The example weights reached the loss: every training batch carried them.
    assert trainer._sample_weight_presence == {"train": True}


def test_seq2seq_snippet_runs(tmp_path, monkeypatch):
    names = _seq2seq_names()
    monkeypatch.chdir(tmp_path)
    exec(snippets()[1], names)
    from hf_lsce import SmoothingSeq2SeqTrainer

    assert type(names["trainer"]) is SmoothingSeq2SeqTrainer and names["trainer"].state.global_step > 0
    metrics = names["metrics"]
    assert math.isfinite(metrics["eval_loss"]) and math.isfinite(metrics["eval_nll"])


def test_snippets_need_the_provided_names(tmp_path, monkeypatch):
    """Control: the blocks do use the names this test provides (without them they fail)."""
    monkeypatch.chdir(tmp_path)
    for block in snippets():
        with pytest.raises(NameError, match="'model'"):
            exec(block, {})
