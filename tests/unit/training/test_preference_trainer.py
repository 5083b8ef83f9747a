"""The DPO trainer (finetune/training/preference_trainer.py): TRL's loss on the log-probs of our forward, the reference
being the same model with the LoRA adapter off; a few steps train with finite loss and log rewards and margins."""

import math

import pytest
import torch
import torch.nn.functional as F

from finetune.data.encode import IGNORE_INDEX
from finetune.model.load import load_model, load_processor, position_rule
from finetune.model.trainable import make_trainable
from finetune.recipe.load import load_config
from finetune.training.preference_forward import completion_log_probs, vision_parts
from finetune.training.preference_trainer import (
    VisionLanguageDPOTrainer,
    build_dpo_config,
    pair_loader_factory,
    sequence_log_probs,
)
from tests.helpers.lora import move_lora
from tests.helpers.preference_pairs import demo_pairs, encoder
from tests.helpers.tolerance import assert_close_to_scale


def _trainer(tmp_path, *overrides):
    config = load_config(
        [
            "method=dpo",
            "logger=none",
            f"trainer.output_dir={tmp_path}",
            "trainer.per_device_train_batch_size=2",
            "trainer.gradient_accumulation_steps=1",
            "trainer.max_steps=3",
            "trainer.logging_steps=1",
            "trainer.save_steps=1000",
            "trainer.dataloader_num_workers=0",
            "trainer.learning_rate=1e-3",
            "trainer.packing=false",
            "trainer.gradient_checkpointing=false",
            *overrides,
        ]
    )
    processor = load_processor(config.model)
    torch.manual_seed(0)  # the same LoRA initialisation in every trainer a test builds
    model = make_trainable(load_model(config.model, "fp32"), config)
    pairs = demo_pairs("img", 2) + demo_pairs("vid", 2)
    build, collator = pair_loader_factory(config, encoder(processor), pairs, position_rule(model, config.model), False)
    trainer = VisionLanguageDPOTrainer(
        model=model,
        args=build_dpo_config(config, "fp32", tmp_path),
        processing_class=processor,
        train_loader=build,
        recipe=config,
        train_size=len(pairs),
    )
    return trainer, collator, pairs


def _by_hand(model, batch, beta, loss_type):
    """TRL's formula on our per-token log-probs, the reference with the adapter off."""
    with torch.no_grad():
        policy = completion_log_probs(model, batch)
        with model.disable_adapter():
            ref = completion_log_probs(model, batch)
    pol = sequence_log_probs(policy.log_probs, policy.mask, None)
    ref_sum = sequence_log_probs(ref.log_probs, ref.mask, None)
    (pc, pr), (rc, rr) = pol.chunk(2), ref_sum.chunk(2)
    chosen, rejected = pc - rc, pr - rr
    if loss_type == "sigmoid":
        return (-F.logsigmoid(beta * (chosen - rejected))).mean(), beta * chosen, beta * rejected
    nc, nr = policy.mask.sum(1).chunk(2)
    return ((chosen / nc - rejected / nr - 1 / (2 * beta)) ** 2).mean(), beta * chosen, beta * rejected


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_the_loss_is_trls_formula_on_our_log_probs(tmp_path, loss_type):
    trainer, collator, pairs = _trainer(tmp_path, f"method.loss_type={loss_type}", "method.beta=0.3")
    model = trainer.model
    move_lora(model, 0.02)
    batch = collator(list(range(len(pairs))))  # images and videos in one batch
    batch.pop("sample_ids"), batch.pop("bad_samples")
    expected, chosen_rewards, rejected_rewards = _by_hand(model, batch, 0.3, loss_type)
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
    assert math.isfinite(loss.item()) and expected.item() != pytest.approx(math.log(2))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    metrics = trainer._metrics["train"]
    assert metrics["rewards/chosen"][-1] == pytest.approx(chosen_rewards.mean().item(), rel=1e-4, abs=1e-7)
    margin = (chosen_rewards - rejected_rewards).mean().item()
    assert metrics["rewards/margins"][-1] == pytest.approx(margin, rel=1e-4, abs=1e-7)


def test_a_few_steps_train_and_log_rewards_and_margins(tmp_path):
    trainer, _, _ = _trainer(tmp_path)
    reference = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    visual, _ = vision_parts(trainer.model)
    calls = []
    handle = visual.register_forward_hook(lambda *args: calls.append(1))
    try:
        trainer.train()
    finally:
        handle.remove()
    assert len(calls) == 3  # one tower call per step: the policy reuses the reference forward's features
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert math.isfinite(h[key]), (key, h)
    assert logs[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)  # the first step: policy = reference
    moved = [n for n, p in trainer.model.named_parameters() if n in reference and not torch.equal(p, reference[n])]
    assert moved  # the adapter trained
    assert logs[-1]["rewards/margins"] != 0
    assert "ref" not in trainer.model.peft_config  # the reference is the adapter off, not a copy


