import os
from pathlib import Path

import pytest

INTEGRATION = Path(__file__).parent / "integration"
# The modules that take minutes (multi-process runs, the whole demo twice): started first, so that on two workers the
# short ones fill in around them instead of one of them running alone at the end.
LONGEST_FIRST = ("test_scale_out.py", "test_demo_end_to_end.py")
# Modules that run one after the other on one worker (one xdist scope), never beside each other: beside the
# multi-rank runs of test_scale_out.py, the demo's single training process ran 6x slower than alone (398 s against
# 65 s, fresh clone of a8ef5ce), while beside the unit tests it runs about 2x slower, as two processes on two cores do.
# The multi-rank modules also rendezvous on accelerate's fixed port (29500): two at once would collide.
ONE_AFTER_ANOTHER = (
    "test_scale_out.py",
    "test_demo_end_to_end.py",
    "test_preference_scale_out.py",
    "test_grpo_zero3.py",
    "test_sequence_parallel.py",
    "test_fsdp2.py",
)
# tests/qlora/ runs only in the process tests/integration/test_qlora.py starts, with bitsandbytes on its path
# (tests/qlora/__init__.py says why it is not in the venv).
collect_ignore = [] if os.environ.get("FINETUNE_QLORA_TESTS") else ["qlora"]
WORKERS = 2  # the 2-core machine the suite is timed on; `-n N` chooses, `-n 0` or `-p no:xdist` runs one process


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """The whole suite, or a -m/-k selection of it (no paths named), runs on WORKERS pytest-xdist workers, a module
    per worker at a time (`--dist loadscope`): a module's fixtures (a trained run several tests read) are built once,
    and the multi-process tests, which rendezvous on accelerate's fixed port, all sit in one module
    (tests/integration/test_scale_out.py) and so never run two at once. Naming files or tests runs them in this process,
    as does `-n 0` or `-p no:xdist`. Most tests here hold one core (tiny models: Python, not matrix sizes, is the
    cost) or wait on a subprocess, so two workers share the two cores well."""
    if not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput"):
        return
    if config.option.numprocesses is None and config.args_source == pytest.Config.ArgsSource.TESTPATHS:
        workers = min(WORKERS, os.cpu_count() or 1)
        if workers > 1 and not config.getoption("usepdb", False) and not config.getoption("collectonly", False):
            config.option.numprocesses = workers
            if config.option.dist == "no":
                config.option.dist = "loadscope"
                config.option.loadscopereorder = False  # xdist would order modules by test count: keep ours


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown under -p no:xdist
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadscope` with the ONE_AFTER_ANOTHER modules in a single scope (so on one worker, in turn)."""
    if config.option.dist != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "one-after-another" if Path(module).name in ONE_AFTER_ANOTHER else super()._split_scope(nodeid)

    return Scheduling(config, log)


def pytest_configure(config):
    """An xdist worker computes with one thread, and so do the processes its tests start (`./launch.sh` keeps an
    OMP_NUM_THREADS it finds): with tiny models a second thread mostly spins, and two workers would oversubscribe two
    cores. Measured on the 2-core machine, 295 unit tests: 193 CPU-s in one process with 2 threads, 91 CPU-s on 2
    workers; the demo beside a busy core: 489 s with 2 threads, 67 s with 1 (2026-12-06)."""
    if hasattr(config, "workerinput"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """The slow marker goes by directory: everything under tests/integration/ trains or launches processes
    (`-m "not slow"` runs the unit tests, a few minutes); CI runs both."""
    for item in items:
        if INTEGRATION in Path(item.fspath).parents:
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(item.fspath).name, len(rank)))  # stable: otherwise collection order


@pytest.fixture(scope="session")
def tiny_paths():
    from finetune.base.families import FAMILIES
    from finetune.model.tiny import tiny_checkpoint

    return {family: tiny_checkpoint(family) for family in FAMILIES}


@pytest.fixture(scope="session")
def processors(tiny_paths):
    from transformers import AutoProcessor

    return {family: AutoProcessor.from_pretrained(path) for family, path in tiny_paths.items()}


@pytest.fixture(scope="session")
def demo_config():
    from finetune.recipe.load import load_config

    return load_config([])
