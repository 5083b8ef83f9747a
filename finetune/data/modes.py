"""The data layer's vocabularies, in a module that imports nothing heavy: the recipe schema takes its choices
for `trainer.label_mode` and `data.over_length` from these enums, and `--help` and tab completion import it."""

from __future__ import annotations

from enum import Enum


class LabelMode(str, Enum):
    """Which tokens carry loss: every assistant reply, only the last one, or every token but the vision pads."""

    ASSISTANT = "assistant"
    LAST_ASSISTANT = "last_assistant"
    ALL = "all"


class OverLength(str, Enum):
    """What a sample over the length limit becomes: a problem (error), or itself without its trailing turns."""

    ERROR = "error"
    DROP_TRAILING_TURNS = "drop_trailing_turns"
