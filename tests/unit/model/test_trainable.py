"""Freezing, LoRA placement and per-part learning rates: after real training steps (the trainer the recipe
builds), exactly the expected parameters changed, and each part moved at its own learning rate."""

import re
import shutil

import pytest
import torch

from finetune.base.errors import ConfigError
from finetune.base.families import FAMILIES
from finetune.model.trainable import model_part
from finetune.recipe.data_settings import vision_settings
from finetune.recipe.load import load_config
from tests.helpers.recipe_runs import EXPERIMENT, mini_dataset, tiny_run_overrides
from tests.helpers.tolerance import assert_close_to_scale

DEMO_FAMILY = FAMILIES["qwen2_5_vl"]  # what _train and the demo recipe train


def _train(tmp_path, extra, steps=2, family="qwen2_5_vl"):
    from finetune.training.workflow import build_trainer

    tmp_path.mkdir(parents=True, exist_ok=True)
    train_file = mini_dataset(tmp_path / "train.json", per_task=2)
    overrides = (
        tiny_run_overrides(family, tmp_path / "run", train_file, steps=steps)
        + ["trainer.lr_scheduler_type=constant", "trainer.save_steps=1000"]
        + extra
    )
    trainer, *_ = build_trainer(load_config(overrides), overrides)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name].detach())}
    return changed, before, after, trainer


def _lora(names, part):
    return {n for n in names if "lora_" in n and model_part(n, DEMO_FAMILY) == part}


