"""Forward + backward time and peak extra memory of hf_lsce's loss against PyTorch and Transformers.

    python -m benchmarks.bench_loss                 # the full grid, 5 rounds (tens of minutes on 2 cores)
    python -m benchmarks.bench_loss --quick         # K <= 32768, 3 rounds: a smoke run
    python -m benchmarks.bench_loss --full          # + eps = 0 and the slowest variants at K = 131072 (hours)
    python -m benchmarks.report                     # table (docs/performance.md) and plot from benchmarks/results/

Method (see issue 5):
1. Every variant is checked against an fp64 truth (hf_lsce's reference path on fp64 logits) before it is timed.
2. The machine's floor is measured in the same run: copy bandwidth and ``exp`` throughput on a buffer the size of
   the largest fp32 logits; ``floor = 2 * N * K * bytes / copy_bandwidth + N * K / exp_rate``.
3. Per case, the variants run interleaved in a rotating order, one warm-up each (discarded) then ``--rounds``
   rounds; each time is forward + backward of a fresh graph on leaf logits, averaged over back-to-back calls for
   the small cases (at least ``CALL_ELEMENTS`` logits per timing, at most 200 calls; they run
   ``SMALL_CASE_ROUNDS_FACTOR`` times the rounds). Ratios to ``F.cross_entropy``
   are taken within each round, then their median (and min / max) is reported. On CPU hf_lsce's fused path writes
   each gradient into the memory of the previous call's, as from a training run's second step on;
   ``--release-memory`` frees it before every call, so that every call writes to fresh memory, as PyTorch's do.
4. Peak extra memory: each (case, variant) runs once in a fresh subprocess, which resets the kernel's RSS
   high-water mark after building its inputs and reports the growth, as a multiple of the logits' size (the
   gradient of the logits counts: it is 1x for every non-in-place variant).

Writes ``benchmarks/results/bench_loss.json`` (machine, floor, one row per case and variant) after every case;
``"complete": false`` marks an interrupted run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import hf_lsce.fused
from benchmarks.harness import (
    RESULTS,
    available_memory,
    machine,
    ratios,
    rotations,
    rss_peak,
    rss_reset_peak,
    run_probe,
    spread,
    sync,
    write_record,
)
from hf_lsce import label_smoothed_cross_entropy

IGNORED_FRACTION = 0.1
CALL_ELEMENTS = 1 << 24  # logits per timing, at least, for the small cases (see `calls_per_timing`)
# Small cases (several calls per timing) run this many times the rounds: a 0.25 ms call's ratio moves by +-0.1 from
# round to round on the 2-core VM, and the extra rounds cost seconds.
SMALL_CASE_ROUNDS_FACTOR = 3


# ---------------------------------------------------------------------------------------------------------------
# Variants: each takes (logits, target, weight, epsilon) and returns a scalar loss (mean over counted positions).
# PyTorch and hf_lsce also take the case's `smoothing_style` and `weight_mode` (see `variant_fn`).


def torch_cross_entropy(x, y, w, eps, smoothing_style="uniform", weight_mode="torch"):
    """F.cross_entropy with the same options: off_target(eps) is uniform(eps K / (K - 1)); weight_mode="example"
    weighs each position's unweighted smoothed loss by its true class's weight and divides by their sum."""
    if smoothing_style == "off_target":
        eps = eps * x.shape[-1] / (x.shape[-1] - 1)
    if weight_mode == "example" and w is not None:
        per_position = F.cross_entropy(x, y, reduction="none", label_smoothing=eps)
        weights = torch.where(y != -100, w[y.clamp(min=0)], 0)
        return (per_position * weights).sum() / weights.sum()
    return F.cross_entropy(x, y, w, label_smoothing=eps)


def hf_lsce_default(x, y, w, eps, **options):
    return label_smoothed_cross_entropy(x, y, w, label_smoothing=eps, **options)


def hf_lsce_inplace(x, y, w, eps, **options):
    return label_smoothed_cross_entropy(x, y, w, label_smoothing=eps, inplace_backward=True, **options)


def hf_lsce_reference(x, y, w, eps, **options):
    return label_smoothed_cross_entropy(x, y, w, label_smoothing=eps, implementation="reference", **options)


def transformers_label_smoother(x, y, w, eps):
    from transformers.trainer_pt_utils import LabelSmoother

    return LabelSmoother(epsilon=eps)({"logits": x}, y)


def seed_dense_one_hot(x, y, w, eps):
    """The seed notebook's loss (SEED.md): a dense (N, K) smoothed one-hot, eps / (K - 1) off target, weights on
    the log-probabilities, plain mean over rows. It has no ignore_index: ignored labels are given class 0."""
    num_classes = x.shape[-1]
    with torch.no_grad():
        targets = torch.empty(x.shape, device=x.device).fill_(eps / (num_classes - 1))
        targets.scatter_(1, y.clamp(min=0).unsqueeze(1), 1.0 - eps)
    lsm = F.log_softmax(x, -1)
    if w is not None:
        lsm = lsm * w.unsqueeze(0)
    return -(targets * lsm).sum(-1).mean()


def liger_cross_entropy(x, y, w, eps):
    from liger_kernel.transformers.functional import liger_cross_entropy as liger

    return liger(x, y, w, label_smoothing=eps)


VARIANTS = {
    "torch": torch_cross_entropy,
    "hf_lsce": hf_lsce_default,
    "hf_lsce_inplace": hf_lsce_inplace,
    "hf_lsce_reference": hf_lsce_reference,
    "label_smoother": transformers_label_smoother,
    "seed_dense": seed_dense_one_hot,
    "liger": liger_cross_entropy,
}


OPTION_VARIANTS = ("torch", "hf_lsce", "hf_lsce_inplace", "hf_lsce_reference")
# The slowest variants, whose ratio to PyTorch no longer changes with K (they are PyTorch's expression or worse).
SLOW_AT_LARGEST_K = ("hf_lsce_reference", "seed_dense")


def variant_fn(variant, case):
    """The variant's loss function for ``case``, with its smoothing style and weight mode when it has them."""
    options = case_options(case)
    return functools.partial(VARIANTS[variant], **options) if options else VARIANTS[variant]


