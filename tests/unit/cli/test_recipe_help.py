"""--help, tab completion and the README's key reference read one source: the schema's field metadata and the table
of commands."""

from finetune.cli.commands import COMMANDS
from finetune.cli.completion import candidates
from finetune.cli.recipe_help import LAUNCH_SH_COMMANDS, MOST_USED, help_text, key_docs, keys_markdown, readme_section
from tests.helpers import REPO


def test_the_readme_key_reference_is_what_the_schema_generates():
    current = readme_section((REPO / "README.md").read_text())
    assert current == keys_markdown(), (
        "README.md's Recipe keys differ from the schema; regenerate them with "
        ".venv/bin/python -m finetune.cli.recipe_help --readme"
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
