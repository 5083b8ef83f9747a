"""`srun ./launch.sh ...` starts the set-up step in every task at once on one shared venv: one task installs, the
others wait for it and then run on the finished venv. launch.sh runs here as it is, copied into a temporary
repository whose `$PYTHON` is a stand-in: it makes a venv-like folder at once and writes each call to a log; its
first `pip install` waits until the test lets it go, which the test does once the other task says it waits for the
lock (or after 10 s: without a lock both tasks are then installing)."""

import os
import shutil
import subprocess
import textwrap
import time

import pytest

from tests.helpers import REPO

FAKE_PYTHON = textwrap.dedent(
    """\
    #!/usr/bin/env bash
    # A stand-in for python3 and for the venv's python: each call launch.sh makes, written to $FAKE_LOG.
    case "$1" in
      -c) exit 0 ;;  # the version check
      -) cat >/dev/null ;;  # the import check, a script on stdin
      -m)
        case "$2" in
          venv) mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && echo "venv" >>"$FAKE_LOG" ;;
          pip)
            echo "pip ${*:3}" >>"$FAKE_LOG"
            for _ in $(seq 300); do [ -f "$FAKE_LOG.go" ] && break; sleep 0.1; done ;;
          finetune) echo "run ${*:3}" >>"$FAKE_LOG" ;;
        esac ;;
    esac
    """
)


def _tools_without(tmp_path, name: str) -> str:
    """A PATH holding every command of this machine but `name`."""
    tools = tmp_path / f"tools-without-{name}"
    tools.mkdir()
    for folder in ("/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"):
        for path in sorted(os.scandir(folder) if os.path.isdir(folder) else [], key=lambda e: e.name):
            if path.name != name and not (tools / path.name).exists():
                (tools / path.name).symlink_to(path.path)
    return str(tools)


@pytest.mark.parametrize("lock", ["flock", "mkdir"])
def test_two_set_ups_at_once_install_once_and_both_run(tmp_path, lock):
    if lock == "flock" and shutil.which("flock") is None:
        pytest.fail("flock (util-linux) is missing on this machine")
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("launch.sh", "pyproject.toml", "constraints.txt"):
        shutil.copy2(REPO / name, root / name)
    python = tmp_path / "python3"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    log = tmp_path / "calls.log"
    path = os.environ["PATH"] if lock == "flock" else _tools_without(tmp_path, "flock")
    env = {
        **os.environ,
        "PATH": path,
        "PYTHON": str(python),
        "FINETUNE_VENV": str(tmp_path / "shared" / "venv"),
        "FAKE_LOG": str(log),
    }
    stderr = [tmp_path / f"task{k}.err" for k in range(2)]
    tasks = [
        subprocess.Popen([str(root / "launch.sh"), f"task={k}"], env=env, stderr=stderr[k].open("w")) for k in range(2)
    ]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any("waiting for it" in e.read_text() for e in stderr):
        time.sleep(0.05)
    (tmp_path / "calls.log.go").touch()
    codes = [task.wait(timeout=120) for task in tasks]
    errors = [e.read_text() for e in stderr]
    assert codes == [0, 0], errors
    calls = log.read_text().splitlines()
    assert calls.count("venv") == 1, calls
    assert sum(call.startswith("pip install") and "-e" in call.split() for call in calls) == 1, calls
    assert sorted(c for c in calls if c.startswith("run")) == ["run task=0", "run task=1"]
    assert sum("waiting for it" in e for e in errors) == 1, errors  # the second task said why it waited
    assert not (tmp_path / "shared" / "venv.lock.d").exists()  # the mkdir lock is released
