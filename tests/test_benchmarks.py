"""benchmarks/: run as modules of the `benchmarks` package, tables rebuilt from the committed records."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )


def test_no_benchmark_edits_sys_path():
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        assert not re.search(r"sys\.path\s*(\[|\.insert|\.append|=)", path.read_text()), path.name


def test_report_rebuilds_the_committed_table_and_pastes_it(tmp_path):
    page = tmp_path / "performance.md"
    page.write_text("intro\n<!-- results:performance -->\nold\n<!-- /results:performance -->\noutro\n")
    done = run_module("benchmarks.report", "--output-dir", str(tmp_path / "out"), "--readme", str(page))
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "out" / "README_table.md").read_text()
    assert table == (RESULTS / "README_table.md").read_text()
    block = f"<!-- results:performance -->\n{table.strip()}\n<!-- /results:performance -->"
    assert page.read_text() == f"intro\n{block}\noutro\n"


def test_report_refuses_a_page_without_markers(tmp_path):
    page = tmp_path / "performance.md"
    page.write_text("no markers\n")
    done = run_module("benchmarks.report", "--output-dir", str(tmp_path / "out"), "--readme", str(page))
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "results:performance" in done.stderr
    assert page.read_text() == "no markers\n"


def test_report_says_one_line_for_a_missing_page(tmp_path):
    """A --readme page that does not exist: one line, status 2, and nothing written (no table, no plot)."""
    done = run_module(
        "benchmarks.report", "--output-dir", str(tmp_path / "out"), "--readme", str(tmp_path / "missing.md")
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"error: --readme {tmp_path / 'missing.md'}: no such file"]
    assert not (tmp_path / "out").exists()


def test_write_record_writes_the_whole_record_with_the_module_command(tmp_path):
    script = (
        "import json, sys, time\n"
        "from pathlib import Path\n"
        "from benchmarks.harness import write_record\n"
        "write_record(Path(sys.argv[1]), 'probe', {}, time.time(), [{'a': 1}], note='x')\n"
    )
    path = tmp_path / "record.json"
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    record = json.loads(path.read_text())
    assert list(record) == ["benchmark", "command", "machine", "note", "wall_seconds", "rows"]
    assert record["rows"] == [{"a": 1}] and len(record["machine"]["load_average_end"]) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]  # no temporary file left behind


def test_bench_linear_runs_a_tiny_grid_and_report_renders_it(tmp_path):
    record_path = tmp_path / "bench_linear.json"
    done = run_module(
        "benchmarks.bench_linear",
        *("--n", "48", "--hidden", "16", "--vocab", "200", "--dtypes", "float32", "--rounds", "2", "--full"),
        *("--variants", "linear", "linear_recompute", "torch", "fused_logits", "--output", str(record_path)),
    )
    assert done.returncode == 0, done.stderr
    record = json.loads(record_path.read_text())
    assert record["complete"] and record["command"].startswith("python -m benchmarks.bench_linear --n 48")
    assert {(row["eps"], row["weighted"]) for row in record["rows"]} == {
        (0, False),
        (0, True),
        (0.1, False),
        (0.1, True),
    }
    for row in record["rows"]:
        assert row["load_average"] >= 0 and row["rounds"] == 2
        assert row["seconds_min"] <= row["seconds_median"] <= row["seconds_max"]
        assert max(row["loss_rel_error"], row["grad_hidden_rel_error"], row["grad_weight_rel_error"]) < 1e-4
        assert "extra_memory_x_logits" in row
        if row["variant"] == "torch":
            assert row["ratio_median"] == 1

    done = run_module("benchmarks.report", "--linear", str(record_path), "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "out" / "README_table.md").read_text()
    assert "**Linear head + loss** (N = 48 tokens, hidden size 16)" in table
    assert len(re.findall(r"^\| float32 \| 200 \| (0|0\.1) \| (yes|no) \|", table, re.M)) == 4
    assert "python -m benchmarks.bench_linear --n 48" in table


def test_bench_linear_check_catches_a_wrong_variant():
    # Negative control for the fp64 check: linear with the smoothing halved must show a large loss error.
    script = (
        "import functools\n"
        "from benchmarks import bench_linear as b\n"
        "case = dict(n=40, d=8, v=64, dtype='float32', eps=0.2, weighted=True)\n"
        "b.VARIANTS['wrong'] = lambda h, w, y, cw, eps: b.linear(h, w, y, cw, eps / 2, recompute=False)\n"
        "errors = b.check(['linear', 'wrong'], case)\n"
        "print(errors['linear']['loss_rel_error'], errors['wrong']['loss_rel_error'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    right, wrong = map(float, done.stdout.split())
    assert right < 1e-6 and wrong > 1e-3


def test_bench_linear_loads_cce_torch_compile_without_triton():
    import importlib.util

    if importlib.util.find_spec("cut_cross_entropy") is None:
        pytest.skip("cut-cross-entropy is not installed")
    script = "from benchmarks.bench_linear import _cce_torch_compile\nprint(_cce_torch_compile().__module__)\n"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "cut_cross_entropy.torch_compile"


def test_bench_import_says_one_line_for_a_missing_page(tmp_path):
    """The shared paster (`harness.paste_table`, `examples.common.paste_into_readme`): a page that cannot be read is a
    usage error, one line and status 2, not a traceback."""
    page = tmp_path / "missing.md"
    done = run_module("benchmarks.bench_import", "--report", "--readme", str(page))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"error: {page}: cannot be read (No such file or directory)"]
