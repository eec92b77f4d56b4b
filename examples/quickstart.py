"""Quickstart: hf_lsce's loss next to PyTorch's, on random logits.

python examples/quickstart.py
"""

import torch
import torch.nn.functional as F

from hf_lsce import LabelSmoothedCrossEntropyLoss


def main() -> None:
    torch.manual_seed(0)
    batch, length, num_classes = 4, 6, 5
    logits = torch.randn(batch, length, num_classes, requires_grad=True)  # the Transformers layout: classes last
    labels = torch.randint(0, num_classes, (batch, length))
    labels[:, -2:] = -100  # padding
    weight = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0])

    ours = LabelSmoothedCrossEntropyLoss(weight, label_smoothing=0.1)(logits, labels)
    torch_ = F.cross_entropy(logits.transpose(1, 2), labels, weight, label_smoothing=0.1)
    print(f"hf_lsce (uniform, torch mode): {ours.item():.6f}")
    print(f"F.cross_entropy:               {torch_.item():.6f}")

    for style in ("uniform", "off_target"):
        for mode in ("torch", "example"):
            loss = LabelSmoothedCrossEntropyLoss(weight, label_smoothing=0.1, smoothing_style=style, weight_mode=mode)
            print(f"{style:>10} / {mode:<7}: {loss(logits, labels).item():.6f}")

    all_padding = torch.full_like(labels, -100)
    print(
        "all positions padding: hf_lsce",
        LabelSmoothedCrossEntropyLoss()(logits, all_padding).item(),
        "| PyTorch",
        F.cross_entropy(logits.transpose(1, 2), all_padding).item(),
    )


if __name__ == "__main__":
    main()
