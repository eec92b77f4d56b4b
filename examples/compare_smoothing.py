"""Does label smoothing (and class weighting) help a text classifier? Accuracy *and* calibration, over seeds.

Runs a grid of settings (label smoothing ε, smoothing style, class weights, training label noise) × seeds, each one
an ordinary ``examples/glue.py`` run in a subprocess (the very code path a user runs), plus the baseline "ε = 0 +
temperature scaling" (Desai & Durrett 2020): the temperature is fitted on the validation logits of the ε = 0 run of
the same seed, class weights and noise, and applied to every evaluation set; it needs no extra training. The
evaluation sets are the test split and any extra test sets the runs have (glue.py's ``--extra_test_files`` and
``--extra_test_sets``: out-of-domain data). Then ``compare_report.py`` writes, from the JSON records alone:

* ``results.md`` / ``results.csv``: accuracy, macro-F1, NLL, ECE, Brier score, AURC and the error at 80 % coverage,
  mean ± std over seeds, one table per evaluation set;
* ``reliability.png`` (one reliability diagram per setting; ``reliability_<set>.png`` for each extra set),
  ``accuracy_ece_vs_eps.png``, ``ece_aurc_vs_eps.png`` (one row per evaluation set), ``confidence_hist.png``.

This file is the runner (options, grid, glue.py runs, the ``analysis.json`` of each run); the table, plots and the
Markdown paste are in ``compare_report.py``.

Layout of ``output_dir``: ``<setting>/seed<k>/`` holds glue.py's ``record.json`` and ``predictions.npz`` plus this
script's ``analysis.json`` (metrics recomputed from the logits for every split, reliability bins and a confidence
histogram per evaluation set; an analysis of an older version is rebuilt from the predictions). Every file
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

import itertools
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
    check_output_dir,
    folder_lock,
    json_text,
    load_config_file,
    read_json_record,
    run_cli,
    write_atomic,
)

# paste_into_readme (from common.py): still importable from here, as before.
from compare_report import paste_into_readme, write_report  # noqa: F401

from hf_lsce.evaluation.calibration import apply_temperature, fit_temperature
from hf_lsce.evaluation.metrics import classification_metrics, reliability_bins, softmax

GLUE_SCRIPT = Path(__file__).resolve().parent / "glue.py"
HISTOGRAM_BINS = 20
# Version 2: every evaluation set (test and the extra test sets) has its metrics, reliability bins and histogram. An
# older analysis.json is rebuilt from its run's predictions.npz (no training).
ANALYSIS_VERSION = 2


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
    label_noise: list[float] = field(
        default_factory=lambda: [0.0],
        metadata={
            "help": "Fractions of training labels replaced by another class (glue.py --label_noise; the same "
            "examples in every run: --label_noise_seed is the base config's)."
        },
    )
    temperature_scaling: bool = field(
        default=True,
        metadata={
            "help": "Add the 'ε = 0 + temperature scaling' baseline per class weights and noise level (needs ε = 0 "
            "in the grid); T is fitted on the validation split and applied to every evaluation set."
        },
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
    label_noise: float = 0.0

    @property
    def slug(self) -> str:
        """Directory name, e.g. ``eps0.1-uniform-cw_none``, ``eps0-cw_balanced-ts`` or ``eps0-cw_none-noise0.2``."""
        parts = [f"eps{self.label_smoothing:g}"]
        if self.smoothing_style:
            parts.append(self.smoothing_style)
        parts.append("cw_" + self.class_weights.replace(",", "_"))
        if self.label_noise:
            parts.append(f"noise{self.label_noise:g}")  # absent at 0: the folders of grids without noise stay
        if self.temperature_scaling:
            parts.append("ts")
        return "-".join(parts)

    @property
    def cross_entropy(self) -> Setting:
        """The ε = 0 run that this setting's temperature-scaling baseline reuses (same class weights and noise)."""
        return Setting(0.0, None, self.class_weights, label_noise=self.label_noise)

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
        if self.label_noise:
            text += f", noise {self.label_noise:g}"
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
    args.label_noise = [float(value) for value in args.label_noise]
    for value in args.label_noise:
        if not 0 <= value <= 1:
            raise UsageError("--label_noise", f"must be fractions in [0, 1], got {value:g}")
    args.class_weights = [str(value) for value in args.class_weights]
    for override in args.glue_overrides:
        if "=" not in override:
            raise UsageError("--glue_overrides", f"entries must be key=value, got {override!r}")
    for style in args.smoothing_style:
        if style not in ("uniform", "off_target"):
            raise UsageError("--smoothing_style", f"must be 'uniform' or 'off_target', got {style!r}")
    return args


