import functools
import os

# Tests never reach the Hub: fail at once instead of retrying. Set before anything imports `huggingface_hub` or
# `datasets` (hf_lsce does, through transformers), which read these once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import socket  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from hf_lsce import label_smoothed_cross_entropy  # noqa: E402

# The tiny configs live with the worker scripts, which torchrun starts without pytest (and so without this file).
sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from tiny_models import TINY_VOCAB, TINY_WORDS, tiny_bert_config  # noqa: E402, F401

# Every implementation of the loss runs the same parity tests.
IMPLEMENTATIONS = {
    "reference": functools.partial(label_smoothed_cross_entropy, implementation="reference"),
    "fused": functools.partial(label_smoothed_cross_entropy, implementation="fused"),
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def lsce(request):
    return IMPLEMENTATIONS[request.param]


# ---------------------------------------------------------------------------------------------------------------------
# Tiny models, built from configs (no Hub, no download): one vocabulary, one BERT (tests/scripts/tiny_models.py),
# shared by every test module
# ---------------------------------------------------------------------------------------------------------------------


def tiny_bert_classifier(**config_overrides):
    """A randomly initialized `BertForSequenceClassification` of `tiny_bert_config(**config_overrides)`."""
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification(tiny_bert_config(**config_overrides))


def tiny_tokenizer():
    """A lower-casing WordPiece tokenizer over `TINY_VOCAB` with BERT's special tokens and pair template."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordPiece({word: i for i, word in enumerate(TINY_VOCAB)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = TINY_VOCAB.index("[CLS]"), TINY_VOCAB.index("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )  # fmt: skip


def save_tiny_bert(folder, **config_overrides) -> str:
    """Saves `tiny_tokenizer()` and a random `BertModel` of `tiny_bert_config(**config_overrides)` into `folder`;
    returns its path.

    The examples load it with `--model_name_or_path folder`, which adds a new classification head of the data's size.
    """
    import torch
    from transformers import BertModel

    tiny_tokenizer().save_pretrained(folder)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        BertModel(tiny_bert_config(**config_overrides)).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """The folder of `save_tiny_bert`, built once per test session."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


# ---------------------------------------------------------------------------------------------------------------------
# Helpers of the tests that start processes or need an optional package
# ---------------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for torchrun's ``--master_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TORCHRUN = ("torch.distributed.run", "--nproc_per_node", "2", "--master_port")
ACCELERATE_LAUNCH = ("accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_port")


def run_two_processes(script: str, out: Path, *args: str, timeout: int = 600, launcher: tuple = TORCHRUN):
    """Runs ``tests/scripts/<script> <out> <args>`` on 2 CPU processes (``launcher``: torchrun, or accelerate launch
    as a user would; gloo, one thread each, offline) and returns what the workers saved to ``out`` (`torch.load`)."""
    import subprocess

    import torch

    command = [
        sys.executable, "-m", *launcher, str(free_port()), str(Path(__file__).parent / "scripts" / script), str(out),
        *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return torch.load(out, weights_only=False)


def check_matches_reference(result: dict, reference: dict, tolerance: float = 1e-6, log_tolerance=None) -> None:
    """A trainer run's parameters after its step, its training loss and its one logged loss equal the full-batch
    truth (`trainer_tasks.full_batch_reference`). The Trainer accumulates the logged loss in an fp32 tensor, which
    older Transformers summed less precisely: ``log_tolerance`` (default ``tolerance``)."""
    import trainer_tasks

    assert trainer_tasks.max_abs_diff(result["params"], reference["params"]) <= tolerance
    assert result["training_loss"] == pytest.approx(reference["loss"], abs=tolerance)
    assert result["logged"] == [pytest.approx(reference["loss"], abs=log_tolerance or tolerance)]


def has_module(name: str) -> bool:
    """Whether ``name`` imports (an optional extra: TRL, PEFT)."""
    try:
        __import__(name)
    except ImportError:
        return False
    return True
