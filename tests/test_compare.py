"""The smoothing comparison, end to end on a tiny model through the real examples/glue.py, offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

import common  # noqa: E402
import compare_smoothing  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("reliability.png", "accuracy_ece_vs_eps.png", "confidence_hist.png")


POSITIVE = "good great fine lovely superb fun".split()
NEGATIVE = "bad awful dull boring poor sad".split()
FILLER = "the a movie film plot was is really quite".split()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Train/validation/test CSVs of short sentences whose label is the polarity of one word (60/40 classes)."""
    import random

    import pandas as pd

    folder = tmp_path_factory.mktemp("tiny_data")
    rng = random.Random(0)
    files = {}
    for split, size in (("train", 48), ("validation", 24), ("test", 24)):
        rows = []
        for index in range(size):
            label = int(index % 5 < 3)
            words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label else NEGATIVE)]
            rng.shuffle(words)
            rows.append({"sentence": " ".join(words), "label": label})
        files[split] = folder / f"{split}.csv"
        pd.DataFrame(rows).to_csv(files[split], index=False)
    return files


def _write_yaml(path: Path, values: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(values))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Grid and configuration (fast, no training)
# ---------------------------------------------------------------------------------------------------------------


def test_grid_runs_cross_entropy_once_and_adds_one_baseline_per_class_weight():
    args = compare_smoothing.parse_args(
        ["--base_config", "x.yaml", "--label_smoothing", "0", "0.1", "--class_weights", "none", "balanced"]
    )
    slugs = [setting.slug for setting in compare_smoothing.expand_grid(args)]
    assert slugs == [
        "eps0-cw_none",
        "eps0-cw_balanced",
        "eps0.1-uniform-cw_none",
        "eps0.1-off_target-cw_none",
        "eps0.1-uniform-cw_balanced",
        "eps0.1-off_target-cw_balanced",
        "eps0-cw_none-ts",
        "eps0-cw_balanced-ts",
    ]


def test_no_baseline_without_epsilon_zero():
    args = compare_smoothing.parse_args(["--base_config", "x.yaml", "--label_smoothing", "0.1", "0.2"])
    assert not any(setting.temperature_scaling for setting in compare_smoothing.expand_grid(args))


def test_command_line_overrides_yaml(tmp_path):
    config = _write_yaml(
        tmp_path / "grid.yaml",
        {"base_config": "a.yaml", "seeds": [1, 2], "label_smoothing": [0.0], "glue_overrides": {"max_seq_length": 64}},
    )
    args = compare_smoothing.parse_args(["--config", str(config), "--seeds", "7"])
    assert args.seeds == [7]
    assert args.base_config == "a.yaml"
    assert args.label_smoothing == [0.0]
    assert args.glue_overrides == ["max_seq_length=64"]
    command = compare_smoothing.glue_command(args, compare_smoothing.expand_grid(args)[0], 7, tmp_path / "run")
    assert command[-2:] == ["--output_dir", str(tmp_path / "run")]
    assert ["--max_seq_length", "64"] == command[command.index("--max_seq_length") :][:2]


def test_accelerate_launcher_and_explicit_class_weights(tmp_path):
    args = compare_smoothing.parse_args(
        [
            "--base_config",
            "a.yaml",
            "--label_smoothing",
            "0.1",
            "--smoothing_style",
            "off_target",
            "--class_weights",
            "1.0,3.0",
            "--launcher",
            "accelerate",
            "--accelerate_config",
            "configs/accelerate/multi_gpu.yaml",
        ]
    )
    (setting,) = compare_smoothing.expand_grid(args)
    command = compare_smoothing.glue_command(args, setting, 3, tmp_path)
    assert command[:5] == [sys.executable, "-m", "accelerate.commands.launch", "--config_file", args.accelerate_config]
    assert command[5].endswith("glue.py")
    assert command[command.index("--class_weights") + 1 : command.index("--class_weights") + 3] == ["1.0", "3.0"]
    assert command[command.index("--smoothing_style") + 1] == "off_target"


def test_unknown_yaml_key_is_an_error(tmp_path):
    config = _write_yaml(tmp_path / "grid.yaml", {"base_config": "a.yaml", "label_smothing": [0.1]})
    with pytest.raises(ValueError, match="label_smothing"):
        compare_smoothing.parse_args(["--config", str(config)])


def test_base_config_with_class_weights_runs_none_unweighted(tmp_path):
    # glue.py's `--class_weights none` unsets the base config's weights: the grid's "none" runs without weights.
    import glue

    base = _write_yaml(tmp_path / "base.yaml", {"dataset": "sms_spam", "class_weights": "balanced"})
    args = compare_smoothing.parse_args(
        ["--base_config", str(base), "--label_smoothing", "0", "--class_weights", "none", "balanced"]
    )
    types = (glue.ModelArguments, glue.DataArguments, glue.SmoothingTrainingArguments)
    weights = {}
    for setting in compare_smoothing.expand_grid(args):
        command = compare_smoothing.glue_command(args, setting, 42, tmp_path / setting.slug)
        flags = command[command.index(str(compare_smoothing.GLUE_SCRIPT)) + 1 :]
        weights[setting.class_weights] = common.parse_args(types, flags)[2].class_weights
    assert weights == {"none": None, "balanced": "balanced"}