CASES = {
    # name: (overrides, expected changed set as a function of all parameter names)
    "default: LoRA on the LLM only": ([], lambda names: _lora(names, "llm")),
    "merger trained fully beside LLM LoRA": (
        ["parts.merger=full"],
        lambda names: _lora(names, "llm") | {n for n in names if ".merger.modules_to_save." in n},
    ),
    "ViT LoRA beside LLM LoRA": (
        ["parts.vision_tower=lora"],
        lambda names: _lora(names, "llm") | _lora(names, "vision_tower"),
    ),
    "ViT LoRA only, merger trained": (
        ["parts.vision_tower=lora", "parts.llm=frozen", "parts.merger=full"],
        lambda names: _lora(names, "vision_tower") | {n for n in names if ".merger.modules_to_save." in n},
    ),
    "full fine-tuning of the LLM": (
        ["parts.llm=full", "export.after_training=false"],
        lambda names: {n for n in names if model_part(n, DEMO_FAMILY) == "llm"},
    ),
    "full fine-tuning of vision tower and merger, LLM frozen": (
        ["parts.llm=frozen", "parts.vision_tower=full", "parts.merger=full", "export.after_training=false"],
        lambda names: {n for n in names if model_part(n, DEMO_FAMILY) != "llm"},
    ),
    "everything trains": (
        ["parts.llm=full", "parts.vision_tower=full", "parts.merger=full", "export.after_training=false"],
        lambda names: set(names),
    ),
    "DoRA": (["peft.use_dora=true"], lambda names: _lora(names, "llm")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exactly_the_chosen_parameters_change(tmp_path, case):
    overrides, expected = CASES[case]
    changed, before, _, _ = _train(tmp_path, overrides)
    assert changed == expected(list(before)), (
        sorted(changed - expected(list(before)))[:5],
        sorted(expected(list(before)) - changed)[:5],
    )
    assert changed  # something trained
    # The Conv3d patch embed never takes LoRA, and no frozen original of a fully trained copy moves.
    assert not any("patch_embed" in n and "lora_" in n for n in before)
    assert not any("original_module" in n for n in changed)
    if "DoRA" in case:
        assert any("lora_magnitude_vector" in n for n in changed)


def test_each_part_moves_at_its_own_learning_rate(tmp_path):
    """One AdamW step moves each element by lr * |g| / (|g| + eps): the largest move in a part is its rate."""
    rates = {"llm": 1e-3, "vision_tower": 2e-3, "merger": 4e-3}
    changed, before, after, _ = _train(
        tmp_path,
        [
            "parts.vision_tower=lora",
            "parts.merger=full",
            f"trainer.learning_rate={rates['llm']}",
            f"parts.vision_tower_lr={rates['vision_tower']}",
            f"parts.merger_lr={rates['merger']}",
        ],
        steps=1,
    )
    for part, lr in rates.items():
        moves = [
            (after[n].detach() - before[n]).abs().max().item() for n in changed if model_part(n, DEMO_FAMILY) == part
        ]
        assert moves and max(moves) == pytest.approx(lr, rel=1e-3), (part, max(moves))


def test_rslora_scales_by_the_square_root_of_the_rank(tmp_path):
    *_, trainer = _train(tmp_path, ["peft.use_rslora=true", "peft.r=4", "peft.alpha=8"], steps=1)
    model = trainer.model
    scalings = {m.scaling["default"] for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)}
    assert len(scalings) == 1 and scalings.pop() == pytest.approx(8 / 4**0.5)  # plain LoRA: 8 / 4 = 2


MOES = [name for name, family in FAMILIES.items() if family.router]  # the mixture-of-experts families


def _moe_lora(names, family, experts=True):
    return {n for n in _lora_of(names, family, "llm") if experts or ".experts." not in n}


def _lora_of(names, family, part):
    return {n for n in names if "lora_" in n and model_part(n, family) == part}


def _routers(names, family):
    return {n for n in names if f".{family.router}." in n}


MOE_CASES = {
    # name: (overrides, expected changed set as a function of all parameter names and the family)
    "default: LoRA on attention and experts, router frozen": ([], _moe_lora),
    "LoRA on attention only": (["peft.target_experts=false"], lambda names, f: _moe_lora(names, f, experts=False)),
    "LoRA and a fully trained router": (
        ["parts.router=full"],
        lambda names, f: _moe_lora(names, f) | {n for n in _routers(names, f) if ".modules_to_save." in n},
    ),
    "full fine-tuning of the LLM, router frozen": (
        ["parts.llm=full", "export.after_training=false"],
        lambda names, f: {n for n in names if model_part(n, f) == "llm"} - _routers(names, f),
    ),
    "full fine-tuning of the LLM and its router": (
        ["parts.llm=full", "parts.router=full", "export.after_training=false"],
        lambda names, f: {n for n in names if model_part(n, f) == "llm"},
    ),
}


@pytest.mark.parametrize("family", MOES)
@pytest.mark.parametrize("case", list(MOE_CASES))
def test_moe_experts_take_lora_and_the_router_trains_only_when_asked(tmp_path, case, family):
    overrides, expected_of = MOE_CASES[case]
    changed, before, _, trainer = _train(tmp_path, overrides, family=family)
    expected = expected_of(list(before), FAMILIES[family])
    assert changed == expected, (sorted(changed - expected)[:5], sorted(expected - changed)[:5])
    if "experts" in case:  # both LoRA factors of both fused parameters, in every layer
        experts = {n for n in changed if ".experts." in n and "lora_" in n}
        assert len(experts) == 2 * 2 * trainer.model.config.text_config.num_hidden_layers
    if "router" in case and "frozen" in case:
        routers = _routers(before, FAMILIES[family])
        assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if n in routers)


@pytest.mark.parametrize("family", MOES)
def test_expert_lora_gets_gradients_and_the_frozen_router_none(family):
    """One forward + backward of the MoE demo model as training builds it: every LoRA factor on the fused experts
    has a non-zero gradient, the router's weights none (and never require one)."""
    from benchmarks.saved_activations import mixed_batch
    from finetune.model.batching import training_batch
    from finetune.model.load import load_model
    from finetune.model.rope import model_position_rule
    from finetune.model.trainable import make_trainable

    config = load_config([f"experiment={EXPERIMENT[family]}"])
    torch.manual_seed(0)
    model = make_trainable(load_model(config.model, "fp32"), config).train()
    for name, param in model.named_parameters():  # LoRA B starts at zero: A would get no gradient
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    encoded, pad_id = mixed_batch(config)
    batch = training_batch([[e] for e in encoded], pad_id, model_position_rule(model))
    batch.pop("num_real_tokens")
    model(**batch, use_cache=False).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if ".experts." in n and "lora_" in n}
    assert len(grads) == 8 and all(g is not None and g.abs().max() > 0 for g in grads.values())
    routers = {n: p for n, p in model.named_parameters() if f".{FAMILIES[family].router}." in n}
    assert len(routers) == 2 and all(not p.requires_grad and p.grad is None for p in routers.values())