def case_options(case):
    return {name: case[name] for name in ("smoothing_style", "weight_mode") if name in case}


def truth(x, y, w, eps, variant, case):
    """fp64 value of what ``variant`` computes (the seed's convention differs: off-target, no ignore, row mean)."""
    x = x.double()
    w = None if w is None else w.double()
    if variant == "seed_dense":
        return label_smoothed_cross_entropy(
            x, y.clamp(min=0), w, reduction="sum", label_smoothing=eps, smoothing_style="off_target"
        ) / len(y)
    return label_smoothed_cross_entropy(x, y, w, label_smoothing=eps, implementation="reference", **case_options(case))


def applicable(variant, case, device, full=False):
    """None if ``variant`` runs on ``case``, else why not."""
    if case_options(case) and variant not in OPTION_VARIANTS:
        return "no such option"
    if variant == "label_smoother" and case["weighted"]:
        return "no class weights"
    if variant == "liger":
        if device.type != "cuda":
            return "needs a GPU"
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger-kernel not installed"
    if variant in SLOW_AT_LARGEST_K and case["k"] > 32768 and not full:
        return "K > 32768: timed up to 32768 unless --full"
    if variant == "seed_dense":
        # Dense one-hot, its log-softmax, the weighted copy, the product and their gradients: ~6x the logits in fp32.
        need = 6 * case["n"] * case["k"] * 4
        if need > 0.6 * available_memory():
            return f"needs ~{need / 2**30:.0f} GiB"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Cases


def cases(max_k: int, full: bool = False):
    sizes = [(n, k) for n, k in [(4096, 2), (4096, 1024), (4096, 32768), (4096, 131072)] if k <= max_k]
    out = [dict(n=32, k=2, dtype="float32", eps=0.1, weighted=False)]
    for dtype in ("float32", "bfloat16"):
        for n, k in sizes:
            for eps in (0.0, 0.1):
                for weighted in (False, True):
                    if k > 32768 and eps == 0 and not full:
                        continue  # the largest K at eps = 0.1 only, unless --full (hours on 2 cores)
                    out.append(dict(n=n, k=k, dtype=dtype, eps=eps, weighted=weighted))
    # The other options of the loss, on the first vocabulary-sized case (their cost is that of the default's).
    if 32768 <= max_k:
        base = dict(n=4096, k=32768, dtype="float32", eps=0.1, weighted=True)
        out += [dict(base, smoothing_style="off_target"), dict(base, weight_mode="example")]
    return out


def case_name(case):
    options = "".join(f" {value}" for value in case_options(case).values())
    weights = "weighted" if case["weighted"] else "plain"
    return f"N={case['n']} K={case['k']} {case['dtype']} eps={case['eps']} {weights}{options}"


