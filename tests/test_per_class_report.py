"""examples/per_class_report.py: per-class recall and predicted shares from a comparison's records."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import per_class_report  # noqa: E402


def test_class_rates_hand_computed():
    # Labels 0 0 1 1 1 2; predictions 0 1 1 1 0 1: recall 1/2, 2/3, 0/1; predicted shares 2/6, 4/6, 0.
    labels = np.array([0, 0, 1, 1, 1, 2])
    logits = np.eye(3)[[0, 1, 1, 1, 0, 1]]
    rates = per_class_report.class_rates(logits, labels, 3)
    np.testing.assert_allclose(rates["recall"], [1 / 2, 2 / 3, 0.0])
    np.testing.assert_allclose(rates["predicted"], [2 / 6, 4 / 6, 0.0])
    np.testing.assert_allclose(rates["true"], [2 / 6, 3 / 6, 1 / 6])


def _fake_run(root: Path, slug: str, seed: int, predicted: list[int], labels: list[int], **setting) -> None:
    run = root / slug / f"seed{seed}"
    run.mkdir(parents=True)
    setting = {"label": slug, "temperature_scaling": False, "class_weights": "none", "label_smoothing": 0.0, **setting}
    config = {"dataset": "vader_nyt_3class", "weight_mode": "torch"}
    (run / "analysis.json").write_text(json.dumps({"setting": setting, "glue_config": config}))
    logits = np.eye(3, dtype=np.float32)[predicted]
    np.savez(run / "predictions.npz", test_logits=logits, test_labels=np.array(labels))


def test_table_averages_seeds_and_skips_temperature_scaling(tmp_path, capsys):
    labels = [0, 1, 1, 2]
    _fake_run(tmp_path, "collapsed", 1, [2, 2, 2, 2], labels)
    _fake_run(tmp_path, "collapsed", 2, [2, 2, 0, 2], labels)
    _fake_run(tmp_path, "scaled", 1, [0, 0, 0, 0], labels, temperature_scaling=True)
    output = tmp_path / "table.md"
    assert per_class_report.main([str(tmp_path), "--output", str(output)]) == 0
    rows = [line for line in output.read_text().splitlines() if line.startswith("| collapsed")]
    # Seed 1: recall 0, 0, 1; predicted 0, 0, 1. Seed 2: recall 0, 0, 1; predicted 1/4, 0, 3/4. Means below.
    assert rows == ["| collapsed | torch | 2 | 0.000 | 0.000 | 1.000 | 0.125 | 0.000 | 0.875 |"]
    assert "recall negative | recall neutral | recall positive" in output.read_text()
    assert "scaled" not in output.read_text()


def test_missing_records_exit_2(tmp_path, capsys):
    assert per_class_report.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}: no */seed*/analysis.json")
    with pytest.raises(SystemExit) as exit_info:
        per_class_report.main([str(tmp_path), "--split", "train"])
    assert exit_info.value.code == 2
