"""Commands as they run: `finetune <command> [arguments]`, `python -m finetune <command>` and `./launch.sh`.

A first argument that names a command runs it; anything else (flags, Hydra overrides, nothing) is `run`, the
whole recipe (the table: finetune/cli/commands.py). The documented
`python -m finetune.<command>` forms are the modules `finetune/{train,evaluate,export,predict,validate}.py`, which
call `run_command` here.
"""

from __future__ import annotations

import difflib
import importlib
import re
import sys

from finetune.base.errors import ConfigError
from finetune.cli.commands import COMMANDS, DEFAULT_COMMAND

FLAGS = {"-m": "multirun", "--multirun": "multirun", "--dry-run": "dry_run", "--help": "help", "-h": "help"}


def run_command(name: str, argv: list[str]) -> int:
    """Run one command of the table with its arguments; its exit status."""
    from finetune.cli.guard import quiet_library_logs

    command = COMMANDS[name]
    module, function = command.target.split(":")
    quiet_library_logs()
    entry = getattr(importlib.import_module(module), function)
    if not command.guarded:
        return entry(argv) or 0
    from finetune.cli.guard import run

    return run(lambda: entry(argv))


def parse_flags(argv: list[str]) -> tuple[dict, list[str]]:
    """Our flags (Hydra's spelling where Hydra has one) and the overrides; an unknown flag is an error."""
    flags, overrides, items = {}, [], list(argv)
    while items:
        item = items.pop(0)
        if item in FLAGS:
            flags[FLAGS[item]] = True
        elif item in ("--cfg", "-c") or item.startswith("--cfg="):
            value = item.split("=", 1)[1] if "=" in item else (items.pop(0) if items else "")
            if value != "job":
                raise ConfigError(f"--cfg {value}: only `--cfg job` (the composed recipe) is available.")
            flags["cfg"] = True
        elif item == "--completion":
            shell = items.pop(0) if items else ""
            if shell != "bash":
                raise ConfigError(f"--completion {shell}: only `--completion bash` is available.")
            flags["completion"] = True
        elif item.startswith("-"):
            raise ConfigError(f"unknown option {item}; see ./launch.sh --help.")
        else:
            overrides.append(item)
    return flags, overrides


def run_recipe_command(argv: list[str]) -> int:
    """`run`: the flags that show things (--help, --cfg job, --completion), a sweep (-m), or the recipe's run."""
    try:
        flags, overrides = parse_flags(argv)
        if flags.get("completion"):
            from finetune.cli.completion import bash_script

            print(bash_script(sys.executable), end="")
            return 0
        if flags.get("help"):
            from finetune.cli.recipe_help import help_text

            print(help_text())
            return 0
        if flags.get("cfg"):
            if flags.get("multirun"):
                raise ConfigError("--cfg job shows one recipe; drop -m (or give single values).")
            from finetune.recipe.budgets import comment_lines
            from finetune.recipe.load import load_config, to_yaml

            config = load_config(overrides)
            print(to_yaml(config), end="")
            print(comment_lines(config))  # YAML comments: the output stays a recipe
            return 0
        if flags.get("multirun"):
            from finetune.runs.sweep import run_sweep

            return run_sweep(overrides, flags.get("dry_run", False))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from finetune.runs.launch import run_recipe

    return run_recipe(overrides, flags.get("dry_run", False))


def not_a_command(word: str) -> str | None:
    """Why a bare first word (no `=`, no leading `-`) that names no command, group or key cannot run, or None."""
    if not re.fullmatch(r"[A-Za-z][\w-]*", word) or word in COMMANDS:
        return None
    from finetune.cli.recipe_help import LAUNCH_SH_COMMANDS
    from finetune.recipe.overrides import GROUPS, schema_keys

    if word in GROUPS or word in schema_keys():
        return None  # an override without its value: the recipe's check says so
    if word in LAUNCH_SH_COMMANDS:
        return f"'{word}' is a command of ./launch.sh itself: ./launch.sh {word}."
    close = difflib.get_close_matches(word, [*COMMANDS, *LAUNCH_SH_COMMANDS], n=1)
    if close:
        return f"'{word}' is not a command; did you mean '{close[0]}'?"
    return f"'{word}' is not a command, flag or override (key=value); see ./launch.sh --help."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        return run_command(argv[0], argv[1:])
    problem = not_a_command(argv[0]) if argv else None
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    return run_command(DEFAULT_COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
