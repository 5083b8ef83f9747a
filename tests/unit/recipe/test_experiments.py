"""A real model never composes the CPU demo's trainer: a demo experiment with a checkpoint that is not tiny:// is
refused in one line naming the family's GPU experiments; a GPU experiment takes another size of its family."""

import json
import re

import pytest
from omegaconf import OmegaConf

from finetune.base.errors import ConfigError
from finetune.base.families import FAMILIES
from finetune.cli.main import main
from finetune.recipe.experiments import experiments_for, gpu_experiments
from finetune.recipe.load import RECIPES_DIR, load_config


def _family_experiments(family: str) -> list[str]:
    """The GPU experiments whose `override /model:` is a model of `family`, read from the files."""
    names = []
    for path in sorted((RECIPES_DIR / "experiment").glob("*.yaml")):
        model = re.search(r"override /model: (\S+)", path.read_text())
        if path.stem.startswith("demo") or model is None:
            continue
        if OmegaConf.load(RECIPES_DIR / "model" / f"{model.group(1)}.yaml").family == family:
            names.append(path.stem)
    return names


@pytest.mark.parametrize(
    "model,family,pick",
    [
        ("qwen2_5_vl_7b", "qwen2_5_vl", "qwen2_5_vl_7b_video_lora"),
        ("qwen3_vl_8b", "qwen3_vl", "qwen3_vl_8b_video_lora"),
    ],
)
def test_a_real_model_with_the_demo_is_refused_naming_the_experiments(model, family, pick, capsys):
    assert main([f"model={model}", "data.train=my.json", "--cfg", "job"]) == 2
    captured = capsys.readouterr()
    expected = (
        f"error: model={model} with the CPU demo's settings (experiment=demo: learning rate, batch and max_length for "
        f"a tiny model on the CPU): pick a GPU experiment, e.g. ./launch.sh experiment={pick} data.train=my.json "
        f"({FAMILIES[family].title} experiments: {', '.join(_family_experiments(family))}).\n"
    )
    assert captured.err == expected and captured.out == ""


def test_another_size_is_offered_with_the_family_experiment_and_composes():
    with pytest.raises(ConfigError) as info:
        load_config(["model=qwen2_5_vl_3b", "data.train=my.json"])
    command = "./launch.sh experiment=qwen2_5_vl_7b_video_lora model=qwen2_5_vl_3b data.train=my.json"
    assert f"e.g. {command} (" in str(info.value)
    config = load_config(command.split()[1:])  # the advice runs
    assert config.model.name_or_path == "Qwen/Qwen2.5-VL-3B-Instruct" and config.name == "qwen2_5_vl_7b_video_lora"


def test_a_demo_with_a_local_checkpoint_is_refused_and_the_tiny_demos_compose():
    with pytest.raises(ConfigError, match=r"^model.name_or_path=/ckpt/qwen with the CPU demo's settings \(experiment="):
        load_config(["experiment=demo_qwen2_vl", "model.name_or_path=/ckpt/qwen"])
    for experiment in ("demo", "demo_qwen3_vl", "demo_qwen3_5_moe"):
        assert load_config([f"experiment={experiment}"]).model.name_or_path.startswith("tiny://")


def test_every_family_has_a_gpu_experiment():
    assert {family for _, family in gpu_experiments().values()} == set(FAMILIES)
    for family in FAMILIES:
        assert experiments_for(family) == _family_experiments(family)


def test_a_local_copy_of_a_tiny_checkpoint_runs_the_demo_and_a_local_real_one_is_refused(tmp_path):
    from finetune.model.tiny import tiny_checkpoint

    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "config.json").write_text((tiny_checkpoint("qwen2_5_vl") / "config.json").read_text())
    assert load_config([f"model.name_or_path={tiny}"]).model.name_or_path == str(tiny)
    real = tmp_path / "real"
    real.mkdir()
    config = json.loads((tiny / "config.json").read_text())
    config["text_config"]["hidden_size"] = 3584  # Qwen2.5-VL-7B's width
    (real / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"model.name_or_path={real} with the CPU demo's settings"):
        load_config([f"model.name_or_path={real}"])


def test_no_experiment_composes_the_groups_defaults():
    budgets = ["model.video_max_frames=128", "model.video_total_pixels=9633792", "data.max_length=16384"]
    config = load_config(["~experiment", "name=bench", "model=qwen2_5_vl_7b", "data=custom", *budgets])
    assert config.name == "bench" and config.trainer.learning_rate == 1e-4 and config.accelerate.mode == "auto"
