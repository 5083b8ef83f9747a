"""KTO, ORPO and SimPO (finetune/training/preference_methods.py): each loss on our per-token log-probs equals its
formula written out here and TRL's own loss code; a few steps train with finite metrics and one vision-tower call per
step; ORPO and SimPO run one forward per step and never turn the adapter off (no reference)."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

with warnings.catch_warnings():  # "trl.experimental is unstable"
    warnings.simplefilter("ignore")
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

from finetune.base.families import family_of
from finetune.model.load import load_model, load_processor, position_rule
from finetune.model.trainable import make_trainable
from finetune.recipe.load import load_config
from finetune.training.preference_forward import completion_log_probs, vision_parts
from finetune.training.preference_methods import VisionLanguageKTOTrainer, VisionLanguageReferenceFreeTrainer
from finetune.training.preference_trainer import (
    build_dpo_config,
    completion_loader_factory,
    pair_loader_factory,
)
from tests.helpers.lora import move_lora
from tests.helpers.preference_pairs import demo_completions, demo_pairs, encoder

COMMON = [
    "logger=none",
    "trainer.per_device_train_batch_size=4",
    "trainer.gradient_accumulation_steps=1",
    "trainer.max_steps=3",
    "trainer.logging_steps=1",
    "trainer.save_steps=1000",
    "trainer.dataloader_num_workers=0",
    "trainer.learning_rate=1e-3",
    "trainer.packing=false",
    "trainer.gradient_checkpointing=false",
]


def _trainer(tmp_path, method, *overrides):
    config = load_config([f"method={method}", f"trainer.output_dir={tmp_path}", *COMMON, *overrides])
    processor = load_processor(config.model)
    torch.manual_seed(0)
    model = make_trainable(load_model(config.model, "fp32"), config)
    rule = position_rule(model, config.model)
    if method == "kto":  # images and videos, desirable and undesirable completions
        items = demo_completions("img", 2) + demo_completions("vid", 2)
        build, collator = completion_loader_factory(config, encoder(processor), items, rule, False)
        trainer_class = VisionLanguageKTOTrainer
    else:
        items = demo_pairs("img", 2) + demo_pairs("vid", 2)
        build, collator = pair_loader_factory(config, encoder(processor), items, rule, False)
        trainer_class = VisionLanguageReferenceFreeTrainer
    trainer = trainer_class(
        model=model,
        args=build_dpo_config(config, "fp32", tmp_path),
        processing_class=processor,
        train_loader=build,
        recipe=config,
        train_size=len(items),
    )
    return trainer, collator, items


def _sums(model, batch, adapter: bool):
    with torch.no_grad():
        if adapter:
            out = completion_log_probs(model, batch)
        else:
            with model.disable_adapter():
                out = completion_log_probs(model, batch)
    return (out.log_probs * out.mask).sum(1), out.mask.sum(1)


def _batch(collator, indices):
    batch = collator(indices)
    for key in ("sample_ids", "bad_samples", "pair_index"):
        batch.pop(key)
    return batch


def _count_calls(module):
    calls = []
    return calls, module.register_forward_hook(lambda *args: calls.append(1))


def _inner(model):
    base = model.get_base_model()
    return base.get_submodule(family_of(base.config.model_type).inner_model)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_the_kto_loss_is_the_formula_on_our_log_probs(tmp_path, loss_type):
    beta, wd, wu = 0.3, 1.5, 0.7
    trainer, collator, items = _trainer(
        tmp_path,
        "kto",
        f"method.loss_type={loss_type}",
        f"method.beta={beta}",
        f"method.desirable_weight={wd}",
        f"method.undesirable_weight={wu}",
    )
    model = trainer.model
    move_lora(model, 0.02)
    batch = _batch(collator, [0, 1, 4, 7, 5])  # images and videos, 3 desirable and 2 undesirable
    label = batch["label"]
    assert label.tolist() == [True, False, True, False, False]
    ratio = _sums(model, batch, True)[0] - _sums(model, batch, False)[0]
    if loss_type == "kto":
        kl_batch = batch["kl_batch"]
        kl = (_sums(model, kl_batch, True)[0] - _sums(model, kl_batch, False)[0]).mean().clamp(min=0)
        desirable = 1 - torch.sigmoid(beta * (ratio[label] - kl))
        undesirable = 1 - torch.sigmoid(beta * (kl - ratio[~label]))
    else:
        assert "kl_batch" not in batch  # apo_zero_unpaired has no KL term: no mismatched sequences
        desirable = 1 - torch.sigmoid(beta * ratio[label])
        undesirable = torch.sigmoid(beta * ratio[~label])
    expected = torch.cat([wd * desirable, wu * undesirable]).mean()
    calls, handle = _count_calls(vision_parts(model)[0])
    try:
        with torch.no_grad():
            loss = trainer.compute_loss(model, batch)
    finally:
        handle.remove()
    assert len(calls) == 1  # four forwards (reference and policy, completions and KL), one tower call
    assert math.isfinite(loss.item()) and ratio.abs().max() > 1e-4  # the adapter moved: the test can tell
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    metrics = trainer._metrics["train"]
    assert metrics["rewards/chosen"][-1] == pytest.approx((beta * ratio[label]).mean().item(), rel=1e-4, abs=1e-7)
    if loss_type == "kto":
        assert metrics["kl"][-1] == pytest.approx(kl.item(), rel=1e-4, abs=1e-7)


def _hand_reference_free(method, chosen, rejected, nll, beta, gamma, alpha):
    if method == "orpo":
        log_odds = (chosen - rejected) - (torch.log1p(-chosen.exp()) - torch.log1p(-rejected.exp()))
        return nll - beta * F.logsigmoid(log_odds).mean()
    return -F.logsigmoid(beta * (chosen - rejected) - gamma).mean() + alpha * nll


@pytest.mark.parametrize("method", ["orpo", "simpo"])
def test_the_reference_free_losses_are_trls_on_our_log_probs(tmp_path, method):
    beta, gamma, alpha = (0.25, 0.0, 0.0) if method == "orpo" else (2.0, 1.0, 0.3)
    extra = [] if method == "orpo" else [f"method.simpo_gamma={gamma}", f"method.cpo_alpha={alpha}"]
    trainer, collator, pairs = _trainer(tmp_path, method, f"method.beta={beta}", *extra)
    model = trainer.model
    move_lora(model, 0.02)
    batch = _batch(collator, list(range(len(pairs))))  # two image pairs, two video pairs
    sums, counts = _sums(model, batch, True)
    average = sums / counts
    chosen, rejected = average.chunk(2)
    nll = -sums.chunk(2)[0].sum() / counts.chunk(2)[0].sum()  # the chosen replies' mean token cross-entropy
    expected = _hand_reference_free(method, chosen, rejected, nll, beta, gamma, alpha)
    # TRL's own loss code on the same tensors
    ns = type("Settings", (), {"beta": beta, "accelerator": trainer.accelerator})()
    if method == "orpo":
        trl_loss = nll - ORPOTrainer.odds_ratio_loss(ns, chosen, rejected)[0].mean()
    else:
        ns.alpha, ns.loss_type, ns.simpo_gamma, ns.label_smoothing = 0.0, "simpo", gamma, 0.0
        trl_loss = CPOTrainer.cpo_loss(ns, chosen, rejected)[0].mean() + alpha * nll
    assert trl_loss.item() == pytest.approx(expected.item(), rel=1e-6)

    def no_reference():
        raise AssertionError("a reference-free method turned the adapter off")

    model.disable_adapter = no_reference
    visual, inner = vision_parts(model)[0], _inner(model)
    tower, handle = _count_calls(visual)
    forwards, inner_handle = _count_calls(inner)
    try:
        with torch.no_grad():
            loss = trainer.compute_loss(model, batch)
    finally:
        handle.remove(), inner_handle.remove()
        del model.disable_adapter
    assert (len(forwards), len(tower)) == (1, 1)  # one forward, one tower call: no reference
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    metrics = trainer._metrics["train"]
    assert metrics["rewards/margins"][-1] == pytest.approx(beta * (chosen - rejected).mean().item(), rel=1e-4)
    assert metrics["nll_loss"][-1] == pytest.approx(nll.item(), rel=1e-5)


@pytest.mark.parametrize("method", ["kto", "orpo", "simpo"])
def test_a_few_steps_train_with_finite_metrics_and_one_tower_call_per_step(tmp_path, method):
    trainer, _, _ = _trainer(tmp_path, method)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    tower, handle = _count_calls(vision_parts(trainer.model)[0])
    forwards, inner_handle = _count_calls(_inner(trainer.model))
    try:
        trainer.train()
    finally:
        handle.remove(), inner_handle.remove()
    assert len(tower) == 3  # one tower call per step (a frozen tower's features serve every forward of the step)
    assert len(forwards) == (4 if method == "kto" else 1) * 3  # KTO: reference and policy, completions and KL
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    keys = ["loss", "rewards/chosen", "rewards/rejected", "logps/chosen"]
    keys += ["kl"] if method == "kto" else ["rewards/accuracies", "rewards/margins", "nll_loss"]
    for h in logs:
        for key in keys:
            assert math.isfinite(h[key]), (key, h)
    moved = [n for n, p in trainer.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert moved


@pytest.mark.parametrize("method", ["kto", "orpo", "simpo"])
def test_build_trainer_dispatches_each_method(tmp_path, monkeypatch, method):
    """`finetune train method=...`: the same model loading and LoRA as SFT, the method's trainer and data (stubbed
    here: finetune/data/preference.py reads them in a run)."""
    from finetune.model.preference_batching import PairCollator, UnpairedCollator
    from finetune.training import workflow

    monkeypatch.setattr(workflow, "read_training_pairs", lambda config, encoder, split="train": demo_pairs("img", 2))
    monkeypatch.setattr(
        workflow, "read_training_completions", lambda config, encoder, split="train": demo_completions("img", 1)
    )
    config = load_config([f"method={method}", "logger=none", f"trainer.output_dir={tmp_path}", "trainer.max_steps=1"])
    trainer, _, size, _ = workflow.build_trainer(config, [])
    expected = VisionLanguageKTOTrainer if method == "kto" else VisionLanguageReferenceFreeTrainer
    assert isinstance(trainer, expected) and size == 2 and trainer.beta == config.method.beta
    collator = trainer._train_loader(1).collate_fn
    assert isinstance(collator, UnpairedCollator if method == "kto" else PairCollator)
    assert collator.encoder.label_mode.value == "last_assistant"
    if method == "kto":
        assert (trainer.loss_type, trainer.calculate_KL) == ("kto", True)


def test_completions_of_one_prompt_share_its_media_and_score_as_alone(tmp_path):
    """Two completions of one image prompt (and two of one video prompt) in a KTO batch: the prompt's media is in the
    batch once, and each completion's log-probs equal those of a batch holding it alone."""
    trainer, collator, _ = _trainer(tmp_path, "kto")
    model = trainer.model
    move_lora(model, 0.02)
    together = _batch(collator, [0, 1, 4, 5])  # (image prompt 0) x 2, (video prompt 0) x 2
    assert together["image_grid_thw"].shape[0] == 1 and together["video_grid_thw"].shape[0] == 1
    assert together["image_index"].tolist() == [0, 0] and together["video_index"].tolist() == [0, 0]
    sums, _ = _sums(model, together, True)
    alone = torch.cat([_sums(model, _batch(collator, [i]), True)[0] for i in (0, 1, 4, 5)])
    assert torch.allclose(sums, alone, rtol=1e-5, atol=1e-5 * alone.abs().max().item())


@pytest.mark.parametrize("method", ["kto", "simpo"])
def test_a_mixture_of_experts_model_trains_with_the_recipes_load_balancing_weight(tmp_path, method):
    """Qwen3-VL-MoE: the router's load-balancing loss comes from the completions' forward, weighted as in SFT (0 with
    a frozen router: logged only)."""
    trainer, _, _ = _trainer(tmp_path, method, "experiment=demo_qwen3_vl_moe", "trainer.max_steps=2")
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.0
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) and math.isfinite(h["aux_loss"]) for h in logs)
