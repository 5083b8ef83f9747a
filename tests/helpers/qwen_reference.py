"""Independent M-RoPE references, fetched at test time into $FINETUNE_CACHE_DIR/reference and checked against
pinned sha256 digests (a failed fetch or a wrong digest raises with what to do; nothing is ever skipped):

- Qwen's own code, as Qwen contributed it to transformers: `get_rope_index` of transformers 4.49.0 (Qwen2-VL,
  Qwen2.5-VL) and of 4.57.0 (Qwen3-VL and Qwen3-VL-MoE, the release that added them; also Qwen3.5 and Qwen3.5-MoE,
  which have Qwen3-VL's positions). Only that method is taken
  from the release's wheel (from the package index); the old transformers is never imported. The method runs on a
  stand-in `self` carrying the config fields it reads. 4.57.0's method is the algorithm of Qwen's fine-tuning code
  (`get_rope_index_3` of QwenLM/Qwen3-VL `qwen-vl-finetune/qwenvl/data/rope2d.py`); that file is on GitHub only,
  which CI cannot reach, so `python -m tests.helpers.rope2d_crosscheck FILE` runs it against 4.57.0 on the position
  tests' random sequences wherever a copy of it is at hand (docs/fidelity.md, "Qwen3-VL").
- vLLM's Qwen3-VL positions: `Qwen3VLForConditionalGeneration._get_mrope_input_positions` (with `_iter_mm_grid_hw`)
  of the vLLM 0.33.0 source distribution on the package index (files.pythonhosted.org, the tarball pinned by its
  sha256). Only those two static methods are taken from the file; vLLM is never imported or built.

The same sdist gives the Qwen3-VL and Qwen3.5 weight loaders the export is checked against
(tests/helpers/vllm_weights.py): the files in VLLM_MEMBERS, each pinned by its own sha256, extracted together on the
first use of any (a member missing from the cache fetches the sdist again and writes them all).
"""

from __future__ import annotations
import __future__

import ast
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import urllib.request
import zipfile
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional, Tuple

import numpy as np
import torch

# Qwen's contributions to transformers, one wheel each (from the package index, pinned by sha256).
WHEELS = {
    "4.49.0": "6b4fded1c5fee04d384b1014495b4235a2b53c87503d7d592423c06128cbbe03",
    "4.57.0": "9d7c6d098c026e40d897e017ed1f481ab803cbac041021dbc6ae6100e4949b55",
}
# family -> (release, module holding its `get_rope_index`)
MODULES = {
    "qwen2_vl": ("4.49.0", "transformers/models/qwen2_vl/modeling_qwen2_vl.py"),
    "qwen2_5_vl": ("4.49.0", "transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py"),
    "qwen3_vl": ("4.57.0", "transformers/models/qwen3_vl/modeling_qwen3_vl.py"),
    "qwen3_vl_moe": ("4.57.0", "transformers/models/qwen3_vl_moe/modeling_qwen3_vl_moe.py"),
    # Qwen3.5 has Qwen3-VL's positions (no release of Qwen's own predates transformers 5, whose rule differs): vLLM
    # 0.33.0's Qwen3_5ForConditionalGeneration inherits Qwen3VLForConditionalGeneration's `_get_mrope_input_positions`,
    # and transformers 5.23's Qwen3_5Model.get_rope_index splits videos into frame pairs as Qwen3-VL's does. So Qwen's
    # Qwen3-VL method of 4.57.0 is its reference too (the config fields it reads are the same).
    "qwen3_5": ("4.57.0", "transformers/models/qwen3_vl/modeling_qwen3_vl.py"),
    "qwen3_5_moe": ("4.57.0", "transformers/models/qwen3_vl/modeling_qwen3_vl.py"),
}


def reference_cache() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE_DIR", Path.home() / ".cache" / "finetune")) / "reference"


def reference_wheel(version: str = "4.49.0") -> Path:
    cache = reference_cache()
    wheel = cache / f"transformers-{version}-py3-none-any.whl"
    if not wheel.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        # into a folder of this process's own, then moved: a concurrent test process never reads a partial wheel
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            f"transformers=={version}",
            "-d",
            str(staging),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode == 0 and (staging / wheel.name).is_file():
            os.replace(staging / wheel.name, wheel)
        shutil.rmtree(staging, ignore_errors=True)
        if result.returncode != 0 or not wheel.is_file():
            raise RuntimeError(
                f"could not fetch the reference wheel {wheel.name} from the package index:\n{result.stderr[-2000:]}"
            )
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEELS[version]:
        raise RuntimeError(f"{wheel} has sha256 {digest}, expected {WHEELS[version]}; delete it to fetch it again")
    return wheel


