"""What trains, and how fast: `parts` modes, LoRA targets, per-part learning rates, activation checkpointing.

A Qwen-VL model has three parts, told apart by parameter name (the module paths of its family's entry in
finetune/base/families.py), each `frozen`, `lora` or `full` in the recipe:
  vision_tower  `model.visual.*` except the mergers (Conv3d patch embed + ViT blocks)
  merger        `model.visual.merger.*` (the MLP projecting vision features into the LLM)
  llm           everything else: `model.language_model.*` (embeddings, decoder layers, norm) and `lm_head`
Under LoRA, PEFT freezes every base weight; a part that trains fully (a `full` merger or vision tower) goes
into `modules_to_save`, so the adapter checkpoint holds it and `merge_and_unload` puts it back in the export.

A mixture-of-experts LLM (Qwen3-VL-MoE) has fused expert parameters, which take LoRA as parameters (PEFT
`target_parameters`) beside the attention's nn.Linear layers, and a router per layer, frozen in every mode unless
`parts.router=full`; its load-balancing loss is logged, and weighted into the training loss as
`router_aux_loss_coef` says.
"""

from __future__ import annotations

import functools
import re

import torch

from finetune.base.errors import ConfigError
from finetune.base.families import Family, family_of
from finetune.recipe.schema import Config

PARTS = ("llm", "vision_tower", "merger")


def model_part(name: str, family: Family) -> str:
    """The part a parameter or module name of a `family` model belongs to. Told by the vision tower's own name,
    not its full path, so that PEFT-wrapped names (`base_model.model.` in front) and the keys of saved checkpoints
    (transformers 5 writes the original layout, `visual.*` without the `model.` in front) are told apart too."""
    padded = f".{name}."
    vision = f".{family.vision_tower}."
    if vision not in padded:
        return "llm"
    return "merger" if padded.split(vision, 1)[1].split(".")[0] in family.mergers else "vision_tower"


def base_model(model):
    """The transformers model under a PEFT wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_family(model) -> Family:
    """The registry entry of a (PEFT-wrapped) model, by its config's model_type."""
    return family_of(base_model(model).config.model_type)


def vision_tower(model):
    """The vision tower module, mergers included (`model.model.visual` in transformers 5)."""
    family = model_family(model)
    return base_model(model).get_submodule(f"{family.inner_model}.{family.vision_tower}")


def check_layout(model) -> None:
    """Every parameter lies under one module path of the family's entry: the vision tower, the language model or
    the lm_head. `model_part` counts whatever is outside the vision tower as LLM; this makes sure that is true, so
    a checkpoint laid out otherwise (or a wrong entry) is refused instead of trained part by wrong part."""
    family = model_family(model)
    prefixes = (
        f"{family.inner_model}.{family.vision_tower}.",
        f"{family.inner_model}.{family.language_model}.",
        f"{family.lm_head}.",
    )
    stray = [name for name, _ in base_model(model).named_parameters() if not name.startswith(prefixes)]
    if stray:
        raise ConfigError(
            f"{len(stray)} parameters of this {family.title} checkpoint ({', '.join(stray[:3])}) are under none of "
            f"the module paths of its entry in finetune/base/families.py ({', '.join(p[:-1] for p in prefixes)}); "
            "the entry does not describe this checkpoint's layout."
        )


def default_lora_patterns(family: Family) -> dict[str, str]:
    """The family's LoRA targets as the patterns `lora_targets` matches full module names with: per part, the
    listed nn.Linear names inside that part's module (the part check keeps the mergers out of the vision's)."""

    def pattern(module: str, names: tuple[str, ...]) -> str:  # (anything in front: names under a wrapper too)
        path = rf"{re.escape(family.inner_model)}\.{re.escape(module)}"
        return rf"(.*\.)?{path}\..*\.({'|'.join(map(re.escape, names))})"

    return {
        "llm": pattern(family.language_model, family.lora_targets),
        "vision_tower": pattern(family.vision_tower, family.vision_lora_targets),
    }


