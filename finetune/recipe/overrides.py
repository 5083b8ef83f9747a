"""Command-line overrides checked against the schema and the recipe files before Hydra sees them.

Hydra's own refusals are written for Hydra applications and mislead here: for a misspelt key it advises
"To append to your config use +key=value", and a `+key` the schema does not have is then accepted and silently
dropped when the recipe becomes its dataclasses; a misspelt group option prints the whole search path. Every
recipe key exists in the schema and every group is in `recipes/config.yaml`'s defaults, so neither `+` (append)
nor `~` (delete) has a use here beyond `++key=value` (the same as `key=value`): each mistake gets one line naming
the fix instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

from finetune.base.errors import ConfigError
from finetune.recipe.schema import Config

# What an option of each group is, in a sentence: "'x' is not an experiment (recipes/experiment/)".
GROUP_NOUNS = {
    "model": "a model",
    "data": "a data recipe",
    "peft": "a peft recipe",
    "trainer": "a trainer recipe",
    "deepspeed": "a deepspeed recipe",
    "accelerate": "an accelerate mode",
    "logger": "a logger",
    "experiment": "an experiment",
    "method": "a training method",
}
GROUPS = tuple(GROUP_NOUNS)
LISTED = 12  # a group with at most this many options names them all when nothing is close


def schema_keys() -> dict[str, Any]:
    """{"group.key" (or a top-level key such as "name"): its type} for every key of the schema."""
    keys = {}
    top = typing.get_type_hints(Config)  # the annotations are strings (from __future__ import annotations)
    for f in dataclasses.fields(Config):
        if dataclasses.is_dataclass(top[f.name]):
            hints = typing.get_type_hints(top[f.name])
            keys.update({f"{f.name}.{sub.name}": hints[sub.name] for sub in dataclasses.fields(top[f.name])})
        else:
            keys[f.name] = top[f.name]
    return keys


def group_options(recipes_dir: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (recipes_dir / group).glob("*.yaml"))


def _did_you_mean(word: str, candidates, otherwise: str = ".") -> str:
    close = difflib.get_close_matches(word, sorted(candidates), n=1)
    return f"; did you mean '{close[0]}'?" if close else otherwise


def unknown_key(key: str, keys=None) -> str:
    """The one wording of a key the schema does not have."""
    keys = schema_keys() if keys is None else keys
    if "." in key:
        return f"'{key}' is not a recipe key" + _did_you_mean(key, keys, "; ./launch.sh --help lists them.")
    return f"'{key}' is not a recipe group or key" + _did_you_mean(key, [*GROUPS, *keys], "; see ./launch.sh --help.")


def _under_open_key(key: str, keys: dict[str, Any]) -> bool:
    """`data.train.0.path`: inside a key whose value is free-form (typed Any: data.train, data.eval)."""
    parts = key.split(".")
    return any(keys.get(".".join(parts[:n])) is Any for n in range(1, len(parts)))


OPTIONAL_GROUP = "experiment"  # the one group a recipe may go without (`~experiment`, benchmarks/gpu_train.py)


def _check_group(group: str, prefix: str, value: str, recipes_dir: Path) -> None:
    options = group_options(recipes_dir, group)
    if prefix in ("+", "++"):
        raise ConfigError(f"'{prefix}{group}={value}': {group} is already in the recipe; drop the '{prefix}'.")
    if prefix == "~":
        if group == OPTIONAL_GROUP:  # no experiment: the other groups' defaults and the overrides are the recipe
            return
        raise ConfigError(f"'~{group}': a recipe group cannot be removed; choose one of its options ({group}=...).")
    if value in options or "," in value:  # "a,b" is a sweep's list, expanded before each job composes
        return
    where = f"{GROUP_NOUNS[group]} (recipes/{group}/)"
    listed = f"; choose one of {', '.join(options)}." if len(options) <= LISTED else "; ./launch.sh --help lists them."
    if not value:
        raise ConfigError(f"'{group}=' needs {GROUP_NOUNS[group]} (recipes/{group}/){listed}")
    raise ConfigError(f"'{value}' is not {where}" + _did_you_mean(value, options, listed))


def check_overrides(overrides: list[str], recipes_dir: Path, groups_allowed: bool = True) -> None:
    """Refuse, with one line naming the fix, an override naming a key or group option that does not exist, and the
    `+`/`~` forms that have no use here. What passes goes to Hydra (values are typed and checked there)."""
    keys = schema_keys()
    for override in overrides:
        body = override.lstrip("+~")
        prefix = override[: len(override) - len(body)]
        key, equals, value = body.partition("=")
        if key.startswith("hydra"):  # a sweep's launcher options (finetune/runs/sweep.py checks them)
            continue
        if not equals and prefix != "~":
            known = key in keys or key in GROUPS
            raise ConfigError(
                f"'{key}' needs a value: {key}=VALUE." if known else unknown_key(key, keys) + " (overrides: key=value)"
            )
        if key in GROUPS and groups_allowed:
            _check_group(key, prefix, value, recipes_dir)
        elif key in keys:
            if prefix in ("+", "~"):
                raise ConfigError(
                    f"'{override}': {key} is already a recipe key; "
                    + (f"drop the '+' ({body})." if prefix == "+" else f"set it instead ({key}=VALUE).")
                )
        elif not _under_open_key(key, keys):
            raise ConfigError(unknown_key(key, keys))
