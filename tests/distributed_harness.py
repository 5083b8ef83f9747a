"""`finetune.train` with test-only fault injection, launched by `accelerate launch` like the real thing.

    HARNESS_KILL_AT_STEP=N      every rank SIGKILLs itself right after checkpoint-N is complete on disk
    HARNESS_SPLIT_MODALITIES=1  batches of one-sample rows go to ranks by modality: rank 0 gets only text-only rows,
                                rank 1 only rows of video samples (the case that hangs ZeRO-3 without
                                finetune/vision_sync.py)
"""

import json
import os
import signal
import sys

import finetune.packing
import finetune.train


def kill_after_checkpoint(step: int) -> None:
    make = finetune.train.make_trainer_class

    def make_killing_trainer():
        class KilledAfterCheckpoint(make()):
            def _save_checkpoint(self, model, trial):
                super()._save_checkpoint(model, trial)
                if self.state.global_step == step:
                    self.accelerator.wait_for_everyone()  # every rank's shards are written
                    os.kill(os.getpid(), signal.SIGKILL)

        return KilledAfterCheckpoint

    finetune.train.make_trainer_class = make_killing_trainer


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

    finetune.packing.RowBatchSampler.__iter__ = by_modality


if __name__ == "__main__":
    overrides = sys.argv[1:]
    if os.environ.get("HARNESS_KILL_AT_STEP"):
        kill_after_checkpoint(int(os.environ["HARNESS_KILL_AT_STEP"]))
    if os.environ.get("HARNESS_SPLIT_MODALITIES"):
        split_modalities(overrides)
    sys.exit(finetune.train.main(overrides))
