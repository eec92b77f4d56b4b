"""The report of a smoothing comparison: the table, the CSV, the plots and the Markdown paste, from records alone.

Everything here reads only the ``<setting>/seed<k>/analysis.json`` records that ``compare_smoothing.py`` (the
runner) writes, so a report can be rebuilt at any time (``compare_smoothing.py --report_only``) and the same table
and plots come out of the same records. Every file is written whole (`common.atomic_open`).

* ``results.md`` / ``results.csv``: accuracy, macro-F1, NLL, ECE, Brier score, AURC and the error at 80 % coverage,
  mean ± std over seeds, one table per evaluation set (the in-domain test split, then each extra test set);
* ``reliability.png`` (test; one reliability diagram per setting, seeds pooled) and ``reliability_<set>.png`` for
  each extra set, ``accuracy_ece_vs_eps.png`` (test), ``ece_aurc_vs_eps.png`` (ECE and AURC against ε, one row per
  evaluation set), ``confidence_hist.png`` (test);
* with ``export_dir``, copies of them and every record (``records.jsonl``); with ``readme``, ``results.md`` pasted
  between the ``<!-- results:NAME -->`` markers of a Markdown file (`paste_into_readme`).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
from common import UsageError, atomic_open, paste_into_readme, read_json_record, write_atomic

METRICS = ("accuracy", "macro_f1", "nll", "ece", "brier", "aurc", "error_at_80_coverage")
METRIC_NAMES = {
    "accuracy": "accuracy ↑",
    "macro_f1": "macro-F1 ↑",
    "nll": "NLL ↓",
    "ece": "ECE ↓",
    "brier": "Brier ↓",
    "aurc": "AURC ↓",
    "error_at_80_coverage": "err@80% ↓",
}
IN_DOMAIN = "test"
ANALYSIS_VERSION = 2  # the version of compare_smoothing.py's analysis.json that this report reads


def load_records(output_dir: Path) -> list[dict]:
    records = []
    for path in sorted(output_dir.glob("*/seed*/analysis.json")):
        record = read_json_record(path)
        if record is None:
            raise UsageError(path, "is empty or not valid JSON: run the comparison without --report_only to redo it")
        if record.get("analysis_version") != ANALYSIS_VERSION:
            raise UsageError(
                path,
                "was written by an older compare_smoothing.py: run the comparison again without --report_only (it "
                "rebuilds the analysis from predictions.npz and trains nothing new)",
            )
        records.append(record)
    return records


def evaluation_sets(records: list[dict]) -> list[str]:
    """The sets every record was evaluated on, in the records' order (the in-domain test split first)."""
    return [name for name in records[0]["evaluation_sets"] if all(name in r["metrics"] for r in records)]


