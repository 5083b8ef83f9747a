"""`./launch.sh --help` and the key reference (docs/recipe-keys.md), from the sources the program itself runs on: the
recipe groups and options on disk, the table of commands (finetune/cli/commands.py) and each schema key's default,
choices and help from its field metadata (finetune/recipe/keys.py). Nothing here restates what a key or a command does.

    .venv/bin/python -m finetune.cli.recipe_help --markdown   # the key reference, printed
    .venv/bin/python -m finetune.cli.recipe_help --write      # rewrite it between the markers of docs/recipe-keys.md
"""

from __future__ import annotations

import dataclasses
import re
import sys
import textwrap
import typing
from pathlib import Path

from finetune.base.paths import REPO_ROOT
from finetune.cli.commands import COMMANDS, DEFAULT_COMMAND
from finetune.recipe.keys import choices_of, help_of
from finetune.recipe.load import RECIPES_DIR
from finetune.recipe.schema import Config

# The default command's flags (finetune/cli/main.py:parse_flags), one form each.
RUN_FLAGS = (
    ("--cfg job", "print the composed, checked recipe and exit"),
    (
        "--dry-run",
        "also print the accelerate command and the process layout; start nothing (on a machine without GPUs: "
        "GPUS_PER_NODE=N lays out N per node)",
    ),
    (
        "-m a=1,2 b=x,y",
        "a sweep (Hydra's syntax: a=1,2  a=range(1,4)  a=choice(x,y)  experiment=demo,demo_qwen2_vl): one run "
        "directory per job under runs/<name>/sweep-<time>/, results in sweep_results.{md,csv}",
    ),
)
SWEEP_LAUNCHER = (
    "    hydra/launcher=submitit_slurm [hydra.launcher.partition=P ...]",
    "each job as a Slurm job (submitit_local: subprocesses on this machine)",
)
# launch.sh's own commands, which never reach Python: {name: (arguments, summary)}
LAUNCH_SH_COMMANDS = {"test": ("[pytest args]", "the test suite"), "setup": ("", "only set up")}
COMPLETION_FORM = ('eval "$(./launch.sh --completion bash)"', "tab completion of groups, options, keys, choices, flags")

MOST_USED = (
    "model.name_or_path",
    "model.max_pixels",
    "model.video_fps",
    "model.video_max_frames",
    "model.rope_rule",
    "data.train",
    "data.eval",
    "data.media_root",
    "data.max_length",
    "data.skip_invalid",
    "data.streaming",
    "parts.llm",
    "parts.vision_tower",
    "parts.merger",
    "peft.r",
    "peft.alpha",
    "trainer.output_dir",
    "trainer.max_steps",
    "trainer.num_train_epochs",
    "trainer.per_device_train_batch_size",
    "trainer.gradient_accumulation_steps",
    "trainer.learning_rate",
    "trainer.packing",
    "trainer.precision",
    "trainer.resume_from_checkpoint",
    "trainer.seed",
    "accelerate.processes_per_node",
    "evaluation.steps",
    "export.dtype",
)
KEYS_DOC = REPO_ROOT / "docs" / "recipe-keys.md"
MARKERS = ("<!-- recipe-keys:start -->", "<!-- recipe-keys:end -->")


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    default: str  # as a recipe spells it (null, true); "(required)" for a key without a default
    help: str
    choices: tuple[str, ...]
    kind: typing.Any  # the field's type; completion offers true/false for bool


def _spelled(value) -> str:
    if value is dataclasses.MISSING or value == "???":  # OmegaConf's MISSING
        return "(required)"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value)


def key_docs() -> dict[str, KeyDoc]:
    """{"group.key" (or a top-level key such as "name"): its documentation} for every key of the schema."""
    docs = {}
    top = typing.get_type_hints(Config)  # the annotations are strings (from __future__ import annotations)
    for f in dataclasses.fields(Config):
        if not dataclasses.is_dataclass(top[f.name]):
            docs[f.name] = KeyDoc(_spelled(f.default), help_of(f), choices_of(f), top[f.name])
            continue
        hints = typing.get_type_hints(top[f.name])
        for sub in dataclasses.fields(top[f.name]):
            docs[f"{f.name}.{sub.name}"] = KeyDoc(_spelled(sub.default), help_of(sub), choices_of(sub), hints[sub.name])
    return docs


def group_descriptions() -> dict[str, str]:
    """{group: its schema class's docstring, on one line}."""
    groups = Config().groups()
    return {name: " ".join((type(group).__doc__ or "").split()) for name, group in groups.items()}


def group_options() -> dict[str, list[tuple[str, str]]]:
    """{group: [(option, its first comment line)]} for every recipe file on disk."""
    groups = {}
    for folder in sorted(p for p in RECIPES_DIR.iterdir() if p.is_dir()):
        options = []
        for path in sorted(folder.glob("*.yaml")):
            comments = [line.lstrip("# ").rstrip() for line in path.read_text().splitlines() if line.startswith("#")]
            described = [c for c in comments if c and not c.startswith("@package")]
            options.append((path.stem, described[0] if described else ""))
        groups[folder.name] = options
    return groups


def _row(form: str, summary: str, column: int = 42, width: int = 118) -> list[str]:
    """A form and its summary in two columns; a form too wide for its column puts the summary below it."""
    wrapped = textwrap.wrap(summary, width - column) or [""]
    if len(form) > column - 3:
        return [f"  {form}"] + [" " * column + line for line in wrapped]
    return [f"  {form:<{column - 2}}{wrapped[0]}"] + [" " * column + line for line in wrapped[1:]]


