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


def test_kto_orpo_simpo_groups_carry_their_settings():
    kto = load_config(["method=kto", "method.desirable_weight=1.33"]).method
    assert (kto.loss_type, kto.desirable_weight, kto.undesirable_weight) == ("kto", 1.33, 1.0)
    orpo = load_config(["method=orpo"]).method
    assert (orpo.loss_type, orpo.beta) == ("orpo", 0.1)
    simpo = load_config(["method=simpo"]).method
    assert (simpo.loss_type, simpo.beta, simpo.simpo_gamma, simpo.cpo_alpha) == ("simpo", 2.0, 1.0, 0.0)


@pytest.mark.parametrize(
    "method, overrides, message",
    [
        ("kto", ["method.loss_type=sigmoid"], "'sigmoid' is not a loss of method=kto"),
        ("kto", ["trainer.per_device_train_batch_size=1"], "per_device_train_batch_size >= 2"),
        ("kto", ["method.desirable_weight=0"], "must be positive"),
        ("kto", ["method.precompute_ref_log_probs=true"], "anew every step"),
        ("kto", ["method.label_smoothing=0.1"], "method=kto has none"),
        ("orpo", ["method.precompute_ref_log_probs=true"], "has no reference model"),
        ("orpo", ["method.loss_type=simpo"], "not a loss of method=orpo"),
        ("orpo", ["method.ld_alpha=0.5"], "method.ld_alpha is a DPO setting"),
        ("orpo", ["method.undesirable_weight=2"], "weigh KTO's labels"),
        ("simpo", ["method.cpo_alpha=-1"], "cpo_alpha must be >= 0"),
        ("simpo", ["method.loss_weights=1"], "method.loss_weights is a DPO setting"),
        ("simpo", ["method.beta=0"], "method.beta must be positive"),
        ("simpo", ["parts.llm=full"], "method=simpo runs on LoRA"),
    ],
)
def test_bad_kto_orpo_simpo_combinations_are_refused_in_one_line(method, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config([f"method={method}", *overrides])
    assert "\n" not in str(err.value)


def test_the_data_kinds_name_the_schemas_methods():
    """finetune/data/preference.py's METHOD_KINDS: every method the schema accepts has its data kind."""
    from finetune.data.preference import METHOD_KINDS
    from finetune.recipe.keys import METHODS

    assert set(METHODS) <= set(METHOD_KINDS) and "ipo" not in METHOD_KINDS
    assert METHOD_KINDS["kto"] == "unpaired" and METHOD_KINDS["orpo"] == METHOD_KINDS["simpo"] == "pairs"


def test_a_preference_run_does_not_run_the_sft_evaluation_after_training():
    assert load_config(["experiment=demo_dpo"]).evaluates_after_training() is False
    assert load_config([]).evaluates_after_training() is True
