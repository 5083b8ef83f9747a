"""Generation-based evaluation while training (`evaluation.steps`): every N optimizer steps and at the end.

The held-out samples are split across the ranks, each rank generating for its share with the model as it is
(adapter or full weights, training precision) and the same encoder, budgets and position rule as the
standalone evaluation. Every rank gets the same number of samples (the last share is padded with a repeat)
and steps `generate` in lockstep (`synced_gpus`) with one vision-tower call per forward
(finetune/training/vision_sync.py), so ZeRO-3's parameter gathers pair up. The predictions are gathered, scored
(finetune/evaluation/metrics.py), logged to the recipe's logger as `eval_*` and written to `eval/step-N/`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from finetune.evaluation.evaluate import predict_samples, write_results
from finetune.model import attention
from finetune.records.rundir import RunDir


def shard(n: int, rank: int, world: int) -> list[int]:
    """This rank's sample indices, padded with its last one so that every rank has ceil(n / world) of them."""
    per_rank = -(-n // world)
    mine = list(range(rank, n, world))
    return mine + [mine[-1] if mine else n - 1] * (per_rank - len(mine))


def evaluate_in_training(trainer, samples: list, encoder, batch_size: int, max_new_tokens: int, run_dir: Path) -> dict:
    """Metrics of the current model on `samples` (all ranks call this together); rank 0 writes eval/step-N/."""
    from accelerate.utils import gather_object

    from finetune.evaluation.metrics import score

    world, rank = trainer.accelerator.num_processes, trainer.accelerator.process_index
    indices = shard(len(samples), rank, world)
    model, sync = trainer.model, trainer.one_vision_call
    was_training = model.training
    model.eval()
    if sync is not None:
        sync.in_evaluation = True
    try:
        with attention.for_generation(model):  # generation pads its batches: sdpa, not varlen
            records = predict_samples(
                model,
                encoder,
                [samples[i] for i in indices],
                batch_size,
                max_new_tokens,
                synced_gpus=world > 1,
                progress=trainer.is_world_process_zero(),
            )
    finally:
        if sync is not None:
            sync.in_evaluation = False
        model.train(was_training)
    tagged = [(i, r) for i, r in zip(indices, records)]
    by_index = dict(reversed(gather_object(tagged) if world > 1 else tagged))  # first answer per sample wins
    records = [by_index[i] for i in sorted(by_index)]
    out_dir = RunDir(run_dir).eval_step_dir(trainer.state.global_step)
    if trainer.is_world_process_zero():
        return write_results(out_dir, records)
    answered = [r for r in records if r.get("error") is None]
    return {**score(answered), "unanswered": [r["id"] for r in records if r.get("error") is not None]}


def as_logs(metrics: dict, prefix: str = "eval") -> dict:
    """Flat `eval_*` scalars for the logger: overall metrics, then exact match and token F1 per task."""
    logs = {
        f"{prefix}_{k}": metrics[k]
        for k in ("exact_match", "token_f1", "choice_accuracy", "chance")
        if metrics.get(k) is not None
    }
    for task, values in metrics["tasks"].items():
        logs[f"{prefix}_{task}_exact_match"] = values["exact_match"]
        logs[f"{prefix}_{task}_token_f1"] = values["token_f1"]
    return logs


def publish_final(run_dir: Path, step: int) -> None:
    """The last in-training evaluation is the run's evaluation: copy it to eval/ (what ./launch.sh reports)."""
    for name in ("metrics.json", "predictions.jsonl"):
        shutil.copyfile(RunDir(run_dir).eval_step_dir(step) / name, RunDir(run_dir).eval_dir / name)
