"""An independent M-RoPE reference: `get_rope_index` of transformers 4.49.0, as contributed by Qwen.

Only that method is taken from the release's wheel (fetched once from the package index into the cache
directory, checked against its published sha256); the old transformers is never imported. The method runs
on a stand-in `self` carrying the config fields it reads.
"""

from __future__ import annotations

import ast
import hashlib
import os
import subprocess
import sys
import textwrap
import zipfile
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional, Tuple

import torch

WHEEL = "transformers-4.49.0-py3-none-any.whl"
WHEEL_SHA256 = "6b4fded1c5fee04d384b1014495b4235a2b53c87503d7d592423c06128cbbe03"
MODULES = {
    "qwen2_vl": "transformers/models/qwen2_vl/modeling_qwen2_vl.py",
    "qwen2_5_vl": "transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py",
}


def reference_wheel() -> Path:
    cache = Path(os.environ.get("FINETUNE_CACHE_DIR", Path.home() / ".cache" / "finetune")) / "reference"
    wheel = cache / WHEEL
    if not wheel.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "transformers==4.49.0",
            "-d",
            str(cache),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not wheel.is_file():
            raise RuntimeError(
                f"could not fetch the reference wheel {WHEEL} from the package index:\n{result.stderr[-2000:]}"
            )
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise RuntimeError(f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256}; delete it to fetch it again")
    return wheel


@lru_cache(maxsize=None)
def reference_get_rope_index(family: str):
    """The 4.49.0 method of `family`, as a plain function of (self, input_ids, ...)."""
    with zipfile.ZipFile(reference_wheel()) as z:
        source = z.read(MODULES[family]).decode()
    node = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == "get_rope_index")
    namespace = {"torch": torch, "Optional": Optional, "Tuple": Tuple, "List": List}
    exec(compile(textwrap.dedent(ast.get_source_segment(source, node)), f"4.49.0:{MODULES[family]}", "exec"), namespace)
    return namespace["get_rope_index"]


def reference_self(model_config) -> SimpleNamespace:
    """A stand-in `self` with the config fields 4.49.0 reads, taken from a 5.23 config."""
    vision = model_config.vision_config
    config = SimpleNamespace(
        image_token_id=model_config.image_token_id,
        video_token_id=model_config.video_token_id,
        vision_start_token_id=model_config.vision_start_token_id,
        vision_config=SimpleNamespace(
            spatial_merge_size=vision.spatial_merge_size, tokens_per_second=getattr(vision, "tokens_per_second", None)
        ),
    )
    return SimpleNamespace(config=config)
