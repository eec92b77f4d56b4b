"""Markdown tables and a plot from the benchmark records in benchmarks/results/ (nothing here is typed by hand).

    python -m benchmarks.report                               # results/README_table.md, results/bench_loss.png
    python -m benchmarks.report --readme docs/performance.md  # ... and pastes the table into that page

Reads ``bench_loss.json`` (required), ``bench_trainer.json``, ``bench_loss_release_memory.json`` (``bench_loss
--release-memory``), ``bench_trainer_wide*.json`` (``bench_trainer --wide``) and ``bench_linear.json`` (each when
present), as written by the benchmarks. With ``--readme PAGE`` (docs/performance.md holds the markers), the text
between ``<!-- results:performance -->`` and ``<!-- /results:performance -->`` is replaced by the generated table
(by examples/common.py's `paste_into_readme`); both markers must be there, once each, in that order.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks.harness import RESULTS, paste_table

README_MARKER = "performance"

# bench_loss variants shown, in column order, with their names in the table; a column none of whose rows ran is left
# out (Liger runs only on GPUs). hf_lsce's fp64 reference path is in the JSON but not the table.
LOSS_COLUMNS = {
    "hf_lsce": "hf_lsce",
    "hf_lsce_inplace": "hf_lsce in-place",
    "label_smoother": "LabelSmoother",
    "seed_dense": "seed dense one-hot",
    "liger": "Liger",
}
# Names in the memory column's header, where all variants share one cell.
SHORT_NAMES = {"hf_lsce_inplace": "in-place", "label_smoother": "LabelSmoother", "seed_dense": "seed"}
MEMORY_MIN_K = 32768  # bench_loss measures memory from this class count up
TRAINER_VARIANTS = {
    "plain": "`Trainer` (model's own loss)",
    "smoothing": "`SmoothingTrainer`, ε = 0.1, class weights",
    "smoothing_eps0": "`SmoothingTrainer`, ε = 0, no weights",
}
# bench_linear variants, in column order, with their names in the table.
LINEAR_COLUMNS = {
    "torch": "torch",
    "linear": "linear",
    "linear_recompute": "linear, recompute",
    "fused_logits": "fused on logits",
    "cce_compile": "CCE compile",
}
LINEAR_ERRORS = ("loss_rel_error", "grad_hidden_rel_error", "grad_weight_rel_error")


# ---------------------------------------------------------------------------------------------------------------
# Tables


def case_key(row: dict) -> tuple:
    options = " ".join(row[name] for name in ("smoothing_style", "weight_mode") if name in row)
    return row["n"], row["k"], row["dtype"], row["eps"], row["weighted"], options


def group_cases(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """``{case key: {variant: row}}``, ordered by K, N, ε, weights."""
    cases: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        cases.setdefault(case_key(row), {})[row["variant"]] = row
    return dict(sorted(cases.items(), key=lambda item: (item[0][1], item[0][0], item[0][5], item[0][3], item[0][4])))


def ratio_cell(row: dict | None) -> str:
    if row is None or "skipped" in row:
        return "–"
    if "ratio_median" not in row:
        return f"{row['seconds_median'] * 1e3:.1f} ms"
    return f"{row['ratio_median']:.2f} [{row['ratio_min']:.2f}–{row['ratio_max']:.2f}]"


def case_cells(key: tuple, variants: dict[str, dict]) -> list[str]:
    """N, K, ε, weights (and options) and PyTorch's time in ms."""
    n, k, _, eps, weighted, options = key
    torch_row = variants.get("torch")
    torch_ms = "–" if torch_row is None or "skipped" in torch_row else f"{torch_row['seconds_median'] * 1e3:.1f}"
    return [f"{n}", f"{k}", f"{eps:g}", ("yes" if weighted else "no") + (f", {options}" if options else ""), torch_ms]


def floor_cell(row: dict | None) -> str:
    return "–" if row is None or "x_floor" not in row else f"{row['x_floor']:.1f}"


def memory_cell(variants: dict[str, dict], names: list[str]) -> str:
    values = []
    for name in names:
        row = variants.get(name)
        if row is None or "skipped" in row:
            values.append("–")
        elif "extra_memory_x_logits" in row:
            values.append(f"{row['extra_memory_x_logits']:.2f}")
        else:
            values.append("?" if "memory_error" in row else "–")
    return " / ".join(values)


