"""The QLoRA tests (tests/qlora/: every dense family per unit, the demo's 20 nf4 steps and its export) in a process of
their own with bitsandbytes on its path: ./launch.sh installs it beside the venv, not in it (tests/qlora/__init__.py)."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO


def test_the_qlora_tests_pass_with_bitsandbytes_on_their_path(tmp_path):
    env = {**os.environ, "FINETUNE_QLORA_TESTS": "1"}
    if importlib.util.find_spec("bitsandbytes") is None:
        site = Path(sys.prefix) / "extras" / "qlora"
        assert (site / "bitsandbytes").is_dir(), f"no bitsandbytes in the venv nor in {site}: run ./launch.sh setup"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), str(REPO), env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider"]
    result = subprocess.run(
        [*command, "--basetemp", str(tmp_path / "qlora"), "tests/qlora"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, output[-8000:]
    collected, passed = re.search(r"collected (\d+) items", output), re.search(r"(\d+) passed", summary)
    assert collected and passed and passed.group(1) == collected.group(1) and int(passed.group(1)) >= 20, summary
    assert not re.search(r"failed|error|skipped|xfail|xpass|deselected", summary), summary
