"""Does label smoothing (and class weighting) help a text classifier? Accuracy *and* calibration, over seeds.

Runs a grid of settings (label smoothing ε, smoothing style, class weights) × seeds, each one an ordinary
``examples/glue.py`` run in a subprocess (the very code path a user runs), plus the baseline "ε = 0 + temperature
scaling" (Desai & Durrett 2020): the temperature is fitted on the validation logits of the ε = 0 run of the same
seed and class weights and reported on test; it needs no extra training. Then it writes, from the JSON records alone:

* ``results.md`` / ``results.csv``: test accuracy, macro-F1, NLL, ECE and Brier score, mean ± std over seeds;
* ``reliability.png`` (one reliability diagram per setting), ``accuracy_ece_vs_eps.png``, ``confidence_hist.png``.

Layout of ``output_dir``: ``<setting>/seed<k>/`` holds glue.py's ``record.json`` and ``predictions.npz`` plus this
script's ``analysis.json`` (metrics recomputed from the logits, reliability bins, confidence histogram). Every file
is written whole (a temporary file renamed into place). A run whose ``record.json`` holds a JSON object is finished
and not trained again, so an interrupted comparison resumes where it stopped; an empty or truncated record counts as
unfinished, and that run is redone.

One comparison at a time per ``output_dir``: a second one started on the same folder stops at once with a message
naming the first (its pid and host), instead of training the same runs again. The lock is the operating system's
(``flock`` on ``output_dir/.lock``), released when its holder exits however it ends, so a comparison that was killed
never blocks the next one; the ``.lock`` file it leaves behind is harmless. ``--report_only`` takes no lock.

Launch:

    python examples/compare_smoothing.py --config configs/experiments/compare_demo.yaml
    python examples/compare_smoothing.py --config configs/experiments/compare_demo.yaml --report_only
    # every run under accelerate (e.g. several GPUs):
    python examples/compare_smoothing.py --config configs/experiments/compare_full.yaml \\
        --launcher accelerate --accelerate_config configs/accelerate/multi_gpu.yaml

Command-line flags override the YAML file, which overrides the defaults below (the full grid); unknown keys are
errors.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

# examples/common.py: the YAML reader glue.py uses (with `extends:`), and the one-line errors of every script.
from common import (
    USAGE_ERROR_STATUS,
    UsageError,
    argument_parser,
    atomic_open,
    check_output_dir,
    folder_lock,
    load_config_file,
    read_json_record,
    run_cli,
    write_atomic,
)

from hf_lsce.calibration import apply_temperature, fit_temperature
from hf_lsce.metrics import classification_metrics, reliability_bins, softmax

GLUE_SCRIPT = Path(__file__).resolve().parent / "glue.py"
METRICS = ("accuracy", "macro_f1", "nll", "ece", "brier")
METRIC_NAMES = {"accuracy": "accuracy ↑", "macro_f1": "macro-F1 ↑", "nll": "NLL ↓", "ece": "ECE ↓", "brier": "Brier ↓"}
HISTOGRAM_BINS = 20


@dataclass
class CompareArguments:
    config: str | None = field(default=None, metadata={"help": "YAML file with any of these fields (the grid)."})
    base_config: str | None = field(
        default=None,
        metadata={"help": "The glue.py --config every run starts from (model, data, training); glue_overrides win."},
    )
    output_dir: str = field(default="runs/compare", metadata={"help": "Where the runs, table and plots go."})
    seeds: list[int] = field(default_factory=lambda: [42, 43, 44], metadata={"help": "Seeds of every setting."})
    label_smoothing: list[float] = field(
        default_factory=lambda: [0.0, 0.05, 0.1, 0.2], metadata={"help": "Label smoothing values ε."}
    )
    smoothing_style: list[str] = field(
        default_factory=lambda: ["uniform", "off_target"],
        metadata={"help": "Smoothing styles for ε > 0 (ε = 0 runs once: both styles are plain cross-entropy)."},
    )
    class_weights: list[str] = field(
        default_factory=lambda: ["none", "balanced"],
        metadata={"help": "Class weights: 'none', 'balanced', or comma-separated floats such as '1.0,3.0'."},
    )
    temperature_scaling: bool = field(
        default=True, metadata={"help": "Add the 'ε = 0 + temperature scaling' baseline (needs ε = 0 in the grid)."}
    )
    glue_overrides: list[str] = field(
        default_factory=list,
        metadata={"help": "Extra glue.py flags for every run, as key=value (in YAML also a mapping)."},
    )
    launcher: str = field(
        default="python", metadata={"help": "How each run starts.", "choices": ["python", "accelerate"]}
    )
    accelerate_config: str | None = field(
        default=None, metadata={"help": "`accelerate launch --config_file` (with --launcher accelerate)."}
    )
    n_bins: int = field(default=15, metadata={"help": "Equal-width confidence bins for ECE and reliability diagrams."})
    title: str | None = field(default=None, metadata={"help": "Heading of results.md."})
    report_only: bool = field(default=False, metadata={"help": "Train nothing; rebuild table and plots from records."})
    export_dir: str | None = field(
        default=None,
        metadata={"help": "Also copy results.md/.csv, the plots and all analysis records (records.jsonl) here."},
    )
    readme: str | None = field(
        default=None,
        metadata={
            "help": "Paste results.md into this Markdown file, between `<!-- results:NAME -->` and "
            "`<!-- /results:NAME -->` (NAME from --readme_marker), replacing what was there."
        },
    )
    readme_marker: str | None = field(default=None, metadata={"help": "NAME of the --readme markers."})


@dataclass(frozen=True)
class Setting:
    label_smoothing: float
    smoothing_style: str | None  # None when ε = 0: the style does not matter
    class_weights: str
    temperature_scaling: bool = False

    @property
    def slug(self) -> str:
        """Directory name, e.g. ``eps0.1-uniform-cw_none`` or ``eps0-cw_balanced-ts``."""
        parts = [f"eps{self.label_smoothing:g}"]
        if self.smoothing_style:
            parts.append(self.smoothing_style)
        parts.append("cw_" + self.class_weights.replace(",", "_"))
        if self.temperature_scaling:
            parts.append("ts")
        return "-".join(parts)

    @property
    def label(self) -> str:
        """Short human name for tables and plot titles."""
        text = (
            "ε=0 (cross-entropy)"
            if self.label_smoothing == 0
            else f"ε={self.label_smoothing:g} {self.smoothing_style}"
        )
        if self.temperature_scaling:
            text = "ε=0 + temperature scaling"
        if self.class_weights != "none":
            text += f", {self.class_weights} weights"
        return text


def parse_args(argv: list[str] | None = None) -> CompareArguments:
    """Defaults < YAML file (``--config``) < command-line flags; unknown YAML keys raise."""
    parser = argument_parser((CompareArguments,))
    argv = sys.argv[1:] if argv is None else argv
    (pre,) = parser.parse_args_into_dataclasses(argv)
    if pre.config is not None:
        loaded = load_config_file(pre.config)
        known = {f.name for f in fields(CompareArguments)} - {"config"}
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise UsageError(pre.config, f"unknown keys {unknown}; allowed: {sorted(known)}")
        if isinstance(loaded.get("glue_overrides"), dict):
            loaded["glue_overrides"] = [f"{key}={value}" for key, value in loaded["glue_overrides"].items()]
        parser.set_defaults(**loaded)
        (pre,) = parser.parse_args_into_dataclasses(argv)
    args = pre
    args.label_smoothing = [float(value) for value in args.label_smoothing]
    args.class_weights = [str(value) for value in args.class_weights]
    for override in args.glue_overrides:
        if "=" not in override:
            raise UsageError("--glue_overrides", f"entries must be key=value, got {override!r}")
    for style in args.smoothing_style:
        if style not in ("uniform", "off_target"):
            raise UsageError("--smoothing_style", f"must be 'uniform' or 'off_target', got {style!r}")
    return args


def check_base_config(args: CompareArguments) -> None:
    """glue.py has no flag that unsets class weights, so a base config that sets them cannot run "none"."""
    base = load_config_file(args.base_config) if args.base_config else {}
    if base.get("class_weights") is not None and "none" in args.class_weights:
        raise UsageError(
            args.base_config,
            f"sets class_weights={base['class_weights']!r}, so the grid's class_weights 'none' "
            "cannot be run: use a base config without class_weights and list the weights in the grid instead",
        )


def expand_grid(args: CompareArguments) -> list[Setting]:
    """The settings to train, then the temperature-scaled baselines (one per class-weight choice with ε = 0)."""
    settings = []
    for epsilon, class_weights in itertools.product(args.label_smoothing, args.class_weights):
        styles = args.smoothing_style if epsilon > 0 else [None]
        settings.extend(Setting(epsilon, style, class_weights) for style in styles)
    settings = list(dict.fromkeys(settings))  # repeated values in the YAML would train the same thing twice
    if args.temperature_scaling:
        settings += [Setting(0.0, None, s.class_weights, True) for s in settings if s.label_smoothing == 0]
    return settings


def glue_command(args: CompareArguments, setting: Setting, seed: int, run_dir: Path) -> list[str]:
    if args.launcher == "accelerate":
        launcher = [sys.executable, "-m", "accelerate.commands.launch"]
        if args.accelerate_config:
            launcher += ["--config_file", args.accelerate_config]
    else:
        launcher = [sys.executable]
    flags = ["--config", args.base_config] if args.base_config else []
    flags += ["--label_smoothing", f"{setting.label_smoothing:g}", "--seed", str(seed)]
    if setting.smoothing_style:
        flags += ["--smoothing_style", setting.smoothing_style]
    if setting.class_weights != "none":
        # glue.py takes `balanced` or one float per class as separate words; "none" is its default (no flag).
        flags += ["--class_weights", *setting.class_weights.split(",")]
    for override in args.glue_overrides:
        key, value = override.split("=", 1)
        flags += [f"--{key}", value]
    # Last, so that no override can send two runs to the same folder.
    flags += ["--output_dir", str(run_dir)]
    return [*launcher, str(GLUE_SCRIPT), *flags]


def _jsonable(value):
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return (
            [_jsonable(item) for item in np.asarray(value).tolist()]
            if isinstance(value, np.ndarray)
            else [_jsonable(item) for item in value]
        )
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)  # JSON has no NaN; empty bins become null
    if isinstance(value, np.integer):
        return int(value)
    return value


def analyze(logits: dict[str, np.ndarray], labels: dict[str, np.ndarray], n_bins: int) -> dict:
    """Metrics per split, test reliability bins and a confidence histogram split into right and wrong predictions."""
    probs = softmax(logits["test"])
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels["test"]
    edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    return {
        "metrics": {
            split: classification_metrics(logits[split], labels[split], n_bins=n_bins)
            for split in ("validation", "test")
        },
        "reliability": reliability_bins(probs, labels["test"], n_bins=n_bins),
        "confidence_histogram": {
            "edges": edges,
            "correct": np.histogram(confidence[correct], bins=edges)[0],
            "incorrect": np.histogram(confidence[~correct], bins=edges)[0],
        },
    }


def load_predictions(run_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    with np.load(run_dir / "predictions.npz") as data:
        logits = {split: data[f"{split}_logits"] for split in ("validation", "test")}
        labels = {split: data[f"{split}_labels"].astype(np.int64) for split in ("validation", "test")}
    return logits, labels


def write_analysis(args: CompareArguments, setting: Setting, seed: int) -> None:
    """Writes ``analysis.json`` for a finished run (or a temperature-scaled copy of the ε = 0 run)."""
    run_dir = Path(args.output_dir) / setting.slug / f"seed{seed}"
    source_dir = run_dir
    temperature = None
    if setting.temperature_scaling:
        source_dir = Path(args.output_dir) / Setting(0.0, None, setting.class_weights).slug / f"seed{seed}"
    record = read_json_record(source_dir / "record.json")
    logits, labels = load_predictions(source_dir)
    if setting.temperature_scaling:
        temperature = fit_temperature(logits["validation"], labels["validation"])
        logits = {split: apply_temperature(values, temperature) for split, values in logits.items()}
    analysis = {
        "setting": {**asdict(setting), "slug": setting.slug, "label": setting.label},
        "seed": seed,
        "temperature": temperature,
        "n_bins": args.n_bins,
        "source_record": str(source_dir / "record.json"),
        "glue_config": record.get("config", {}),
        "train_wall_time_s": None if setting.temperature_scaling else record.get("wall_time_s"),
        "device": record.get("device"),
        "num_processes": record.get("num_processes"),
        "git_revision": record.get("git_revision"),
        **analyze(logits, labels, args.n_bins),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "analysis.json", json.dumps(_jsonable(analysis), indent=2))


def run_grid(args: CompareArguments, settings: list[Setting]) -> list[str]:
    """Trains what has no finished record yet; returns the runs that failed.

    A run is finished when its `record.json` holds a JSON object (glue.py writes it whole, last). An empty or
    truncated one (a comparison killed by an older version, a disk that filled up) is not trusted: the run is redone.
    """
    trained = [s for s in settings if not s.temperature_scaling]
    jobs = [(s, seed) for s in trained for seed in args.seeds]
    failures, durations = [], []
    for index, (setting, seed) in enumerate(jobs, 1):
        run_dir = Path(args.output_dir) / setting.slug / f"seed{seed}"
        prefix = f"[{index}/{len(jobs)}] {setting.slug} seed {seed}"
        record_path = run_dir / "record.json"
        analysis_missing = read_json_record(run_dir / "analysis.json") is None
        if read_json_record(record_path) is not None:
            print(f"{prefix}: record exists, skipped ({record_path})", flush=True)
        else:
            if record_path.exists():
                print(f"{prefix}: {record_path} is empty or not valid JSON (unfinished): training again", flush=True)
            remaining = len(jobs) - index + 1
            eta = f", about {remaining * np.mean(durations) / 60:.0f} min left" if durations else ""
            print(f"{prefix}: training -> {run_dir}{eta}", flush=True)
            command = glue_command(args, setting, seed, run_dir)
            start = time.perf_counter()
            # The child inherits stdout/stderr, so the trainer's own progress bars show.
            result = subprocess.run(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            durations.append(time.perf_counter() - start)
            if result.returncode == USAGE_ERROR_STATUS:
                # glue.py refused its options or data (its one-line error is above): every other run would too.
                raise UsageError(
                    f"{setting.slug}/seed{seed}", f"glue.py stopped on a usage error (above): {' '.join(command)}"
                )
            if result.returncode != 0 or read_json_record(record_path) is None:
                print(f"{prefix}: FAILED (exit code {result.returncode}): {' '.join(command)}", flush=True)
                failures.append(f"{setting.slug}/seed{seed}")
                continue
            print(f"{prefix}: done in {durations[-1] / 60:.1f} min", flush=True)
            analysis_missing = True  # an analysis of an earlier, unfinished run's files is stale
        if analysis_missing:
            write_analysis(args, setting, seed)
    for setting in settings:
        if not setting.temperature_scaling:
            continue
        for seed in args.seeds:
            source = Path(args.output_dir) / Setting(0.0, None, setting.class_weights).slug / f"seed{seed}"
            if read_json_record(source / "record.json") is not None:
                write_analysis(args, setting, seed)  # cheap (no training), so always refreshed
    return failures


# ---------------------------------------------------------------------------------------------------------------
# Report: everything below reads only the analysis.json records.
# ---------------------------------------------------------------------------------------------------------------


def load_records(output_dir: Path) -> list[dict]:
    records = []
    for path in sorted(output_dir.glob("*/seed*/analysis.json")):
        record = read_json_record(path)
        if record is None:
            raise UsageError(path, "is empty or not valid JSON: run the comparison without --report_only to redo it")
        records.append(record)
    return records


def group_by_setting(records: list[dict]) -> dict[str, list[dict]]:
    """Settings in a stable reading order: by class weights, then ε, style, and the TS baseline after ε = 0."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record["setting"]["slug"], []).append(record)

    def order(slug: str) -> tuple:
        setting = groups[slug][0]["setting"]
        return (
            setting["class_weights"] != "none",
            setting["class_weights"],
            setting["label_smoothing"],
            setting["temperature_scaling"],
            ("uniform", "off_target").index(setting["smoothing_style"]) if setting["smoothing_style"] else -1,
        )

    return {slug: sorted(groups[slug], key=lambda r: r["seed"]) for slug in sorted(groups, key=order)}


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summary_rows(groups: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for slug, records in groups.items():
        setting = records[0]["setting"]
        row = {
            "setting": setting["label"],
            "slug": slug,
            "label_smoothing": setting["label_smoothing"],
            "smoothing_style": setting["smoothing_style"] or "",
            "class_weights": setting["class_weights"],
            "temperature_scaling": setting["temperature_scaling"],
            "seeds": len(records),
        }
        for metric in METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std([r["metrics"]["test"][metric] for r in records])
        temperatures = [r["temperature"] for r in records if r["temperature"] is not None]
        row["temperature_mean"] = float(np.mean(temperatures)) if temperatures else None
        times = [r["train_wall_time_s"] for r in records if r["train_wall_time_s"] is not None]
        row["train_minutes_mean"] = float(np.mean(times)) / 60 if times else None
        rows.append(row)
    return rows


def _describe_data(records: list[dict]) -> str:
    config = records[0].get("glue_config", {})
    keys = ("dataset", "task_name", "train_file", "model_name_or_path", "max_train_samples", "max_seq_length")
    keys += ("num_train_epochs", "learning_rate", "per_device_train_batch_size")
    return ", ".join(f"`{key}={config[key]}`" for key in keys if config.get(key) is not None)


def markdown_table(rows: list[dict], records: list[dict], title: str | None, n_bins: int) -> str:
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
    seeds = sorted({r["seed"] for r in records})
    total = sum(r["train_wall_time_s"] or 0.0 for r in records)
    devices = sorted({str(r.get("device")) for r in records if r.get("device")})
    notes = [
        f"Test split; mean ± sample std over seeds {seeds}. ECE with {n_bins} equal-width bins; Brier is the "
        "multi-class score (sum over classes, range [0, 2]). T: the fitted temperature (mean over seeds). "
        "min/run: wall time of one glue.py run (loading, training, evaluation), mean over seeds.",
        f"Runs: {_describe_data(records)}.",
        f"{sum(r['train_wall_time_s'] is not None for r in records)} training runs, "
        f"{total / 60:.1f} min in total (sum of the runs' wall times) on {', '.join(devices) or '?'}.",
    ]
    heading = f"### {title}\n\n" if title else ""
    return heading + "\n".join(lines) + "\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"


def _grid_shape(count: int) -> tuple[int, int]:
    columns = min(4, count)
    return math.ceil(count / columns), columns


def _pooled_bins(records: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pools the seeds' reliability bins: per-bin accuracy and confidence weighted by the bins' counts."""
    counts = np.array([r["reliability"]["count"] for r in records], dtype=np.float64)
    total = counts.sum(axis=0)
    pooled = []
    for key in ("accuracy", "confidence"):
        values = np.array([[np.nan if v is None else v for v in r["reliability"][key]] for r in records])
        with np.errstate(invalid="ignore", divide="ignore"):
            pooled.append(np.where(total > 0, np.nansum(values * counts, axis=0) / total, np.nan))
    return pooled[0], pooled[1], total


def plot_reliability(groups: dict[str, list[dict]], path: Path) -> None:
    import matplotlib.pyplot as plt

    nrows, ncols = _grid_shape(len(groups))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.3 * nrows), squeeze=False, sharex=True, sharey=True)
    for ax, records in zip(axes.flat, groups.values()):
        accuracy, confidence, total = _pooled_bins(records)
        lower = np.asarray(records[0]["reliability"]["bin_lower"])
        width = np.asarray(records[0]["reliability"]["bin_upper"]) - lower
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
        ece = np.mean([r["metrics"]["test"]["ece"] for r in records])
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
    fig.suptitle("Reliability diagrams (test, seeds pooled)")
    fig.tight_layout()
    with atomic_open(path, "wb") as file:
        fig.savefig(file, format="png", dpi=110)
    plt.close(fig)


def plot_against_epsilon(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    trained = [row for row in rows if not row["temperature_scaling"]]
    styles = [style for style in ("uniform", "off_target") if any(r["smoothing_style"] == style for r in trained)]
    styles = styles or [""]
    # Colour says the smoothing style, line style the class weights; the TS baseline is a grey horizontal line.
    colors = {"uniform": "tab:blue", "off_target": "tab:orange", "": "tab:blue"}
    weight_choices = list(dict.fromkeys(row["class_weights"] for row in rows))
    dashes = dict(zip(weight_choices, ["-", ":", "-.", (0, (5, 1))] * 4))
    for class_weights in weight_choices:
        weights_text = "no class weights" if class_weights == "none" else f"{class_weights} weights"
        baseline = [r for r in trained if r["class_weights"] == class_weights and r["label_smoothing"] == 0]
        for style in styles:
            line = baseline + [
                r for r in trained if r["class_weights"] == class_weights and r["smoothing_style"] == style
            ]
            line.sort(key=lambda r: r["label_smoothing"])
            if not line:
                continue
            for ax, metric in zip(axes, ("accuracy", "ece")):
                ax.errorbar(
                    [r["label_smoothing"] for r in line],
                    [r[f"{metric}_mean"] for r in line],
                    yerr=[r[f"{metric}_std"] for r in line],
                    marker="o",
                    capsize=3,
                    color=colors[style],
                    linestyle=dashes[class_weights],
                    label=f"{style or 'cross-entropy'}, {weights_text}",
                )
        for row in rows:
            if row["temperature_scaling"] and row["class_weights"] == class_weights:
                for ax, metric in zip(axes, ("accuracy", "ece")):
                    ax.axhline(
                        row[f"{metric}_mean"],
                        linestyle=dashes[class_weights],
                        color="grey",
                        label=f"ε=0 + temperature scaling, {weights_text}",
                    )
    for ax, metric in zip(axes, ("accuracy", "ece")):
        ax.set_xlabel("label smoothing ε")
        ax.set_ylabel(f"test {METRIC_NAMES[metric]}")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("Accuracy and calibration error against ε (mean ± std over seeds)")
    fig.tight_layout()
    with atomic_open(path, "wb") as file:
        fig.savefig(file, format="png", dpi=110)
    plt.close(fig)


def plot_confidence_histograms(groups: dict[str, list[dict]], path: Path) -> None:
    import matplotlib.pyplot as plt

    nrows, ncols = _grid_shape(len(groups))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.8 * nrows), squeeze=False, sharex=True)
    for ax, records in zip(axes.flat, groups.values()):
        edges = np.asarray(records[0]["confidence_histogram"]["edges"])
        correct = np.sum([r["confidence_histogram"]["correct"] for r in records], axis=0)
        incorrect = np.sum([r["confidence_histogram"]["incorrect"] for r in records], axis=0)
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
    fig.suptitle("Confidence of test predictions (seeds pooled)")
    fig.tight_layout()
    with atomic_open(path, "wb") as file:
        fig.savefig(file, format="png", dpi=110)
    plt.close(fig)


def paste_into_readme(readme: Path, marker: str | None, content: str) -> None:
    """Replaces the text between ``<!-- results:marker -->`` and ``<!-- /results:marker -->`` with ``content``."""
    if not marker:
        raise ValueError("--readme needs --readme_marker, the NAME in <!-- results:NAME -->")
    start, end = f"<!-- results:{marker} -->", f"<!-- /results:{marker} -->"
    text = readme.read_text()
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"{readme} must contain {start} once, followed by {end} once")
    before, rest = text.split(start)
    _, after = rest.split(end)
    write_atomic(readme, f"{before}{start}\n{content.strip()}\n{end}{after}")


def write_report(args: CompareArguments) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a server

    output_dir = Path(args.output_dir)
    records = load_records(output_dir)
    if not records:
        raise UsageError("--output_dir", f"no */seed*/analysis.json records under {output_dir}: nothing to report")
    groups = group_by_setting(records)
    rows = summary_rows(groups)
    write_atomic(output_dir / "results.md", markdown_table(rows, records, args.title, args.n_bins))
    with atomic_open(output_dir / "results.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_reliability(groups, output_dir / "reliability.png")
    plot_against_epsilon(rows, output_dir / "accuracy_ece_vs_eps.png")
    plot_confidence_histograms(groups, output_dir / "confidence_hist.png")
    outputs = ["results.md", "results.csv", "reliability.png", "accuracy_ece_vs_eps.png", "confidence_hist.png"]
    if args.export_dir:
        export = Path(args.export_dir)
        export.mkdir(parents=True, exist_ok=True)
        for name in outputs:
            write_atomic(export / name, (output_dir / name).read_bytes())
        write_atomic(export / "records.jsonl", "".join(json.dumps(record) + "\n" for record in records))
    if args.readme:
        paste_into_readme(Path(args.readme), args.readme_marker, (output_dir / "results.md").read_text())
    print(
        f"wrote {', '.join(outputs)} to {output_dir}" + (f" (copied to {args.export_dir})" if args.export_dir else "")
    )
    return output_dir / "results.md"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        # Trains nothing and writes whole files only, so it may run while a comparison fills the folder.
        print(write_report(args).read_text())
        return 0
    check_base_config(args)
    settings = expand_grid(args)
    check_output_dir(args.output_dir)
    with folder_lock(args.output_dir):
        print(f"{len(settings)} settings × {len(args.seeds)} seeds -> {args.output_dir}", flush=True)
        start = time.perf_counter()
        failures = run_grid(args, settings)
        print(f"grid finished in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
        results = write_report(args)
    print(results.read_text())
    if failures:
        print(f"{len(failures)} run(s) failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)
