"""What trains, and how fast: `parts` modes, LoRA targets, per-part learning rates, activation checkpointing.

A Qwen-VL model has three parts, told apart by parameter name, each `frozen`, `lora` or `full` in the recipe:
  vision_tower  `model.visual.*` except the merger (Conv3d patch embed + ViT blocks)
  merger        `model.visual.merger.*` (the MLP projecting vision features into the LLM)
  llm           everything else (embeddings, decoder layers, norm, lm_head)
Under LoRA, PEFT freezes every base weight; a part that trains fully (a `full` merger or vision tower) goes
into `modules_to_save`, so the adapter checkpoint holds it and `merge_and_unload` puts it back in the export.
"""

from __future__ import annotations

import functools
import re

import torch

from finetune.base.errors import ConfigError
from finetune.recipe.schema import Config

PARTS = ("llm", "vision_tower", "merger")


def model_part(name: str) -> str:
    """The part a parameter or module name belongs to (works on PEFT-wrapped names too)."""
    padded = f".{name}."
    if ".visual." not in padded:
        return "llm"
    return "merger" if ".merger." in padded else "vision_tower"


def base_model(model):
    """The transformers model under a PEFT wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def vision_tower(model):
    """`model.model.visual` in transformers 5 (the merger lives inside it as `.merger`)."""
    inner = base_model(model)
    return getattr(inner, "model", inner).visual


def apply_freezing(model, config: Config) -> None:
    """requires_grad on the weights of `full` parts only (a `lora` part's base weights stay frozen)."""
    modes = config.parts.modes()
    for name, param in model.named_parameters():
        param.requires_grad_(modes[model_part(name)] == "full")


def lora_targets(model, config: Config) -> list[str]:
    """Full names of the nn.Linear modules that get LoRA: with parts.llm=lora the LLM's (peft.target_modules),
    with parts.vision_tower=lora the ViT blocks' (peft.vision_target_modules). Only nn.Linear ever matches, so the
    Conv3d patch embed never takes LoRA (LLaMA-Factory #5324), nor does the merger (it trains fully if at all)."""
    peft, modes = config.peft, config.parts.modes()
    patterns = []
    if modes["llm"] == "lora":
        patterns.append(("llm", re.compile(peft.target_modules)))
    if modes["vision_tower"] == "lora":
        patterns.append(("vision_tower", re.compile(peft.vision_target_modules)))
    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(
            model_part(name) == part and pattern.fullmatch(name) for part, pattern in patterns
        ):
            names.append(name)
    for part, pattern in patterns:
        if not any(model_part(n) == part for n in names):
            key = "peft.target_modules" if part == "llm" else "peft.vision_target_modules"
            raise ConfigError(f"{key}={pattern.pattern!r} matches no linear layer of the {part} of this model.")
    return names


def fully_trained_modules(model, config: Config) -> list[str]:
    """Modules PEFT must train fully and save beside the adapter (`modules_to_save`)."""
    visual = vision_tower(model)
    prefix = next(n for n, m in model.named_modules() if m is visual)
    names = []
    if config.parts.merger == "full":
        names.append(f"{prefix}.merger")
    if config.parts.vision_tower == "full":  # each ViT block and the patch embed (a ModuleList cannot be wrapped)
        for child_name, child in visual.named_children():
            if child_name == "merger" or next(child.parameters(), None) is None:
                continue
            if isinstance(child, torch.nn.ModuleList):
                names += [f"{prefix}.{child_name}.{i}" for i in range(len(child))]
            else:
                names.append(f"{prefix}.{child_name}")
    return names


def apply_lora(model, config: Config):
    from peft import LoraConfig, get_peft_model

    peft = config.peft
    targets = lora_targets(model, config)
    lora = LoraConfig(
        r=peft.r,
        lora_alpha=peft.alpha,
        lora_dropout=peft.dropout,
        use_dora=peft.use_dora,
        use_rslora=peft.use_rslora,
        target_modules=targets,  # exact names: nothing but the checked nn.Linear layers can match
        modules_to_save=fully_trained_modules(model, config) or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def make_trainable(model, config: Config):
    """Freeze per the recipe, then add LoRA if a part asks for it; returns the model to train."""
    apply_freezing(model, config)
    run_frozen_parts_without_autograd(model, config)
    if config.parts.uses_lora:
        model = apply_lora(model, config)
    return model


def part_learning_rates(config: Config) -> dict[str, float]:
    base, parts = config.trainer.learning_rate, config.parts
    return {"llm": base, "vision_tower": parts.vision_tower_lr or base, "merger": parts.merger_lr or base}


def parameter_groups(model, config: Config, decay_names: set[str]) -> list[dict]:
    """Optimizer groups: one per (part, weight decay or not), each with its part's learning rate."""
    rates = part_learning_rates(config)
    groups: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((model_part(name), name in decay_names), []).append(param)
    return [
        {
            "params": params,
            "lr": rates[part],
            "weight_decay": config.trainer.weight_decay if decay else 0.0,
            "name": f"{part}{'' if decay else '_no_decay'}",
        }
        for (part, decay), params in sorted(groups.items())
    ]


def trained_parts(model) -> dict[str, int]:
    """Trainable parameter count per part (ZeRO-3 partitioned parameters count in full)."""
    counts = dict.fromkeys(PARTS, 0)
    for name, param in model.named_parameters():
        if param.requires_grad:
            counts[model_part(name)] += getattr(param, "ds_numel", param.numel())
    return counts


def count_parameters(model) -> tuple[int, int]:
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(n for n, trained in sizes if trained), sum(n for n, _ in sizes)


def enable_activation_checkpointing(model, config: Config, reentrant: bool | None = None) -> bool:
    """Recompute activations in backward: the LLM's decoder layers, and the ViT blocks if asked.

    Returns whether reentrant checkpointing was chosen (`reentrant`: None decides as follows). Non-reentrant is
    PyTorch's recommendation, but with PEFT under ZeRO-3 it fails in backward ("Recomputed values ... have different metadata": frozen
    parameters are partitioned again by the time they are recomputed), see huggingface/trl#6356,
    huggingface/transformers#47254 and deepspeedai/DeepSpeed#4332; reentrant is the workaround there.
    A frozen vision tower is left alone: it runs without autograd (`run_frozen_parts_without_autograd`), so it
    keeps no activations for backward and checkpointing it would only cost a second forward.
    """
    if reentrant is None:
        reentrant = config.parts.uses_lora and config.deepspeed.zero_stage == 3
    inner = base_model(model)
    inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    # transformers 5 also hooks the input embeddings of every nested model (the vision patch embed included) to
    # require a gradient: a frozen ViT would then build a graph and keep every activation of every frame
    # (ms-swift #10214). Those hooks go; `require_input_grads` puts back only what a trainable part needs.
    inner.disable_input_require_grads()
    if not config.trainer.gradient_checkpointing_vision_tower:
        for module in vision_tower(inner).modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = False
    inner.config.use_cache = False
    require_input_grads(model, config, reentrant)
    return reentrant


def require_input_grads(model, config: Config, reentrant: bool) -> None:
    """Make the inputs of checkpointed blocks require a gradient where reentrant checkpointing needs it, and nowhere
    else. Reentrant checkpointing back-propagates into a block only when one of its inputs requires a gradient:
    - the LLM's: its embeddings are frozen under LoRA, so the token embeddings are marked;
    - the ViT's, when it has LoRA and its blocks are checkpointed: nothing upstream (frozen Conv3d patch embed)
      requires a gradient, so its LoRA weights would silently get none (LLaMA-Factory #6754); the patch-embed
      output is marked.
    Non-reentrant checkpointing needs neither."""
    if not reentrant:
        return
    inner = base_model(model)
    embeddings = inner.get_input_embeddings()
    if not embeddings.weight.requires_grad:
        embeddings.register_forward_hook(_output_requires_grad)
    if config.parts.vision_tower == "lora" and config.trainer.gradient_checkpointing_vision_tower:
        vision_tower(inner).patch_embed.register_forward_hook(_output_requires_grad)


def _output_requires_grad(module, args, output):
    output.requires_grad_(True)


def run_frozen_parts_without_autograd(model, config: Config) -> None:
    """A frozen vision tower runs under `torch.no_grad()` (with a frozen merger behind it, the whole `visual`): with
    nothing to train it needs no graph, and any input hook that asks for a gradient would otherwise make autograd
    keep every ViT activation and run backward through every block for nothing. A merger that trains still builds
    its own graph on the tower's output."""
    if config.parts.vision_tower != "frozen":
        return
    visual = vision_tower(model)
    if config.parts.merger == "frozen":
        _forward_without_autograd(visual)
        return
    for name, child in visual.named_children():
        if name != "merger":
            for module in child if isinstance(child, torch.nn.ModuleList) else [child]:
                _forward_without_autograd(module)


def _forward_without_autograd(module: torch.nn.Module) -> None:
    forward = module.forward

    @functools.wraps(forward)
    def without_autograd(*args, **kwargs):
        with torch.no_grad():
            return forward(*args, **kwargs)

    module.forward = without_autograd