@pytest.mark.parametrize("family", MOES)
def test_the_load_balancing_loss_is_logged_and_weighted_as_asked(tmp_path, family):
    """2 steps of the MoE demo: `aux_loss` is logged at every step; with a frozen router it is not in the loss
    (weight 0), with trainer.router_aux_loss_coef=0.5 the first step's loss (same weights) is higher by 0.5 x it.
    The model config keeps the checkpoint's values (TRL writes its own choice there)."""
    runs = {}
    for coef in (None, 0.5):
        extra = [] if coef is None else [f"trainer.router_aux_loss_coef={coef}"]
        *_, trainer = _train(tmp_path / str(coef), extra, family=family)
        logged = [h for h in trainer.state.log_history if "loss" in h]
        assert [h["step"] for h in logged] == [1, 2] and all(h["aux_loss"] > 0 for h in logged)
        assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == (coef or 0.0)
        text_config = trainer.model.config.get_text_config()
        assert (text_config.output_router_logits, text_config.router_aux_loss_coef) == (False, 0.001)
        runs[coef] = logged[0]
    assert runs[None]["aux_loss"] == pytest.approx(runs[0.5]["aux_loss"], rel=1e-6)
    assert runs[0.5]["loss"] - runs[None]["loss"] == pytest.approx(0.5 * runs[0.5]["aux_loss"], rel=1e-4)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["parts.router=full"], "Qwen2.5-VL has no router"),
        (["trainer.router_aux_loss_coef=0.01"], "Qwen2.5-VL has no router"),
        (["experiment=demo_qwen3_vl_moe", "peft.dropout=0.05"], "PEFT applies LoRA to expert parameters without"),
        (["experiment=demo_qwen3_vl_moe", "parts.router=full", "parts.llm=frozen", "parts.merger=full"], "frozen LLM"),
        (["experiment=demo_qwen3_vl_moe", "trainer.router_aux_loss_coef=-1"], "must be >= 0"),
        (
            [
                "experiment=demo_qwen3_vl_moe",
                "parts.router=full",
                "deepspeed=zero3",
                "trainer.gradient_checkpointing=true",
            ],
            "gets no gradient under LoRA \\+ ZeRO-3",
        ),
    ],
)
def test_moe_keys_out_of_place_are_refused_with_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides)


def test_moe_keys_that_fit_are_accepted():
    load_config(["experiment=demo_qwen3_vl_moe", "peft.dropout=0.05", "peft.target_experts=false"])
    load_config(["experiment=demo_qwen3_vl_moe", "deepspeed=zero3", "trainer.gradient_checkpointing=true"])
    load_config(
        ["experiment=demo_qwen3_vl_moe", "parts.router=full", "trainer.router_aux_loss_coef=0", "deepspeed=zero3"]
    )


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["parts.merger=lora"], "parts.merger=full"),
        (["parts.llm=full", "parts.vision_tower=lora"], "whole LLM inside a LoRA adapter"),
        (["parts.llm=sometimes"], "choose one of frozen, lora, full"),
        (["parts.llm=frozen"], "Nothing would be trained"),
        (["parts.vision_tower_lr=1e-5"], "parts.vision_tower=frozen"),
        (["parts.merger_lr=1e-5"], "parts.merger=frozen"),
        (["parts.merger=full", "parts.merger_lr=-1"], "must be positive"),
        (["trainer.gradient_checkpointing_vision_tower=true", "trainer.gradient_checkpointing=true"], "frozen one"),
    ],
)
def test_inconsistent_trainable_parts_are_refused_with_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides)


