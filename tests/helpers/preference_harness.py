"""`finetune.train method=dpo` on test pairs, launched like the real thing (`accelerate launch`, or plain
`python tests/helpers/preference_harness.py <overrides>` for one process).

The pairs are the demo's (tests/helpers/preference_pairs.py) in the order text-only, video, text-only, video, ...:
text-only pairs are the image prompts with the image left out. Each step takes pairs 2k and 2k + 1: one process gets
both in one batch, two processes one each (accelerate hands batch k to rank k % 2), so rank 0 holds only text and
rank 1 only video: the case that hangs ZeRO-3 unless every rank calls the vision tower alike.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repository root, for `tests`

import finetune.data.packing  # noqa: E402
import finetune.training.workflow  # noqa: E402
from finetune.cli.main import run_command  # noqa: E402
from tests.helpers.preference_pairs import demo_pairs, strip_media  # noqa: E402

STEPS = 3


def pairs(config, encoder, split="train"):
    text = [(strip_media(c), strip_media(r)) for c, r in demo_pairs("img", STEPS)]
    video = demo_pairs("vid", STEPS)
    return [pair for both in zip(text, video) for pair in both]


def two_pairs_a_step(self):
    for k in range(STEPS):
        if self.world_size == 1:
            yield [(2 * k,), (2 * k + 1,)]
        else:
            yield [(2 * k,)]
            yield [(2 * k + 1,)]


if __name__ == "__main__":
    finetune.training.workflow.read_training_pairs = pairs
    finetune.data.packing.RowBatchSampler.__iter__ = two_pairs_a_step
    finetune.data.packing.RowBatchSampler.__len__ = lambda self: STEPS * self.world_size
    sys.exit(run_command("train", sys.argv[1:]))
