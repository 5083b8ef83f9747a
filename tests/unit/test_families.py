"""The model family registry (finetune/base/families.py): every entry is complete and well typed, every field is
read by the package, and each entry describes its real (tiny) model, its processors and has its recipes. The
per-family tests elsewhere take their family list from the registry, so a new entry runs them too."""

import dataclasses
import re
import types
import typing
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from finetune.base.families import FAMILIES, VIDEO_BUDGETS, VIDEO_LAYOUTS, Family, family_of
from finetune.base.paths import REPO_ROOT
from finetune.recipe.load import load_config
from tests.helpers.recipe_runs import EXPERIMENT

NAMES = list(FAMILIES)


def _type_problem(value, hint) -> str | None:
    """Why `value` is not a filled-in `hint` (None when it is). Optional fields may be None, never empty."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(hint)):
            return None
        (hint,) = args
    origin, args = typing.get_origin(hint) or hint, typing.get_args(hint)
    if origin is str:
        return None if isinstance(value, str) and value.strip() else "an empty or non-string value"
    if origin is tuple:
        ok = isinstance(value, tuple) and value and all(isinstance(v, str) and v.strip() for v in value)
        return None if ok else "not a non-empty tuple of names"
    if origin is dict:
        ok = isinstance(value, dict) and value and all(isinstance(k, str) and k for k in value)
        return None if ok else "not a non-empty dict keyed by names"
    return f"a type this test cannot check yet ({hint}): teach _type_problem about it"


def entry_problems(family: Family) -> list[str]:
    hints = typing.get_type_hints(Family)
    problems = []
    for field in dataclasses.fields(Family):
        problem = _type_problem(getattr(family, field.name), hints[field.name])
        if problem:
            problems.append(f"{family.model_type}.{field.name}: {problem}")
    return problems


# ---------------------------------------------------------------- the entries as data


def test_no_field_can_be_left_out():
    """A field without a default cannot be missing from an entry (constructing it fails on import)."""
    with_default = [
        f.name
        for f in dataclasses.fields(Family)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]
    assert not with_default, f"Family fields with a default can be silently left out of an entry: {with_default}"


@pytest.mark.parametrize("name", NAMES)
def test_every_field_is_filled_in_and_well_typed(name):
    family = FAMILIES[name]
    assert family.model_type == name and family_of(name) is family
    assert entry_problems(family) == []


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(Family)])
def test_the_completeness_check_catches_each_field_left_empty(field):
    family = FAMILIES[NAMES[0]]
    blank = {str: "", tuple: (), dict: {}}[type(getattr(family, field) or "")]
    assert [p for p in entry_problems(dataclasses.replace(family, **{field: blank})) if f".{field}:" in p]


@pytest.mark.parametrize("name", NAMES)
def test_video_layout_is_one_the_package_knows(name):
    assert FAMILIES[name].video_layout in VIDEO_LAYOUTS
    assert FAMILIES[name].video_budget in VIDEO_BUDGETS


def test_titles_tell_families_apart_and_unknown_types_are_refused():
    assert len({f.title for f in FAMILIES.values()}) == len(FAMILIES)
    with pytest.raises(ValueError, match="not a model family"):
        family_of("llava")


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(Family)])
def test_every_field_is_read_by_the_package(field):
    """No dead fields: some module that imports the registry (besides the registry) reads `<entry>.<field>`."""
    sources = [p.read_text() for p in (REPO_ROOT / "finetune").rglob("*.py") if p.name != "families.py"]
    importers = [text for text in sources if "finetune.base.families import" in text]
    readers = [text for text in importers if re.search(rf"\.{field}\b", text)]
    assert readers, f"Family.{field} is read nowhere in finetune/"


# ---------------------------------------------------------------- each entry against its real model


@pytest.fixture(scope="module")
def models(tiny_paths):
    from transformers import AutoModelForImageTextToText

    return {name: AutoModelForImageTextToText.from_pretrained(path) for name, path in tiny_paths.items()}


def test_the_tiny_checkpoints_cover_the_registry(tiny_paths):
    assert set(tiny_paths) == set(FAMILIES)


@pytest.mark.parametrize("name", NAMES)
def test_module_paths_resolve_and_classify_every_parameter_once(models, name):
    from finetune.model.trainable import check_layout, model_family, model_part, vision_tower

    family, model = FAMILIES[name], models[name]
    assert model.config.model_type == name and model_family(model) is family
    inner = model.get_submodule(family.inner_model)
    assert hasattr(inner, "get_rope_index")
    visual = inner.get_submodule(family.vision_tower)
    assert vision_tower(model) is visual
    for merger in family.mergers:
        visual.get_submodule(merger)
    inner.get_submodule(family.language_model)
    assert model.get_submodule(family.lm_head) is model.get_output_embeddings()
    check_layout(model)

    vision = f"{family.inner_model}.{family.vision_tower}."
    groups = {
        "merger": tuple(f"{vision}{m}." for m in family.mergers),
        "vision_tower": (vision,),
        "llm": (f"{family.inner_model}.{family.language_model}.", f"{family.lm_head}."),
    }
    seen = dict.fromkeys(groups, 0)
    for param_name, _ in model.named_parameters():
        under = [part for part, prefixes in groups.items() if param_name.startswith(prefixes)]
        # a merger's parameters are under the vision tower too: they belong to the merger alone
        expected = ["merger"] if "merger" in under else under
        assert len(expected) == 1, (param_name, under)
        assert model_part(param_name, family) == expected[0], param_name
        assert model_part(f"base_model.model.{param_name}", family) == expected[0]  # as PEFT names it
        seen[expected[0]] += 1
    assert all(seen.values()), seen


@pytest.mark.parametrize("name", NAMES)
def test_shard_units_are_the_decoder_layers_and_vision_blocks(models, name):
    """FSDP2's units (finetune/runs/launch.py): every LLM decoder layer and every ViT block is an instance of exactly
    one of the named classes, and no other module is."""
    family, model = FAMILIES[name], models[name]
    inner = model.get_submodule(family.inner_model)
    layers = list(inner.get_submodule(family.language_model).layers)
    blocks = list(inner.get_submodule(family.vision_tower).blocks)
    named = [m for m in model.modules() if type(m).__name__ in family.shard_units]
    assert {type(m).__name__ for m in layers} | {type(m).__name__ for m in blocks} == set(family.shard_units)
    assert len(named) == len(layers) + len(blocks) and {id(m) for m in named} == {id(m) for m in layers + blocks}


@pytest.mark.parametrize("name", NAMES)
def test_saved_checkpoint_keys_classify_like_the_loaded_parameters(models, tiny_paths, name):
    """transformers 5 writes the original key layout (`visual.*`, `model.layers.*`): the parts are told apart there
    too (the export test compares merged and base weights by part)."""
    from safetensors import safe_open

    from finetune.model.checkpoint_layout import published_layout
    from finetune.model.trainable import model_part

    family = FAMILIES[name]
    with safe_open(str(tiny_paths[name] / "model.safetensors"), "pt") as f:
        saved = Counter(model_part(key, family) for key in f.keys())
    with torch.no_grad():  # the keys as published: experts split per expert where the family's checkpoints are so
        published = published_layout(dict(models[name].named_parameters()), family)
    assert saved == Counter(model_part(n, family) for n in published)


@pytest.mark.parametrize("name", NAMES)
def test_lora_targets_are_linear_layers_of_their_part(models, name):
    from finetune.model.trainable import lora_targets, model_part

    family, model = FAMILIES[name], models[name]
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    llm = {n for n in linear if n.startswith(f"{family.inner_model}.{family.language_model}.")}
    vision = {n for n in linear if model_part(n, family) == "vision_tower"}
    for target in family.lora_targets:
        assert any(n.rsplit(".", 1)[1] == target for n in llm), target
    for target in family.vision_lora_targets:
        assert any(n.endswith(f".{target}") for n in vision), target
    config = load_config([f"experiment={EXPERIMENT[name]}", "parts.vision_tower=lora"])
    chosen = set(lora_targets(model, config))
    assert chosen == {n for n in llm if n.rsplit(".", 1)[1] in family.lora_targets} | {
        n for n in vision if n.endswith(tuple(f".{t}" for t in family.vision_lora_targets))
    }
    assert not any("patch_embed" in n for n in chosen)


@pytest.mark.parametrize("name", NAMES)
def test_experts_router_and_published_layout_match_the_model(models, tiny_paths, name):
    """A mixture-of-experts entry names, in every decoder layer, 3-D expert parameters (one slice per expert), a
    router that is no nn.Linear (so the nn.Linear LoRA targets never reach it) with one [E, H] weight, and how the
    published layout stores the experts: the tiny checkpoint stores exactly the `transposed_in_checkpoint` ones
    transposed, with last two dimensions that differ (transformers' loader decides by shape), and the
    `per_expert_in_checkpoint` ones as one tensor per expert and projection, not fused. A dense entry names none,
    and its LLM has none."""
    from safetensors import safe_open

    from finetune.model.checkpoint_layout import split_per_expert

    family, model = FAMILIES[name], models[name]
    text = model.config.text_config
    layers = model.get_submodule(f"{family.inner_model}.{family.language_model}").layers
    params = dict(model.named_parameters())
    with safe_open(str(tiny_paths[name] / "model.safetensors"), "pt") as f:
        saved = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    if family.router is None:
        assert family.expert_lora_targets is None and family.transposed_in_checkpoint is None
        assert family.per_expert_in_checkpoint is None
        # (3-D elsewhere: Qwen3.5's depthwise linear_attn.conv1d [C, 1, K])
        assert not [n for n, p in params.items() if p.dim() == 3 and ".layers." in n and ".mlp." in n]
        assert all(saved[n] == tuple(p.shape) for n, p in params.items() if n in saved)
        return
    transposed, split = family.transposed_in_checkpoint or (), family.per_expert_in_checkpoint or ()
    assert not set(transposed) & set(split) and set(transposed) | set(split) == set(family.expert_lora_targets)
    prefix = f"{family.inner_model}.{family.language_model}.layers"
    rewritten = set()
    for index, layer in enumerate(layers):
        for target in family.expert_lora_targets:
            param = params[f"{prefix}.{index}.{target}"]
            assert param.dim() == 3 and param.shape[0] == text.num_experts, target
        router = layer.get_submodule(family.router)
        assert not isinstance(router, torch.nn.Linear)
        assert [tuple(p.shape) for p in router.parameters()] == [(text.num_experts, text.hidden_size)]
        for target in transposed:
            key = f"{prefix}.{index}.{target}"
            shape = tuple(params[key].shape)
            assert shape[-1] != shape[-2] and saved[key] == (*shape[:-2], shape[-1], shape[-2]), key
            rewritten.add(key)
        for target in split:
            key = f"{prefix}.{index}.{target}"
            pieces = {k: tuple(v.shape) for k, v in split_per_expert(key, params[key].detach()).items()}
            assert key not in saved and {k: saved.get(k) for k in pieces} == pieces, key
            assert len(pieces) == text.num_experts * (2 if target.endswith("gate_up_proj") else 1)
            rewritten.add(key)
    assert all(saved[n] == tuple(p.shape) for n, p in params.items() if n not in rewritten)


# The patterns peft.target_modules / peft.vision_target_modules defaulted to before they defaulted to the family's.
OLD_LLM_DEFAULT = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
OLD_VISION_DEFAULT = r".*visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2|gate_proj|up_proj|down_proj))$"


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])  # the families the recipe defaults were written for
def test_registry_targets_are_what_the_recipe_defaults_chose(models, name):
    from finetune.model.trainable import lora_targets, model_part

    family, model = FAMILIES[name], models[name]
    config = load_config([f"experiment={EXPERIMENT[name]}", "parts.vision_tower=lora"])
    by_regex = {
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
        and (
            (model_part(n, family) == "llm" and re.fullmatch(OLD_LLM_DEFAULT, n))
            or (model_part(n, family) == "vision_tower" and re.fullmatch(OLD_VISION_DEFAULT, n))
        )
    }
    assert set(lora_targets(model, config)) == by_regex


@pytest.mark.parametrize("name", NAMES)
def test_processors_positions_and_tiny_build_match_the_model(models, processors, name):
    family, model, processor = FAMILIES[name], models[name], processors[name]
    assert type(processor).__name__ == family.processor
    assert type(processor.image_processor).__name__ == family.image_processor
    assert type(processor.video_processor).__name__ == family.video_processor
    vision_config, hidden = model.config.vision_config, model.config.text_config.hidden_size
    # finetune/data/encode.py asks the processor whether videos carry seconds; the registry says the same
    assert ("second_per_grid_ts" in processor.model_input_names) == (family.video_seconds_scale is not None)
    if family.video_seconds_scale:
        assert getattr(vision_config, family.video_seconds_scale) > 0
    assert getattr(vision_config, family.merger_width) == hidden
    visual = model.get_submodule(f"{family.inner_model}.{family.vision_tower}")
    for merger in family.mergers:
        last = [m for m in visual.get_submodule(merger).modules() if isinstance(m, torch.nn.Linear)][-1]
        assert last.out_features == hidden, merger
    for key, value in family.tiny_vision.items():
        assert getattr(vision_config, key) == value, key
    for key, value in (family.tiny_text or {}).items():
        assert getattr(model.config.text_config, key) == value, key
    # The processors cut the pixels as the model's patch embed and merger expect (Qwen3-VL: the classes' defaults
    # are not the checkpoints', so the tiny build sets the checkpoints' values), and hold those values.
    for part in (processor.image_processor, processor.video_processor):
        assert (part.patch_size, part.merge_size, part.temporal_patch_size) == (
            vision_config.patch_size,
            vision_config.spatial_merge_size,
            vision_config.temporal_patch_size,
        )
    for part_name, values in (family.processor_settings or {}).items():
        part = getattr(processor, part_name)
        for key, value in values.items():
            got = getattr(part, key)
            got = {k: got[k] for k in value} if isinstance(value, dict) else got
            assert (list(got) if isinstance(got, tuple) else got) == value, (part_name, key)


# ---------------------------------------------------------------- each entry has its recipes


@pytest.mark.parametrize("name", NAMES)
def test_each_family_has_its_recipes(name):
    """A real-model recipe, the tiny recipe (recipes/model/tiny_<family>.yaml) and a demo experiment."""
    assert name in EXPERIMENT, f"tests/helpers/recipe_runs.py EXPERIMENT names no demo experiment for {name}"
    model_recipes = {p.stem: OmegaConf.load(p) for p in (REPO_ROOT / "recipes" / "model").glob("*.yaml")}
    real = [stem for stem, r in model_recipes.items() if r.family == name and not stem.startswith("tiny_")]
    assert real, f"no recipes/model/*.yaml with family: {name}"
    tiny = load_config([f"model=tiny_{name}"]).model
    assert (tiny.family, tiny.name_or_path) == (name, f"tiny://{name}")
    assert (REPO_ROOT / "recipes" / "experiment" / f"{EXPERIMENT[name]}.yaml").is_file()
    assert load_config([f"experiment={EXPERIMENT[name]}"]).model.family == name


def test_recipes_name_only_registered_families():
    for path in sorted(Path(REPO_ROOT / "recipes" / "model").glob("*.yaml")):
        assert OmegaConf.load(path).family in FAMILIES, path.name
