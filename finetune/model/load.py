"""Load models and processors and decide precision from the hardware (what trains: trainable.py). One loader for
each form a model takes here: the base checkpoint (`load_model`, training), and a trained run (base + adapter, a
run trained without LoRA, or a merged export: `load_trained_model`, used by evaluate, predict and export)."""

from __future__ import annotations

import logging

import torch

from finetune.base.errors import ConfigError
from finetune.base.families import FAMILIES
from finetune.model import linear_attention, quantization
from finetune.model.attention import loading_implementation
from finetune.model.rope import PositionRule, install_position_rule
from finetune.model.tiny import resolve_model_path
from finetune.model.trainable import check_layout
from finetune.recipe.schema import ModelConfig

logger = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def uses_gpu(config) -> bool:
    """Whether this run computes on GPUs: the recipe's accelerate mode decides (`cpu` stays on the CPU even
    on a machine with GPUs); a GPU mode without a visible GPU is refused by the launcher."""
    return config.accelerate.mode != "cpu" and torch.cuda.is_available()


def resolve_precision(requested: str, has_gpu: bool) -> str:
    """'auto' -> bf16 on a GPU that supports it, else fp32. Half precision on a CPU is refused, not ignored."""
    if requested == "auto":
        return "bf16" if has_gpu and torch.cuda.is_bf16_supported() else "fp32"
    if requested in ("bf16", "fp16") and not has_gpu:
        raise ConfigError(
            f"trainer.precision={requested} needs a GPU run (a GPU accelerate recipe and a visible GPU); "
            "use trainer.precision=auto on the CPU."
        )
    if requested == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("This GPU has no bf16 support; use trainer.precision=fp16 or auto.")
    return requested


def recipe_precision(config, device_map="recipe") -> str:
    """The one precision decision: the recipe's `trainer.precision` on the recipe's devices (launch, train, export);
    for inference on another device (`device_map`, e.g. "cpu" for a GPU-trained run) what that device can do."""
    on_gpu = uses_gpu(config) if device_map == "recipe" else device_map not in (None, "cpu")
    return resolve_precision(config.trainer.precision if on_gpu else "auto", on_gpu)


def load_processor(model_cfg: ModelConfig, path: str | None = None):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(
        path or resolve_model_path(model_cfg.name_or_path), trust_remote_code=model_cfg.trust_remote_code
    )


