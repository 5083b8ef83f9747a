"""Shared helpers: a small image+video dataset drawn from the demo data, and running the real CLIs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import DEMO, REPO

EXPERIMENT = {
    "qwen2_vl": "demo_qwen2_vl",
    "qwen2_5_vl": "demo",
    "qwen3_vl": "demo_qwen3_vl",
    "qwen3_vl_moe": "demo_qwen3_vl_moe",
    "qwen3_5": "demo_qwen3_5",
    "qwen3_5_moe": "demo_qwen3_5_moe",
}


def mini_dataset(path: Path, per_task: int = 4) -> Path:
    """`per_task` image and `per_task` video samples from the demo split, media left in the demo folder."""
    records = json.loads((DEMO / "train.json").read_text())
    images = [r for r in records if r["task"] == "colour"][:per_task]
    videos = [r for r in records if r["task"] == "direction"][:per_task]
    path.write_text(json.dumps([r for pair in zip(images, videos) for r in pair], indent=1))
    return path


def run_module(
    module: str,
    overrides: list[str],
    timeout: int = 600,
    expect_failure: bool | None = False,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run `python -m module overrides` from the repository root, with `env` added to this environment; fail unless
    it exits as expected (None: any)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    result = subprocess.run(
        [sys.executable, "-m", module, *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    if expect_failure is not None and (result.returncode != 0) != expect_failure:
        raise AssertionError(f"{module} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def tiny_run_overrides(family: str, run_dir: Path, train_file: Path, steps: int = 3) -> list[str]:
    return [
        f"experiment={EXPERIMENT[family]}",
        "logger=none",
        f"trainer.output_dir={run_dir}",
        f"trainer.max_steps={steps}",
        "trainer.logging_steps=1",
        "trainer.per_device_train_batch_size=8",
        "trainer.warmup_steps=0",
        f"data.train={train_file}",
        f"data.media_root={DEMO}",
        f"data.eval={train_file}",
    ]
