"""`import hf_lsce` is as light as torch: the trainers (Transformers, `datasets`, TRL) are imported on first use."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import has_module

import hf_lsce

HEAVY = ("transformers", "datasets", "trl", "evaluate")


def _run(code: str) -> dict:
    """Runs ``code`` in a fresh interpreter; it prints one JSON value on its last line."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def _loaded(statement: str) -> str:
    """Code that runs ``statement`` and prints which of the heavy packages are then in ``sys.modules``."""
    return f"import json, sys\n{statement}\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"


@pytest.mark.parametrize(
    "statement",
    [
        "import hf_lsce",
        "from hf_lsce import label_smoothed_cross_entropy",
        "from hf_lsce import LabelSmoothedCrossEntropyLoss, linear_label_smoothed_cross_entropy, mean_denominator",
        "from hf_lsce import compute_class_weights",
        "import hf_lsce.checks, hf_lsce.loss, hf_lsce.fused, hf_lsce.linear, hf_lsce.class_weights",
    ],
)
def test_the_loss_imports_no_heavy_package(statement):
    assert _run(_loaded(statement)) == []


LAZY_NAMES = {
    "SmoothingTrainer": "hf_lsce.trainer",
    "SmoothingTrainerMixin": "hf_lsce.trainer",
    "SmoothingArguments": "hf_lsce.training_args",
    "SmoothingTrainingArguments": "hf_lsce.training_args",
    "SmoothingSeq2SeqTrainingArguments": "hf_lsce.training_args",
    "SmoothingSeq2SeqTrainer": "hf_lsce.seq2seq",
}


def test_a_trainer_name_imports_transformers_on_first_use():
    """The negative control of the test above: the same check sees Transformers once a trainer name is used."""
    code = (
        "import json, sys, hf_lsce\n"
        "before = 'transformers' in sys.modules\n"
        f"modules = {{name: getattr(hf_lsce, name).__module__ for name in {sorted(LAZY_NAMES)!r}}}\n"
        "print(json.dumps([before, modules, 'transformers' in sys.modules]))"
    )
    before, modules, after = _run(code)
    assert not before and modules == LAZY_NAMES and after


def test_sft_names_resolve_with_trl():
    pytest.importorskip("trl")
    assert hf_lsce.SmoothingSFTTrainer.__module__ == "hf_lsce.sft"
    assert hf_lsce.SmoothingSFTConfig.__module__ == "hf_lsce.sft"


def test_lazy_names_are_the_modules_objects():
    from hf_lsce.trainer import SmoothingTrainer
    from hf_lsce.training_args import SmoothingTrainingArguments

    assert hf_lsce.SmoothingTrainer is SmoothingTrainer
    assert hf_lsce.SmoothingTrainingArguments is SmoothingTrainingArguments
    from hf_lsce import SmoothingTrainerMixin  # `from` imports go through the module's __getattr__ too

    assert SmoothingTrainerMixin.__module__ == "hf_lsce.trainer"


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="module 'hf_lsce' has no attribute 'SmoothingTrainerr'"):
        hf_lsce.SmoothingTrainerr  # noqa: B018
    assert not hasattr(hf_lsce, "trainers")
    with pytest.raises(ImportError, match="cannot import name 'Trainer' from 'hf_lsce'"):
        from hf_lsce import Trainer  # noqa: F401


def test_all_is_sorted_resolves_and_is_listed_by_dir():
    assert hf_lsce.__all__ == sorted(hf_lsce.__all__)
    assert set(hf_lsce.__all__) <= set(dir(hf_lsce))
    for name in hf_lsce.__all__:
        if name in ("SmoothingSFTConfig", "SmoothingSFTTrainer") and not has_module("trl"):
            continue
        assert getattr(hf_lsce, name) is not None


def test_performance_page_holds_the_import_table_built_from_the_record():
    """docs/performance.md's import block is `bench_import --report`'s table, rebuilt from the committed record, in
    which both targeted statements meet the 1.3x target."""
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_import", "--report"], cwd=repo, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    table = done.stdout.split("\nimport hf_lsce:")[0].strip()
    page = (repo / "docs" / "performance.md").read_text()
    assert f"<!-- results:import -->\n{table}\n<!-- /results:import -->" in page
    record = json.loads((repo / "benchmarks" / "results" / "bench_import.json").read_text())
    assert {row["variant"]: row.get("meets_target") for row in record["rows"]} == {
        "torch": None, "hf_lsce": True, "loss": True, "trainer": None,
    }  # fmt: skip
    assert "meets the 1.3x target" in done.stdout