def loss_tables(record: dict) -> str:
    rows = record["rows"]
    present = {row["variant"] for row in rows if "skipped" not in row}
    columns = [name for name in LOSS_COLUMNS if name in present]
    memory_names = ["torch", *columns]
    has_memory = any("extra_memory_x_logits" in row for row in rows)
    cases = group_cases(rows)
    out = []
    for dtype in dict.fromkeys(key[2] for key in cases):
        header = ["N", "K", "ε", "weights", "torch ms", *(LOSS_COLUMNS[name] for name in columns), "hf_lsce × floor"]
        if has_memory:
            header.append(f"extra memory × logits: {' / '.join(SHORT_NAMES.get(n, n) for n in memory_names)}")
        out += [f"**{dtype}**: time as a multiple of `F.cross_entropy`'s, median [min–max] over rounds", ""]
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        skipped: dict[str, set[str]] = {}
        for key, variants in cases.items():
            if key[2] != dtype:
                continue
            k = key[1]
            cells = case_cells(key, variants)
            cells += [ratio_cell(variants.get(name)) for name in columns]
            cells.append(floor_cell(variants.get("hf_lsce")))
            if has_memory:
                cells.append(memory_cell(variants, memory_names) if k >= MEMORY_MIN_K else "")
            out.append("| " + " | ".join(cells) + " |")
            for name in columns:
                if name in variants and "skipped" in variants[name]:
                    skipped.setdefault(LOSS_COLUMNS[name], set()).add(variants[name]["skipped"])
        if skipped:
            reasons = "; ".join(f"{name}: {', '.join(sorted(why))}" for name, why in skipped.items())
            out += ["", f"– not run ({reasons})."]
        out.append("")
    rounds = "/".join(str(r) for r in sorted({row["rounds"] for row in rows}))
    max_calls = max(row.get("calls_per_timing", 1) for row in rows)
    copy_rate, exp_rate = record["floor"]["copy_bytes_per_s"] / 1e9, record["floor"]["exp_per_s"] / 1e9
    out.append(
        f"Forward + backward on leaf logits, {record['ignored_fraction']:.0%} of the labels ignored; {rounds} "
        "interleaved rounds after a warm-up"
        + (
            f"; a time is the mean of up to {max_calls} back-to-back calls where one call is short"
            if max_calls > 1
            else ""
        )
        + ". The floor is two copies of the logits at the measured copy bandwidth "
        f"({copy_rate:.1f} GB/s) plus one `exp` per logit ({exp_rate:.2f} G/s)."
        + (
            f" Extra memory: peak growth of one forward + backward (K ≥ {MEMORY_MIN_K}), as a multiple of the "
            "logits' size; the logits' gradient alone is 1×."
            if has_memory
            else ""
        )
    )
    return "\n".join(out)


