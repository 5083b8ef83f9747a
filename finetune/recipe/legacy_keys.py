"""Recipe keys that were replaced by `parts`: a recipe or override that still uses one fails with the new
spelling in the message, and a run directory saved before the change still reads (its config is translated)."""

from __future__ import annotations

import logging
import re

from finetune.recipe.keys import PART_MODES

logger = logging.getLogger(__name__)


def _mode(part: str, when_true: str, when_false: str):
    """The translation of a boolean key; a value that is not a boolean (e.g. null) gets the choices."""

    def translate(value) -> list[str]:
        flag = {"true": True, "false": False}.get(str(value).lower())
        return [f"parts.{part}={'|'.join(PART_MODES) if flag is None else when_true if flag else when_false}"]

    return translate


def _method(value) -> list[str]:
    return ["parts.llm=lora"] if value == "lora" else ["parts.llm=full"]


# old key -> the new overrides for one of its values
REPLACED = {
    "model.freeze_llm": _mode("llm", "frozen", "full"),
    "model.freeze_vision_tower": _mode("vision_tower", "frozen", "full"),
    "model.freeze_merger": _mode("merger", "frozen", "full"),
    "peft.lora_llm": _mode("llm", "lora", "frozen"),
    "peft.lora_vision_tower": _mode("vision_tower", "lora", "frozen"),
    "peft.method": _method,
    "trainer.vision_tower_lr": lambda value: [f"parts.vision_tower_lr={value}"],
    "trainer.merger_lr": lambda value: [f"parts.merger_lr={value}"],
}
_EXAMPLE_VALUE = {"peft.method": "none", "trainer.vision_tower_lr": "2e-5", "trainer.merger_lr": "1e-5"}


def _spelling(key: str, value) -> str:
    return f"{key}={value} is now `{' '.join(REPLACED[key](value))}`"


def _both_values(key: str) -> str:
    if key in _EXAMPLE_VALUE:
        return _spelling(key, _EXAMPLE_VALUE[key])
    return f"{_spelling(key, 'true')}; {_spelling(key, 'false')}"


_GUIDE = (
    f"What trains is one mode per part: parts.llm, parts.vision_tower, parts.merger = {' | '.join(PART_MODES)} "
    "(docs/fidelity.md, What trains)."
)


def check_overrides(overrides: list[str]) -> str | None:
    """The message for command-line overrides that use a replaced key or `peft=none`; None when there are none."""
    found = []
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in REPLACED:
            found.append(_spelling(key, value))
        elif key == "peft" and value == "none":
            found.append("peft=none is now `parts.llm=full`")
    return "; ".join(found) + ". " + _GUIDE if found else None


def hint_for_error(message: str) -> str | None:
    """A Hydra composition error caused by a replaced key in a recipe file (OmegaConf names it as `full_key:`):
    that key's new spelling."""
    keys = sorted(set(re.findall(r"full_key: (\S+)", message)) & set(REPLACED))
    if not keys:
        return None
    return "A recipe file uses a replaced key: " + "; ".join(_both_values(k) for k in keys) + ". " + _GUIDE


def migrate_saved(values: dict, source: str) -> dict:
    """Translate a config saved by an older version (freeze_* / lora_* / peft.method) into `parts`."""
    model, peft, trainer = (values.setdefault(group, {}) for group in ("model", "peft", "trainer"))
    old = {key for key in REPLACED if key.split(".")[1] in values[key.split(".")[0]]}
    if not old:
        return values
    lora = peft.pop("method", "lora") == "lora"
    lora_llm, lora_vision = peft.pop("lora_llm", True), peft.pop("lora_vision_tower", False)
    freeze_llm = model.pop("freeze_llm", None)
    freeze_vision, freeze_merger = model.pop("freeze_vision_tower", True), model.pop("freeze_merger", True)
    llm_frozen = lora if freeze_llm is None else freeze_llm
    parts = values.setdefault("parts", {})
    parts.setdefault("llm", "lora" if lora and lora_llm else "frozen" if llm_frozen else "full")
    parts.setdefault("vision_tower", "lora" if lora and lora_vision else "frozen" if freeze_vision else "full")
    parts.setdefault("merger", "frozen" if freeze_merger else "full")
    for part in ("vision_tower", "merger"):
        rate = trainer.pop(f"{part}_lr", None)
        if rate is not None:
            parts.setdefault(f"{part}_lr", rate)
    logger.warning(
        "%s was saved by an older version (%s); read as parts: llm=%s vision_tower=%s merger=%s.",
        source,
        ", ".join(sorted(old)),
        parts["llm"],
        parts["vision_tower"],
        parts["merger"],
    )
    return values