def commands_text() -> list[str]:
    """The commands: the default one with its flags, the others from the table, launch.sh's own, the modules."""
    lines = [
        "Commands (./launch.sh COMMAND; with the venv active also finetune COMMAND or python -m finetune COMMAND):"
    ]
    lines += _row("./launch.sh [overrides]", f"{COMMANDS[DEFAULT_COMMAND].summary}; default recipe: the CPU demo")
    for flag, summary in RUN_FLAGS:
        lines += _row(f"./launch.sh {flag} [overrides]", summary)
    lines += _row(*SWEEP_LAUNCHER)
    for name, command in COMMANDS.items():
        if name != DEFAULT_COMMAND:
            lines += _row(f"./launch.sh {name} {command.usage}".rstrip(), command.summary)
    for name, (arguments, summary) in LAUNCH_SH_COMMANDS.items():
        lines += _row(f"./launch.sh {name} {arguments}".rstrip(), summary)
    lines += _row(*COMPLETION_FORM)
    package = Path(__file__).resolve().parents[1]
    modules = [f"finetune.{name}" for name in COMMANDS if (package / f"{name}.py").is_file()]  # the aliases
    lines += _row(f".venv/bin/python -m {' | '.join(modules)} [arguments]", "the same commands, as modules")
    return lines


def _described(doc: KeyDoc) -> str:
    return (f"[{' | '.join(doc.choices)}] " if doc.choices else "") + doc.help


def help_text() -> str:
    lines = [
        "Fine-tune Qwen2-VL, Qwen2.5-VL, Qwen3-VL(-MoE), Qwen3.5(-MoE): ./launch.sh [--help] [--cfg job] [--dry-run] [-m] [overrides]",
        "",
        *commands_text(),
        "",
        "Recipe groups (choose one with group=option; default recipe: recipes/config.yaml):",
    ]
    for group, options in group_options().items():
        lines.append(f"  {group}:")
        lines += [f"    {name:<28} {doc}" for name, doc in options]
    lines += [
        "",
        "Most used keys (group.key=value; [choices]; every key: docs/recipe-keys.md; the composed values: "
        "./launch.sh --cfg job):",
    ]
    docs = key_docs()
    for key in MOST_USED:
        doc = docs[key]
        wrapped = textwrap.wrap(_described(doc), 64) or [""]
        if len(wrapped) > 3:  # the whole text is in docs/recipe-keys.md; three lines keep the list readable
            wrapped = wrapped[:2] + [textwrap.shorten(" ".join(wrapped[2:]), 60, placeholder=" ...")]
        lines.append(f"  {key:<37} {doc.default[:20]:<20} {wrapped[0]}")
        lines += [f"  {'':<37} {'':<20} {more}" for more in wrapped[1:]]
    return "\n".join(lines)


def _markdown_text(text: str) -> str:
    """Help text for Markdown: `<...>` outside code spans would be read as an HTML tag and vanish."""
    parts = text.split("`")
    return "`".join(part if i % 2 else re.sub(r"<(?=[A-Za-z/!?])", "&lt;", part) for i, part in enumerate(parts))


def _markdown_item(key: str, doc: KeyDoc) -> str:
    default = "required" if doc.default == "(required)" else f"default `{doc.default}`"
    choices = f"; one of {', '.join(f'`{c}`' for c in doc.choices)}" if doc.choices else ""
    return f"- `{key}` ({default}{choices}): {_markdown_text(doc.help)}"


def keys_markdown() -> str:
    """The key reference of docs/recipe-keys.md: every key by group, with its default, choices and help."""
    docs = key_docs()
    lines = [
        "Generated from the schema (`finetune/recipe/schema.py`) by "
        "`.venv/bin/python -m finetune.cli.recipe_help --write`; a unit test checks that it is current.",
        "",
    ]
    lines += [_markdown_item(key, doc) for key, doc in docs.items() if "." not in key]
    for group, description in group_descriptions().items():
        lines += ["", f"**`{group}`**: {_markdown_text(description)}", ""]
        lines += [_markdown_item(key, doc) for key, doc in docs.items() if key.startswith(f"{group}.")]
    return "\n".join(lines)


def _split_keys_doc(text: str) -> tuple[str, str, str]:
    """The key reference's file as (up to the start marker, between the markers, from the end marker)."""
    start, end = MARKERS
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"the key reference needs one {start} ... {end} section")
    before, rest = text.split(start)
    inside, after = rest.split(end)
    return before + start, inside.strip("\n"), end + after


def keys_section(text: str) -> str:
    """What stands between the markers of the key reference."""
    return _split_keys_doc(text)[1]


def update_keys_doc(path: Path = KEYS_DOC) -> bool:
    """Rewrite the key reference of `path` from the schema; whether it changed."""
    before, old, after = _split_keys_doc(path.read_text())
    new = keys_markdown()
    if old != new:
        path.write_text(f"{before}\n{new}\n{after}")
    return old != new


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args == ["--markdown"]:
        print(keys_markdown())
    elif args[:1] == ["--write"]:
        path = Path(args[1]) if len(args) > 1 else KEYS_DOC
        print(f"{path}: {'updated' if update_keys_doc(path) else 'already current'}")
    elif not args:
        print(help_text())
    else:
        print("usage: python -m finetune.cli.recipe_help [--markdown | --write [docs/recipe-keys.md]]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
