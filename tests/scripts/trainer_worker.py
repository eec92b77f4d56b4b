"""torchrun worker for the trainer invariants: `torchrun --nproc_per_node 2 trainer_worker.py OUT [TASK ...]`.

Every rank trains each task once per split (2 processes × batch 4; 2 processes × batch 2 × accumulation 2; and the
negative control, a per-micro-batch mean, at 2 × 2 × 2); rank 0 writes the parameters after the step and the losses
to OUT (torch.save) and OUT.json. The task "sft" (TRL's SFTTrainer through SmoothingSFTTrainer, needs TRL) runs the
two splits without the control, as does "sample_weight/TASK" (TASK, "sft" included, with per-example
weights).
"""

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trainer_tasks import SAMPLE_WEIGHTS, TASKS, PerMicroBatchMeanTrainer, dump, run, weighted_dataset  # noqa: E402

SPLITS = {"2x4": (4, 1), "2x2x2": (2, 2)}


def main() -> None:
    out = sys.argv[1]
    tasks = sys.argv[2:] or TASKS
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in tasks:
            if task == "sft":
                import trainer_sft_tasks

                for name, (batch_size, grad_accum) in SPLITS.items():
                    results[f"sft/{name}"] = trainer_sft_tasks.run(f"{tmp}/sft-{name}", batch_size, grad_accum)
                continue
            if task.startswith("sample_weight/"):
                # sample_weight/TASK: the task with per-example weights, both splits, no control.
                base = task.split("/", 1)[1]
                for name, (batch_size, grad_accum) in SPLITS.items():
                    out_dir = f"{tmp}/{base}-weighted-{name}"
                    if base == "sft":
                        import trainer_sft_tasks

                        result = trainer_sft_tasks.run(out_dir, batch_size, grad_accum, sample_weights=SAMPLE_WEIGHTS)
                    else:
                        result = run(base, out_dir, batch_size, grad_accum, train_dataset=weighted_dataset(base))
                    results[f"{task}/{name}"] = result
                continue
            for name, (batch_size, grad_accum) in SPLITS.items():
                results[f"{task}/{name}"] = run(task, f"{tmp}/{task}-{name}", batch_size, grad_accum)
            results[f"{task}/control"] = run(task, f"{tmp}/{task}-control", 2, 2, trainer_cls=PerMicroBatchMeanTrainer)
    if int(os.environ.get("RANK", "0")) == 0:
        dump(out, results)


if __name__ == "__main__":
    main()
