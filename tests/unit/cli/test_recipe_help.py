"""--help, tab completion and the key reference (docs/recipe-keys.md) read one source: the schema's field metadata and the table
of commands."""

from finetune.cli.commands import COMMANDS
from finetune.cli.completion import candidates
from finetune.cli.recipe_help import LAUNCH_SH_COMMANDS, MOST_USED, help_text, key_docs, keys_markdown, keys_section
from tests.helpers import REPO


def test_the_key_reference_is_what_the_schema_generates():
    current = keys_section((REPO / "docs" / "recipe-keys.md").read_text())
    assert current == keys_markdown(), (
        "docs/recipe-keys.md differs from the schema; regenerate it with "
        ".venv/bin/python -m finetune.cli.recipe_help --write"
    )


def test_help_lists_every_command_and_the_choices_of_the_keys_it_shows():
    text = help_text()
    for name, command in COMMANDS.items():
        if name != "run":  # the default command: `./launch.sh [overrides]` and its flags
            assert f"./launch.sh {name} {command.usage}".rstrip() in text, name
    for name in LAUNCH_SH_COMMANDS:
        assert f"./launch.sh {name}" in text
    docs = key_docs()
    for key in MOST_USED:
        line = next(line for line in text.splitlines() if line.startswith(f"  {key} "))
        assert docs[key].default[:20] in line
        if docs[key].choices:
            assert f"[{' | '.join(docs[key].choices)}]" in line, key


def test_completion_offers_each_keys_choices_and_the_commands():
    for key, doc in key_docs().items():
        if doc.choices:
            assert candidates(f"{key}=") == [f"{key}={choice}" for choice in doc.choices]
    assert candidates("trainer.gradient_checkpointing=") == [
        "trainer.gradient_checkpointing=true",
        "trainer.gradient_checkpointing=false",
    ]
    first_words = candidates("", first=True)
    assert set(COMMANDS) | set(LAUNCH_SH_COMMANDS) <= set(first_words)
    assert not set(COMMANDS) & set(candidates("", first=False))
