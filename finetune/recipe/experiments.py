"""The experiments on disk by model family, and the refusal of a CPU demo composed with a real model.

`recipes/config.yaml` defaults to `experiment: demo` (a tiny model on the CPU: learning rate 3e-3, batch 16, rows of
256 tokens, the demo's eval set and run name). Swapping only the model (`model=qwen2_5_vl_7b`) would train a real
model with those settings, so a demo experiment takes tiny:// checkpoints only and names the GPU experiments of the
model's family instead. A local folder holding a tiny checkpoint counts as tiny (its config.json's width).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from omegaconf import OmegaConf

from finetune.base.errors import ConfigError
from finetune.base.families import FAMILIES
from finetune.base.paths import REPO_ROOT
from finetune.recipe.schema import Config

RECIPES_DIR = REPO_ROOT / "recipes"
DEMO_PREFIX = "demo"


def is_demo(experiment: str | None) -> bool:
    return bool(experiment) and experiment.startswith(DEMO_PREFIX)


def _model_option(experiment_file) -> str | None:
    """The `override /model: X` of an experiment file's defaults list."""
    defaults = OmegaConf.to_container(OmegaConf.load(experiment_file)).get("defaults") or []
    for entry in defaults:
        if isinstance(entry, dict):
            for key, value in entry.items():
                if key.replace("override", "").strip() == "/model":
                    return value
    return None


@lru_cache(maxsize=1)
def gpu_experiments() -> dict[str, tuple[str, str]]:
    """Every experiment that is not a demo: name -> (its model option, that model's family)."""
    found = {}
    for path in sorted((RECIPES_DIR / "experiment").glob("*.yaml")):
        if is_demo(path.stem):
            continue
        model = _model_option(path)
        if model is None:
            continue
        family = OmegaConf.load(RECIPES_DIR / "model" / f"{model}.yaml").get("family")
        found[path.stem] = (model, family)
    return found


def experiments_for(family: str) -> list[str]:
    return [name for name, (_, fam) in gpu_experiments().items() if fam == family]


TINY_HIDDEN_SIZE = 512  # the tiny checkpoints' LLMs are 64 wide; the smallest published Qwen-VL LLM is 1,024 wide


def is_tiny_checkpoint(name_or_path: str) -> bool:
    """A tiny:// checkpoint, or a local folder holding one (a copy of it, a test's variant): its config.json says an
    LLM at most TINY_HIDDEN_SIZE wide. A hub id or any other folder counts as a real model."""
    if name_or_path.startswith("tiny://"):
        return True
    config_file = Path(name_or_path) / "config.json"
    if not config_file.is_file():
        return False
    try:
        values = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return False
    hidden = (values.get("text_config") or {}).get("hidden_size", values.get("hidden_size"))
    return isinstance(hidden, int) and hidden <= TINY_HIDDEN_SIZE


def refuse_demo_with_real_model(config: Config, choices: dict, overrides: list[str]) -> None:
    """A demo experiment trains tiny:// checkpoints only; anything else is refused naming the experiments to use.
    `choices`: the group options Hydra composed (`experiment`, `model`, ...)."""
    experiment = choices.get("experiment")
    if not is_demo(experiment) or is_tiny_checkpoint(config.model.name_or_path):
        return
    option = choices.get("model")
    real_option = option is not None and not str(option).startswith("tiny_")
    model = f"model={option}" if real_option else f"model.name_or_path={config.model.name_or_path}"
    family = config.model.family
    names = experiments_for(family)
    data = next((o for o in reversed(overrides) if o.startswith("data.train=")), "data.train=my.json")
    if names:
        # the experiment of this very model first (a video LoRA before others), else the family's first with model=
        same = [n for n in names if real_option and gpu_experiments()[n][0] == option]
        pick = sorted(same or names, key=lambda n: ("video_lora" not in n, n))[0]
        size = "" if same else f" {model}"
        title = FAMILIES[family].title if family in FAMILIES else family
        advice = (
            f"pick a GPU experiment, e.g. ./launch.sh experiment={pick}{size} {data} "
            f"({title} experiments: {', '.join(names)})"
        )
    else:
        advice = f"pick a GPU experiment (experiment=...; recipes/experiment/) and add {model}"
    raise ConfigError(
        f"{model} with the CPU demo's settings (experiment={experiment}: learning rate, batch and max_length for "
        f"a tiny model on the CPU): {advice}."
    )
