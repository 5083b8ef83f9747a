"""What a run directory records so that it can be reproduced: resolved config, versions, git SHA."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from finetune.base.paths import REPO_ROOT
from finetune.recipe.load import to_yaml
from finetune.recipe.schema import Config
from finetune.records.rundir import RunDir

PACKAGES = (
    "torch",
    "torchvision",
    "torchcodec",
    "transformers",
    "tokenizers",
    "peft",
    "trl",
    "accelerate",
    "deepspeed",
    "datasets",
    "hydra-core",
    "omegaconf",
    "wandb",
    "av",
    "pillow",
    "numpy",
)


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


def file_digest(path: Path) -> str:
    """sha256 of a dataset file, or of every file of a dataset folder (names and bytes)."""
    h = hashlib.sha256()
    files = (
        sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    )
    for file in files:
        h.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def data_digests(config: Config) -> dict[str, str]:
    """{dataset path: sha256} of the recipe's training and evaluation files (media are not hashed)."""
    from finetune.base.paths import resolve_data_file
    from finetune.data.sources import parse_sources

    digests = {}
    for value in (config.data.train, config.data.eval):
        if value is None:
            continue
        for source in parse_sources(value, config.data.media_root, resolve_data_file):
            digests[str(source.path.resolve())] = file_digest(source.path)
    return digests


def write_run_info(run_dir: Path, config: Config, overrides: list[str], extra: dict | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    RunDir(run_dir).config_file.write_text(to_yaml(config))
    info = {
        "command": [sys.executable, "-m", "finetune.train", *overrides],
        "overrides": overrides,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "git": git_state(),
        "data_sha256": data_digests(config),
        **(extra or {}),
    }
    RunDir(run_dir).run_info_file.write_text(json.dumps(info, indent=2))