def group_by_setting(records: list[dict]) -> dict[str, list[dict]]:
    """Settings in a stable reading order: by class weights, noise, then ε, style, and the TS baseline after ε = 0."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record["setting"]["slug"], []).append(record)

    def order(slug: str) -> tuple:
        setting = groups[slug][0]["setting"]
        return (
            setting["class_weights"] != "none",
            setting["class_weights"],
            setting.get("label_noise", 0.0),
            setting["label_smoothing"],
            setting["temperature_scaling"],
            ("uniform", "off_target").index(setting["smoothing_style"]) if setting["smoothing_style"] else -1,
        )

    return {slug: sorted(groups[slug], key=lambda r: r["seed"]) for slug in sorted(groups, key=order)}


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summary_rows(groups: dict[str, list[dict]], evaluation_set: str) -> list[dict]:
    """One row per setting: the mean and sample std over seeds of each metric on `evaluation_set`."""
    rows = []
    for slug, records in groups.items():
        setting = records[0]["setting"]
        row = {
            "evaluation_set": evaluation_set,
            "setting": setting["label"],
            "slug": slug,
            "label_smoothing": setting["label_smoothing"],
            "smoothing_style": setting["smoothing_style"] or "",
            "class_weights": setting["class_weights"],
            "label_noise": setting.get("label_noise", 0.0),
            "temperature_scaling": setting["temperature_scaling"],
            "seeds": len(records),
            "examples": _set_size(records[0], evaluation_set),
        }
        for metric in METRICS:
            values = [r["metrics"][evaluation_set][metric] for r in records]
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std(values)
        temperatures = [r["temperature"] for r in records if r["temperature"] is not None]
        row["temperature_mean"] = float(np.mean(temperatures)) if temperatures else None
        times = [r["train_wall_time_s"] for r in records if r["train_wall_time_s"] is not None]
        row["train_minutes_mean"] = float(np.mean(times)) / 60 if times else None
        rows.append(row)
    return rows


def _set_size(record: dict, evaluation_set: str) -> int:
    return int(sum(record["class_counts"][evaluation_set]))


def _describe_data(records: list[dict]) -> str:
    config = records[0].get("glue_config", {})
    keys = ("dataset", "task_name", "train_file", "model_name_or_path", "max_train_samples", "max_seq_length")
    keys += ("num_train_epochs", "learning_rate", "per_device_train_batch_size", "label_noise_seed")
    shown = {key: config[key] for key in keys if config.get(key) is not None}
    if "label_noise_seed" in shown and not any(r["setting"].get("label_noise") for r in records):
        del shown["label_noise_seed"]
    return ", ".join(f"`{key}={value}`" for key, value in shown.items())


def class_names(analysis: dict, num_classes: int) -> list[str]:
    """The class names of a run's analysis record, by class id.

    From its `id2label` (glue.py's record.json has it); for older records, the label names of a corpus of
    `pypi_corpora.py` named by its `glue_config`'s `dataset`; else ``class <id>``.
    """
    id2label = analysis.get("id2label") or {}
    if all(str(index) in id2label for index in range(num_classes)):
        return [str(id2label[str(index)]) for index in range(num_classes)]
    dataset = (analysis.get("glue_config") or {}).get("dataset")
    if dataset is not None:
        from pypi_corpora import CORPORA  # loads `datasets`, so only when needed

        if dataset in CORPORA and len(CORPORA[dataset][2]) == num_classes:
            return [str(name) for name in CORPORA[dataset][2]]
    return [f"class {index}" for index in range(num_classes)]


def _describe_set(records: list[dict], evaluation_set: str) -> str:
    """``test (in-domain): 1,273 examples, 38 % rotten / 62 % fresh`` (see `class_names`)."""
    counts = np.asarray(records[0]["class_counts"][evaluation_set], dtype=np.int64)
    names = class_names(records[0], len(counts))
    shares = " / ".join(f"{100 * count / counts.sum():.0f} % {name}" for name, count in zip(names, counts))
    where = " (in-domain)" if evaluation_set == IN_DOMAIN else ""
    return f"{evaluation_set}{where}: {counts.sum():,} examples, {shares}"


def _table_lines(rows: list[dict]) -> list[str]:
    def cell(row: dict, metric: str) -> str:
        mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
        return f"{mean:.3f}" if row["seeds"] == 1 else f"{mean:.3f} ± {std:.3f}"

    header = ["setting", "seeds", *[METRIC_NAMES[m] for m in METRICS], "T", "min/run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        temperature = f"{row['temperature_mean']:.2f}" if row["temperature_mean"] is not None else ""
        minutes = f"{row['train_minutes_mean']:.1f}" if row["train_minutes_mean"] is not None else "0 (reuses ε=0)"
        values = [row["setting"], str(row["seeds"]), *[cell(row, m) for m in METRICS], temperature, minutes]
        lines.append("| " + " | ".join(values) + " |")
    return lines


def markdown_table(rows_by_set: dict[str, list[dict]], records: list[dict], title: str | None, n_bins: int) -> str:
    """The Markdown of ``results.md``: one table per evaluation set (a heading each when there are several), notes."""
    several = len(rows_by_set) > 1
    parts = [f"### {title}\n"] if title else []
    for evaluation_set, rows in rows_by_set.items():
        if several:
            parts.append(f"#### {_describe_set(records, evaluation_set)}\n")
        parts.append("\n".join(_table_lines(rows)) + "\n")
    seeds = sorted({r["seed"] for r in records})
    total = sum(r["train_wall_time_s"] or 0.0 for r in records)
    devices = sorted({str(r.get("device")) for r in records if r.get("device")})
    where = "each table is one evaluation set" if several else _describe_set(records, next(iter(rows_by_set)))
    where = where[0].upper() + where[1:]
    notes = [
        f"{where}; mean ± sample std over seeds {seeds}. ECE with {n_bins} equal-width bins; Brier is the "
        "multi-class score (sum over classes, range [0, 2]). AURC: area under the risk-coverage curve (confidence = "
        "maximum probability; lower is better); err@80%: error rate of the 80 % most confident predictions. "
        "T: the temperature fitted on the in-domain validation split (mean over seeds), applied to every set. "
        "min/run: wall time of one glue.py run (loading, training, evaluation), mean over seeds.",
        f"Runs: {_describe_data(records)}.",
        f"{sum(r['train_wall_time_s'] is not None for r in records)} training runs, "
        f"{total / 60:.1f} min in total (sum of the runs' wall times) on {', '.join(devices) or '?'}.",
    ]
    return "\n".join(parts) + "\n" + "\n".join(f"- {note}" for note in notes) + "\n"


def _grid_shape(count: int) -> tuple[int, int]:
    columns = min(4, count)
    return math.ceil(count / columns), columns


def _pooled_bins(records: list[dict], evaluation_set: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pools the seeds' reliability bins: per-bin accuracy and confidence weighted by the bins' counts."""
    bins = [r["reliability"][evaluation_set] for r in records]
    counts = np.array([b["count"] for b in bins], dtype=np.float64)
    total = counts.sum(axis=0)
    pooled = []
    for key in ("accuracy", "confidence"):
        values = np.array([[np.nan if v is None else v for v in b[key]] for b in bins])
        with np.errstate(invalid="ignore", divide="ignore"):
            pooled.append(np.where(total > 0, np.nansum(values * counts, axis=0) / total, np.nan))
    return pooled[0], pooled[1], total


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_open(path, "wb") as file:
        fig.savefig(file, format="png", dpi=110)
    plt.close(fig)


def plot_reliability(groups: dict[str, list[dict]], path: Path, evaluation_set: str = IN_DOMAIN) -> None:
    import matplotlib.pyplot as plt

    nrows, ncols = _grid_shape(len(groups))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.3 * nrows), squeeze=False, sharex=True, sharey=True)
    for ax, records in zip(axes.flat, groups.values()):
        accuracy, confidence, total = _pooled_bins(records, evaluation_set)
        lower = np.asarray(records[0]["reliability"][evaluation_set]["bin_lower"])
        width = np.asarray(records[0]["reliability"][evaluation_set]["bin_upper"]) - lower
        filled = total > 0
        ax.bar(
            lower[filled],
            accuracy[filled],
            width=width[filled],
            align="edge",
            color="tab:blue",
            edgecolor="k",
            linewidth=0.5,
            label="accuracy",
        )
        ax.bar(
            lower[filled],
            confidence[filled] - accuracy[filled],
            bottom=accuracy[filled],
            width=width[filled],
            align="edge",
            color="tab:red",
            alpha=0.35,
            label="gap to confidence",
        )
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        ece = np.mean([r["metrics"][evaluation_set]["ece"] for r in records])
        ax.set_title(records[0]["setting"]["label"], fontsize=9)
        ax.text(0.04, 0.9, f"ECE {ece:.3f}", transform=ax.transAxes, fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    for ax in axes.flat[len(groups) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("confidence")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy")
    axes.flat[0].legend(loc="lower right", fontsize=7)
    fig.suptitle(f"Reliability diagrams ({evaluation_set}, seeds pooled)")
    _save(fig, path)


def _plot_epsilon_lines(ax, rows: list[dict], metric: str) -> None:
    """One line per (smoothing style, class weights, label noise) against ε, starting at its ε = 0 run; the
    temperature-scaling baselines as horizontal lines. Colour: noise; line style: class weights; marker: style."""
    trained = [row for row in rows if not row["temperature_scaling"]]
    styles = [style for style in ("uniform", "off_target") if any(r["smoothing_style"] == style for r in trained)]
    markers = dict(zip(styles or [""], ["o", "s"]))
    noises = list(dict.fromkeys(row["label_noise"] for row in rows))
    colors = dict(zip(noises, ["tab:blue", "tab:red", "tab:green", "tab:purple", "tab:brown"] * 4))
    weight_choices = list(dict.fromkeys(row["class_weights"] for row in rows))
    dashes = dict(zip(weight_choices, ["-", ":", "-.", (0, (5, 1))] * 4))
    several_noises = len(noises) > 1

    def describe(class_weights: str, noise: float) -> str:
        parts = [] if class_weights == "none" else [f"{class_weights} weights"]
        if several_noises:
            parts.append(f"noise {noise:g}")
        return ", ".join(parts)

    for noise in noises:
        for class_weights in weight_choices:
            same = [r for r in trained if r["class_weights"] == class_weights and r["label_noise"] == noise]
            baseline = [r for r in same if r["label_smoothing"] == 0]
            for style in styles or [""]:
                line = baseline + [r for r in same if r["smoothing_style"] == style and r["label_smoothing"] > 0]
                line.sort(key=lambda r: r["label_smoothing"])
                if not line:
                    continue
                ax.errorbar(
                    [r["label_smoothing"] for r in line],
                    [r[f"{metric}_mean"] for r in line],
                    yerr=[r[f"{metric}_std"] for r in line],
                    marker=markers[style],
                    capsize=3,
                    color=colors[noise],
                    linestyle=dashes[class_weights],
                    label=", ".join(filter(None, [style or "cross-entropy", describe(class_weights, noise)])),
                )
            scaled = [r for r in rows if r["temperature_scaling"] and r["class_weights"] == class_weights]
            for row in [r for r in scaled if r["label_noise"] == noise]:
                ax.axhline(
                    row[f"{metric}_mean"],
                    linestyle=dashes[class_weights],
                    linewidth=1.0,
                    color=colors[noise],
                    alpha=0.45,
                    label=", ".join(filter(None, ["ε=0 + temperature scaling", describe(class_weights, noise)])),
                )
    ax.set_xlabel("label smoothing ε")
    ax.grid(alpha=0.3)


def plot_against_epsilon(rows: list[dict], path: Path, evaluation_set: str = IN_DOMAIN) -> None:
    """Accuracy and ECE on one evaluation set against ε (``accuracy_ece_vs_eps.png``)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("accuracy", "ece")):
        _plot_epsilon_lines(ax, rows, metric)
        ax.set_ylabel(f"{evaluation_set} {METRIC_NAMES[metric]}")
    axes[1].legend(fontsize=7)
    fig.suptitle("Accuracy and calibration error against ε (mean ± std over seeds)")
    _save(fig, path)


def plot_sets_against_epsilon(rows_by_set: dict[str, list[dict]], path: Path) -> None:
    """ECE and AURC against ε, one row of plots per evaluation set (``ece_aurc_vs_eps.png``)."""
    import matplotlib.pyplot as plt

    metrics = ("ece", "aurc")
    fig, axes = plt.subplots(len(rows_by_set), 2, figsize=(10, 3.3 * len(rows_by_set)), squeeze=False, sharex=True)
    for row_axes, (evaluation_set, rows) in zip(axes, rows_by_set.items()):
        for ax, metric in zip(row_axes, metrics):
            _plot_epsilon_lines(ax, rows, metric)
            where = " (in-domain)" if evaluation_set == IN_DOMAIN else ""
            ax.set_title(f"{evaluation_set}{where}", fontsize=9)
            ax.set_ylabel(METRIC_NAMES[metric])
    for ax in axes[:-1].flat:
        ax.set_xlabel("")  # shared ε axis: labelled once, at the bottom
    axes[0, 1].legend(fontsize=7)
    fig.suptitle("Calibration (ECE) and selective prediction (AURC) against ε, per evaluation set (mean ± std)")
    _save(fig, path)


def plot_confidence_histograms(groups: dict[str, list[dict]], path: Path, evaluation_set: str = IN_DOMAIN) -> None:
    import matplotlib.pyplot as plt

    nrows, ncols = _grid_shape(len(groups))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.8 * nrows), squeeze=False, sharex=True)
    for ax, records in zip(axes.flat, groups.values()):
        histograms = [r["confidence_histogram"][evaluation_set] for r in records]
        edges = np.asarray(histograms[0]["edges"])
        correct = np.sum([h["correct"] for h in histograms], axis=0)
        incorrect = np.sum([h["incorrect"] for h in histograms], axis=0)
        width = np.diff(edges)
        ax.bar(edges[:-1], correct, width=width, align="edge", color="tab:green", alpha=0.7, label="correct")
        ax.bar(
            edges[:-1], incorrect, width=width, bottom=correct, align="edge", color="tab:red", alpha=0.7, label="wrong"
        )
        ax.set_title(records[0]["setting"]["label"], fontsize=9)
    for ax in axes.flat[len(groups) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("confidence (max probability)")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Confidence of {evaluation_set} predictions (seeds pooled)")
    _save(fig, path)


def write_report(
    output_dir: str | Path,
    *,
    title: str | None = None,
    n_bins: int = 15,
    export_dir: str | Path | None = None,
    readme: str | Path | None = None,
    readme_marker: str | None = None,
) -> Path:
    """Writes the table and plots of the ``*/seed*/analysis.json`` records under `output_dir`; returns ``results.md``.

    Args:
        output_dir (`str` or `Path`): the comparison's folder.
        title (`str`, *optional*): heading of ``results.md``.
        n_bins (`int`, *optional*, defaults to 15): the records' number of confidence bins, for the table's notes.
        export_dir (`str` or `Path`, *optional*): also copy the outputs there, with every record (``records.jsonl``).
        readme (`str` or `Path`, *optional*): paste ``results.md`` into this Markdown file (see `paste_into_readme`).
        readme_marker (`str`, *optional*): the NAME of `readme`'s ``<!-- results:NAME -->`` markers.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a server

    output_dir = Path(output_dir)
    records = load_records(output_dir)
    if not records:
        raise UsageError("--output_dir", f"no */seed*/analysis.json records under {output_dir}: nothing to report")
    groups = group_by_setting(records)
    sets = evaluation_sets(records)
    if not sets:
        raise UsageError("--output_dir", f"the records under {output_dir} share no evaluation set: nothing to report")
    rows_by_set = {name: summary_rows(groups, name) for name in sets}
    write_atomic(output_dir / "results.md", markdown_table(rows_by_set, records, title, n_bins))
    with atomic_open(output_dir / "results.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows_by_set[sets[0]][0]))
        writer.writeheader()
        for rows in rows_by_set.values():
            writer.writerows(rows)
    # The first set (the in-domain test split when there is one) gets the plots a comparison always had.
    main_set = sets[0]
    plot_reliability(groups, output_dir / "reliability.png", main_set)
    plot_against_epsilon(rows_by_set[main_set], output_dir / "accuracy_ece_vs_eps.png", main_set)
    plot_confidence_histograms(groups, output_dir / "confidence_hist.png", main_set)
    plot_sets_against_epsilon(rows_by_set, output_dir / "ece_aurc_vs_eps.png")
    outputs = ["results.md", "results.csv", "reliability.png", "accuracy_ece_vs_eps.png", "confidence_hist.png"]
    outputs.append("ece_aurc_vs_eps.png")
    for name in sets[1:]:
        plot_reliability(groups, output_dir / f"reliability_{name}.png", name)
        outputs.append(f"reliability_{name}.png")
    if export_dir:
        export = Path(export_dir)
        export.mkdir(parents=True, exist_ok=True)
        for name in outputs:
            write_atomic(export / name, (output_dir / name).read_bytes())
        write_atomic(export / "records.jsonl", "".join(json.dumps(record) + "\n" for record in records))
    if readme:
        paste_into_readme(Path(readme), readme_marker, (output_dir / "results.md").read_text())
    print(f"wrote {', '.join(outputs)} to {output_dir}" + (f" (copied to {export_dir})" if export_dir else ""))
    return output_dir / "results.md"