def make_inputs(case, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n, k = case["n"], case["k"]
    dtype = getattr(torch, case["dtype"])
    x = (2 * torch.randn(n, k, generator=generator)).to(dtype)
    y = torch.randint(0, k, (n,), generator=generator)
    y[torch.rand(n, generator=generator) < IGNORED_FRACTION] = -100
    # In the logits' dtype: F.cross_entropy requires it (hf_lsce computes in fp32 either way).
    w = (torch.rand(k, generator=generator) + 0.5).to(dtype) if case["weighted"] else None
    return x.to(device), y.to(device), None if w is None else w.to(device)


# ---------------------------------------------------------------------------------------------------------------
# Measurements


def run_once(fn, x, y, w, eps, inplace_source=None, calls=1, before=None):
    """Seconds per forward + backward on leaf logits ``x`` (refilled from ``inplace_source`` first, and ``before()``
    called, untimed), averaged over ``calls`` back-to-back calls."""
    elapsed = 0.0
    for _ in range(calls):
        if inplace_source is not None:
            with torch.no_grad():
                x.copy_(inplace_source)
        if before is not None:
            before()
        x.grad = None
        sync(x.device)
        start = time.perf_counter()
        fn(x, y, w, eps).backward()
        sync(x.device)
        elapsed += time.perf_counter() - start
    x.grad = None
    return elapsed / calls


def calls_per_timing(case):
    """Back-to-back calls per timing: small cases last ~0.1-1 ms, well below the VM's scheduling noise."""
    return max(1, min(200, CALL_ELEMENTS // (case["n"] * case["k"])))


def check(variant, case, device):
    """Max relative error of the loss and of the gradient against the fp64 truth, on the case's first 256 rows."""
    x, y, w = make_inputs(case, device)
    x, y = x[:256].clone(), y[:256]
    leaf = x.clone().requires_grad_(True)
    loss = variant_fn(variant, case)(leaf, y, w, case["eps"])
    loss.backward()
    ref_leaf = x.clone().requires_grad_(True)
    ref = truth(ref_leaf, y, w, case["eps"], variant, case)
    ref.backward()
    loss_err = abs(loss.double().item() - ref.item()) / max(abs(ref.item()), 1e-12)
    grad_err = ((leaf.grad.double() - ref_leaf.grad).abs().max() / ref_leaf.grad.abs().max().clamp_min(1e-30)).item()
    return loss_err, grad_err


def time_case(case, variants, rounds, device, release_memory=False):
    x0, y, w = make_inputs(case, device)
    eps = case["eps"]
    leaf = x0.clone().requires_grad_(True)
    work = x0.clone().requires_grad_(True)  # overwritten by the in-place variant, refilled before each run
    times = {v: [] for v in variants}
    order = list(variants)
    calls = calls_per_timing(case)
    for round_, rotated in rotations(order, rounds + 1):  # round 0 is the warm-up
        for v in rotated:
            inplace = v == "hf_lsce_inplace"
            x, source = (work, x0) if inplace else (leaf, None)
            before = hf_lsce.fused.empty_cache if release_memory and v.startswith("hf_lsce") else None
            elapsed = run_once(variant_fn(v, case), x, y, w, eps, source, calls, before)
            if round_:
                times[v].append(elapsed)
    return times


def measure_floor(device, numel):
    """Copy bandwidth (bytes copied per second) and exp rate (fp32 elements per second), medians of 5."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy, exp = [], []
    for _ in range(6):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        copy.append(time.perf_counter() - start)
        start = time.perf_counter()
        torch.exp(src, out=dst)
        sync(device)
        exp.append(time.perf_counter() - start)
    return {
        "copy_bytes_per_s": numel * 4 / statistics.median(copy[1:]),
        "exp_per_s": numel / statistics.median(exp[1:]),
        "numel": numel,
    }


def floor_seconds(floor, case):
    numel = case["n"] * case["k"]
    nbytes = numel * torch.empty((), dtype=getattr(torch, case["dtype"])).element_size()
    return 2 * nbytes / floor["copy_bytes_per_s"] + numel / floor["exp_per_s"]


def memory_probe(spec: str) -> None:
    """In a fresh process: peak RSS growth of one forward + backward, after the inputs exist (printed as JSON)."""
    case, variant, device = json.loads(spec)
    device = torch.device(device)
    x, y, w = make_inputs(case, device)
    x.requires_grad_(True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        variant_fn(variant, case)(x, y, w, case["eps"]).backward()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        base = rss_reset_peak()
        variant_fn(variant, case)(x, y, w, case["eps"]).backward()
        extra = rss_peak() - base
    print(json.dumps({"extra_bytes": extra, "logits_bytes": x.numel() * x.element_size()}))


def measure_memory(case, variant, device):
    result = run_probe(__spec__.name, "--memory-probe", json.dumps([case, variant, str(device)]))
    if "error" in result:
        return {"memory_error": result["error"]}
    return {"extra_memory_x_logits": result["extra_bytes"] / result["logits_bytes"]}


# ---------------------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="K <= 32768 and 3 rounds")
    parser.add_argument(
        "--full", action="store_true", help="also eps = 0 and the slowest variants at the largest K, memory at eps = 0"
    )
    parser.add_argument("--max-k", type=int, default=131072, help="largest class count to run")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--output", type=Path, default=RESULTS / "bench_loss.json")
    parser.add_argument(
        "--release-memory",
        action="store_true",
        help="hf_lsce.fused.empty_cache() before every hf_lsce call (untimed): each call then writes its gradient to "
        "fresh memory, as on a training run's first step, instead of the previous call's",
    )
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        return memory_probe(args.memory_probe)
    rounds = 3 if args.quick else args.rounds
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.time()
    info = machine(device)

    all_cases = cases(min(args.max_k, 32768) if args.quick else args.max_k, args.full)
    biggest = max(c["n"] * c["k"] for c in all_cases if c["dtype"] == "float32")
    floor = measure_floor(device, biggest)
    print(
        f"floor: copy {floor['copy_bytes_per_s'] / 1e9:.1f} GB/s, exp {floor['exp_per_s'] / 1e9:.2f} G/s "
        f"({torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f})",
        flush=True,
    )

    rows = []
    for case in all_cases:
        skipped = {v: applicable(v, case, device, args.full) for v in args.variants}
        variants = [v for v in args.variants if skipped[v] is None]
        errors = {v: check(v, case, device) for v in variants}
        for v, (loss_err, grad_err) in errors.items():
            # hf_lsce computes in fp32 whatever the logits' dtype, and rounds only the bf16 gradient once.
            tolerance = 1e-2 if case["dtype"] == "bfloat16" else 1e-4
            if loss_err > tolerance or grad_err > tolerance:
                message = f"{v} on {case_name(case)}: error {loss_err:.2e} / {grad_err:.2e} vs fp64 truth"
                if v.startswith("hf_lsce"):
                    raise SystemExit(message)
                print(f"note: {message} (a baseline's own rounding; recorded in its row)", flush=True)
        case_rounds = rounds * SMALL_CASE_ROUNDS_FACTOR if calls_per_timing(case) > 1 else rounds
        times = time_case(case, variants, case_rounds, device, args.release_memory)
        floor_s = floor_seconds(floor, case)
        baseline = times.get("torch")
        line = [case_name(case)]
        for v in args.variants:
            row = dict(case, variant=v, rounds=case_rounds, calls_per_timing=calls_per_timing(case))
            if skipped[v] is not None:
                rows.append(dict(row, skipped=skipped[v]))
                continue
            t = times[v]
            row.update(
                spread(t),
                floor_seconds=floor_s,
                x_floor=statistics.median(t) / floor_s,
                loss_rel_error=errors[v][0],
                grad_rel_error=errors[v][1],
            )
            if baseline:
                row.update(ratios(t, baseline))
            # Smaller logits (16 MiB at K = 1024) drown in the process's own noise (lazy initialisation, arenas);
            # eps does not change what is allocated, so eps = 0 cases are not probed (unless --full).
            if not args.no_memory and case["k"] >= 32768 and (case["eps"] > 0 or args.full):
                row.update(measure_memory(case, v, device))
            rows.append(row)
            mem = f" mem {row['extra_memory_x_logits']:.2f}x" if "extra_memory_x_logits" in row else ""
            line.append(f"{v} {row['seconds_median'] * 1e3:.1f} ms ({row.get('ratio_median', 1):.2f}x){mem}")
        print(" | ".join(line), flush=True)
        # After every case, so that an interrupted run keeps what it measured.
        fields = dict(
            floor=floor,
            ignored_fraction=IGNORED_FRACTION,
            release_memory=args.release_memory,
            complete=case is all_cases[-1],
        )
        write_record(args.output, "bench_loss", dict(info), started, rows, **fields)


if __name__ == "__main__":
    main()
