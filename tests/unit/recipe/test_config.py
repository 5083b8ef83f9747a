"""Every recipe composes and passes its checks; mistakes fail at start-up with the fix in the message."""

import json
import re

import pytest
from omegaconf import OmegaConf

from finetune.base.errors import ConfigError
from finetune.base.families import FAMILIES
from finetune.recipe.experiments import experiments_for
from finetune.recipe.keys import RL_METHODS
from finetune.recipe.load import GROUPS, RECIPES_DIR, load_config


def _options(group):
    return sorted(p.stem for p in (RECIPES_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes(experiment):
    config = load_config([f"experiment={experiment}"])
    assert config.name == experiment
    assert config.trainer.output_dir == f"runs/{experiment}"


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS if g != "experiment" for o in _options(g)])
def test_every_group_option_composes(group, option):
    # A real model takes a GPU experiment of its family (the demo experiment is for tiny models only).
    written = OmegaConf.to_container(OmegaConf.load(RECIPES_DIR / group / f"{option}.yaml"))
    experiment = "demo"
    if group == "model" and not written["name_or_path"].startswith("tiny://"):
        experiment = experiments_for(written["family"])[0]
    # An RL method's preset leaves the rewards to the recipe (refused without them).
    rewards = ["method.rewards=[exact_match]"] if group == "method" and option in RL_METHODS else []
    composed = OmegaConf.structured(load_config([f"experiment={experiment}", f"{group}={option}", *rewards]))
    # every value the option file sets is what the checked recipe holds, unless the experiment sets it
    written.pop("defaults", None)
    leaves = [(f"{group}.{k}", v) for k, v in _flatten(written)]
    by_experiment = dict(
        _flatten(OmegaConf.to_container(OmegaConf.load(RECIPES_DIR / "experiment" / f"{experiment}.yaml")))
    )
    assert leaves
    for key, value in leaves:
        if key in by_experiment:
            continue
        if not (isinstance(value, str) and "${" in value):
            assert OmegaConf.select(composed, key) == value, key


def _flatten(values: dict, prefix: str = ""):
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_experiment_files_start_with_command_and_hardware():
    for path in (RECIPES_DIR / "experiment").glob("*.yaml"):
        header = path.read_text().split("defaults:")[0]
        assert "Command:" in header and "Hardware:" in header and "emory" in header, path.name


def test_demo_is_the_default_recipe():
    config = load_config([])
    assert (config.name, config.model.name_or_path, config.accelerate.mode) == ("demo", "tiny://qwen2_5_vl", "cpu")
    assert config.evaluates_after_training() and config.export.after_training


def test_command_line_group_beats_experiment_default():
    assert load_config(["model=tiny_qwen2_vl"]).model.family == "qwen2_vl"
    assert load_config(["experiment=demo_qwen2_vl"]).model.name_or_path == "tiny://qwen2_vl"


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["trainer.max_stpes=3"], "did you mean 'trainer.max_steps'"),
        (["modle=tiny_qwen2_vl"], "did you mean 'model'"),
        (["model=qwen3"], "'qwen3' is not a model (recipes/model/); did you mean"),
        (["trainer.learning_rate=fast"], "could not be converted to Float"),
        (["model.family=llava"], "choose one of " + ", ".join(FAMILIES)),
        (["model.min_pixels=5000", "model.max_pixels=4000"], "must be positive and <= model.max_pixels"),
        (["data.eval=null", "evaluation.after_training=true"], "set data.eval=PATH or evaluation.after_training=auto"),
        (["evaluation.after_training=maybe"], "choose one of auto, true, false"),
        (["trainer.max_steps=-1", "trainer.num_train_epochs=0"], "nothing would be trained"),
        (["peft.target_modules='(unclosed'"], "not a valid regular expression"),
        (["deepspeed.config_file=missing.json"], "does not exist"),
        (["trainer.label_mode=everything"], "choose one of assistant, last_assistant, all"),
    ],
)
def test_mistakes_fail_at_start_up_with_the_fix(overrides, expected):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(overrides)
    assert expected in str(info.value)


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_deepspeed_files_are_valid_json_with_auto_values(name):
    config = json.loads((RECIPES_DIR / "deepspeed" / f"{name}.json").read_text())
    assert config["zero_optimization"]["stage"] in (2, 3)
    assert config["train_micro_batch_size_per_gpu"] == "auto"
    assert load_config([f"deepspeed={name}"]).deepspeed.config_file.endswith(f"{name}.json")


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_each_recipe_states_its_hardware_and_a_fitting_deepspeed_stage(experiment):
    """Every experiment says what hardware it needs, with a measured figure or the word "estimate"; ZeRO-3 where the
    weights are too big for one GPU (30B and more: 32B, 72B, the 30B-A3B and 35B-A3B MoE), no ZeRO-3 for models that
    fit (its sharding then costs speed)."""
    header = (RECIPES_DIR / "experiment" / f"{experiment}.yaml").read_text().split("defaults:")[0]
    hardware = header[header.index("# Hardware:") :]
    assert "measured" in hardware.lower() or "estimate" in hardware, hardware
    config = load_config([f"experiment={experiment}", "data.train=my.json"])
    size = re.search(r"-(\d+(?:\.\d+)?)B\b", config.model.name_or_path)
    big = size is not None and float(size.group(1)) >= 30
    assert (config.deepspeed.zero_stage == 3) == big, (experiment, config.deepspeed.config_file)
