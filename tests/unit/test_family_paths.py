"""The end-to-end tests that run one family per distinct path (tests/helpers/family_paths.py) still reach every path
of every family, and what they assert per family that no other per-family test asserts is checked here for each
family, in this process."""

import dataclasses

import pytest

from finetune.base.families import FAMILIES
from tests.helpers.family_paths import FAMILY_PER_PATH, one_family_per_path, path_features
from tests.helpers.recipe_runs import EXPERIMENT


def test_the_chosen_families_take_every_path_of_every_family():
    chosen = set().union(*(path_features(FAMILIES[n]) for n in FAMILY_PER_PATH))
    for name, family in FAMILIES.items():
        assert path_features(family) <= chosen, name
    assert len(FAMILY_PER_PATH) == len(set(FAMILY_PER_PATH)) and set(FAMILY_PER_PATH) <= set(FAMILIES)


def test_a_family_on_a_new_path_joins_and_one_on_known_paths_does_not():
    base = FAMILIES["qwen2_5_vl"]
    known = dataclasses.replace(base, model_type="known")  # every path already taken
    new = dataclasses.replace(base, model_type="new", mergers=("merger", "deepstack_merger_list"), router="gate")
    assert one_family_per_path({**FAMILIES, "known": known}) == FAMILY_PER_PATH
    assert "new" in one_family_per_path({**FAMILIES, "new": new})


@pytest.mark.parametrize("family", list(FAMILIES))
def test_trained_mergers_and_expert_lora_are_in_the_saved_adapter(family):
    """What the 2-rank ZeRO-3 test asserts of its saved adapter, for every family: with parts.merger=full each merger
    (DeepStack's too) is saved in full beside the LoRA weights, and a mixture of experts saves its experts' LoRA."""
    from peft import get_peft_model_state_dict

    from finetune.model.load import load_model
    from finetune.model.trainable import make_trainable
    from finetune.recipe.load import load_config

    entry = FAMILIES[family]
    config = load_config([f"experiment={EXPERIMENT[family]}", "parts.merger=full"])
    saved = list(get_peft_model_state_dict(make_trainable(load_model(config.model, "fp32"), config)))
    for merger in entry.mergers:
        assert any(f".{entry.vision_tower}.{merger}." in k and "lora_" not in k for k in saved), merger
    assert any(".language_model." in k and "lora_" in k for k in saved)
    assert any(".experts." in k and "lora_" in k for k in saved) == bool(entry.expert_lora_targets)