def load_model(
    model_cfg: ModelConfig, precision: str, path: str | None = None, device_map=None, quantized: bool | None = None
):
    """The base model in the training dtype; its model_type must match the recipe's family, and its modules the
    family's entry (finetune/base/families.py). `quantized` (None: as the recipe's `model.quantization` says): the
    LLM's linear layers in 4 bits (QLoRA, finetune/model/quantization.py), quantized while loading onto `device_map`
    (None: the CPU; a training rank passes its device). Weights are read
    from safetensors only (never unpickled). Attention: the recipe's transformers implementation, or sdpa for
    `auto`/`varlen` (training switches to those afterwards: finetune/model/attention.py). Wherever the model computes positions itself (`generate`, a
    forward without position ids) it uses the recipe's `model.rope_rule` (finetune/model/rope.py). A hybrid model's
    linear-attention layers restart at every packed sample's boundary (finetune/model/linear_attention.py)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    path = path or resolve_model_path(model_cfg.name_or_path)
    check_weight_files(path, model_cfg.allow_pickled_weights)
    config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    entry = FAMILIES.get(model_cfg.family)
    if entry is None or config.model_type != entry.model_type:
        raise ConfigError(
            f"{model_cfg.name_or_path} is a {config.model_type!r} checkpoint but the recipe says "
            f"model.family={model_cfg.family}; set model.family={config.model_type} (or pick the matching model recipe)."
        )
    quantized = model_cfg.quantization != "none" if quantized is None else quantized
    extra = {}
    if quantized:
        extra["quantization_config"] = quantization.quantization_config(
            model_cfg.quantization, entry, DTYPES[precision]
        )
        # bitsandbytes quantizes on the device the weights load to; without a map transformers picks the current GPU
        # even for a CPU run.
        device_map = {"": "cpu"} if device_map is None else device_map
    model = AutoModelForImageTextToText.from_pretrained(
        path,
        dtype=DTYPES[precision],
        attn_implementation=loading_implementation(model_cfg.attn_implementation),
        trust_remote_code=model_cfg.trust_remote_code,
        use_safetensors=not model_cfg.allow_pickled_weights,
        device_map=device_map,
        **extra,
    )
    if quantized:
        hybrid = linear_attention.is_hybrid(model.config)
        quantization.without_cpu_repacking(model)
        quantization.describe(model, entry, model_cfg.quantization, DTYPES[precision], hybrid)
    check_layout(model)
    install_position_rule(model, position_rule(model, model_cfg))
    linear_attention.install(model)
    return model


def load_trained_model(config, model_dir: str | None = None, device_map="recipe", quantized: bool | None = None):
    """(model, processor) of a trained run: a merged directory (`model_dir`), or the run's base model + adapter (a
    PeftModel), or the weights saved by a run with no LoRA part. The model computes positions with the recipe's
    rope rule. `device_map`: the recipe's (the GPUs of a GPU run, else the CPU) or a transformers device map.
    A QLoRA run (`model.quantization`) is loaded as it trained, the base in 4 bits under the adapter (evaluate and
    predict see the trained model), unless `quantized=False` (the export's 16-bit base, which the adapter is merged
    into); a merged directory is the 16-bit export and loads in 16 bits."""
    from finetune.records.rundir import RunDir

    precision = recipe_precision(config, device_map)
    if precision != config.trainer.precision and config.trainer.precision != "auto":
        logger.info("inference in %s on this machine (the recipe trained in %s)", precision, config.trainer.precision)
    device_map = inference_device_map(config) if device_map == "recipe" else device_map
    if model_dir:
        model = load_model(config.model, precision, path=model_dir, device_map=device_map, quantized=False)
        return model, load_processor(config.model, path=model_dir)
    adapter_dir = RunDir(config.trainer.output_dir).adapter
    if not adapter_dir.is_dir():
        raise ConfigError(f"No trained adapter at {adapter_dir}; train first (./launch.sh with the same overrides).")
    processor = load_processor(config.model, path=str(adapter_dir))
    if not config.parts.uses_lora:
        return load_model(config.model, precision, path=str(adapter_dir), device_map=device_map), processor
    from peft import PeftModel

    base = load_model(config.model, precision, device_map=device_map, quantized=quantized)
    try:
        return PeftModel.from_pretrained(base, str(adapter_dir)).eval(), processor
    except RuntimeError as err:  # size mismatches: an adapter trained on another architecture
        reason = str(err).splitlines()[0]
        raise ConfigError(f"{adapter_dir} does not fit {config.model.name_or_path}: {reason}") from None


def check_weight_files(path: str, allow_pickled: bool) -> None:
    """A local checkpoint with pickled weights only is refused before anything is unpickled."""
    from pathlib import Path

    folder = Path(path)
    if allow_pickled or not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise ConfigError(
            f"{path} holds pickled weights only ({', '.join(pickled[:3])}); loading them would run code stored in "
            "the file. Convert them to safetensors (load once where you trust them, then `save_pretrained`), or "
            "set model.allow_pickled_weights=true for a checkpoint you trust."
        )


def position_rule(model, model_cfg: ModelConfig) -> PositionRule:
    """The recipe's M-RoPE rule with the model's vision geometry."""
    return PositionRule.for_model(model.config, model_cfg.rope_rule)


def inference_device_map(config):
    """Evaluation and export run in one process: spread the model over the GPUs of a GPU run, else CPU."""
    return "auto" if uses_gpu(config) else None
