"""The run directory (`trainer.output_dir`): its layout, its checkpoints and the reports read back from it.

    config.yaml          the resolved recipe            run_info.json      versions, git SHA, data checksums
    checkpoint-N/        trainer checkpoints; complete.json once every rank has written (then it counts)
    adapter/             the trained adapter (or model) + processor
    log_history.json     every logged step              bad_samples.jsonl  samples skipped during training
    eval/                metrics.json, predictions.jsonl, step-N/ (evaluation during training)
    merged/              the export (export.output_dir's default), with export_report.json and a model card
Every module that writes or reads one of these goes through `RunDir`, so the layout is spelled out here only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from finetune.base.errors import ConfigError
from finetune.recipe.schema import Config

COMPLETE = "complete.json"
logger = logging.getLogger("finetune.rundir")


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def run_info_file(self) -> Path:
        return self.path / "run_info.json"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def history_file(self) -> Path:
        return self.path / "log_history.json"

    @property
    def bad_samples_file(self) -> Path:
        return self.path / "bad_samples.jsonl"

    @property
    def rewards_file(self) -> Path:
        """RL methods: per reward, the completions it scored and those it could not (NoScore), over the whole run."""
        return self.path / "rewards.json"

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"

    @property
    def metrics_file(self) -> Path:
        return self.eval_dir / "metrics.json"

    def eval_step_dir(self, step: int) -> Path:
        return self.eval_dir / f"step-{step}"

    def checkpoint(self, step: int) -> Path:
        return self.path / f"checkpoint-{step}"

    def checkpoints(self, complete_only: bool = True) -> list[tuple[int, Path]]:
        """checkpoint-N folders by step (complete ones only, by default)."""
        found = [
            (int(p.name.split("-")[1]), p) for p in self.path.glob("checkpoint-*") if p.name.split("-")[1].isdigit()
        ]
        return sorted((step, p) for step, p in found if not complete_only or is_complete(p))

    def run_info(self) -> dict:
        return json.loads(self.run_info_file.read_text()) if self.run_info_file.exists() else {}

    def history(self) -> list[dict]:
        return json.loads(self.history_file.read_text()) if self.history_file.exists() else []

    def metrics(self) -> dict | None:
        return json.loads(self.metrics_file.read_text()) if self.metrics_file.exists() else None

    def skipped_samples(self, start: int = 0) -> list[dict]:
        """The training samples skipped because their media failed to decode (bad_samples.jsonl from byte `start`),
        once per id (every rank that meets a sample lists it) in the order they were met."""
        if not self.bad_samples_file.exists():
            return []
        with open(self.bad_samples_file, "rb") as f:
            f.seek(start)
            entries = [json.loads(line) for line in f.read().decode("utf-8").splitlines() if line.strip()]
        first: dict[str, dict] = {}
        for entry in entries:
            first.setdefault(str(entry.get("id")), entry)
        return list(first.values())

    def unanswered(self) -> list[dict]:
        """The evaluation records whose question could not be asked (their media failed to decode)."""
        predictions = self.eval_dir / "predictions.jsonl"
        if not predictions.exists():
            return []
        records = (json.loads(line) for line in predictions.read_text().splitlines() if line.strip())
        return [r for r in records if r.get("error") is not None]

    def is_trained(self) -> bool:
        """A finished run: its recipe and its adapter are there."""
        return self.config_file.is_file() and self.adapter.is_dir()


def mark_complete(checkpoint: Path, step: int) -> None:
    """Put the completion marker in place atomically: a reader sees it whole or not at all."""
    tmp = checkpoint / (COMPLETE + ".tmp")
    tmp.write_text(json.dumps({"step": step}))
    os.replace(tmp, checkpoint / COMPLETE)


def is_complete(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / COMPLETE).read_text())
    except (OSError, ValueError):
        return False
    return (checkpoint / "trainer_state.json").is_file()


def rotate(run_dir: Path, keep: int | None) -> None:
    """Keep the newest `keep` complete checkpoints; an incomplete one older than the newest complete one goes too
    (a save that was killed). Replaces the Trainer's rotation, which could delete the last complete checkpoint
    before the new one is marked."""
    run = RunDir(run_dir)
    done = run.checkpoints()
    if not done:
        return
    doomed = [p for _, p in done[: -keep or None]] if keep else []
    doomed += [p for step, p in run.checkpoints(complete_only=False) if step < done[-1][0] and not is_complete(p)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)


def resolve_checkpoint(value: str | None, run_dir: Path) -> str | None:
    """`trainer.resume_from_checkpoint`: null, `latest` (the newest checkpoint-N in the run directory) or a path."""
    if value is not None and value != "latest":
        if not is_complete(Path(value)):
            raise ConfigError(
                f"trainer.resume_from_checkpoint={value}: not a complete checkpoint folder (no "
                "complete.json: its save did not finish). Give an earlier checkpoint or `latest`."
            )
        return value
    found = RunDir(run_dir).checkpoints()
    newest = found[-1][1] if found else None
    if value is None:
        if newest:
            logger.warning(
                "%s already holds %s from an earlier run; this run starts again from step 0 (add "
                "trainer.resume_from_checkpoint=latest to continue it instead)",
                run_dir,
                newest.name,
            )
        return None
    if newest is None:
        raise ConfigError(
            f"trainer.resume_from_checkpoint=latest: no complete checkpoint-* folder in {run_dir}. "
            "Drop the option to start afresh, or give a checkpoint folder."
        )
    return str(newest)


def check_checkpoint_fits(checkpoint: str, config: Config, world_size: int) -> None:
    """A DeepSpeed checkpoint resumes only under DeepSpeed with the same number of ranks (its optimizer state is
    sharded per rank), an FSDP2 checkpoint (torch.distributed.checkpoint shards) only under FSDP2; say so at start-up
    instead of failing inside DeepSpeed's or transformers' loader."""
    sharded_by_fsdp = (Path(checkpoint) / "pytorch_model_fsdp_0").is_dir()  # transformers' FSDP model folder
    if sharded_by_fsdp != bool(config.accelerate.fsdp_version):
        raise ConfigError(
            f"{checkpoint} was written under FSDP2: resume it with accelerate=fsdp2 (accelerate.fsdp_version=2)."
            if sharded_by_fsdp
            else f"{checkpoint} was written without FSDP2: resume it with the accelerate and deepspeed recipes it was "
            "trained with (accelerate.fsdp_version=null), or start a new run."
        )
    shards = list(Path(checkpoint).glob("global_step*/*_optim_states.pt"))
    if shards and not config.deepspeed.config_file:
        raise ConfigError(f"{checkpoint} was written under DeepSpeed: resume it with the same deepspeed recipe.")
    if not shards and config.deepspeed.config_file:
        raise ConfigError(
            f"{checkpoint} was written without DeepSpeed: resume it with deepspeed=none, or start a new run."
        )
    if shards and len(shards) != world_size:
        raise ConfigError(
            f"{checkpoint} holds optimizer shards of {len(shards)} DeepSpeed ranks but this run has {world_size}: "
            f"resume with {len(shards)} processes in all (accelerate.processes_per_node x NNODES), or start a new run."
        )
