"""The summary `./launch.sh` prints when a run ends: where everything went (run directory, recipe, adapter,
evaluation, export, logs) and what the run could not use: training samples skipped because their media failed to
decode (bad_samples.jsonl; for RL, prompts), completions an RL reward could not score (rewards.json) and
evaluation questions that could not be asked, each with the count, the file that
lists them all and the first few ids and reasons, so that a user who looked away still sees them."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.recipe.schema import Config
from finetune.records.rundir import RunDir
from finetune.training.reward_eval import summary_line

SHOWN_SKIPS = 3  # samples named in the summary per list; the files hold them all


def file_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def skip_lines(label: str, entries: list[dict], what: str, where: Path) -> list[str]:
    """`label` N <what>: <file>, then the first few ids with their reasons."""
    if not entries:
        return []
    lines = [f"  {label:<12} {len(entries)} {what}: {where}"]
    for entry in entries[:SHOWN_SKIPS]:
        reason = str(entry.get("error", "")).splitlines()[0] if entry.get("error") else entry.get("kind", "?")
        lines.append(f"    {entry.get('id')}: {reason[:240]}")
    if len(entries) > SHOWN_SKIPS:
        lines.append(f"    ... and {len(entries) - SHOWN_SKIPS} more")
    return lines


def not_evaluated(config: Config) -> list[str]:
    """A given data.eval that the run did not evaluate, with why and the key to change."""
    if not config.data.eval or config.evaluates_after_training() or config.evaluation.steps:
        return []
    if config.method.name != "sft":  # pairs or RL prompts: scored during training only
        return [
            f"  evaluation:  not run: data.eval={config.data.eval} was given but evaluation.steps is null; set "
            f"evaluation.steps=N to score it during training (method={config.method.name})"
        ]
    return [
        f"  evaluation:  not run: data.eval={config.data.eval} was given but evaluation.after_training=false; set "
        "evaluation.after_training=auto to evaluate it after training (or run `./launch.sh evaluate` with this run's "
        "overrides now)"
    ]


def reward_lines(run: RunDir) -> list[str]:
    """RL methods: how many completions each reward scored, and how many it could not (NoScore: no answer it could
    read), over the run."""
    if not run.rewards_file.exists():
        return []
    counts = json.loads(run.rewards_file.read_text())
    lines = [f"  rewards:     {run.rewards_file}"]
    for name, c in counts.items():
        total = c["scored"] + c["no_score"]
        share = f" ({100 * c['no_score'] / total:.0f}%)" if total else ""
        lines.append(f"    {name}: {c['scored']} completions scored, {c['no_score']} not scored{share}")
    return lines


def summary(config: Config, skipped_from: int = 0) -> str:
    """The end-of-run summary; the skipped training samples are those bad_samples.jsonl lists from byte
    `skipped_from` (what this launch appended)."""
    run = RunDir(config.trainer.output_dir)
    run_dir = run.path
    lines = [
        f"Run directory: {run_dir.resolve()}",
        f"  config:      {run.config_file}  (versions, git SHA, command: {run.run_info_file.name})",
        f"  adapter:     {run.adapter}",
    ]
    skipped = run.skipped_samples(skipped_from)
    plural = len(skipped) != 1
    lines += skip_lines(
        "skipped:",
        skipped,
        f"training sample{'s' if plural else ''} failed to decode and {'were' if plural else 'was'} left out",
        run.bad_samples_file,
    )
    lines += reward_lines(run)
    lines += not_evaluated(config)
    m = run.metrics()
    if m is not None and "reward" in m:  # an RL method's held-out prompts (finetune/training/reward_eval.py)
        lines.append(f"  evaluation:  {run.metrics_file}  ({summary_line(m)})")
    elif m is not None:
        lines.append(f"  evaluation:  {run.metrics_file}  (accuracy {m['accuracy']:.3f}, chance {m['chance']:.3f})")
        unanswered = run.unanswered()
        plural = len(unanswered) != 1
        lines += skip_lines(
            "unanswered:",
            unanswered,
            f"evaluation sample{'s' if plural else ''} could not be asked ({'their' if plural else 'its'} media "
            "failed to decode)",
            run.eval_dir / "predictions.jsonl",
        )
    report_file = Path(config.export.output_dir) / "export_report.json"
    if report_file.exists():
        r = json.loads(report_file.read_text())
        frames = r.get("served_grids", {}).get("video_input") == "frames"
        lines.append(
            f"  merged:      {r['merged_dir']}  (reloaded; max |logit diff| {r['max_abs_logit_diff']:.1e}"
            + (
                "; video grids checked on frames we decoded: transformers cannot decode video files here)"
                if frames
                else ")"
            )
        )
    if config.logger.report_to == "wandb":
        lines.append(
            f"  wandb:       {run_dir / 'wandb'}  (offline runs: `wandb sync {run_dir / 'wandb'}/offline-run-*`)"
        )
    elif config.logger.report_to == "tensorboard":
        lines.append(f"  tensorboard: tensorboard --logdir {run_dir}")
    return "\n".join(lines)
