"""Helpers shared by the tests: media and datasets written on the fly, tiny recipe runs, the reference code
wrappers, and the multi-process harness. Imported as `tests.helpers.<module>` (tests/ is a package)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "data" / "demo"
