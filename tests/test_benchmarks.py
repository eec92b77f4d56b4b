"""benchmarks/: run as modules of the `benchmarks` package, tables rebuilt from the committed records."""

import json
import re
import subprocess
import sys
from pathlib import Path

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
    assert done.returncode != 0
    assert "results:performance" in done.stderr
    assert page.read_text() == "no markers\n"


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
