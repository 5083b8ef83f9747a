from pathlib import Path

import pytest

INTEGRATION = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(items):
    """The slow marker goes by directory: everything under tests/integration/ trains or launches processes
    (`-m "not slow"` runs the unit tests, a few minutes); CI runs both."""
    for item in items:
        if INTEGRATION in Path(item.fspath).parents:
            item.add_marker(pytest.mark.slow)


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
