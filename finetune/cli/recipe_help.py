"""`./launch.sh --help`: the recipe groups and their options as they exist on disk, the most used keys with
their defaults and the comments of the schemas (finetune/recipe/schema.py), and the commands."""

from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap
import typing

from finetune.recipe.load import RECIPES_DIR
from finetune.recipe.schema import Config

COMMANDS = """\
Commands:
  ./launch.sh [overrides]                 train -> evaluate -> export the recipe (default: the CPU demo)
  ./launch.sh --cfg job [overrides]       print the composed, checked recipe and exit
  ./launch.sh --dry-run [overrides]       also print the accelerate command and the process layout; start nothing
  ./launch.sh -m a=1,2 b=x,y [overrides]  a sweep (Hydra's syntax: a=1,2  a=range(1,4)  a=choice(x,y)
                                          experiment=demo,demo_qwen2_vl): one run directory per job under
                                          runs/<name>/sweep-<time>/, results in sweep_results.{md,csv}
      hydra/launcher=submitit_slurm [hydra.launcher.partition=P ...]   each job as a Slurm job (submitit_local:
                                          subprocesses on this machine)
  ./launch.sh rerun runs/<run> [key=value ...]   run a finished run again from its config.yaml
  ./launch.sh test [pytest args]          the test suite            ./launch.sh setup   only set up
  eval "$(./launch.sh --completion bash)"  tab completion of groups, options, keys and flags in bash
  .venv/bin/python -m finetune.validate [overrides] [--decode]     check a dataset
  .venv/bin/python -m finetune.evaluate | finetune.export [overrides]
  .venv/bin/python -m finetune.predict --model runs/<run> --image a.jpg --question "..."
"""

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


def _field_comments(cls) -> dict[str, str]:
    """A dataclass's field comments from its source: the trailing comment, else the comment lines above."""
    comments, above = {}, []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        match = re.match(r"(\w+): [^=]+=.*?(?:#\s*(.*))?$", stripped)
        if match:
            comments[match.group(1)] = match.group(2) or " ".join(above)
        above = []
    return comments


def key_docs() -> dict[str, tuple[str, str]]:
    """{"group.key": (default, doc)} for every key of the schemas."""
    docs = {}
    groups = typing.get_type_hints(Config)  # the annotations are strings (from __future__ import annotations)
    for group in dataclasses.fields(Config):
        cls = groups[group.name]
        if not dataclasses.is_dataclass(cls):
            continue
        comments = _field_comments(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else "(required)"
            docs[f"{group.name}.{f.name}"] = (str(default), comments.get(f.name, ""))
    return docs


def help_text() -> str:
    lines = [
        "Fine-tune Qwen2-VL / Qwen2.5-VL: ./launch.sh [--help] [--cfg job] [--dry-run] [-m] [overrides]",
        "",
        COMMANDS,
        "Recipe groups (choose one with group=option; default recipe: recipes/config.yaml):",
    ]
    for group, options in group_options().items():
        lines.append(f"  {group}:")
        lines += [f"    {name:<28} {doc}" for name, doc in options]
    lines += [
        "",
        "Most used keys (group.key=value; every key: ./launch.sh --cfg job; schema: finetune/recipe/schema.py):",
    ]
    docs = key_docs()
    for key in MOST_USED:
        default, doc = docs.get(key, ("", ""))
        default = "(required)" if default == "???" else default
        wrapped = textwrap.wrap(doc, 64) or [""]
        lines.append(f"  {key:<37} {default[:20]:<20} {wrapped[0]}")
        lines += [f"  {'':<37} {'':<20} {more}" for more in wrapped[1:3]]
    return "\n".join(lines)
