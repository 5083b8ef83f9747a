"""What can go wrong while a run trains, and how each is contained.

- A sample whose media fail to decode (corrupt past the header, which the pre-pass cannot see) is left out
  by the collator (finetune/model/batching.py) and handed here: logged, appended to `bad_samples.jsonl` in the run
  directory, counted across ranks; past `data.max_bad_samples` the run stops with the list.
- A NaN or infinite loss on any rank stops the run naming the step and the samples of every rank's rows
  (`trainer.nonfinite_loss=stop`), or drops that step's gradients (`skip`; not under DeepSpeed).
- A checkpoint counts only once every rank has written it and a `complete.json` marker was put in place
  atomically (written, then renamed), so a kill during a save never leaves a checkpoint that resume would
  load half-written; out of disk while saving stops the run and leaves the previous checkpoint as it was.
All ranks make the same decision at the same step: the counts travel in one small all-gather per step.
"""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import torch

from finetune.base.errors import DataError, RunStopped
from finetune.model.media_features import MEDIA
from finetune.records.rundir import RunDir, mark_complete, rotate

logger = logging.getLogger("finetune.faults")


def bad_sample_limit(value: float | None, num_samples: int) -> int:
    """`data.max_bad_samples`: null -> max(10, 1 % of the samples); >= 1 -> that many; in (0, 1) -> that fraction."""
    if value is None:
        return max(10, num_samples // 100)
    return int(value) if value >= 1 else int(value * num_samples)


class StepGuard:
    def __init__(self, run_dir: Path, limit: int, nonfinite: str, accelerator):
        self.run_dir, self.limit, self.nonfinite, self.accelerator = run_dir, limit, nonfinite, accelerator
        self.seen: set[str] = set()  # bad sample ids this rank has reported
        self.bad_total = 0  # across ranks
        self.sample_ids: list[list[str]] = []
        self.new_bad = 0

    def take(self, inputs: dict, step: int) -> None:
        """Pop the collator's bookkeeping from a batch; report samples that failed to decode."""
        self.sample_ids = inputs.pop("sample_ids", [])
        self.new_bad = 0
        for bad in inputs.pop("bad_samples", []):
            if bad["id"] in self.seen:
                continue
            self.seen.add(bad["id"])
            self.new_bad += 1
            logger.warning("skipping sample %s (step %d): %s", bad["id"], step + 1, bad["error"])
            with open(RunDir(self.run_dir).bad_samples_file, "a") as f:  # one short line per write: appends stay whole
                f.write(json.dumps({**bad, "step": step + 1, "rank": self.accelerator.process_index}) + "\n")

    def after_step(self, loss: torch.Tensor, real_tokens: int, step: int, model) -> int:
        """Check the step on every rank together; returns the real tokens of all ranks."""
        finite = bool(torch.isfinite(loss.detach()).all())
        local = torch.tensor([real_tokens, self.new_bad, 0 if finite else 1], device=self.accelerator.device)
        totals = self.accelerator.gather(local).reshape(-1, 3).sum(0).tolist()
        self.bad_total += int(totals[1])
        if totals[2]:
            self._nonfinite(step, model)
        if self.bad_total > self.limit:
            raise DataError(
                f"{self.bad_total} training samples failed to decode, more than data.max_bad_samples allows "
                f"({self.limit}); they are listed in {RunDir(self.run_dir).bad_samples_file}. Fix or remove them (python -m "
                "finetune.validate --decode lists every one), or raise data.max_bad_samples."
            )
        return int(totals[0])

    def _nonfinite(self, step: int, model) -> None:
        from accelerate.utils import gather_object

        ids = gather_object([self.sample_ids]) if self.accelerator.num_processes > 1 else [self.sample_ids]
        rows = "; ".join(f"rank {r}: {', '.join(map(str, sum(rank_rows, [])))}" for r, rank_rows in enumerate(ids))
        if self.nonfinite == "skip":
            model.zero_grad(set_to_none=True)  # nothing of this accumulation window reaches the weights
            logger.warning("step %d: non-finite loss; its gradients were dropped (samples %s)", step + 1, rows)
            return
        raise DataError(
            f"step {step + 1}: the loss is NaN or infinite (samples {rows}). Lower trainer.learning_rate, check "
            "these samples, use trainer.precision=bf16 instead of fp16, or set trainer.nonfinite_loss=skip."
        )


def out_of_disk(err: BaseException) -> bool:
    return (isinstance(err, OSError) and err.errno == errno.ENOSPC) or "No space left" in str(err)


def batch_summary(inputs: dict) -> dict:
    """What a training batch asks of memory, taken before its forward: rows x tokens, and vision patches."""
    rows, tokens = inputs["input_ids"].shape
    summary = {"rows": rows, "tokens_per_row": tokens}
    for kind, pixels, grid in MEDIA:  # the batch keys of each modality (finetune/model/media_features.py)
        if inputs.get(pixels) is not None:
            summary[f"{kind}_patches"] = int(inputs[pixels].shape[0])
            summary[f"{kind}s"] = int(inputs[grid].shape[0])
    return summary


def out_of_memory_message(config, step: int, summary: dict | None, err: BaseException) -> str:
    """One message for a GPU out-of-memory error: where it happened, and the recipe values that lower memory."""
    m, t = config.model, config.trainer
    budget = t.max_tokens_per_row or config.data.max_length
    at = f"step {step + 1}"
    if summary:
        at += f", a batch of {summary['rows']} row(s) x {summary['tokens_per_row']} tokens"
        media = [
            f"{summary[k + '_patches']:,} {k} patches ({summary[k + 's']} {k}{'s' if summary[k + 's'] != 1 else ''})"
            for k in ("image", "video")
            if k + "s" in summary
        ]
        at += f" with {', '.join(media)}" if media else " (text only)"
    used = ""
    if torch.cuda.is_available():
        used = f" Peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB of {torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB."
    first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
    return (
        f"out of GPU memory at {at}.{used} ({first_line})\n"
        "Lower memory with the recipe, then rerun (trainer.resume_from_checkpoint=latest keeps the steps done):\n"
        f"  trainer.max_tokens_per_row={budget} -> smaller rows (packing), or trainer.per_device_train_batch_size="
        f"{t.per_device_train_batch_size} -> fewer rows per step (raise trainer.gradient_accumulation_steps to keep the batch)\n"
        f"  model.video_max_pixels={m.video_max_pixels}, model.video_total_pixels={m.video_total_pixels}, "
        f"model.video_max_frames={m.video_max_frames}, model.max_pixels={m.max_pixels} -> fewer vision tokens per sample\n"
        f"  trainer.gradient_checkpointing={str(t.gradient_checkpointing).lower()} -> true recomputes the LLM's "
        "activations in backward"
        + (
            " (and trainer.gradient_checkpointing_vision_tower=true the ViT's)"
            if config.parts.vision_tower != "frozen"
            else ""
        )
        + "\n"
        f"  deepspeed: ZeRO stage {config.deepspeed.zero_stage} -> deepspeed=zero2 / zero3 on several GPUs shards optimizer state"
        " (and weights), deepspeed=zero3_offload also moves them to CPU memory\n"
        "  model.attn_implementation=auto (varlen on GPUs) avoids sdpa's dense (rows, 1, L, L) mask on packed rows"
    )


def save_marked_checkpoint(trainer, save, model, trial) -> None:
    """`save(model, trial)` (the Trainer's own checkpoint save), then the completion marker once every rank has
    written, and the rotation to `trainer.save_total_limit`; running out of disk stops the run with the fix. Every
    trainer here (SFT, preference, GRPO) saves through it."""
    run_dir, step = Path(trainer.args.output_dir), trainer.state.global_step
    try:
        save(model, trial)
    except Exception as err:
        if not out_of_disk(err):
            raise
        raise RunStopped(
            f"out of disk space while writing {run_dir}/checkpoint-{step} ({err}). It is not "
            "marked complete, so resuming ignores it; earlier checkpoints are intact. Free space "
            "and run again with trainer.resume_from_checkpoint=latest."
        ) from None
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        mark_complete(RunDir(run_dir).checkpoint(step), step)
        rotate(run_dir, trainer._recipe.trainer.save_total_limit)
