import pytest


@pytest.fixture(scope="session")
def tiny_paths():
    from finetune.model.tiny import tiny_checkpoint

    return {family: tiny_checkpoint(family) for family in ("qwen2_vl", "qwen2_5_vl")}


@pytest.fixture(scope="session")
def processors(tiny_paths):
    from transformers import AutoProcessor

    return {family: AutoProcessor.from_pretrained(path) for family, path in tiny_paths.items()}


@pytest.fixture(scope="session")
def demo_config():
    from finetune.recipe.schema import load_config

    return load_config([])
