"""Where relative paths in recipes point, and where our caches live."""

from __future__ import annotations

import os
from pathlib import Path

from finetune.base.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout: recipes/, data/ and the tests live here


def resolve_data_file(path: str) -> Path:
    """A dataset file or folder as given, else relative to the current directory, else to the repository root (so the
    bundled recipes work from any directory). A missing file is an error that lists where we looked."""
    candidate = Path(path)
    if candidate.is_absolute():
        tried = [candidate]
    else:
        tried = list(dict.fromkeys([Path.cwd() / candidate, REPO_ROOT / candidate]))  # one entry when cwd is the repo
    for p in tried:
        if p.exists():
            return p
    raise DataError(f"Dataset file {path!r} not found (looked at {', '.join(str(p) for p in tried)}).")


def cache_root() -> Path:
    """Tiny checkpoints, reference wheels and the stores of read-only datasets ($FINETUNE_CACHE_DIR)."""
    return Path(os.environ.get("FINETUNE_CACHE_DIR", Path.home() / ".cache" / "finetune"))