def expand_grid(args: CompareArguments) -> list[Setting]:
    """The settings to train, then the temperature-scaled baselines (one per class weights and noise with ε = 0)."""
    settings = []
    for noise, epsilon, class_weights in itertools.product(args.label_noise, args.label_smoothing, args.class_weights):
        styles = args.smoothing_style if epsilon > 0 else [None]
        settings.extend(Setting(epsilon, style, class_weights, label_noise=noise) for style in styles)
    settings = list(dict.fromkeys(settings))  # repeated values in the YAML would train the same thing twice
    if args.temperature_scaling:
        settings += [
            Setting(0.0, None, s.class_weights, True, s.label_noise) for s in settings if s.label_smoothing == 0
        ]
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
    # Always given, so that 0 also overrides a base config's noise.
    flags += ["--label_noise", f"{setting.label_noise:g}"]
    if setting.smoothing_style:
        flags += ["--smoothing_style", setting.smoothing_style]
    # Always given, so that "none" also unsets a base config's weights; glue.py takes one float per class as separate
    # words.
    flags += ["--class_weights", *setting.class_weights.split(",")]
    for override in args.glue_overrides:
        key, value = override.split("=", 1)
        flags += [f"--{key}", value]
    # Last, so that no override can send two runs to the same folder.
    flags += ["--output_dir", str(run_dir)]
    return [*launcher, str(GLUE_SCRIPT), *flags]


def analyze(logits: dict[str, np.ndarray], labels: dict[str, np.ndarray], n_bins: int) -> dict:
    """Per split: metrics, class counts; per evaluation set (every split but validation): reliability bins and a
    confidence histogram split into right and wrong predictions."""
    evaluation_sets = [name for name in logits if name != "validation"]
    num_classes = next(iter(logits.values())).shape[1]
    edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    reliability, histograms = {}, {}
    for name in evaluation_sets:
        probs = softmax(logits[name])
        confidence = probs.max(axis=1)
        correct = probs.argmax(axis=1) == labels[name]
        reliability[name] = reliability_bins(probs, labels[name], n_bins=n_bins)
        histograms[name] = {
            "edges": edges,
            "correct": np.histogram(confidence[correct], bins=edges)[0],
            "incorrect": np.histogram(confidence[~correct], bins=edges)[0],
        }
    return {
        "evaluation_sets": evaluation_sets,
        "metrics": {name: classification_metrics(logits[name], labels[name], n_bins=n_bins) for name in logits},
        "class_counts": {name: np.bincount(labels[name], minlength=num_classes) for name in logits},
        "reliability": reliability,
        "confidence_histogram": histograms,
    }


def load_predictions(run_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Logits and labels of every split in ``predictions.npz`` (validation, test, extra test sets), in its order."""
    with np.load(run_dir / "predictions.npz") as data:
        names = [name.removesuffix("_logits") for name in data.files if name.endswith("_logits")]
        logits = {name: data[f"{name}_logits"] for name in names}
        labels = {name: data[f"{name}_labels"].astype(np.int64) for name in names}
    # "test" first: the in-domain set leads the tables.
    names.sort(key=lambda name: (name != "validation", name != "test"))
    return {name: logits[name] for name in names}, {name: labels[name] for name in names}


def write_analysis(args: CompareArguments, setting: Setting, seed: int) -> None:
    """Writes ``analysis.json`` for a finished run (or a temperature-scaled copy of the ε = 0 run)."""
    run_dir = Path(args.output_dir) / setting.slug / f"seed{seed}"
    source_dir = run_dir
    temperature = None
    if setting.temperature_scaling:
        source_dir = Path(args.output_dir) / setting.cross_entropy.slug / f"seed{seed}"
    record = read_json_record(source_dir / "record.json")
    logits, labels = load_predictions(source_dir)
    if setting.temperature_scaling:
        # Fitted on the in-domain validation split only, as a user would: the other sets are not seen before testing.
        temperature = fit_temperature(logits["validation"], labels["validation"])
        logits = {split: apply_temperature(values, temperature) for split, values in logits.items()}
    analysis = {
        "analysis_version": ANALYSIS_VERSION,
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
        "id2label": record.get("id2label"),
        "label_noise": record.get("label_noise"),
        **analyze(logits, labels, args.n_bins),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    # JSON has no NaN: an empty reliability bin is written as null (NaN would make the file unreadable to jq & co).
    write_atomic(run_dir / "analysis.json", json_text(analysis, nan_as_null=True))


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
        analysis = read_json_record(run_dir / "analysis.json")
        analysis_missing = analysis is None or analysis.get("analysis_version") != ANALYSIS_VERSION
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
            source = Path(args.output_dir) / setting.cross_entropy.slug / f"seed{seed}"
            if read_json_record(source / "record.json") is not None:
                write_analysis(args, setting, seed)  # cheap (no training), so always refreshed
    return failures


def report(args: CompareArguments) -> Path:
    """`compare_report.write_report` with the comparison's options."""
    return write_report(
        args.output_dir,
        title=args.title,
        n_bins=args.n_bins,
        export_dir=args.export_dir,
        readme=args.readme,
        readme_marker=args.readme_marker,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        # Trains nothing and writes whole files only, so it may run while a comparison fills the folder.
        print(report(args).read_text())
        return 0
    settings = expand_grid(args)
    check_output_dir(args.output_dir)
    with folder_lock(args.output_dir):
        print(f"{len(settings)} settings × {len(args.seeds)} seeds -> {args.output_dir}", flush=True)
        start = time.perf_counter()
        failures = run_grid(args, settings)
        print(f"grid finished in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
        results = report(args)
    print(results.read_text())
    if failures:
        print(f"{len(failures)} run(s) failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)
