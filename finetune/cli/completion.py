"""Tab completion for `./launch.sh` in bash: groups and their options as they exist on disk (`model=<TAB>`), every
schema key (`trainer.<TAB>`), a key's choices from the schema (`parts.llm=<TAB>`, `model.rope_rule=<TAB>`),
true/false for switches, the flags, and the commands as the first word.

    eval "$(./launch.sh --completion bash)"      # e.g. in ~/.bashrc, with the repository's path

Hydra's own completion belongs to `@hydra.main` applications; the launcher composes through Hydra's compose API,
so it completes from the same sources that `--help` lists (finetune/cli/recipe_help.py).
"""

from __future__ import annotations

import shlex
import sys

from finetune.cli.commands import COMMANDS
from finetune.cli.recipe_help import LAUNCH_SH_COMMANDS, group_options, key_docs

FLAG_WORDS = ("--help", "--cfg", "--dry-run", "-m", "--multirun", "--completion")


def _value_choices(key: str, keys: dict) -> list[str]:
    """Values worth offering for a key: its choices in the schema, true/false for a switch."""
    doc = keys.get(key)
    if doc is None:
        return []
    return list(doc.choices) if doc.choices else ["true", "false"] if doc.kind is bool else []


def candidates(word: str, first: bool = False) -> list[str]:
    """Completions of the word under the cursor (`first`: it is the first argument, where subcommands go)."""
    from finetune.runs.sweep import LAUNCHERS

    groups = group_options()
    keys = key_docs()
    if word.startswith("-"):
        return [f for f in FLAG_WORDS if f.startswith(word)]
    if "=" in word:
        key, _, value = word.partition("=")
        if key in groups:
            values = [option for option, _ in groups[key]]
        elif key == "hydra/launcher":
            values = list(LAUNCHERS)
        else:
            values = _value_choices(key.lstrip("+~"), keys)
        return [f"{key}={v}" for v in values if v.startswith(value)]
    words = [f"{g}=" for g in groups] + ["hydra/launcher="]
    if "." in word:
        words += [f"{k}=" for k in keys if "." in k]
    else:  # a group's prefix, or a top-level key such as `name`
        words += sorted({f"{k.split('.')[0]}." if "." in k else f"{k}=" for k in keys})
    if first:
        words += [*COMMANDS, *LAUNCH_SH_COMMANDS]
    return sorted(w for w in words if w.startswith(word))


def bash_script(python: str) -> str:
    """A bash completion function for launch.sh. The word under the cursor is taken from COMP_LINE, since bash
    splits words at `=`; the replies then drop what bash already treats as a separate word."""
    command = f"{shlex.quote(python)} -m finetune.cli.completion"
    return f"""\
_finetune_launch_complete() {{
  local line="${{COMP_LINE:0:COMP_POINT}}" word first=""
  word="${{line##*[[:space:]]}}"
  case "${{line#*[[:space:]]}}" in *[[:space:]]*) ;; *) first="--first" ;; esac
  local replies
  replies="$({command} $first -- "$word" 2>/dev/null)" || return 0
  COMPREPLY=()
  local prefix="${{word%"${{word##*[=:]}}"}}"
  local reply
  while IFS= read -r reply; do
    [ -n "$reply" ] && COMPREPLY+=("${{reply#"$prefix"}}")
  done <<< "$replies"
}}
complete -o nospace -o default -F _finetune_launch_complete launch.sh ./launch.sh
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    first = "--first" in args
    words = args[args.index("--") + 1 :] if "--" in args else [a for a in args if a != "--first"]
    print("\n".join(candidates(words[0] if words else "", first)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
