"""Time and peak memory of importing hf_lsce, against `import torch`, each in a fresh interpreter.

    python -m benchmarks.bench_import                                # measure, write the record, print the table
    python -m benchmarks.bench_import --readme docs/performance.md   # ... and paste the table into that page
    python -m benchmarks.bench_import --report --readme docs/performance.md  # the table from the record alone

Method: every round runs each statement once in a new ``python -c`` process started from the repository's root (so
this checkout's hf_lsce is imported), in an order rotated from round to round. The child times the statement alone
(``time.perf_counter``, interpreter start-up excluded) and reports its peak RSS (``resource.getrusage(RUSAGE_SELF)
.ru_maxrss``, which includes the interpreter's own few MiB). Ratios to ``import torch`` are taken within each round,
then their median, min and max. The target (issue 10) is at most 1.3x the time and memory of ``import torch`` for
``import hf_lsce`` and for the loss alone; the trainer's row shows what the lazy names defer.

Writes ``benchmarks/results/bench_import.json`` (machine, one row per statement).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from benchmarks.harness import REPO, RESULTS, machine, paste_table, ratios, rotations, spread, write_record

README_MARKER = "import"
RECORD = RESULTS / "bench_import.json"
TARGET = 1.3
BASELINE = "torch"
# Variant -> the statement its child process times.
STATEMENTS = {
    "torch": "import torch",
    "hf_lsce": "import hf_lsce",
    "loss": "from hf_lsce import label_smoothed_cross_entropy",
    "trainer": "from hf_lsce import SmoothingTrainer",
}
# The variants the target applies to.
TARGETED = ("hf_lsce", "loss")

CHILD = """\
import json, resource, time
start = time.perf_counter()
{statement}
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""


def measure(statement: str) -> dict:
    """Runs ``statement`` in a fresh interpreter; returns its time and the child's peak RSS."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD.format(statement=statement)], capture_output=True, text=True, cwd=REPO
    )
    if done.returncode:
        raise SystemExit(f"error: {statement!r} failed in a fresh interpreter: {done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(rounds: int, variants: list[str]) -> list[dict]:
    samples = {name: [] for name in variants}
    measure(STATEMENTS[BASELINE])  # a warm-up, discarded: the first run reads the files from disk
    for round_, order in rotations(variants, rounds):
        for name in order:
            samples[name].append(measure(STATEMENTS[name]))
        print(f"round {round_ + 1}/{rounds}", file=sys.stderr)
    base_seconds = [s["seconds"] for s in samples[BASELINE]]
    base_rss = [s["peak_rss_bytes"] for s in samples[BASELINE]]
    rows = []
    for name in variants:
        seconds = [s["seconds"] for s in samples[name]]
        rss = [s["peak_rss_bytes"] for s in samples[name]]
        row = {"variant": name, "statement": STATEMENTS[name], "rounds": rounds}
        row |= spread(seconds) | ratios(seconds, base_seconds, "time_ratio")
        row |= spread(rss, "peak_rss_bytes") | ratios(rss, base_rss, "rss_ratio")
        if name in TARGETED:
            row["meets_target"] = row["time_ratio_median"] <= TARGET and row["rss_ratio_median"] <= TARGET
        rows.append(row)
    return rows


def table(record: dict) -> str:
    """The Markdown table of a record: median [min-max] time and peak RSS, and their ratios to ``import torch``."""
    mib = 2**20
    lines = [
        f"| statement | time (s) | × `{STATEMENTS[BASELINE]}` | peak RSS (MiB) | × `{STATEMENTS[BASELINE]}` |",
        "|---|---|---|---|---|",
    ]
    for row in record["rows"]:
        lines.append(
            f"| `{row['statement']}` "
            f"| {row['seconds_median']:.2f} [{row['seconds_min']:.2f}–{row['seconds_max']:.2f}] "
            f"| {row['time_ratio_median']:.2f} [{row['time_ratio_min']:.2f}–{row['time_ratio_max']:.2f}] "
            f"| {row['peak_rss_bytes_median'] / mib:.0f} "
            f"| {row['rss_ratio_median']:.2f} [{row['rss_ratio_min']:.2f}–{row['rss_ratio_max']:.2f}] |"
        )
    info = record["machine"]
    lines.append("")
    lines.append(
        f"Medians [min–max] of {record['rounds']} interleaved rounds, each statement in a fresh interpreter; "
        f"{info.get('cpu', '?')}, torch {info.get('torch', '?')}, hf_lsce at {info.get('git_revision', '?')}, "
        f"load average (1 min) {info['load_average_start'][0]:.2f} / {info['load_average_end'][0]:.2f} at start / "
        f"end; `{record['command']}`."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds (default 11)")
    parser.add_argument(
        "--no-trainer", action="store_true", help="leave out the trainer's row (it imports Transformers: ~10 s each)"
    )
    parser.add_argument("--report", action="store_true", help="no measurement: the table from the existing record")
    parser.add_argument("--readme", help=f"page to paste the table into, between its results:{README_MARKER} markers")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.exit(2, f"error: --rounds: must be at least 1, got {args.rounds}\n")

    if args.report:
        if not RECORD.is_file():
            parser.exit(2, f"error: {RECORD}: no record; run python -m benchmarks.bench_import first\n")
        record = json.loads(RECORD.read_text())
    else:
        import torch

        started = time.time()
        info = machine(torch.device("cpu"))
        variants = [name for name in STATEMENTS if not (args.no_trainer and name == "trainer")]
        rows = run(args.rounds, variants)
        write_record(RECORD, "bench_import", info, started, rows, rounds=args.rounds, target_ratio=TARGET)
        record = json.loads(RECORD.read_text())
    text = table(record)
    print(text)
    for row in record["rows"]:
        if row["variant"] in TARGETED:
            verdict = "meets" if row["meets_target"] else "misses"
            print(
                f"{row['statement']}: {row['time_ratio_median']:.2f}x the time and {row['rss_ratio_median']:.2f}x the "
                f"peak memory of {STATEMENTS[BASELINE]} ({verdict} the {TARGET}x target)"
            )
    if args.readme:
        paste_table(parser, args.readme, README_MARKER, text)


if __name__ == "__main__":
    main()
