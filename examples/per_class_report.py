"""Per-class recall and predicted-class shares of a comparison's runs: what accuracy and macro-F1 hide.

A collapsed classifier (one that predicts a single class, or never predicts one) shows as a recall near 0 for some
classes and a predicted share far from the true share. This reads the runs that `examples/compare_smoothing.py`
left in one or more output folders (`<setting>/seed<k>/predictions.npz` and `analysis.json`) and writes one Markdown
table, the mean over seeds per setting and weight mode:

    python examples/per_class_report.py runs/study/imbalanced3 runs/study/imbalanced3_torch \\
        --output docs/results/imbalanced3/per_class.md

The temperature-scaled baselines are left out: dividing logits by T changes no prediction.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from common import write_atomic  # examples/common.py: every file the examples write is written whole
from compare_report import class_names

SPLITS = ("test", "validation")


def class_rates(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """`recall[c]`: share of the examples of class c predicted as c (NaN if c is absent); `predicted[c]`: share of all
    examples predicted as c; `true[c]`: share of all examples in class c. Predictions are `logits.argmax(1)`."""
    predictions = logits.argmax(axis=1)
    support = np.bincount(labels, minlength=num_classes)
    hits = np.bincount(labels[predictions == labels], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, hits / support, np.nan)
    return {
        "recall": recall,
        "predicted": np.bincount(predictions, minlength=num_classes) / len(labels),
        "true": support / len(labels),
    }


def collect(output_dirs: list[Path], split: str) -> tuple[dict[tuple[str, str], list[dict]], list[str]]:
    """Rates of every trained run, grouped by (setting label, weight mode)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    names = None
    for output_dir in output_dirs:
        analyses = sorted(output_dir.glob("*/seed*/analysis.json"))
        if not analyses:
            raise FileNotFoundError(f"{output_dir}: no */seed*/analysis.json (not a compare_smoothing.py output)")
        for path in analyses:
            analysis = json.loads(path.read_text())
            if analysis["setting"]["temperature_scaling"]:
                continue
            with np.load(path.parent / "predictions.npz") as arrays:
                if f"{split}_logits" not in arrays:
                    raise KeyError(f"{path.parent / 'predictions.npz'}: no {split}_logits")
                logits, labels = arrays[f"{split}_logits"], arrays[f"{split}_labels"].astype(np.int64)
            names = names or class_names(analysis, logits.shape[1])
            setting = analysis["setting"]
            weight_mode = str(analysis["glue_config"].get("weight_mode", "?"))
            # The reading order of compare_report.py's table: no weights first, then by ε; the modes side by side.
            order = (setting["class_weights"] != "none", setting["class_weights"], setting["label_smoothing"])
            groups.setdefault((*order, setting["label"], weight_mode), []).append(
                class_rates(logits, labels, logits.shape[1])
            )
    return {key[-2:]: groups[key] for key in sorted(groups)}, names


def markdown(groups: dict[tuple[str, str], list[dict]], names: list[str], split: str) -> str:
    def mean(records: list[dict], key: str) -> np.ndarray:
        return np.mean([record[key] for record in records], axis=0)

    header = ["setting", "weight_mode", "seeds", *[f"recall {n}" for n in names], *[f"predicted {n}" for n in names]]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|"]
    true_share = None
    for (label, weight_mode), records in groups.items():
        recall, predicted = mean(records, "recall"), mean(records, "predicted")
        true_share = mean(records, "true")
        rates = [f"{value:.3f}" for value in (*recall, *predicted)]
        cells = [label, weight_mode, str(len(records)), *rates]
        lines.append("| " + " | ".join(cells) + " |")
    shares = ", ".join(f"{name} {share:.3f}" for name, share in zip(names, true_share))
    note = (
        f"{split.capitalize()} split; mean over seeds. recall: share of a class's examples predicted as that class; "
        f"predicted: share of all examples predicted as the class (true shares: {shares})."
    )
    return "\n".join(lines) + f"\n\n- {note}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dirs", nargs="+", type=Path, help="compare_smoothing.py output folders")
    parser.add_argument("--output", type=Path, help="write the table here (default: print it)")
    parser.add_argument("--split", default="test", choices=SPLITS)
    args = parser.parse_args(argv)
    try:
        groups, names = collect(args.output_dirs, args.split)
    except (FileNotFoundError, KeyError) as error:
        print(f"error: {error.args[0]}", file=sys.stderr)
        return 2
    if not groups:
        print(f"error: {', '.join(map(str, args.output_dirs))}: only temperature-scaled runs", file=sys.stderr)
        return 2
    table = markdown(groups, names, args.split)
    if args.output is None:
        print(table)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.output, table)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