def test_a_pair_with_no_completion_tokens_adds_nothing(tmp_path):
    """The stand-in batch (every pair failed to decode): no trained token, loss log 2, zero gradient."""
    trainer, collator, pairs = _trainer(tmp_path)
    move_lora(trainer.model, 0.02)
    batch = collator([0])
    for key in ("labels",):
        batch[key] = torch.full_like(batch[key], IGNORE_INDEX)
    batch.pop("sample_ids"), batch.pop("bad_samples")
    loss = trainer.compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)


def test_packed_rows_with_activation_checkpointing_give_the_padded_loss(tmp_path):
    """trainer.packing=true puts the 2B sequences of a step into shared rows; with LLM activation checkpointing on,
    the loss and the LoRA gradients equal the padded batch's."""
    results = []
    for packing in ("false", "true"):
        trainer, collator, pairs = _trainer(
            tmp_path / packing, f"trainer.packing={packing}", "trainer.gradient_checkpointing=true"
        )
        model = trainer.model
        model.train()
        move_lora(model, 0.02)
        batch = collator(list(range(len(pairs))))
        assert (batch["input_ids"].shape[0] < 2 * len(pairs)) == (packing == "true")
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (padded, padded_grads), (packed, packed_grads) = results
    assert packed.item() == pytest.approx(padded.item(), rel=1e-5)
    assert padded_grads and set(packed_grads) == set(padded_grads)
    for name, grad in padded_grads.items():
        assert_close_to_scale(packed_grads[name], grad, rel=1e-4, name=name)


def test_build_trainer_dispatches_method_dpo(tmp_path, monkeypatch):
    """`finetune train method=dpo`: the same model loading and LoRA as SFT, the DPO trainer, the pairs from the reader
    (stubbed here with the demo pairs; finetune/data/preference.py reads them in a run)."""
    from finetune.training import workflow

    monkeypatch.setattr(workflow, "read_training_pairs", lambda config, encoder, split="train": demo_pairs("img", 2))
    config = load_config(["method=dpo", "logger=none", f"trainer.output_dir={tmp_path}", "trainer.max_steps=1"])
    trainer, _, size, precision = workflow.build_trainer(config, [])
    assert isinstance(trainer, VisionLanguageDPOTrainer) and size == 2 and precision == "fp32"
    assert trainer.model.peft_config["default"].r == config.peft.r
    assert trainer.beta == config.method.beta and trainer.loss_types == ["sigmoid"]
    assert trainer._train_loader(1).collate_fn.encoder.label_mode.value == "last_assistant"


def test_precomputed_reference_log_probs_equal_the_per_step_ones(tmp_path):
    """method.precompute_ref_log_probs: the table scored once (adapter off, images and videos) gives the same loss as
    the reference forward of every step, and a step then calls the tower once (the policy's)."""
    trainer, collator, pairs = _trainer(tmp_path)
    model = trainer.model
    move_lora(model, 0.02)
    batch = collator(list(range(len(pairs))))
    batch.pop("sample_ids"), batch.pop("bad_samples")
    with torch.no_grad():
        per_step = trainer.compute_loss(model, dict(batch, pair_index=None))
    trainer._reference_collators = {"train": collator}
    trainer.model_wrapped = model
    visual, _ = vision_parts(model)
    calls = []
    handle = visual.register_forward_hook(lambda *args: calls.append(1))
    try:
        trainer.precompute_reference()
        assert len(calls) == 2  # 4 pairs in batches of 2
        calls.clear()
        table = trainer._reference_tables["train"]
        assert table.shape == (len(pairs), 2) and (table < 0).all()  # every pair scored (log-probs are negative)
        shuffled = collator([3, 1, 0, 2])  # any order: looked up by pair index
        shuffled.pop("sample_ids"), shuffled.pop("bad_samples")
        with torch.no_grad():
            precomputed = trainer.compute_loss(model, shuffled)
        assert len(calls) == 1
    finally:
        handle.remove()
    assert precomputed.item() == pytest.approx(per_step.item(), rel=1e-5)


def test_a_mixture_of_experts_model_trains_with_the_recipes_load_balancing_weight(tmp_path):
    """Qwen3-VL-MoE: our forward returns the router's load-balancing loss; with a frozen router its weight is 0 (as in
    SFT), so the DPO loss is TRL's alone, and the aux loss is logged."""
    trainer, _, _ = _trainer(tmp_path, "experiment=demo_qwen3_vl_moe", "trainer.max_steps=2")
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.0
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) and math.isfinite(h["aux_loss"]) for h in logs)
    assert logs[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)
