"""`./launch.sh rerun runs/<run> [key=value ...]`: run a finished run again from its saved, resolved recipe.

The new run goes to `runs/<run>-rerun-<time>` (or `trainer.output_dir=...`) with the same recipe and seed. The
dataset files must be the ones the run trained on (checked against the sha256 in its run_info.json); a
different package version or git commit is reported before the run starts, since it may change the numbers.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from finetune.base.errors import ConfigError
from finetune.records.rundir import RunDir


def _differences(info: dict) -> list[str]:
    from finetune.records.runinfo import git_state, package_versions

    notes = []
    now = package_versions()
    for name, version in (info.get("packages") or {}).items():
        if now.get(name) != version:
            notes.append(f"{name} {version} then, {now.get(name)} now")
    then, current = info.get("git") or {}, git_state()
    if then.get("sha") != current.get("sha"):
        notes.append(f"git commit {then.get('sha')} then, {current.get('sha')} now")
    if current.get("dirty"):
        notes.append("the working tree has uncommitted changes now")
    return notes


def rerun_overrides(run_dir: Path, extra: list[str]) -> list[str]:
    """The overrides that re-run `run_dir` (checked: the recipe exists, the data files are unchanged)."""
    from finetune.recipe.load import load_config
    from finetune.records.runinfo import data_digests

    run = RunDir(run_dir)
    recipe = run.config_file
    if not recipe.is_file():
        raise ConfigError(f"{run_dir} holds no config.yaml: give the run directory of a finished run.")
    target = next((o.split("=", 1)[1] for o in extra if o.startswith("trainer.output_dir=")), None)
    if target is None:
        target = str(run_dir.parent / f"{run_dir.name}-rerun-{time.strftime('%Y%m%d-%H%M%S')}")
    overrides = [
        f"recipe_file={recipe}",
        f"trainer.output_dir={target}",
        f"export.output_dir={target}/merged",
        "trainer.resume_from_checkpoint=null",
        *[o for o in extra if not o.startswith("trainer.output_dir=")],
    ]
    info_file, info = run.run_info_file, run.run_info()
    recorded = info.get("data_sha256")
    if recorded is None:
        print(f"warning: {info_file} records no data checksums (an older run): the data files are not checked.")
    else:
        now = data_digests(load_config(overrides))
        changed = [path for path, digest in recorded.items() if now.get(path) != digest]
        if changed:
            raise ConfigError(
                "the data changed since the run: " + ", ".join(changed) + " (sha256 differs or the file "
                "is gone). Restore the files, or start a new run from the recipe instead."
            )
    for note in _differences(info):
        print(f"warning: {note}: the numbers may differ from the original run.")
    return overrides


def rerun(argv: list[str]) -> int:
    from finetune.runs.launch import run_recipe

    if not argv or argv[0].startswith("-"):
        print("usage: ./launch.sh rerun runs/<run> [key=value ...]", file=sys.stderr)
        return 2
    try:
        overrides = rerun_overrides(Path(argv[0]), argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"re-running {argv[0]} into {overrides[1].split('=', 1)[1]}")
    return run_recipe(overrides)