def is_router(name: str, family: Family) -> bool:
    """Whether a parameter (or module) name is (in) a router of the family's experts."""
    return family.router is not None and f".{family.router}." in f".{name}."


def apply_freezing(model, config: Config) -> None:
    """requires_grad on the weights of `full` parts only (a `lora` part's base weights stay frozen); a router
    trains only with parts.router=full."""
    modes, family = config.parts.modes(), model_family(model)
    for name, param in model.named_parameters():
        full = modes[model_part(name, family)] == "full"
        param.requires_grad_(config.parts.router == "full" if is_router(name, family) else full)


def lora_targets(model, config: Config) -> list[str]:
    """Full names of the nn.Linear modules that get LoRA: with parts.llm=lora the LLM's (peft.target_modules),
    with parts.vision_tower=lora the ViT blocks' (peft.vision_target_modules). A pattern left at null is the
    family's list (finetune/base/families.py), so a new family needs no pattern of its own. Only nn.Linear ever matches, so the Conv3d patch embed never takes LoRA
    (LLaMA-Factory #5324), nor does the merger (it trains fully if at all)."""
    peft, modes, family = config.peft, config.parts.modes(), model_family(model)
    defaults = default_lora_patterns(family)
    chosen = {"llm": peft.target_modules, "vision_tower": peft.vision_target_modules}
    patterns = [
        (part, re.compile(chosen[part] or defaults[part])) for part in ("llm", "vision_tower") if modes[part] == "lora"
    ]
    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(
            model_part(name, family) == part and pattern.fullmatch(name) for part, pattern in patterns
        ):
            names.append(name)
    for part, pattern in patterns:
        if not any(model_part(n, family) == part for n in names):
            key = "peft.target_modules" if part == "llm" else "peft.vision_target_modules"
            raise ConfigError(f"{key}={pattern.pattern!r} matches no linear layer of the {part} of this model.")
    return names


def expert_lora_targets(model, config: Config) -> list[str]:
    """Full names of the fused expert parameters that get LoRA (PEFT `target_parameters`): with parts.llm=lora and
    peft.target_experts, every one of the family's `expert_lora_targets` in the language model; none for a dense
    family."""
    family = model_family(model)
    if config.parts.llm != "lora" or not config.peft.target_experts or not family.expert_lora_targets:
        return []
    language_model = f"{family.inner_model}.{family.language_model}."
    names = [
        name
        for name, _ in model.named_parameters()
        if name.startswith(language_model) and name.endswith(tuple(f".{t}" for t in family.expert_lora_targets))
    ]
    if not names:
        raise ConfigError(
            f"None of {family.title}'s expert parameters ({', '.join(family.expert_lora_targets)}) is in this "
            "checkpoint; set peft.target_experts=false."
        )
    return names


def fully_trained_modules(model, config: Config) -> list[str]:
    """Modules PEFT must train fully and save beside the adapter (`modules_to_save`)."""
    visual, family = vision_tower(model), model_family(model)
    prefix = next(n for n, m in model.named_modules() if m is visual)

    def wrappable(child_name: str) -> list[str]:  # a ModuleList cannot be wrapped: each of its modules instead
        child = visual.get_submodule(child_name)
        if isinstance(child, torch.nn.ModuleList):
            return [f"{prefix}.{child_name}.{i}" for i in range(len(child))]
        return [f"{prefix}.{child_name}"]

    names = []
    if family.router and config.parts.router == "full" and config.parts.llm == "lora":  # each layer's router
        names += [name for name, _ in model.named_modules() if name.endswith(f".{family.router}")]
    if config.parts.merger == "full":  # the merger, and Qwen3-VL's DeepStack mergers (a ModuleList)
        names += [name for merger in family.mergers for name in wrappable(merger)]
    if config.parts.vision_tower == "full":  # each ViT block and the patch embed
        for child_name, child in visual.named_children():
            if child_name in family.mergers or next(child.parameters(), None) is None:
                continue
            names += wrappable(child_name)
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
        target_parameters=expert_lora_targets(model, config) or None,  # fused experts (peft.target_experts)
        modules_to_save=fully_trained_modules(model, config) or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def make_trainable(model, config: Config):
    """Freeze per the recipe, then add LoRA if a part asks for it; returns the model to train."""
    training_without_cache(model)
    apply_freezing(model, config)
    run_frozen_parts_without_autograd(model, config)
    if config.parts.uses_lora:
        model = apply_lora(model, config)
    return model


