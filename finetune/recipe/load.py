"""Hydra composition of a recipe onto the schemas (finetune/recipe/schema.py), saved recipes read back, and
`load_config`, the one way a command gets its checked `Config`.

A misspelt key or group option fails before composing, in one line with a "did you mean" hint
(finetune/recipe/overrides.py), a wrong type while composing; every group's `check()` runs on the result, so what a command receives is a recipe that can run.
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from finetune.base.errors import ConfigError
from finetune.base.paths import REPO_ROOT
from finetune.recipe import legacy_keys
from finetune.recipe import overrides as overrides_check
from finetune.recipe.budgets import check_fits
from finetune.recipe.experiments import refuse_demo_with_real_model
from finetune.recipe.schema import Config

RECIPES_DIR = REPO_ROOT / "recipes"
GROUPS = overrides_check.GROUPS


def _register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node=Config)


def _hydra_message(err: Exception) -> str:
    """Hydra's refusal of what `overrides.check_overrides` let through (a value of the wrong type, an experiment
    naming a missing option), without its advice for Hydra applications: no "+key" to append, no search path."""
    message = str(err)
    if err.__cause__ is not None:  # Hydra's own text hides the OmegaConf reason (e.g. a type error)
        message += "\n" + str(err.__cause__).splitlines()[0]
    message = message.split("\nAvailable options", 1)[0].split("\nConfig search path", 1)[0]
    kept = [line for line in message.splitlines() if line.strip() and not line.startswith("To append to your config")]
    first = re.fullmatch(r"(?:Error merging override |Could not override ')(.+?)'?\.?", kept[0]) if kept else None
    if first and len(kept) > 1:  # "Error merging override k=v" + the reason -> "k=v: the reason", on one line
        return f"{first.group(1)}: " + "; ".join(kept[1:])
    return "\n".join(kept)


def compose(overrides: list[str] | None = None, choices: dict | None = None):
    """Compose `recipes/config.yaml` with Hydra overrides; returns the (unresolved) DictConfig. `choices`, when
    given, receives the group options composed (Hydra's runtime choices: experiment, model, ...)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides or [])
    replaced = legacy_keys.check_overrides(overrides)
    if replaced:
        raise ConfigError(replaced)
    overrides_check.check_overrides(overrides, RECIPES_DIR)
    _register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
    except Exception as err:  # Hydra wraps the real cause; keep its text and add our hints
        message = _hydra_message(err)
        hint = legacy_keys.hint_for_error(message)
        raise ConfigError(message + ("\n" + hint if hint else "")) from None
    if choices is not None:
        choices.update(OmegaConf.to_container(cfg.hydra.runtime.choices))
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


RECIPE_FILE = "recipe_file="  # `recipe_file=runs/x/config.yaml`: a saved, resolved recipe instead of composing


def load_config(overrides: list[str] | None = None) -> Config:
    """Compose, resolve interpolations and run every schema check. Raises ConfigError with the fix.
    With `recipe_file=PATH` among the overrides, the saved recipe is the starting point (what `rerun` uses) and
    the other overrides (keys only, no groups) apply on top."""
    overrides = list(overrides or [])
    saved = [o[len(RECIPE_FILE) :] for o in overrides if o.startswith(RECIPE_FILE)]
    if saved:
        return _load_recipe_file(Path(saved[-1]), [o for o in overrides if not o.startswith(RECIPE_FILE)])
    choices: dict = {}
    cfg = compose(overrides, choices)
    try:
        config = OmegaConf.to_object(cfg)  # resolves interpolations; fails on MISSING values
    except Exception as err:
        raise ConfigError(str(err)) from None
    refuse_demo_with_real_model(config, choices, overrides)  # before the checks: the demo's values are not the user's
    config.check()
    check_fits(config)
    return config


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def _load_recipe_file(path: Path, overrides: list[str]) -> Config:
    groups = [o for o in overrides if "." not in o.split("=", 1)[0]]
    replaced = legacy_keys.check_overrides(overrides)
    if replaced:
        raise ConfigError(replaced)
    if groups:
        raise ConfigError(
            f"{' '.join(groups)}: a saved recipe ({path}) takes key overrides only (a.b=value), not "
            "groups; compose a new recipe instead."
        )
    overrides_check.check_overrides(overrides, RECIPES_DIR, groups_allowed=False)
    try:
        saved = _read_saved(path)
        cfg = OmegaConf.merge(OmegaConf.structured(Config), saved, OmegaConf.from_dotlist(overrides))
        config = OmegaConf.to_object(cfg)
    except Exception as err:
        raise ConfigError(f"{path} with {overrides}: {str(err).splitlines()[0]}") from None
    config.check()
    check_fits(config)
    return config


def _read_saved(path: Path):
    """A saved recipe as a DictConfig; one written before `parts` existed is translated (with a warning)."""
    values = OmegaConf.to_container(OmegaConf.load(path))
    return OmegaConf.create(legacy_keys.migrate_saved(values, str(path)))


def load_saved_config(path: Path) -> Config:
    """A resolved recipe saved by a run (`config.yaml`) or an export (`finetune_config.yaml`), checked again."""
    try:
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), _read_saved(path)))
    except Exception as err:
        raise ConfigError(f"{path} is not a recipe this version can read: {str(err).splitlines()[0]}") from None
    config.check()
    return config
