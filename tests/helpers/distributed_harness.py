"""`finetune.train` with test-only fault injection, launched like the real thing (`accelerate launch`, or plain
`python tests/helpers/distributed_harness.py <overrides>` for one process).

    HARNESS_KILL_AT_STEP=N         every rank SIGKILLs itself right after checkpoint-N is complete on disk
    HARNESS_KILL_DURING_SAVE=N     SIGKILL while checkpoint-N is being written (weights saved, optimizer not yet)
    HARNESS_FULL_DISK_AT_STEP=N    writing checkpoint-N's optimizer state fails with ENOSPC (disk full)
    HARNESS_NAN_AT_STEP=N          the loss of optimizer step N is NaN
    HARNESS_KILL_RANK=R:N          rank R SIGKILLs itself at the start of step N (a rank that dies mid-run)
    HARNESS_SPLIT_MODALITIES=1     batches of one-sample rows go to ranks by modality: rank 0 gets only text-only rows,
                                   rank 1 only rows of video samples (the case that hangs ZeRO-3 without
                                   finetune/training/vision_sync.py)
    HARNESS_TEXT_RANK=1            packed rows by modality: each step, rank 0 trains on a row of two text-only samples and
                                   rank 1 on a row of an image and a video sample (one process: both rows in one batch,
                                   the same global batch); `text_rank_rows`
    HARNESS_GRAD_VALUES_DIR=DIR    rank 0 writes DIR/step-N.pt: every trainable parameter's gradient after step N's
                                   backward (reduced over the ranks; gathered whole from FSDP2's shards)
    HARNESS_GRADS_DIR=DIR          every rank writes DIR/rank-R.jsonl: per training step, the trainable parameters whose
                                   gradient its own backward computed (a hook on each), and which of them it found
                                   non-zero
"""

import errno
import json
import os
import signal
import sys

import finetune.data.packing
import finetune.training.workflow
from finetune.cli.main import run_command

ENV = os.environ.get


def faulty_trainer() -> None:
    class Faulty(finetune.training.workflow.VisionLanguageSFTTrainer):
        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            if ENV("HARNESS_KILL_AT_STEP") and self.state.global_step == int(ENV("HARNESS_KILL_AT_STEP")):
                self.accelerator.wait_for_everyone()  # every rank's shards are written
                os.kill(os.getpid(), signal.SIGKILL)

        def _save_optimizer_and_scheduler(self, output_dir):
            step = self.state.global_step
            if ENV("HARNESS_KILL_DURING_SAVE") and step == int(ENV("HARNESS_KILL_DURING_SAVE")):
                os.kill(os.getpid(), signal.SIGKILL)
            if ENV("HARNESS_FULL_DISK_AT_STEP") and step == int(ENV("HARNESS_FULL_DISK_AT_STEP")):
                with open(os.path.join(output_dir, "optimizer.pt"), "wb") as f:
                    f.write(b"\0" * 1000)  # a partial write, then the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(output_dir, "optimizer.pt"))
            super()._save_optimizer_and_scheduler(output_dir)

        def compute_loss(self, model, inputs, *args, **kwargs):
            result = super().compute_loss(model, inputs, *args, **kwargs)
            if ENV("HARNESS_NAN_AT_STEP") and self.state.global_step + 1 == int(ENV("HARNESS_NAN_AT_STEP")):
                loss = result[0] if isinstance(result, tuple) else result
                loss = loss * float("nan")
                return (loss, *result[1:]) if isinstance(result, tuple) else loss
            return result

        def training_step(self, model, inputs, num_items_in_batch=None):
            if ENV("HARNESS_KILL_RANK"):
                rank, step = map(int, ENV("HARNESS_KILL_RANK").split(":"))
                if self.accelerator.process_index == rank and self.state.global_step + 1 == step:
                    os.kill(os.getpid(), signal.SIGKILL)
            if ENV("HARNESS_GRAD_VALUES_DIR"):
                loss = super().training_step(model, inputs, num_items_in_batch)
                save_gradients(self, model, ENV("HARNESS_GRAD_VALUES_DIR"))
                return loss
            if not ENV("HARNESS_GRADS_DIR"):
                return super().training_step(model, inputs, num_items_in_batch)
            if not hasattr(self, "_computed"):
                self._computed = {}
                for name, param in model.named_parameters():
                    if param.requires_grad:
                        param.register_hook(lambda grad, name=name: self._record(name, grad))
            loss = super().training_step(model, inputs, num_items_in_batch)
            line = {
                "step": self.state.global_step + 1,
                "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
                "computed": sorted(self._computed),
                "nonzero": sorted(n for n, nonzero in self._computed.items() if nonzero),
            }
            path = os.path.join(ENV("HARNESS_GRADS_DIR"), f"rank-{self.accelerator.process_index}.jsonl")
            with open(path, "a") as f:
                f.write(json.dumps(line) + "\n")
            self._computed = {}
            return loss

        def _record(self, name, grad):
            self._computed[name] = self._computed.get(name, False) or bool(grad.abs().max() > 0)

    finetune.training.workflow.VisionLanguageSFTTrainer = Faulty


