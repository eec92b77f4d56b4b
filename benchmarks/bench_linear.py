"""Forward + backward of a linear head and its loss: hf_lsce's `linear_label_smoothed_cross_entropy` (no logits)
against eager PyTorch, Cut Cross-Entropy's ``torch.compile`` implementation and hf_lsce's fused loss on the logits.

    python -m benchmarks.bench_linear               # eps = 0 unweighted and eps = 0.1 weighted (see `cases`)
    python -m benchmarks.bench_linear --full        # also eps = 0 weighted and eps = 0.1 unweighted
    python -m benchmarks.bench_linear --n 64 --hidden 32 --vocab 512 --rounds 1   # a smoke run, seconds
    python -m benchmarks.report                     # tables (docs/performance.md) from benchmarks/results/

Inputs: ``hidden`` (N, D) and the head's ``weight`` (V, D), both leaves that require grad, drawn once per case
(weights ~ N(0, 4 / D), so the logits have a standard deviation of about 2); 10 % of the labels ignored (-100);
class weights from [0.5, 1.5). Variants (``VARIANTS``):

* ``linear``: `hf_lsce.linear_label_smoothed_cross_entropy` with ``recompute=False`` (gradients in the forward pass);
* ``linear_recompute``: the same with ``recompute=True`` (log-sum-exp kept, logits recomputed in the backward pass;
  the default for bf16/fp16 heads);
* ``torch``: ``F.cross_entropy(hidden @ weight.T, target, class_weight, label_smoothing=eps)``, PyTorch's eager
  path in the inputs' dtype;
* ``cce_compile``: Cut Cross-Entropy's ``impl="torch_compile"`` (``torch.compile`` of the same two lines, with the
  logits upcast to fp32), at eps = 0 without class weights only: it has neither option;
* ``fused_logits``: hf_lsce's `label_smoothed_cross_entropy` (its fused path) on the logits ``hidden @ weight.T``.

Method:
1. Every variant is checked first against an fp64 truth (hf_lsce's reference path on the fp64 logits of the same
   inputs) on the case's first ``CHECK_ROWS`` rows: max relative error of the loss, of ``hidden``'s gradient and of
   ``weight``'s gradient (max absolute error / max absolute value). hf_lsce's variants must pass (1e-4 in fp32, 2e-2
   in bf16) or the run stops; a baseline's own rounding is recorded.
2. Each variant is called once on a small case per dtype (``torch.compile``'s compilation, lazy set-up), untimed.
3. Per case, the variants run interleaved in a rotating order for ``--rounds`` rounds (``--large-rounds`` at
   V > ``LARGE_VOCAB``); each call is one forward + backward of fresh gradients, timed, and the medians (and min /
   max) over rounds are reported, with the per-round ratios to ``torch`` and to ``cce_compile``.
4. Peak extra memory of every call: before it (untimed) the process hands freed memory back to the kernel and resets
   its RSS high-water mark (`harness.peak_rss_growth`; hf_lsce's fused path drops the gradient memory it keeps, so
   every variant writes to fresh pages); after it, the growth less the parameters' gradients (``hidden`` and
   ``weight``, which every method returns), as a multiple of the logits' size (N x V in the inputs' dtype).
   The median over rounds is reported.

Writes ``benchmarks/results/bench_linear.json`` after every case (``"complete": false`` until the last); each row
records the 1-minute load average before its case: the project's VM has 2 cores shared with other work.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

import hf_lsce.fused
from benchmarks.harness import (
    RESULTS,
    available_memory,
    machine,
    peak_rss_growth,
    ratios,
    rotations,
    spread,
    sync,
    write_record,
)
from hf_lsce import label_smoothed_cross_entropy, linear_label_smoothed_cross_entropy

IGNORED_FRACTION = 0.1
CHECK_ROWS = 256
LARGE_VOCAB = 32768  # cases with a larger vocabulary run --large-rounds rounds
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
HF_LSCE_VARIANTS = ("linear", "linear_recompute", "fused_logits")


# ---------------------------------------------------------------------------------------------------------------
# Variants: each takes (hidden, weight, target, class_weight, eps) and returns the mean loss over counted positions.


def linear(h, w, y, cw, eps, recompute):
    return linear_label_smoothed_cross_entropy(h, w, y, class_weight=cw, label_smoothing=eps, recompute=recompute)


def torch_eager(h, w, y, cw, eps):
    return F.cross_entropy(h @ w.T, y, cw, label_smoothing=eps)


def fused_logits(h, w, y, cw, eps):
    return label_smoothed_cross_entropy(h @ w.T, y, cw, label_smoothing=eps)


def cce_compile(h, w, y, cw, eps):
    return _cce_torch_compile()(h, w, y)


@functools.cache
def _cce_torch_compile():
    """CCE's ``torch_compile_linear_cross_entropy``, or ImportError.

    cut-cross-entropy 25.1's package ``__init__`` imports its Triton kernels on every platform but macOS, so
    ``import cut_cross_entropy`` fails where Triton is missing (CPU-only machines) although ``impl="torch_compile"``
    needs none of it. The package is therefore entered without its ``__init__`` (an empty parent module on the
    package's folder), and only ``cut_cross_entropy.torch_compile`` and its plain-PyTorch imports are loaded.
    """
    if "cut_cross_entropy" not in sys.modules:
        spec = importlib.util.find_spec("cut_cross_entropy")
        if spec is None or spec.submodule_search_locations is None:
            raise ImportError("cut-cross-entropy is not installed")
        package = types.ModuleType("cut_cross_entropy")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["cut_cross_entropy"] = package
    from cut_cross_entropy.torch_compile import torch_compile_linear_cross_entropy

    return torch_compile_linear_cross_entropy


VARIANTS = {
    "linear": functools.partial(linear, recompute=False),
    "linear_recompute": functools.partial(linear, recompute=True),
    "torch": torch_eager,
    "cce_compile": cce_compile,
    "fused_logits": fused_logits,
}
# Memory each variant needs beyond its inputs, in fp32 logits (N x V x 4 bytes), to skip it on a machine without.
LOGITS_COPIES = {"torch": 4, "cce_compile": 4, "fused_logits": 3, "linear": 0.5, "linear_recompute": 0.5}


def applicable(variant: str, case: dict) -> str | None:
    """None if ``variant`` runs on ``case``, else why not."""
    if variant == "cce_compile":
        if case["eps"] or case["weighted"]:
            return "eps = 0 without class weights only"
        try:
            _cce_torch_compile()
        except ImportError as error:
            return f"cut-cross-entropy: {error}"
    need = LOGITS_COPIES[variant] * case["n"] * case["v"] * 4
    if need > 0.7 * available_memory():
        return f"needs ~{need / 2**30:.0f} GiB"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Cases


def cases(n: int, hidden: int, vocabs: list[int], dtypes: list[str], full: bool) -> list[dict]:
    """Per dtype and V: eps = 0 without class weights (the CCE anchor's case) and eps = 0.1 with them; with ``full``
    also eps = 0 with weights and eps = 0.1 without. On the shared 2-core VM one call at V = 131072 takes tens of
    seconds, and the options cost little next to the matrix products: the default grid is the two corners."""
    settings = [(0.0, False), (0.0, True), (0.1, False), (0.1, True)] if full else [(0.0, False), (0.1, True)]
    return [
        dict(n=n, d=hidden, v=v, dtype=dtype, eps=eps, weighted=weighted)
        for dtype in dtypes
        for v in vocabs
        for eps, weighted in settings
    ]


def case_name(case: dict) -> str:
    weights = "weighted" if case["weighted"] else "plain"
    return f"N={case['n']} D={case['d']} V={case['v']} {case['dtype']} eps={case['eps']} {weights}"


def make_inputs(case: dict, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    n, d, v = case["n"], case["d"], case["v"]
    dtype = getattr(torch, case["dtype"])
    hidden = torch.randn(n, d, generator=generator).to(dtype)
    weight = (torch.randn(v, d, generator=generator) * (2 / d**0.5)).to(dtype)
    target = torch.randint(0, v, (n,), generator=generator)
    target[torch.rand(n, generator=generator) < IGNORED_FRACTION] = -100
    # In the inputs' dtype: F.cross_entropy requires the logits' dtype.
    class_weight = (torch.rand(v, generator=generator) + 0.5).to(dtype) if case["weighted"] else None
    return hidden, weight, target, class_weight


# ---------------------------------------------------------------------------------------------------------------
# Measurements


def check(variants: list[str], case: dict) -> dict[str, dict[str, float]]:
    """Max relative errors of the loss and of both gradients against the fp64 truth, on the first CHECK_ROWS rows."""
    hidden, weight, target, class_weight = make_inputs(case)
    hidden, target = hidden[:CHECK_ROWS], target[:CHECK_ROWS]
    h64 = hidden.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    cw64 = None if class_weight is None else class_weight.double()
    truth = label_smoothed_cross_entropy(
        h64 @ w64.T, target, cw64, label_smoothing=case["eps"], implementation="reference"
    )
    truth.backward()
    errors = {}
    for variant in variants:
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = VARIANTS[variant](h, w, target, class_weight, case["eps"])
        loss.backward()
        errors[variant] = {
            "loss_rel_error": abs(loss.double().item() - truth.item()) / max(abs(truth.item()), 1e-30),
            "grad_hidden_rel_error": _relative(h.grad, h64.grad),
            "grad_weight_rel_error": _relative(w.grad, w64.grad),
        }
    return errors


def _relative(value: torch.Tensor, truth: torch.Tensor) -> float:
    return ((value.double() - truth).abs().max() / truth.abs().max().clamp_min(1e-30)).item()


def call(variant: str, case: dict, inputs) -> tuple[float, int]:
    """Seconds of one forward + backward with fresh gradients, and the RSS growth in bytes during it."""
    hidden, weight, target, class_weight = inputs
    hidden.grad = weight.grad = None
    hf_lsce.fused.empty_cache()  # the fused path's kept gradient memory: every variant starts from the same state
    sync(hidden.device)
    with peak_rss_growth() as growth:
        start = time.perf_counter()
        VARIANTS[variant](hidden, weight, target, class_weight, case["eps"]).backward()
        sync(hidden.device)
        elapsed = time.perf_counter() - start
    hidden.grad = weight.grad = None
    return elapsed, growth["bytes"]


def warm_up(variants: list[str], dtypes: list[str], n: int, hidden: int, vocab: int) -> None:
    """One untimed call of each variant per dtype on a small case: compilation and lazy set-up happen here."""
    for dtype in dtypes:
        for weighted, eps in ((False, 0.0), (True, 0.1)):
            case = dict(n=min(n, 512), d=hidden, v=min(vocab, 4096), dtype=dtype, eps=eps, weighted=weighted)
            inputs = make_inputs(case)
            inputs[0].requires_grad_(True)
            inputs[1].requires_grad_(True)
            for variant in variants:
                if applicable(variant, case) is None:
                    call(variant, case, inputs)


def time_case(case: dict, variants: list[str], rounds: int) -> dict[str, dict[str, list]]:
    inputs = make_inputs(case)
    inputs[0].requires_grad_(True)
    inputs[1].requires_grad_(True)
    results = {v: {"seconds": [], "extra_bytes": []} for v in variants}
    # The parameters' gradients, which every variant returns, are not extra memory.
    gradients = sum(t.numel() * t.element_size() for t in inputs[:2])
    for _, order in rotations(variants, rounds):
        for variant in order:
            seconds, growth = call(variant, case, inputs)
            results[variant]["seconds"].append(seconds)
            results[variant]["extra_bytes"].append(growth - gradients)
    return results


# ---------------------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4096, help="tokens")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size D")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072], help="vocabulary sizes V")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=3, help=f"rounds per case with V <= {LARGE_VOCAB}")
    parser.add_argument("--large-rounds", type=int, default=1, help=f"rounds per case with V > {LARGE_VOCAB}")
    parser.add_argument("--full", action="store_true", help="also eps = 0 with weights and eps = 0.1 without")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--output", type=Path, default=RESULTS / "bench_linear.json")
    args = parser.parse_args()
    for name in ("n", "hidden", "rounds", "large_rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.vocab) < 2:
        parser.error(f"--vocab must be >= 2, got {min(args.vocab)}")
    device = torch.device("cpu")
    started = time.time()
    info = machine(device)
    all_cases = cases(args.n, args.hidden, args.vocab, args.dtypes, args.full)
    print(f"{len(all_cases)} cases, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}", flush=True)
    warm_up(args.variants, args.dtypes, args.n, args.hidden, min(args.vocab))

    rows = []
    for case in all_cases:
        load = os.getloadavg()[0]
        skipped = {v: applicable(v, case) for v in args.variants}
        variants = [v for v in args.variants if skipped[v] is None]
        errors = check(variants, case)
        for variant, error in errors.items():
            worst = max(error.values())
            if worst > TOLERANCE[case["dtype"]]:
                message = f"{variant} on {case_name(case)}: max relative error {worst:.2e} against the fp64 truth"
                if variant in HF_LSCE_VARIANTS:
                    raise SystemExit(message)
                print(f"note: {message} (a baseline's own rounding; recorded in its row)", flush=True)
        rounds = args.large_rounds if case["v"] > LARGE_VOCAB else args.rounds
        results = time_case(case, variants, rounds)
        logits_bytes = case["n"] * case["v"] * torch.empty((), dtype=getattr(torch, case["dtype"])).element_size()
        line = [case_name(case)]
        for variant in args.variants:
            row = dict(case, variant=variant, rounds=rounds, load_average=load)
            if skipped[variant] is not None:
                rows.append(dict(row, skipped=skipped[variant]))
                continue
            result = results[variant]
            row.update(spread(result["seconds"]), **errors[variant])
            for anchor, prefix in (("torch", "ratio"), ("cce_compile", "ratio_cce")):
                if anchor in results:
                    row.update(ratios(result["seconds"], results[anchor]["seconds"], prefix))
            row["extra_memory_x_logits"] = statistics.median(result["extra_bytes"]) / logits_bytes
            rows.append(row)
            line.append(
                f"{variant} {row['seconds_median']:.2f} s ({row.get('ratio_median', 1):.2f}x) "
                f"mem {row['extra_memory_x_logits']:.2f}x"
            )
        print(" | ".join(line), flush=True)
        # After every case, so that an interrupted run keeps what it measured.
        write_record(
            args.output,
            "bench_linear",
            dict(info),
            started,
            rows,
            ignored_fraction=IGNORED_FRACTION,
            check_rows=CHECK_ROWS,
            large_vocab=LARGE_VOCAB,
            complete=case is all_cases[-1],
        )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
