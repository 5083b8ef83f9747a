"""The table of commands: every entry leads to a function, the documented `python -m finetune.<command>` forms and
`python -m finetune` reach the same entries, and a first argument that is not a command runs the recipe."""

import importlib
import subprocess
import sys

import pytest

from finetune.cli import main as cli
from finetune.cli.commands import COMMANDS
from tests.helpers import REPO


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_leads_to_a_function(name):
    module, function = COMMANDS[name].target.split(":")
    assert callable(getattr(importlib.import_module(module), function))
    assert COMMANDS[name].summary


@pytest.mark.parametrize("name", ["train", "evaluate", "export", "predict", "validate"])
def test_the_documented_module_forms_run_their_command(name):
    alias = (REPO / "finetune" / f"{name}.py").read_text()
    assert f'run_command("{name}", sys.argv[1:])' in alias


def test_a_first_word_that_names_a_command_runs_it_and_anything_else_runs_the_recipe(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "run_command", lambda name, argv: seen.append((name, argv)) or 0)
    cli.main(["validate", "--decode", "data.train=x.json"])
    cli.main(["trainer.max_steps=2", "--dry-run"])
    cli.main([])
    assert seen == [
        ("validate", ["--decode", "data.train=x.json"]),
        ("run", ["trainer.max_steps=2", "--dry-run"]),
        ("run", []),
    ]


def test_refusals_end_as_one_line_and_exit_2_through_the_table(capsys):
    assert cli.run_command("train", ["trainer.learning_rate=-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "learning_rate" in err and "Traceback" not in err


def test_python_dash_m_finetune_is_the_same_table():
    result = subprocess.run(
        [sys.executable, "-m", "finetune", "--cfg", "job", "trainer.max_steps=7"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "max_steps: 7" in result.stdout
