"""The method group: sft by default, dpo with TRL's DPO settings; each impossible combination is one line naming the
fix."""

import pytest

from finetune.base.errors import ConfigError
from finetune.recipe.load import load_config


def test_sft_is_the_default_and_dpo_carries_trls_settings():
    assert load_config([]).method.name == "sft"
    method = load_config(["method=dpo", "method.loss_type=sigmoid+sft", "method.loss_weights=1+0.5"]).method
    assert method.loss_types == ["sigmoid", "sft"] and method.weights == [1.0, 0.5] and method.beta == 0.1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method.loss_type=sigmod"], "sigmod is not a DPO loss"),
        (["method.loss_type=sigmoid+ipo", "method.loss_weights=1"], "1 weights for 2 loss types"),
        (["method.loss_weights=one"], "numbers joined by"),
        (["method.beta=0"], "method.beta must be positive"),
        (["method.label_smoothing=0.5"], "label_smoothing must be in"),
        (["method.loss_type=exo_pair"], "exo_pair needs method.label_smoothing > 0"),
        (["method.ld_alpha=2"], "ld_alpha must be in"),
        (["method.use_weighting=true", "method.loss_type=aot"], "cannot weight loss_type aot"),
        (["method.f_divergence_type=kl"], "method.f_divergence_type='kl' is not supported"),
        (["parts.merger=full"], "parts.merger=full would move the reference too"),
        (["parts.llm=full"], "parts.llm=full would move the reference too"),
        (["data.streaming=true", "trainer.max_steps=5"], "set data.streaming=false"),
        (["evaluation.after_training=true"], "evaluation.after_training=true evaluates SFT answers"),
    ],
)
def test_bad_combinations_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(["method=dpo", *overrides])
    assert "\n" not in str(err.value)


def test_a_preference_run_does_not_run_the_sft_evaluation_after_training():
    assert load_config(["experiment=demo_dpo"]).evaluates_after_training() is False
    assert load_config([]).evaluates_after_training() is True
