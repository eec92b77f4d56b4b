import functools
import os

# Tests never reach the Hub: fail at once instead of retrying. Set before anything imports `huggingface_hub` or
# `datasets` (hf_lsce does, through transformers), which read these once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from hf_lsce import label_smoothed_cross_entropy  # noqa: E402

# Every implementation of the loss runs the same parity tests.
IMPLEMENTATIONS = {
    "reference": functools.partial(label_smoothed_cross_entropy, implementation="reference"),
    "fused": functools.partial(label_smoothed_cross_entropy, implementation="fused"),
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def lsce(request):
    return IMPLEMENTATIONS[request.param]