def test_paste_into_readme_replaces_only_the_marked_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:demo -->\nold table\n<!-- /results:demo -->\noutro\n")
    compare_smoothing.paste_into_readme(readme, "demo", "| new |\n")
    assert readme.read_text() == "intro\n<!-- results:demo -->\n| new |\n<!-- /results:demo -->\noutro\n"
    with pytest.raises(ValueError, match="results:other"):
        compare_smoothing.paste_into_readme(readme, "other", "x")


def test_paste_into_readme_lives_in_the_report_module():
    import compare_report

    # It lives in common.py (benchmarks/report.py imports it from there); the older import paths keep working.
    assert compare_smoothing.paste_into_readme is compare_report.paste_into_readme


def test_interrupted_readme_paste_leaves_the_old_readme(tmp_path, monkeypatch):
    # A kill between writing the new text and renaming it into place, simulated by a failing rename.
    readme = tmp_path / "README.md"
    original = "intro\n<!-- results:demo -->\nold table\n<!-- /results:demo -->\noutro\n"
    readme.write_text(original)
    readme.chmod(0o640)

    def interrupted(source, destination):
        assert Path(source).read_text().count("| new |") == 1  # the whole new text was written, next to the README
        raise KeyboardInterrupt

    monkeypatch.setattr(common.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compare_smoothing.paste_into_readme(readme, "demo", "| new |\n")
    assert readme.read_text() == original
    assert sorted(path.name for path in tmp_path.iterdir()) == ["README.md"]  # no temporary file left behind
    monkeypatch.undo()
    compare_smoothing.paste_into_readme(readme, "demo", "| new |\n")
    assert "| new |" in readme.read_text() and readme.stat().st_mode & 0o777 == 0o640  # permissions kept


def _grid_args(tmp_path) -> list[str]:
    return ["--output_dir", str(tmp_path / "out"), "--label_smoothing", "0", "--class_weights", "none"]


def test_second_comparison_on_one_folder_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    with common.folder_lock(tmp_path / "out"):
        with pytest.raises(
            common.UsageError, match=rf"--output_dir: .*out is in use by another run \(pid {os.getpid()} on "
        ):
            compare_smoothing.main(_grid_args(tmp_path))
        # The same through the script: one line, status 2, nothing trained.
        command = [sys.executable, str(REPO / "examples" / "compare_smoothing.py"), *_grid_args(tmp_path)]
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
        assert result.returncode == 2, result.stderr[-3000:]
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("error: --output_dir: ") and f"(pid {os.getpid()} on " in line
        assert "training" not in result.stdout
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [".lock"]


def test_lock_of_a_killed_comparison_does_not_block(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import common, time\n"
         "with common.folder_lock(sys.argv[2]):\n    print('locked', flush=True); time.sleep(600)",
         str(REPO / "examples"), str(folder)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(common.UsageError, match=f"in use by another run \\(pid {holder.pid} on "):
            with common.folder_lock(folder):
                pass
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs in the holder
        holder.wait()
    assert f"pid {holder.pid}" in (folder / ".lock").read_text()  # the file stays ...
    with common.folder_lock(folder):  # ... and does not block
        assert f"pid {os.getpid()}" in (folder / ".lock").read_text()


def test_report_only_without_records_says_so(tmp_path):
    with pytest.raises(compare_smoothing.UsageError, match="--output_dir: no .* records under .*nothing to report"):
        compare_smoothing.main(["--output_dir", str(tmp_path), "--report_only"])


def test_bad_grid_is_one_line_and_status_2(tmp_path):
    config = _write_yaml(tmp_path / "grid.yaml", {"base_config": "a.yaml", "label_smothing": [0.1]})
    command = [sys.executable, str(REPO / "examples" / "compare_smoothing.py"), "--config", str(config)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {config}: unknown keys ['label_smothing']; allowed: ['accelerate_config', ")


# ---------------------------------------------------------------------------------------------------------------
# End to end: tiny BERT through examples/glue.py, table and plots, then a re-run that trains nothing
# ---------------------------------------------------------------------------------------------------------------


def _run_compare(config: Path, output_dir: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "examples" / "compare_smoothing.py"), "--config", str(config)]
    command += ["--output_dir", str(output_dir)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_tiny_grid_end_to_end_then_rerun_skips(tmp_path, tiny_bert, tiny_data):
    base = _write_yaml(
        tmp_path / "tiny_glue.yaml",
        {
            "model_name_or_path": str(tiny_bert),
            "train_file": str(tiny_data["train"]),
            "validation_file": str(tiny_data["validation"]),
            "test_file": str(tiny_data["test"]),
            "text_columns": "sentence",
            "max_seq_length": 16,
            "num_train_epochs": 1,
            "per_device_train_batch_size": 16,
            "per_device_eval_batch_size": 32,
            "learning_rate": 1e-3,
            "eval_strategy": "no",
            "save_strategy": "no",
            "report_to": "none",
            "use_cpu": True,
            "disable_tqdm": True,
        },
    )
    grid = _write_yaml(
        tmp_path / "grid.yaml",
        {
            "base_config": str(base),
            "seeds": [1],
            "label_smoothing": [0.0, 0.1],
            "smoothing_style": ["uniform"],
            "class_weights": ["none"],
            "title": "tiny",
        },
    )
    output_dir = tmp_path / "out"
    first = _run_compare(grid, output_dir)
    assert first.stdout.count(": training ->") == 2

    table = (output_dir / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ε=")]
    assert [row.split(" | ")[0] for row in rows] == [
        "| ε=0 (cross-entropy)",
        "| ε=0 + temperature scaling",
        "| ε=0.1 uniform",
    ]
    for name in PLOTS:
        content = (output_dir / name).read_bytes()
        assert content[:8] == PNG_SIGNATURE, name
        assert len(content) > 5_000, name

    records = sorted(output_dir.glob("*/seed1/analysis.json"))
    assert [path.parent.parent.name for path in records] == [
        "eps0-cw_none",
        "eps0-cw_none-ts",
        "eps0.1-uniform-cw_none",
    ]
    baseline = json.loads((output_dir / "eps0-cw_none" / "seed1" / "analysis.json").read_text())
    scaled = json.loads((output_dir / "eps0-cw_none-ts" / "seed1" / "analysis.json").read_text())
    assert scaled["temperature"] > 0
    # Temperature scaling never changes a prediction, and is fitted to lower the validation NLL.
    assert scaled["metrics"]["test"]["accuracy"] == baseline["metrics"]["test"]["accuracy"]
    assert scaled["metrics"]["validation"]["nll"] <= baseline["metrics"]["validation"]["nll"] + 1e-9
    glue_record = json.loads((output_dir / "eps0.1-uniform-cw_none" / "seed1" / "record.json").read_text())
    assert glue_record["config"]["label_smoothing"] == 0.1
    assert glue_record["config"]["seed"] == 1

    trained = {path: path.stat().st_mtime_ns for path in output_dir.glob("*/seed1/record.json")}
    second = _run_compare(grid, output_dir)
    assert second.stdout.count("record exists, skipped") == 2
    assert ": training ->" not in second.stdout
    assert {path: path.stat().st_mtime_ns for path in output_dir.glob("*/seed1/record.json")} == trained

    # A record left empty or truncated (a run killed while writing it, before writes were atomic) is unfinished: the
    # run is redone, with one line saying why, and its analysis rebuilt.
    empty, truncated = (
        output_dir / "eps0-cw_none/seed1/record.json",
        output_dir / "eps0.1-uniform-cw_none/seed1/record.json",
    )
    empty.write_text("")
    truncated.write_text(truncated.read_text()[:200])
    third = _run_compare(grid, output_dir)
    assert third.stdout.count("is empty or not valid JSON (unfinished): training again") == 2
    assert third.stdout.count(": training ->") == 2
    for path in (empty, truncated):
        assert json.loads(path.read_text())["config"]["seed"] == 1
        assert path.with_name("analysis.json").stat().st_mtime_ns > path.stat().st_mtime_ns
    assert sorted(path.name for path in empty.parent.iterdir()) == ["analysis.json", "predictions.npz", "record.json"]
    table = (output_dir / "results.md").read_text()

    # The report is rebuilt from the records alone.
    (output_dir / "results.md").unlink()
    report = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "compare_smoothing.py"),
            "--output_dir",
            str(output_dir),
            "--report_only",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    rebuilt = (output_dir / "results.md").read_text()
    assert [line for line in rebuilt.splitlines() if line.startswith("|")] == [
        line for line in table.splitlines() if line.startswith("|")
    ]


@pytest.mark.parametrize(
    "path", sorted((REPO / "configs" / "experiments").glob("compare_*.yaml")), ids=lambda p: p.name
)
def test_shipped_grids_give_runs_that_glue_accepts(path, tmp_path):
    """Every run of a shipped grid parses in glue.py, with the grid's own options winning over its base config."""
    import common
    import glue

    args = compare_smoothing.parse_args(["--config", str(path)])
    settings = compare_smoothing.expand_grid(args)
    assert settings and all(not setting.temperature_scaling or setting.label_smoothing == 0 for setting in settings)
    for setting in settings:
        command = compare_smoothing.glue_command(args, setting, 42, tmp_path / setting.slug)
        flags = command[command.index(str(compare_smoothing.GLUE_SCRIPT)) + 1 :]
        types = (glue.ModelArguments, glue.DataArguments, glue.SmoothingTrainingArguments)
        _, data_args, training_args, _ = common.parse_args(types, [*flags, "--use_cpu", "true"])
        assert training_args.label_smoothing == setting.label_smoothing
        assert training_args.output_dir == str(tmp_path / setting.slug)
        overrides = dict(override.split("=", 1) for override in args.glue_overrides)
        if "weight_mode" in overrides:
            assert training_args.weight_mode == overrides["weight_mode"]
