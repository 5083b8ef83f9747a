"""The table of commands, as data: what `finetune <command>`, `python -m finetune <command>` and `./launch.sh
<command>` run (finetune/cli/main.py), what `--help` lists and what tab completion offers. Each target is imported
only when its command runs, so `--help` and completion stay fast."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    target: str  # "module:function"; the function takes the remaining arguments and returns an exit status or None
    usage: str  # the arguments, as `--help` shows them
    summary: str
    guarded: bool = True  # refusals (ConfigError, DataError, RunStopped) become one `error:` line and exit 2


COMMANDS = {
    "run": Command(
        "finetune.cli.main:run_recipe_command",
        "[--cfg job] [--dry-run] [-m] [overrides]",
        "train -> evaluate -> export the recipe under `accelerate launch` (the default command)",
        guarded=False,
    ),
    "train": Command("finetune.training.workflow:main", "[overrides]", "train in this process (one rank of `run`)"),
    "evaluate": Command(
        "finetune.evaluation.evaluate:main", "[--model DIR] [overrides]", "generation-based evaluation of a run"
    ),
    "export": Command("finetune.exporting.export:main", "[overrides]", "merge, check and write the served model"),
    "predict": Command(
        "finetune.evaluation.predict:main",
        "--model runs/<run> (--image F | --video F) --question Q",
        "answer questions about images and videos",
    ),
    "validate": Command(
        "finetune.training.validate:main", "[--decode] [--split S] [overrides]", "check a dataset, list every problem"
    ),
    "rerun": Command(
        "finetune.runs.rerun:rerun", "runs/<run> [overrides]", "run a finished run again from its config.yaml", False
    ),
    "completion": Command(
        "finetune.cli.completion:main", "[--first] -- WORD", "the completions of a word (used by tab completion)", False
    ),
    "tiny": Command("finetune.model.tiny:main", "", "build the tiny offline checkpoints and print where they are"),
}
DEFAULT_COMMAND = "run"
