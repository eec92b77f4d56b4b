"""torchrun worker for the fused_linear tests: `torchrun --nproc_per_node 2 trainer_linear_worker.py OUT [MODEL ...]`.

Every rank trains each model one step at 2 processes x batch 4 with fused_linear=True; rank 0 writes the losses and
gradients (after DDP's all-reduce) to OUT (torch.save).
"""

import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trainer_linear_tasks import SPLIT_MODELS, run  # noqa: E402


def main() -> None:
    out = sys.argv[1]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in sys.argv[2:] or SPLIT_MODELS:
            result = run(name, f"{tmp}/{name}", 4, 1)
            results[name] = {key: result[key] for key in ("loss", "grads", "head_widths")}
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main()