@pytest.mark.parametrize(
    "overrides,new_spelling",
    [
        (["model.freeze_merger=false"], "parts.merger=full"),
        (["model.freeze_vision_tower=false"], "parts.vision_tower=full"),
        (["model.freeze_llm=true"], "parts.llm=frozen"),
        (["peft.lora_vision_tower=true"], "parts.vision_tower=lora"),
        (["peft.lora_llm=false"], "parts.llm=frozen"),
        (["peft=none"], "peft=none is now `parts.llm=full`."),
        (["peft.method=none"], "peft.method=none is now `parts.llm=full`."),
        (["trainer.vision_tower_lr=2e-5"], "parts.vision_tower_lr=2e-5"),
        (["trainer.merger_lr=1e-5"], "parts.merger_lr=1e-5"),
    ],
)
def test_replaced_keys_fail_with_the_new_spelling(overrides, new_spelling):
    with pytest.raises(ConfigError, match=re.escape(new_spelling)):
        load_config(overrides)


def test_a_recipe_file_with_a_replaced_key_names_the_new_spelling(tmp_path, monkeypatch):
    import finetune.recipe.load as config_module

    recipes = tmp_path / "recipes"
    shutil.copytree(config_module.RECIPES_DIR, recipes)
    (recipes / "experiment" / "old.yaml").write_text("# @package _global_\nname: old\nmodel:\n  freeze_merger: false\n")
    monkeypatch.setattr(config_module, "RECIPES_DIR", recipes)
    with pytest.raises(ConfigError, match=re.escape("model.freeze_merger=false is now `parts.merger=full`")):
        load_config(["experiment=old"])


def test_a_run_saved_with_the_old_keys_still_reads_as_parts(tmp_path):
    """A run directory written before `parts` existed (evaluate, export, rerun read its config.yaml)."""
    from omegaconf import OmegaConf

    from finetune.recipe.load import load_saved_config, to_yaml

    saved = OmegaConf.to_container(OmegaConf.create(to_yaml(load_config([]))))
    del saved["parts"]
    saved["model"].update(freeze_llm=None, freeze_vision_tower=True, freeze_merger=False)
    saved["peft"].update(method="lora", lora_llm=True, lora_vision_tower=True)
    saved["trainer"].update(vision_tower_lr=2e-5, merger_lr=None)
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    parts = load_saved_config(tmp_path / "config.yaml").parts
    assert (parts.llm, parts.vision_tower, parts.merger, parts.vision_tower_lr) == ("lora", "lora", "full", 2e-5)
    saved["peft"].update(method="none", lora_vision_tower=False)
    saved["trainer"]["vision_tower_lr"] = None
    saved["export"]["after_training"] = False
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    parts = load_saved_config(tmp_path / "config.yaml").parts
    assert (parts.llm, parts.vision_tower, parts.merger) == ("full", "frozen", "full")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_vision_call_per_forward_changes_nothing(tmp_path, processors, family):
    """With the multi-process hook, every forward calls the vision tower exactly once (text-only, image-only,
    video-only or both), and the loss and gradients equal the plain forward's (two calls, or none)."""
    from finetune.data.conversation import record_to_sample
    from finetune.data.encode import ConversationEncoder
    from finetune.data.sources import load_samples
    from finetune.model.batching import training_batch
    from finetune.model.load import load_model
    from finetune.model.rope import model_position_rule
    from finetune.model.trainable import make_trainable, vision_tower
    from finetune.training.vision_sync import OneVisionCall
    from tests.helpers import DEMO

    config = load_config([f"experiment={EXPERIMENT[family]}", "parts.vision_tower=lora", "parts.merger=full"])
    torch.manual_seed(0)
    model = make_trainable(load_model(config.model, "fp32"), config).train()
    for name, param in model.named_parameters():  # LoRA B starts at zero: give every trainable weight a value
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    encoder = ConversationEncoder(processors[family], vision_settings(config))
    image, video = [encoder.encode(s) for s in load_samples(mini_dataset(tmp_path / "d.json", per_task=1), DEMO)]
    text = encoder.encode(
        record_to_sample(
            {
                "messages": [
                    {"role": "user", "content": "What is two plus two?"},
                    {"role": "assistant", "content": "Four."},
                ]
            },
            0,
            "text",
            DEMO,
        )
    )
    calls = []
    vision_tower(model).register_forward_hook(lambda *args: calls.append(1))

    def run(batch):
        model.zero_grad()
        calls.clear()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(calls)

    for rows, real_calls in [([text], 0), ([image], 1), ([video], 1), ([image, video], 2), ([text, video, image], 2)]:
        batch = training_batch([[r] for r in rows], encoder.tokenizer.pad_token_id, model_position_rule(model))
        batch.pop("num_real_tokens")
        plain_loss, plain_grads, plain_calls = run(batch)
        hook = OneVisionCall(model.get_base_model().model)
        loss, grads, hooked_calls = run(batch)
        hook.remove()
        assert (plain_calls, hooked_calls) == (real_calls, 1)
        assert loss == pytest.approx(plain_loss, rel=1e-6)
        assert grads.keys() >= plain_grads.keys()
        # fp32 re-association noise: relative to each gradient's scale (tests/helpers/tolerance.py)
        for n in plain_grads:
            assert_close_to_scale(grads[n], plain_grads[n], rel=1e-5, name=n)
        assert all(g.abs().max() == 0 for n, g in grads.items() if n not in plain_grads)
        # every trainable vision weight takes part in backward on every rank, media or not
        assert {n for n in grads if model_part(n, FAMILIES[family]) != "llm"} == {
            n for n, p in model.named_parameters() if p.requires_grad and model_part(n, FAMILIES[family]) != "llm"
        }