def save_gradients(trainer, model, directory: str) -> None:
    """Every trainable parameter's gradient as the optimizer will see it (one accumulation step per optimizer step);
    every rank takes part in FSDP2's gathers, rank 0 writes."""
    import torch
    from torch.distributed.tensor import DTensor

    grads = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
            grads[name] = grad.detach().to("cpu", torch.float64).clone()
    if trainer.accelerator.process_index == 0:
        torch.save(grads, os.path.join(directory, f"step-{trainer.state.global_step + 1}.pt"))


def text_rank_rows(records: list[dict]) -> None:
    """HARNESS_TEXT_RANK (see the module docstring): RowBatchSampler yields, per step, the row of text samples k and
    the row of image and video sample k, to ranks 0 and 1 (one batch each) or together (one process)."""
    text = [i for i, r in enumerate(records) if not r.get("images") and not r.get("videos")]
    images = [i for i, r in enumerate(records) if r.get("images")]
    videos = [i for i, r in enumerate(records) if r.get("videos")]
    assert len(text) >= 2 and images and videos

    def by_rank(self):
        steps = self.num_batches // self.world_size
        for k in range(self.epoch * steps, (self.epoch + 1) * steps):
            text_row = (text[2 * k % len(text)], text[(2 * k + 1) % len(text)])
            media_row = (images[k % len(images)], videos[k % len(videos)])
            if self.world_size == 1:
                yield [text_row, media_row]
            else:
                assert self.world_size == 2 and self.rows_per_batch == 1
                yield [text_row]
                yield [media_row]

    finetune.data.packing.RowBatchSampler.__iter__ = by_rank


def split_modalities(overrides: list[str]) -> None:
    train_file = next(o.split("=", 1)[1] for o in overrides if o.startswith("data.train="))
    records = json.load(open(train_file))
    text = [i for i, r in enumerate(records) if not r.get("images") and not r.get("videos")]
    video = [i for i, r in enumerate(records) if r.get("videos") and not r.get("images")]
    assert text and video and len(text) + len(video) == len(records)

    def by_modality(self):  # accelerate hands batch k to rank k % 2
        for k in range(self.num_batches // 2):
            yield [(text[k % len(text)],)]
            yield [(video[k % len(video)],)]

    finetune.data.packing.RowBatchSampler.__iter__ = by_modality


if __name__ == "__main__":
    overrides = sys.argv[1:]
    faulty_trainer()
    if ENV("HARNESS_SPLIT_MODALITIES"):
        split_modalities(overrides)
    if ENV("HARNESS_TEXT_RANK"):
        train_file = next(o.split("=", 1)[1] for o in overrides if o.startswith("data.train="))
        text_rank_rows(json.load(open(train_file)))
    sys.exit(run_command("train", overrides))
