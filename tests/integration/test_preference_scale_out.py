"""DPO on two processes, started as users start them (`accelerate launch`): with ZeRO-3, a rank holding only
text-only pairs beside a rank holding only video pairs takes every step (no hang: every rank calls the vision tower
once per forward) and the losses and gradient norms equal one process training both pairs per step."""

import json

import pytest

from tests.helpers import DEMO
from tests.helpers.preference_harness import STEPS
from tests.integration.test_scale_out import _run, losses

OVERRIDES = [
    "method=dpo",
    "logger=none",
    "trainer.max_steps=3",
    "trainer.logging_steps=1",
    "trainer.warmup_steps=0",
    "trainer.learning_rate=1e-2",
    "trainer.packing=false",
    "trainer.dataloader_num_workers=0",
    "trainer.save_steps=1000",
    f"data.media_root={DEMO}",
    "data.eval=null",
    "evaluation.after_training=false",
    "export.after_training=false",
]


def _harness(run_dir, processes, *extra):
    import sys

    from finetune.recipe.load import load_config
    from finetune.runs.launch import accelerate_args

    overrides = [
        *OVERRIDES,
        f"trainer.output_dir={run_dir}",
        f"trainer.per_device_train_batch_size={2 // processes}",
        f"accelerate.processes_per_node={processes}",
        *extra,
    ]
    args = accelerate_args(load_config(overrides), {}, 0, "fp32")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *args, "tests/helpers/preference_harness.py", *overrides]
    return _run(cmd, {"DS_ACCELERATOR": "cpu"}, timeout=420)


def test_two_zero3_ranks_text_only_and_video_match_one_process(tmp_path):
    single, two = tmp_path / "single", tmp_path / "two"
    _harness(single, 1)
    _, _, err = _harness(two, 2, "deepspeed=zero3")
    assert "ZeRO-3: loading the weights partitioned" in err  # DeepSpeed ran, over 2 ranks
    expected = losses(single)
    assert len(expected) == STEPS and expected[1] == pytest.approx(0.6931, abs=1e-3)  # step 1: policy = reference
    assert len(set(expected.values())) > 1  # it trained
    assert losses(two) == pytest.approx(expected, abs=1e-4)
    # The gradients too: the norm of the full gradient each step (before clipping), summed over the ranks' shards.
    norms = [grad_norms(run) for run in (single, two)]
    assert len(norms[0]) == STEPS and min(norms[0].values()) > 0
    assert norms[1] == pytest.approx(norms[0], rel=1e-3)


def grad_norms(run_dir) -> dict[int, float]:
    history = json.loads((run_dir / "log_history.json").read_text())
    return {h["step"]: h["grad_norm"] for h in history if "grad_norm" in h}