@pytest.mark.parametrize("vision_too", [False, True])
def test_activation_checkpointing_changes_memory_not_training(tmp_path, vision_too):
    """Same losses and the same updated weights with checkpointing on (LLM only, or both towers with ViT LoRA),
    and checkpointing really is set on the chosen blocks (never on a frozen vision tower)."""
    extra = ["parts.vision_tower=lora", "parts.merger=full"] if vision_too else []
    runs = {}
    for checkpointing in (False, True):
        options = [
            f"trainer.gradient_checkpointing={checkpointing}",
            f"trainer.gradient_checkpointing_vision_tower={checkpointing and vision_too}",
        ]
        changed, _, after, trainer = _train(tmp_path / str(checkpointing), extra + options)
        blocks = {
            name: m.gradient_checkpointing
            for name, m in trainer.model.named_modules()
            if name.endswith((".layers.0", ".layers.1", ".blocks.0", ".blocks.1"))
        }
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        runs[checkpointing] = changed, {n: after[n].detach().clone() for n in changed}, blocks, losses
    (changed_off, weights_off, _, losses_off), (changed_on, weights_on, blocks_on, losses_on) = runs[False], runs[True]
    assert changed_on == changed_off and losses_on == pytest.approx(losses_off, abs=1e-6)
    for n in changed_on:
        assert_close_to_scale(weights_on[n], weights_off[n], rel=1e-5, name=n)
    assert len(blocks_on) == 4
    assert all(on == (model_part(name, DEMO_FAMILY) == "llm" or vision_too) for name, on in blocks_on.items()), (
        blocks_on
    )


