"""What the benchmarks share: interleaved rounds and their medians, peak memory in a fresh process, the machine's
description and the record, written whole.

The benchmarks are modules of the ``benchmarks`` package, run from the repository's root:

    python -m benchmarks.bench_loss
    python -m benchmarks.report --readme docs/performance.md

From there the example scripts' folder is importable as ``examples`` (a namespace package): the benchmarks take the
Markdown paste and the PyPI model lookup from ``examples/common.py``, and write records with ``hf_lsce._io``'s atomic
writer, instead of keeping copies.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------------------------
# Interleaved rounds


def rotations(names: Sequence[str], rounds: int) -> Iterator[tuple[int, list[str]]]:
    """``(round, order)`` for ``rounds`` rounds, the order of ``names`` rotated by one each round, so that no
    variant always runs first (after another's garbage) or last."""
    names = list(names)
    for round_ in range(rounds):
        shift = round_ % len(names)
        yield round_, names[shift:] + names[:shift]


def spread(values: Sequence[float], prefix: str = "seconds") -> dict[str, float]:
    """``{prefix_median, prefix_min, prefix_max}`` of ``values``."""
    return {f"{prefix}_median": statistics.median(values), f"{prefix}_min": min(values), f"{prefix}_max": max(values)}


def ratios(values: Sequence[float], baseline: Sequence[float], prefix: str = "ratio") -> dict[str, float]:
    """Ratios to ``baseline`` taken within each round, then their median, min and max (``spread``)."""
    return spread([a / b for a, b in zip(values, baseline)], prefix)


# ---------------------------------------------------------------------------------------------------------------
# Peak memory


def rss_reset_peak() -> int:
    """Current RSS in bytes, after resetting the high-water mark (Linux: /proc/self/clear_refs, 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status("VmRSS")


def rss_peak() -> int:
    """The RSS high-water mark in bytes since the last `rss_reset_peak` (or the process's start)."""
    return _proc_status("VmHWM")


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def release_free_memory() -> None:
    """Collects garbage and hands the C heap's free pages back to the kernel (glibc's ``malloc_trim``), so that memory
    freed earlier in this process is not counted as free room by the next `peak_rss_growth`."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is not None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


@contextlib.contextmanager
def peak_rss_growth() -> Iterator[dict]:
    """Measures, in this process, how far the RSS rose above its level at entry: ``{"bytes": growth}`` after the
    block. Freed memory is handed back first (`release_free_memory`), so that the block's allocations are fresh pages;
    PyTorch's CPU allocator keeps no cache of its own. A fresh process (`run_probe`) needs no such care but costs a
    start-up per measurement."""
    release_free_memory()
    result = {}
    base = rss_reset_peak()
    yield result
    result["bytes"] = rss_peak() - base


def available_memory() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 where there is none)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run_probe(module: str, *args: str) -> dict:
    """Runs ``python -m module *args`` in a fresh process from the repository's root and returns the JSON object on
    the last line of its output, or ``{"error": last line of its stderr}`` if it failed."""
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, check=False, cwd=REPO)
    if done.returncode:
        lines = done.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else done.returncode}
    return json.loads(done.stdout.strip().splitlines()[-1])


def sync(device: torch.device) -> None:
    """Waits for the device's queued work (GPUs); nothing on CPUs."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------------
# Records


def machine(device: torch.device) -> dict:
    """Platform, versions, threads, the CPU or GPU, the load average now and the git revision."""
    import torch  # here, not at the top: report.py reads records without torch

    import hf_lsce

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "hf_lsce": hf_lsce.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "device": str(device),
        "load_average_start": os.getloadavg(),
    }
    try:
        # From the installed metadata: importing Transformers for its version costs seconds.
        info["transformers"] = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    else:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    try:
        info["git_revision"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
        ).stdout.strip()
    except OSError:
        pass
    return info


def command_line() -> str:
    """How this process was started, as it would be typed: ``python -m benchmarks.bench_loss --quick``."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    script = ["-m", spec.name] if spec is not None else sys.argv[:1]
    return " ".join([Path(sys.executable).name, *script, *sys.argv[1:]])


def paste_table(parser, page: Path, marker: str, table: str) -> None:
    """Pastes ``table`` into ``page`` between its ``results:marker`` markers (`examples.common.paste_into_readme`);
    a page that cannot be read or lacks the markers ends the run as a usage error: one line, ``error: ...``, exit
    status 2 (``parser.exit``)."""
    # examples/common.py imports Transformers: only when a page is pasted into.
    from examples.common import UsageError, paste_into_readme

    try:
        paste_into_readme(page, marker, table)
    except UsageError as error:
        parser.exit(2, f"error: {error}\n")
    print(f"pasted the table into {page}")


def write_record(path: Path, benchmark: str, info: dict, started: float, rows: list[dict], **fields) -> None:
    """Writes a benchmark's JSON record whole: the command, the machine (with the load average now), ``fields``,
    the wall time and the rows."""
    from hf_lsce._io import write_atomic

    info["load_average_end"] = os.getloadavg()
    record = {
        "benchmark": benchmark,
        "command": command_line(),
        "machine": info,
        **fields,
        "wall_seconds": time.time() - started,
        "rows": rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(record, indent=1))
