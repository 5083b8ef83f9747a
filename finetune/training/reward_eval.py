"""Evaluation during training for the RL methods (`evaluation.steps` with method=grpo, dapo, dr_grpo, gspo): before
the first step (the base model's rewards), every N optimizer steps and at the end, the held-out prompts (data.eval, in the training prompts' format) get one greedy
completion each, scored by the recipe's rewards.

Each rank takes its share of the prompts (periodic_eval.shard: the same number on every rank, the last padded with a
repeat) and generates as the rollouts do (finetune/evaluation/rollouts.py `generate_rollouts`: the same encoder, pixel
budgets, position rule, completion length and end tokens, one vision-tower call per generate call, every rank stepping
in lockstep under ZeRO-3, a text-only rank beside a video rank included), with the most likely token at each step. The
completions are scored on their rank (the rewards get the same extras as in training) and the records gathered, so
every rank computes the same metrics from the same list, whatever the number of ranks:

    eval_reward             the mean over the prompts of the weighted reward total (a NoScore adds 0, as in training)
    eval_reward/<name>      each reward's mean over the completions it scored
    eval_no_score/<name>    the completions it could not score

Rank 0 writes eval/step-N/predictions.jsonl (id, prompt, solution, completion, finished, reward, rewards) and
metrics.json; the last evaluation is published to eval/ (periodic_eval.publish_final), which ./launch.sh reports.
Held-out completions are not counted in rewards.json (the run's training completions).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from finetune.base.errors import DataError
from finetune.evaluation.evaluate import question_of
from finetune.evaluation.rollouts import generate_rollouts
from finetune.model import attention
from finetune.records.rundir import RunDir
from finetune.training.periodic_eval import publish_final, shard

logger = logging.getLogger("finetune.grpo")


def completion_records(trainer, items: list, batch_size: int) -> list[dict]:
    """One record per RL prompt of `items` (this rank's share; every rank calls this with as many): its greedy
    completion and rewards. A prompt whose media fail to decode is asked as the training stand-in (every rank must
    still call generate) and recorded with its `error`, unscored."""
    encoder, m = trainer._encoder, trainer._recipe.method
    encoded, errors = [], []
    for item in items:
        try:
            encoded.append(encoder.encode(item.prompt, generation_prompt=True))
            errors.append(None)
        except DataError as err:
            logger.warning("cannot ask held-out prompt %s: %s", item.id, err)
            encoded.append(encoder.encode(trainer._find_stand_in().prompt, generation_prompt=True))
            errors.append(str(err))
    with trainer._generation_model() as model, attention.for_generation(model):
        rollouts = generate_rollouts(
            model,
            encoder,
            [item.prompt for item in items],
            1,
            m.max_completion_length,
            prompts_per_call=batch_size,
            synced_gpus=trainer._synced(),
            encoded=encoded,
            greedy=True,
        )
    records = []
    for item, rollout, error in zip(items, rollouts, errors):
        record = {"id": item.id, "prompt": question_of(item.prompt), "solution": item.solution}
        if error is not None:
            records.append({**record, "completion": None, "error": error})
            continue
        extras = {**trainer.frame_facts(item), **item.extras}  # as in training: the record's own columns win
        scores = trainer.reward_table.score_group(rollout.texts, item.solution, item.id, extras, tally=False)
        records.append(
            {
                **record,
                "completion": rollout.texts[0],
                "finished": rollout.finished[0],
                "reward": scores.totals[0],
                "rewards": {name: column[0] for name, column in scores.scores.items()},
            }
        )
    return records


def merge_shards(tagged: list[tuple[int, dict]]) -> list[dict]:
    """The ranks' (prompt index, record) pairs as one list in prompt order, each prompt once (a rank's padding
    repeats a prompt another rank or itself answered: the first answer wins)."""
    by_index = dict(reversed(tagged))
    return [by_index[i] for i in sorted(by_index)]


def reward_metrics(records: list[dict], names: list[str], step: int) -> dict:
    """The held-out metrics of `records` (every prompt's, in order): see the module docstring."""
    answered = [r for r in records if r.get("error") is None]
    if not answered:
        raise DataError(
            f"none of the {len(records)} held-out prompts could be asked (their media failed to decode), e.g. "
            f"{records[0]['error']}"
        )
    rewards = {}
    for name in names:
        scored = [r["rewards"][name] for r in answered if r["rewards"][name] is not None]
        rewards[name] = {
            "mean": sum(scored) / len(scored) if scored else None,
            "scored": len(scored),
            "no_score": len(answered) - len(scored),
        }
    return {
        "step": step,
        "n": len(answered),
        "reward": sum(r["reward"] for r in answered) / len(answered),
        "finished": sum(r["finished"] for r in answered) / len(answered),
        "rewards": rewards,
        "unanswered": [r["id"] for r in records if r.get("error") is not None],
    }


def as_logs(metrics: dict, prefix: str = "eval") -> dict:
    """`eval_reward`, `eval_reward/<name>` (when the reward scored any completion), `eval_no_score/<name>`."""
    logs = {f"{prefix}_reward": metrics["reward"]}
    for name, values in metrics["rewards"].items():
        if values["mean"] is not None:
            logs[f"{prefix}_reward/{name}"] = values["mean"]
        logs[f"{prefix}_no_score/{name}"] = values["no_score"]
    return logs


def evaluate_rewards_in_training(trainer, prompts: list, batch_size: int, run_dir: Path) -> dict:
    """The held-out metrics of the current policy (all ranks call this together); rank 0 writes eval/step-N/."""
    from accelerate.utils import gather_object

    world, rank = trainer.accelerator.num_processes, trainer.accelerator.process_index
    indices = shard(len(prompts), rank, world)
    records = completion_records(trainer, [prompts[i] for i in indices], batch_size)
    tagged = list(zip(indices, records))
    records = merge_shards(gather_object(tagged) if world > 1 else tagged)
    step = trainer.state.global_step
    metrics = reward_metrics(records, trainer.reward_table.names, step)
    if trainer.is_world_process_zero():
        out_dir = RunDir(run_dir).eval_step_dir(step)
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "predictions.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def finish_reward_evaluation(trainer, run_dir: Path) -> None:
    """After training: the last step evaluated too (the trainer evaluates at the end; a resumed run that ended at a
    checkpoint may not have), and that evaluation published to eval/ (metrics.json, predictions.jsonl)."""
    step = trainer.state.global_step
    if not any(h.get("step") == step and "eval_reward" in h for h in trainer.state.log_history):
        trainer.evaluate()
    if trainer.is_world_process_zero():
        publish_final(run_dir, step)
        metrics = RunDir(run_dir).metrics()
        logger.info("held-out prompts at step %d: %s", step, summary_line(metrics))


def summary_line(metrics: dict) -> str:
    """`mean reward 0.412 over 32 prompts (exact_match 0.250, 4 not scored; ...)`: the run summary's words."""
    parts = []
    for name, values in metrics["rewards"].items():
        mean = "-" if values["mean"] is None else f"{values['mean']:.3f}"
        parts.append(f"{name} {mean}" + (f", {values['no_score']} not scored" if values["no_score"] else ""))
    return f"mean reward {metrics['reward']:.3f} over {metrics['n']} prompts ({'; '.join(parts)})"