def _step_with_checkpointing(vision_tower_mode: str, reentrant: bool, checkpoint_vision: bool):
    """One forward + backward of the demo model on 2 image + 2 video rows, as training builds it; returns the
    model and, per vision-tower module, whether its output required a gradient."""
    from benchmarks.saved_activations import mixed_batch
    from finetune.model.batching import training_batch
    from finetune.model.load import load_model
    from finetune.model.rope import model_position_rule
    from finetune.model.trainable import enable_activation_checkpointing, make_trainable, vision_tower

    config = load_config(
        [
            f"parts.vision_tower={vision_tower_mode}",
            "trainer.gradient_checkpointing=true",
            f"trainer.gradient_checkpointing_vision_tower={checkpoint_vision}",
        ]
    )
    torch.manual_seed(0)
    model = make_trainable(load_model(config.model, "fp32"), config).train()
    enable_activation_checkpointing(model, config, reentrant=reentrant)
    for name, param in model.named_parameters():  # LoRA B starts at zero: A would get no gradient
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    outputs_need_grad = {}

    def record(name):
        def hook(module, args, output):
            values = output.values() if isinstance(output, dict) else output  # ModelOutput, tuple or tensor
            tensors = [output] if torch.is_tensor(output) else [t for t in values if torch.is_tensor(t)]
            outputs_need_grad[name] = outputs_need_grad.get(name, False) or any(t.requires_grad for t in tensors)

        return hook

    for name, module in vision_tower(model).named_modules():
        module.register_forward_hook(record(name or "visual"))
    encoded, pad_id = mixed_batch(config)
    batch = training_batch([[e] for e in encoded], pad_id, model_position_rule(model))
    batch.pop("num_real_tokens")
    model(**batch, use_cache=False).loss.backward()
    return model, outputs_need_grad


def _lora_grads(model, part):
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n and model_part(n, DEMO_FAMILY) == part}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_a_frozen_vision_tower_builds_no_graph(reentrant):
    """No ViT or merger activation requires a gradient in a training step (transformers 5 hooks the vision patch
    embed to require one, ms-swift #10214), and the LLM's LoRA weights still get gradients."""
    model, outputs_need_grad = _step_with_checkpointing("frozen", reentrant, checkpoint_vision=False)
    assert len(outputs_need_grad) > 5 and not any(outputs_need_grad.values()), outputs_need_grad
    llm = _lora_grads(model, "llm")
    assert llm and all(g is not None and g.abs().max() > 0 for g in llm.values())


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("checkpoint_vision", [False, True], ids=["vit-plain", "vit-checkpointed"])
def test_vision_tower_lora_gets_gradients(reentrant, checkpoint_vision):
    model, outputs_need_grad = _step_with_checkpointing("lora", reentrant, checkpoint_vision)
    assert outputs_need_grad["blocks.0"]
    for part in ("vision_tower", "llm"):
        grads = _lora_grads(model, part)
        assert grads and all(g is not None and g.abs().max() > 0 for g in grads.values()), part


def test_the_frozen_vision_tower_saves_nothing_for_backward(capsys):
    """Bytes autograd saves in one training step of a fixed mixed image/video batch, before (transformers' input
    hooks on every nested model) and after: the frozen ViT and merger contribute 0."""
    from benchmarks.saved_activations import measure

    results = measure("qwen2_5_vl", reentrant=False)
    with capsys.disabled():
        print("\nbytes saved for backward, frozen vision tower:", results)
    before, after = results["before"], results["after"]
    assert before["vision_tower"] > 0 and after["vision_tower"] == 0 and after["merger"] == 0
    assert after["llm"] > 0 and after["llm"] <= before["llm"]


def test_varlen_training_steps_use_the_collator_boundaries(tmp_path, monkeypatch):
    """model.attn_implementation=varlen through the real trainer (TRL's fused head, packed rows): every layer takes
    the collator's cu_seq_lens; recomputing them from the positions (a device sync per layer on a GPU) never runs."""
    from finetune.model import attention

    def recompute(*args):
        raise AssertionError("the boundaries were recomputed in a layer")

    monkeypatch.setattr(attention, "boundaries_from_positions", recompute)
    changed, *_ = _train(tmp_path, ["model.attn_implementation=varlen", "trainer.packing=true"], steps=2)
    assert _lora(changed, "llm")
