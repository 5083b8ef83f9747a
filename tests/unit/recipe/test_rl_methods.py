"""The RL methods (grpo, dapo, dr_grpo, gspo) are presets of TRL's GRPO settings in recipes/method/; each setting a
recipe gets wrong is refused in one line naming the key and the fix, before anything loads."""

import pytest

from finetune.base.errors import ConfigError
from finetune.recipe.load import load_config

RL = ["method.rewards=[choice]", "trainer.per_device_train_batch_size=8"]


@pytest.mark.parametrize(
    "method, expected",
    [
        ("grpo", {"loss_type": "grpo", "beta": 0.04, "scale_rewards": "group", "importance_sampling_level": "token"}),
        ("dapo", {"loss_type": "dapo", "beta": 0.0, "epsilon_high": 0.28, "mask_truncated_completions": True}),
        ("dr_grpo", {"loss_type": "dr_grpo", "beta": 0.0, "scale_rewards": "none"}),
        (
            "gspo",
            {"loss_type": "grpo", "importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4},
        ),
    ],
)
def test_each_preset_sets_its_papers_settings(method, expected):
    m = load_config([f"method={method}", *RL]).method
    assert m.is_rl and m.name == method
    assert {key: getattr(m, key) for key in expected} == expected


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["method=grpo", "trainer.per_device_train_batch_size=8"], "needs rewards"),
        (["method=grpo", "method.rewards=[choice]", "trainer.per_device_train_batch_size=6"], "multiple of 4"),
        (["method.rewards=[choice]"], "method.rewards is for the RL methods"),
        (["method=dpo", "method.rewards=[choice]"], "method.rewards is for the RL methods"),
        (["method=grpo", *RL, "method.loss_type=sigmoid"], "is not a GRPO loss"),
        (["method=grpo", *RL, "method.num_generations=1", "trainer.per_device_train_batch_size=1"], "2 or more"),
        (["method=grpo", *RL, "method.beta=-0.1"], "method.beta must be 0"),
        (["method=grpo", *RL, "method.temperature=0"], "method.temperature"),
        (["method=grpo", *RL, "method.top_p=0"], "method.top_p"),
        (["method=grpo", *RL, "method.epsilon_high=0.1"], "below method.epsilon"),
        (["method=grpo", *RL, "method.num_iterations=0"], "method.num_iterations"),
        (["method=grpo", *RL, "method.scale_rewards=mean"], "method.scale_rewards"),
        (["method=grpo", *RL, "method.importance_sampling_level=batch"], "method.importance_sampling_level"),
        (["method=grpo", *RL, "data.eval=null", "evaluation.steps=10"], "evaluation.steps needs a held-out split"),
        (["method=grpo", *RL, "evaluation.after_training=true"], "data.eval holds RL prompts, scored by the rewards"),
        (["method=grpo", *RL, "parts.llm=full"], "LoRA adapter off"),
    ],
)
def test_a_wrong_rl_setting_is_refused_in_one_line(overrides, named):
    with pytest.raises(ConfigError) as err:
        load_config(["logger=none", *overrides])
    message = str(err.value)
    assert named in message and "\n" not in message


def test_an_rl_method_scores_held_out_prompts_during_training():
    """evaluation.steps with an RL method and its prompts as data.eval (reward_eval.py); no standalone SFT evaluation
    after training (data.eval holds prompts, not SFT answers)."""
    config = load_config(["method=grpo", *RL, "data.eval=data/demo/prompts_train.json", "evaluation.steps=10"])
    assert config.evaluation.steps == 10 and not config.evaluates_after_training()


def test_the_rl_build_reads_the_recipes_prompts_and_rewards(tmp_path, monkeypatch):
    """workflow.build_trainer dispatches an RL method to the GRPO trainer with the recipe's rewards (the demo's
    shipped one and its reward by path) and prompts."""
    from finetune.base.paths import REPO_ROOT
    from finetune.training.grpo_trainer import VisionLanguageGRPOTrainer
    from finetune.training.workflow import build_trainer

    monkeypatch.chdir(REPO_ROOT)  # the demo's reward file is named relative to the working directory
    config = load_config(["experiment=demo_grpo", "logger=none", f"trainer.output_dir={tmp_path}"])
    trainer, _, size, _ = build_trainer(config, [])
    assert isinstance(trainer, VisionLanguageGRPOTrainer)
    assert trainer.reward_table.names == ["exact_match", "data/demo/rewards.py:is_option"]
    assert size == 1200 and trainer.num_generations == 16 and trainer.max_completion_length == 1


def test_validate_checks_an_rl_recipes_data_as_prompts_with_solutions(monkeypatch, capsys):
    from finetune.base.paths import REPO_ROOT
    from finetune.training.validate import main

    monkeypatch.chdir(REPO_ROOT)
    assert main(["--split", "train", "experiment=demo_grpo", "logger=none"]) == 0
    assert "tokens per prompt" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["sft", "grpo"])
def test_the_model_card_names_the_method(method):
    from finetune.exporting.serving import model_card

    extra = RL if method != "sft" else []
    card = model_card(load_config([f"method={method}", *extra, "logger=none"]), {})
    assert f"(method `{method}`, recipe" in card
    [tags] = [line for line in card.splitlines() if line.startswith("tags:")]
    assert tags.endswith(f", {method}]")
