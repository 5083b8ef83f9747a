"""ruff (pyproject.toml, [tool.ruff]) on the package, the tests and the benchmarks: part of the suite, so CI, which
runs the README's test command, lints and checks the formatting too."""

import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff_passes(command):
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "finetune", "tests", "benchmarks"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, (
        result.stdout + result.stderr + "\nFix with: .venv/bin/ruff format && .venv/bin/ruff check --fix"
    )
