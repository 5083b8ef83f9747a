"""An environment where `import torchcodec` fails, as on a GPU cluster without the system FFmpeg libraries (and no
root to install them): a package of that name earlier on PYTHONPATH whose `__init__` raises ImportError."""

from __future__ import annotations

import os
from pathlib import Path

REASON = "torchcodec hidden by the test: no FFmpeg libraries"


def hidden_torchcodec_env(folder: Path) -> dict[str, str]:
    """Environment variables to add for a subprocess that cannot import torchcodec."""
    package = folder / "torchcodec"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(f"raise ImportError({REASON!r})\n")
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}