def fresh_memory_table(record: dict) -> str:
    """hf_lsce when every call writes its gradient to fresh memory (``bench_loss.py --release-memory``), K >= 32768."""
    cases = {key: variants for key, variants in group_cases(record["rows"]).items() if key[1] >= MEMORY_MIN_K}
    out = [
        "**Fresh gradient memory** (`--release-memory`: hf_lsce's memory released before every call, so that each "
        "call writes its gradient to new pages, as on a training run's first step): time as a multiple of "
        "`F.cross_entropy`'s, median [min–max] over rounds",
        "",
        "| dtype | N | K | ε | weights | torch ms | hf_lsce | hf_lsce in-place | hf_lsce × floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, variants in cases.items():
        cells = [key[2], *case_cells(key, variants)]
        cells += [ratio_cell(variants.get("hf_lsce")), ratio_cell(variants.get("hf_lsce_inplace"))]
        cells.append(floor_cell(variants.get("hf_lsce")))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def trainer_table(record: dict) -> str:
    rows = record["rows"]
    out = [
        "**Training steps**: optimizer steps per second, and time per step as a multiple of the plain `Trainer`'s, "
        "median [min–max] over rounds",
        "",
        "| model | trainer | steps/s | ms/step | × `Trainer` |",
        "|---|---|---|---|---|",
    ]
    descriptions = {}
    for row in rows:
        descriptions.setdefault(row["model"], row["description"])
        ratio = f"{row['ratio_median']:.3f} [{row['ratio_min']:.3f}–{row['ratio_max']:.3f}]"
        name = TRAINER_VARIANTS.get(row["variant"], row["variant"])
        cells = [row["model"], name, f"{row['steps_per_second']:.2f}", f"{row['seconds_median'] * 1e3:.0f}", ratio]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    first = rows[0]
    out.append(
        f"{first['rounds']} interleaved rounds of {first['warmup']} warm-up + {first['steps']} timed steps per "
        "trainer, same initial weights and batches; a step runs from the previous step's end to its own end. "
        + " ".join(f"{model}: {text}." for model, text in descriptions.items())
    )
    out += [f"Note: {note}." for note in record.get("notes", [])]
    return "\n".join(out)


WIDE_VARIANTS = {
    "plain": "`Trainer` (model's own loss)",
    "linear_off": "`SmoothingTrainer`, ε = 0.1, `fused_linear=False`",
    "linear_on": "`SmoothingTrainer`, ε = 0.1, `fused_linear=True`",
}


def wide_trainer_table(records: list[dict]) -> str:
    out = [
        "**Training without the logits** (`bench_trainer --wide`): time per step and peak RSS of the process, each "
        "as a multiple of the plain `Trainer`'s within a round, median [min–max] over rounds; every run in a fresh "
        "process",
        "",
        "| vocabulary | trainer | ms/step | × `Trainer` | peak RSS GiB | × `Trainer` | RSS growth in `train()` GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    descriptions = []
    # Largest vocabulary first, whichever record a size comes from (the trainers' order within a size is kept).
    for row in sorted((row for record in records for row in record["rows"]), key=lambda row: -row["vocab_size"]):
        cells = [
            str(row["vocab_size"]),
            WIDE_VARIANTS.get(row["variant"], row["variant"]),
            f"{row['seconds_median'] * 1e3:.0f}",
            f"{row['ratio_median']:.3f} [{row['ratio_min']:.3f}–{row['ratio_max']:.3f}]",
            f"{row['peak_rss_median'] / 2**30:.2f}",
            f"{row['rss_ratio_median']:.3f} [{row['rss_ratio_min']:.3f}–{row['rss_ratio_max']:.3f}]",
            f"{row['train_rss_growth_median'] / 2**30:.2f}",
        ]
        out.append("| " + " | ".join(cells) + " |")
        if row["description"] not in descriptions:
            descriptions.append(row["description"])
    first = records[0]["rows"][0]
    out += [
        "",
        f"{first['rounds']} interleaved rounds of {first['warmup']} warm-up + {first['steps']} timed steps per "
        "trainer (AdamW, same initial weights and batches). " + " ".join(f"{text}." for text in descriptions),
    ]
    return "\n".join(out)


def linear_table(record: dict) -> str:
    """bench_linear: time as a multiple of eager PyTorch's and of CCE's compiled path, memory, errors."""
    rows = record["rows"]
    present = {row["variant"] for row in rows if "skipped" not in row}
    columns = [name for name in LINEAR_COLUMNS if name in present]
    timed = [name for name in columns if name != "torch"]
    hf_lsce_columns = [name for name in ("linear", "linear_recompute") if name in present]
    cases: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        key = (row["dtype"], row["v"], row["eps"], row["weighted"])
        cases.setdefault(key, {})[row["variant"]] = row
    first = rows[0]
    names = " / ".join(LINEAR_COLUMNS[name] for name in columns)
    header = ["dtype", "V", "ε", "weights", "torch s", *(LINEAR_COLUMNS[name] for name in timed)]
    if "cce_compile" in present:
        header.append(f"× CCE compile: {' / '.join(LINEAR_COLUMNS[name] for name in hf_lsce_columns)}")
    header += [f"extra memory × logits: {names}", f"max rel. error vs fp64: {names}"]
    out = [
        f"**Linear head + loss** (N = {first['n']} tokens, hidden size {first['d']}): time of forward + backward as a "
        "multiple of eager PyTorch's, median [min–max] over rounds",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    skipped: dict[str, set[str]] = {}
    for (dtype, v, eps, weighted), variants in cases.items():
        torch_row = variants.get("torch")
        torch_s = "–" if torch_row is None or "skipped" in torch_row else f"{torch_row['seconds_median']:.2f}"
        cells = [dtype, f"{v}", f"{eps:g}", "yes" if weighted else "no", torch_s]
        cells += [ratio_cell(variants.get(name)) for name in timed]
        if "cce_compile" in present:
            cce = variants.get("cce_compile")
            cells.append(
                " / ".join(f"{variants[name]['ratio_cce_median']:.2f}" for name in hf_lsce_columns)
                if cce is not None and "skipped" not in cce
                else "–"
            )
        run = [variants.get(name) for name in columns]
        cells.append(
            " / ".join("–" if r is None or "skipped" in r else f"{r['extra_memory_x_logits']:.2f}" for r in run)
        )
        cells.append(
            " / ".join("–" if r is None or "skipped" in r else f"{max(r[e] for e in LINEAR_ERRORS):.0e}" for r in run)
        )
        out.append("| " + " | ".join(cells) + " |")
        for name, row in variants.items():
            if "skipped" in row:
                skipped.setdefault(LINEAR_COLUMNS.get(name, name), set()).add(row["skipped"])
    if skipped:
        out += [
            "",
            "– not run (" + "; ".join(f"{name}: {', '.join(sorted(why))}" for name, why in skipped.items()) + ").",
        ]
    rounds = {}
    for row in rows:
        rounds.setdefault(row["rounds"], set()).add(row["v"])
    rounds_text = ", ".join(
        f"{r} round{'s' if r > 1 else ''} at V = {', '.join(str(v) for v in sorted(vs))}" for r, vs in rounds.items()
    )
    loads = [row["load_average"] for row in rows if "load_average" in row]
    out += [
        "",
        f"{record['ignored_fraction']:.0%} of the labels ignored; interleaved rounds ({rounds_text}) after one "
        "untimed call of each variant on a small case; every call computes fresh gradients of the hidden states and "
        "the head. Extra memory: peak RSS growth of each call beyond the two parameter gradients, as a multiple of "
        "the logits' size in the inputs' dtype (median over rounds, measured in the benchmark's process after "
        "handing freed memory back to the kernel). Errors: max relative error of the loss and both gradients on the "
        f"first {record['check_rows']} rows against an fp64 truth. The 1-minute load average before each case was "
        f"{min(loads):.1f}–{max(loads):.1f} ({record['machine']['cpus']} CPUs, shared with other work)."
        if loads
        else "",
    ]
    return "\n".join(out)


def machine_line(record: dict) -> str:
    info = record["machine"]
    where = info.get("gpu") or info.get("cpu", "?")
    load = info.get("load_average_start"), info.get("load_average_end")
    load_text = " / ".join("?" if value is None else f"{value[0]:.2f}" for value in load)
    versions = f"torch {info.get('torch', '?')}" + (
        f", Transformers {info['transformers']}" if "transformers" in info else ""
    )
    threads = f"{info['threads']} threads ({info['cpus']} CPUs)"
    return (
        f"`{record['benchmark']}`: {where}, {threads}, {versions}, hf_lsce {info['hf_lsce']} at "
        f"{info.get('git_revision', '?')}; load average (1 min) {load_text} at start / end; "
        f"{record['wall_seconds'] / 60:.1f} min; `{record['command']}`"
    )


def markdown(
    loss_record: dict,
    trainer_record: dict | None,
    fresh_record: dict | None = None,
    wide_records: list[dict] = (),
    linear_record: dict | None = None,
) -> str:
    parts = [loss_tables(loss_record)]
    if fresh_record is not None:
        parts.append(fresh_memory_table(fresh_record))
    if trainer_record is not None:
        parts.append(trainer_table(trainer_record))
    if wide_records:
        parts.append(wide_trainer_table(list(wide_records)))
    if linear_record is not None:
        parts.append(linear_table(linear_record))
    records = [r for r in (loss_record, fresh_record, trainer_record, *wide_records, linear_record) if r is not None]
    parts.append("\n\n".join(f"Measured by {machine_line(record)}." for record in records))
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Plot


def plot_loss(record: dict, path: Path) -> None:
    """Time ratio to torch against K (log x, log y), one line per variant, a column of panels per dtype and a row
    per (ε, weights) setting, min–max error bars. Only the most common N is drawn (the N = 32 smoke case is not)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        row
        for row in record["rows"]
        if "ratio_median" in row and row["variant"] in LOSS_COLUMNS and not case_key(row)[5]  # default options only
    ]
    if not rows:
        raise SystemExit("bench_loss.json has no ratios to plot")
    n = statistics.mode(row["n"] for row in rows)
    rows = [row for row in rows if row["n"] == n]
    dtypes = list(dict.fromkeys(row["dtype"] for row in rows))
    settings = list(dict.fromkeys((row["eps"], row["weighted"]) for row in rows))
    fig, axes = plt.subplots(
        len(settings),
        len(dtypes),
        figsize=(5 * len(dtypes), 3 * len(settings)),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    for i, (eps, weighted) in enumerate(settings):
        for j, dtype in enumerate(dtypes):
            ax = axes[i][j]
            for index, (variant, label) in enumerate(LOSS_COLUMNS.items()):
                points = sorted(
                    (row["k"], row["ratio_median"], row["ratio_min"], row["ratio_max"])
                    for row in rows
                    if row["variant"] == variant
                    and row["dtype"] == dtype
                    and (row["eps"], row["weighted"]) == (eps, weighted)
                )
                if not points:
                    continue
                k, median, low, high = zip(*points)
                errors = [[m - lo for m, lo in zip(median, low)], [hi - m for m, hi in zip(median, high)]]
                ax.errorbar(k, median, yerr=errors, marker="o", capsize=3, label=label, color=f"C{index}")
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{dtype}, ε = {eps:g}, {'weighted' if weighted else 'no weights'}", fontsize=9)
            if i == len(settings) - 1:
                ax.set_xlabel(f"classes K (N = {n})")
            if j == 0:
                ax.set_ylabel("time / F.cross_entropy")
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = {}, {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
            labels.setdefault(label, label)
    fig.legend(list(handles.values()), list(labels.values()), loc="upper center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# README


# ---------------------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss", type=Path, default=RESULTS / "bench_loss.json", help="bench_loss.py's record")
    parser.add_argument(
        "--trainer", type=Path, default=RESULTS / "bench_trainer.json", help="bench_trainer.py's record, if present"
    )
    parser.add_argument(
        "--release-memory",
        type=Path,
        default=RESULTS / "bench_loss_release_memory.json",
        help="bench_loss.py --release-memory's record, if present",
    )
    parser.add_argument(
        "--linear", type=Path, default=RESULTS / "bench_linear.json", help="bench_linear's record, if present"
    )
    parser.add_argument("--output-dir", type=Path, default=RESULTS, help="where README_table.md and the plot go")
    parser.add_argument(
        "--readme",
        type=Path,
        help=f"page to paste the table into (docs/performance.md), between its results:{README_MARKER} markers",
    )
    args = parser.parse_args()
    # A usage error is one line and exit status 2, before anything is written.
    if not args.loss.is_file():
        parser.exit(2, f"error: {args.loss}: no such file (run python -m benchmarks.bench_loss first)\n")
    if args.readme is not None and not args.readme.is_file():
        parser.exit(2, f"error: --readme {args.readme}: no such file\n")
    loss_record = json.loads(args.loss.read_text())
    trainer_record = json.loads(args.trainer.read_text()) if args.trainer.is_file() else None
    if trainer_record is None:
        print(f"{args.trainer} not found: no trainer table", file=sys.stderr)
    fresh_record = json.loads(args.release_memory.read_text()) if args.release_memory.is_file() else None
    wide_records = [json.loads(path.read_text()) for path in sorted(RESULTS.glob("bench_trainer_wide*.json"))]
    linear_record = json.loads(args.linear.read_text()) if args.linear.is_file() else None
    table = markdown(loss_record, trainer_record, fresh_record, wide_records, linear_record)

    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "README_table.md").write_text(table)
    plot_loss(loss_record, args.output_dir / "bench_loss.png")
    print(f"wrote {args.output_dir / 'README_table.md'} and {args.output_dir / 'bench_loss.png'}")
    if args.readme is not None:
        paste_table(parser, args.readme, README_MARKER, table)


if __name__ == "__main__":
    main()
