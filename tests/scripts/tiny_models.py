"""The tests' tiny model configs, in one place: imported by tests/conftest.py and by the worker scripts here (which
torchrun starts without pytest, so they cannot use conftest). Built from configs: no Hub, no download.

Transformers is imported inside the functions, so that importing this module (conftest does, at collection) stays
light.
"""

from __future__ import annotations

# The words of the tests' synthetic data; the tiny tokenizer (conftest's `tiny_tokenizer`) knows each of them
# (anything else becomes [UNK]). "berlin" is two WordPiece pieces, so that token classification sees words of several
# sub-tokens.
TINY_WORDS = (
    "good great fine fun warm lovely superb bad awful dull poor cold boring sad "
    "the movie film plot was is a very in city really quite anna paris ber ##lin"
).split()
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_WORDS]

# The layers of the tests' tiny decoders (Llama and its relatives), whatever their vocabulary and special tokens.
TINY_DECODER = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, attn_implementation="eager"
)


def tiny_bert_config(**overrides):
    """A `BertConfig`: 2 layers, hidden size 32, 2 heads over `TINY_VOCAB`; ``overrides`` (e.g. ``num_labels``) win."""
    from transformers import BertConfig

    options = dict(
        vocab_size=len(TINY_VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64,
    )  # fmt: skip
    return BertConfig(**{**options, **overrides})