@lru_cache(maxsize=None)
def reference_get_rope_index(family: str):
    """Qwen's `get_rope_index` of `family` (transformers 4.49.0 or 4.57.0), as a plain function of (self, input_ids,
    ...)."""
    version, module = MODULES[family]
    with zipfile.ZipFile(reference_wheel(version)) as z:
        source = z.read(module).decode()
    node = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == "get_rope_index")
    namespace = {"torch": torch, "Optional": Optional, "Tuple": Tuple, "List": List}
    exec(compile(textwrap.dedent(ast.get_source_segment(source, node)), f"{version}:{module}", "exec"), namespace)
    return namespace["get_rope_index"]


def reference_self(model_config) -> SimpleNamespace:
    """A stand-in `self` with the config fields 4.49.0 / 4.57.0 read, taken from a 5.23 config."""
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


def reference_qwen_rule(family: str, model_config, input_ids, **kwargs):
    """(positions (3, B, L), deltas) of Qwen's own code for `family`. `kwargs`: image_grid_thw, video_grid_thw,
    attention_mask and, for families with absolute time, second_per_grid_ts."""
    return reference_get_rope_index(family)(reference_self(model_config), input_ids, **kwargs)


# ---------------------------------------------------------------- Qwen3-VL

VLLM_SDIST = "vllm-0.33.0.tar.gz"
VLLM_URL = (
    "https://files.pythonhosted.org/packages/f7/25/aa5684e9c59d6fc75f78926b7f15e8d9adc7de2d9e6e7575b80776ad8169/"
    + VLLM_SDIST
)
VLLM_SDIST_SHA256 = "f4c33c2503d52bb411146afa9618a4f48bed68912f617e6803ac8d76e4c74112"
# Files of the sdist (under vllm-0.33.0/vllm/model_executor/) and their sha256.
VLLM_MEMBERS = {
    "models/qwen3_vl.py": "cac3013e717c8d6299893a4e18964ea7ec3abbbf7373eed58045fab50da9028b",
    "models/qwen3_vl_moe.py": "2b73e1987e877d4483453961e4736c4e8174a9aa5174c4dd6e6939da1aea1abe",
    "models/qwen3_moe.py": "4710723deacd3c00e1fcd5e8b1a70474e6860d18dea9aeda2700c115795f4b40",
    "models/qwen3.py": "06bee457e1278cecc3d0745f45c44b4711243330e8c2c19d5c732625b67f1374",
    "models/qwen2.py": "6684104ba6dc40325bb1f6e632ec90633fa83a7b95883bb2181e9dc0008c3e21",
    "models/qwen2_5_vl.py": "2bf91675732b6bafb29e16cc8921e148a20c81f691ba0af80124692aee0389f3",
    # Qwen3.5 / Qwen3.5-MoE: the model classes, the Qwen3-Next ones they build on (attention, MoE block, the language
    # model's weight mapper), the shared expert's MLP, and the Gated DeltaNet layer.
    "models/qwen3_5.py": "ea7e71303c902b9678e85ff3e9a75a7ab6e69b5770605d540ad6ab1084e18187",
    "models/qwen3_next.py": "09ea2a385259edc9feadc79e304e86a31582b9770f80b8003d2d641782405818",
    "models/qwen2_moe.py": "382904901ed32374009fbecfd08c37d3337d721d30d3d25010d39de32cfbb2f8",
    "layers/mamba/gdn/qwen_gdn_linear_attn.py": "c6c037ad94d217aa2710cf29d25d8fa6e3856d1be9fc67fa8bd8681b1f5417f9",
    "layers/fused_moe/layer.py": "c9af2eed017387380ec43ac1aa41dc11a05c42bcbab1fc4fa1cc8971bde0bebd",
    "layers/fused_moe/routed_experts.py": "31e77226425db7eea658e1f273627dca8fb3d423119c3857f8aa5fc6b0d3bd07",
}
VLLM_MEMBER = "vllm-0.33.0/vllm/model_executor/models/qwen3_vl.py"


