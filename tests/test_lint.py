"""ruff (pyproject.toml, [tool.ruff.lint]) on the package, the tests and the benchmarks: part of the suite, so CI,
which runs the README's test command, lints too."""

import subprocess
import sys

from tests.helpers import REPO


def test_ruff_check_passes():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "finetune", "tests", "benchmarks"], cwd=REPO,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