def router_aux_loss_coef(model, config: Config) -> float | None:
    """The weight of the load-balancing loss in the training loss; None: the model has no router (dense). The
    recipe's trainer.router_aux_loss_coef, or when null: the checkpoint's own coefficient with parts.router=full, 0
    with a frozen router (the loss exists to keep the router from sending every token to the same experts; frozen,
    it only reaches the layers below through the hidden states)."""
    if model_family(model).router is None:
        return None
    if config.trainer.router_aux_loss_coef is not None:
        return config.trainer.router_aux_loss_coef
    text_config = base_model(model).config.get_text_config()
    return float(text_config.router_aux_loss_coef) if config.parts.router == "full" else 0.0


def training_without_cache(model) -> None:
    """Training never uses a key/value cache. Qwen3-VL's text model creates one whenever its config says use_cache,
    and with a cache transformers does not look for packed samples in the position ids: attention would then cross
    sample boundaries in a packed row (measured on a tiny Qwen3-VL: packed logits off by 0.6). `generate` asks for a
    cache itself."""
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None and hasattr(config, "use_cache"):
            config.use_cache = False


def part_learning_rates(config: Config) -> dict[str, float]:
    base, parts = config.trainer.learning_rate, config.parts
    return {"llm": base, "vision_tower": parts.vision_tower_lr or base, "merger": parts.merger_lr or base}


def parameter_groups(model, config: Config, decay_names: set[str]) -> list[dict]:
    """Optimizer groups: one per (part, weight decay or not), each with its part's learning rate."""
    rates, family = part_learning_rates(config), model_family(model)
    groups: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((model_part(name, family), name in decay_names), []).append(param)
    return [
        {
            "params": params,
            "lr": rates[part],
            "weight_decay": config.trainer.weight_decay if decay else 0.0,
            "name": f"{part}{'' if decay else '_no_decay'}",
        }
        for (part, decay), params in sorted(groups.items())
    ]


def parameter_size(param) -> int:
    """The weights a parameter stands for: in full for a ZeRO-3 partitioned one, and for a bitsandbytes 4-bit one
    (QLoRA) its unquantized shape's, not the packed bytes (two weights a byte)."""
    state = getattr(param, "quant_state", None)
    if state is not None:
        return state.shape.numel()
    return getattr(param, "ds_numel", param.numel())


def trained_parts(model) -> dict[str, int]:
    """Trainable parameter count per part (ZeRO-3 partitioned parameters count in full)."""
    counts, family = dict.fromkeys(PARTS, 0), model_family(model)
    for name, param in model.named_parameters():
        if param.requires_grad:
            counts[model_part(name, family)] += parameter_size(param)
    return counts


def count_parameters(model) -> tuple[int, int]:
    sizes = [(parameter_size(p), p.requires_grad) for p in model.parameters()]
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
    visual, mergers = vision_tower(model), model_family(model).mergers
    if config.parts.merger == "frozen":
        _forward_without_autograd(visual)
        return
    for name, child in visual.named_children():
        if name not in mergers:
            for module in child if isinstance(child, torch.nn.ModuleList) else [child]:
                _forward_without_autograd(module)


def _forward_without_autograd(module: torch.nn.Module) -> None:
    forward = module.forward

    @functools.wraps(forward)
    def without_autograd(*args, **kwargs):
        with torch.no_grad():
            return forward(*args, **kwargs)

    module.forward = without_autograd
