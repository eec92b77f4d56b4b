"""The study configs of configs/experiments: the SMS spam and 3-class pairs parse and differ only where they should.

Each study is a pair of grids, one per weight mode, whose union is ε ∈ {0, 0.1} × class weights {none, balanced} in
one mode plus "ε = 0.1, balanced" in the other (the only cell where the two modes are different losses). Both files
state weight_mode, so a change of the trainer's default cannot change what a study measures.
"""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "configs" / "experiments"
sys.path.insert(0, str(REPO / "examples"))

import compare_smoothing  # noqa: E402

STUDIES = {
    "sms_spam": ("compare_sms.yaml", "compare_sms_example.yaml", "sms_spam"),
    "imbalanced3": ("compare_imbalanced3.yaml", "compare_imbalanced3_torch.yaml", "vader_nyt_3class"),
}


def _parse(name: str):
    args = compare_smoothing.parse_args(["--config", str(EXPERIMENTS / name)])
    return args, dict(override.split("=", 1) for override in args.glue_overrides)


def _cells(args, overrides) -> set[tuple[float, str, str]]:
    settings = compare_smoothing.expand_grid(args)
    return {
        (s.label_smoothing, s.class_weights, overrides["weight_mode"]) for s in settings if not s.temperature_scaling
    }


@pytest.mark.parametrize("study", sorted(STUDIES))
def test_study_pair_parses_and_differs_only_in_weight_mode(study):
    full_name, other_name, dataset = STUDIES[study]
    full, full_overrides = _parse(full_name)
    other, other_overrides = _parse(other_name)

    assert full_overrides["dataset"] == other_overrides["dataset"] == dataset
    assert {full_overrides["weight_mode"], other_overrides["weight_mode"]} == {"torch", "example"}
    # Same model, data and training: only the mode (and the grid) changes between the two files.
    assert {k: v for k, v in full_overrides.items() if k != "weight_mode"} == {
        k: v for k, v in other_overrides.items() if k != "weight_mode"
    }
    assert full.seeds == other.seeds and len(full.seeds) == 3
    assert full.output_dir != other.output_dir and full.export_dir != other.export_dir

    grid = _cells(full, full_overrides)
    assert grid == {
        (eps, weights, full_overrides["weight_mode"]) for eps in (0.0, 0.1) for weights in ("none", "balanced")
    }
    assert _cells(other, other_overrides) == {(0.1, "balanced", other_overrides["weight_mode"])}


def test_parse_rejects_a_misspelled_study_key(tmp_path):
    # Negative control: the parser the test relies on does refuse what it does not know.
    config = tmp_path / "bad.yaml"
    config.write_text(f"extends: {EXPERIMENTS / 'compare_imbalanced3.yaml'}\nlabel_smothing: [0.1]\n")
    with pytest.raises(ValueError, match="unknown keys .*label_smothing"):
        compare_smoothing.parse_args(["--config", str(config)])


def test_per_class_block_holds_the_generated_table():
    # The per-class table is not a grid's results.md, so tests/test_docs.py does not cover its block.
    text = (REPO / "docs" / "studies.md").read_text()
    start, end = "<!-- results:imbalanced3_per_class -->", "<!-- /results:imbalanced3_per_class -->"
    assert text.count(start) == text.count(end) == 1
    block = text.split(start)[1].split(end)[0].strip()
    assert block == (REPO / "docs" / "results" / "imbalanced3" / "per_class.md").read_text().strip()