def _download(url: str, what: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=300) as response:
            return response.read()
    except Exception as err:  # no network, DNS, HTTP errors: say what was fetched from where
        raise RuntimeError(f"could not fetch {what} from {url}: {type(err).__name__}: {err}") from err


def _checked(path: Path, digest: str) -> bytes:
    data = path.read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if got != digest:
        raise RuntimeError(f"{path} has sha256 {got}, expected {digest}; delete it to fetch it again")
    return data


def _vllm_cached(member: str) -> Path:
    return reference_cache() / f"vllm-0.33.0-{member.replace('/', '-')}"


def vllm_source(member: str) -> str:
    """vllm/model_executor/<member> of the vLLM 0.33.0 sdist (one of VLLM_MEMBERS), from the cache or the package
    index (the tarball is fetched once and every pinned member written to the cache)."""
    path = _vllm_cached(member)
    if not path.is_file():
        data = _download(VLLM_URL, f"the vLLM source distribution {VLLM_SDIST}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != VLLM_SDIST_SHA256:
            raise RuntimeError(f"{VLLM_URL} has sha256 {digest}, expected {VLLM_SDIST_SHA256}")
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for name in VLLM_MEMBERS:
                extracted = tar.extractfile(f"vllm-0.33.0/vllm/model_executor/{name}")
                if extracted is None:
                    raise RuntimeError(f"{VLLM_SDIST} has no vllm/model_executor/{name}")
                target = _vllm_cached(name)
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(f".{target.name}.{os.getpid()}")  # moved into place whole: see above
                partial.write_bytes(extracted.read())
                os.replace(partial, target)
    return _checked(path, VLLM_MEMBERS[member]).decode()


def vllm_qwen3_vl_source() -> str:
    """vllm/model_executor/models/qwen3_vl.py of the vLLM 0.33.0 sdist."""
    return vllm_source("models/qwen3_vl.py")


@lru_cache(maxsize=None)
def reference_vllm_mrope_positions():
    """vLLM's `_get_mrope_input_positions(input_tokens, mm_features, config) -> (positions (3, L), delta)` for
    Qwen3-VL, with the `_iter_mm_grid_hw` it calls, on a stand-in class. `mm_features` as vLLM builds them: per image
    or video, `.modality`, `.mm_position.offset` (where its placeholder's replacement starts) and
    `.data["<modality>_grid_thw"].data` (the (t, h, w) tensor; one row per video)."""
    source = vllm_qwen3_vl_source()
    cls = next(
        n
        for n in ast.walk(ast.parse(source))
        if isinstance(n, ast.ClassDef) and n.name == "Qwen3VLForConditionalGeneration"
    )
    wanted = {"_iter_mm_grid_hw", "_get_mrope_input_positions"}
    methods = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    assert {m.name for m in methods} == wanted, "vLLM's Qwen3-VL M-RoPE methods moved"
    code = "\n\n".join(textwrap.dedent(ast.get_source_segment(source, m)) for m in methods)
    namespace = {"np": np, "torch": torch}
    flags = __future__.annotations.compiler_flag  # the annotations name vLLM types: never evaluated
    exec(compile(code, f"{VLLM_SDIST}:{VLLM_MEMBER}", "exec", flags=flags, dont_inherit=True), namespace)
    # `_get_mrope_input_positions` reaches `_iter_mm_grid_hw` through the class, as a static method.
    namespace["Qwen3VLForConditionalGeneration"] = SimpleNamespace(_iter_mm_grid_hw=namespace["_iter_mm_grid_hw"])
    return namespace["_get_mrope_input_positions"]


def vllm_feature(modality: str, offset: int, grid) -> SimpleNamespace:
    """One entry of vLLM's `mm_features` (MultiModalFeatureSpec) as `_iter_mm_grid_hw` reads it."""
    return SimpleNamespace(
        modality=modality,
        mm_position=SimpleNamespace(offset=offset),
        data={f"{modality}_grid_thw": SimpleNamespace(data=torch.tensor(grid))},
    )


def vllm_config(model_config) -> SimpleNamespace:
    """The config fields vLLM's Qwen3-VL positions read, from a 5.23 config."""
    return SimpleNamespace(
        video_token_id=model_config.video_token_id,
        vision_start_token_id=model_config.vision_start_token_id,
        vision_end_token_id=model_config.vision_end_token_id,
        vision_config=SimpleNamespace(spatial_merge_size=model_config.vision_config.spatial_merge_size),
    )
