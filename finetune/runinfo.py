"""What a run directory records so that it can be reproduced: resolved config, versions, git SHA."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from finetune.config import REPO_ROOT, Config, to_yaml

PACKAGES = (
    "torch", "torchvision", "torchcodec", "transformers", "tokenizers", "peft", "trl", "accelerate",
    "deepspeed", "datasets", "hydra-core", "omegaconf", "wandb", "av", "pillow", "numpy",
)  # fmt: skip


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state() -> dict[str, str | bool | None]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain")
    return {"sha": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def write_run_info(run_dir: Path, config: Config, overrides: list[str], extra: dict | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(config))
    info = {
        "command": [sys.executable, "-m", "finetune.train", *overrides],
        "overrides": overrides,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "git": git_state(),
        **(extra or {}),
    }
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2))
