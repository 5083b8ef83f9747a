"""QLoRA's 4-bit base (`model.quantization=nf4`): which weights bitsandbytes quantizes, which stay 16-bit, and why.

transformers' BitsAndBytesConfig replaces every plain `nn.Linear` outside the skipped modules by a bitsandbytes
`Linear4bit` while loading (4-bit NormalFloat, double quantization of the scales, computed in the run's dtype: bf16
on a GPU, fp32 on the CPU). What stays 16-bit (the family's module paths, finetune/base/families.py):
  - the vision tower with its mergers (Qwen3-VL's DeepStack mergers too): quantizing the ViT or the merger hurts
    (unsloth keeps them 16-bit), and they are a small share of a 7B model's weights;
  - `lm_head`: the output projection over the whole vocabulary, as transformers and unsloth keep it by default;
  - a mixture-of-experts LLM's routed experts: transformers 5.23 holds them as fused 3-D parameters
    (`mlp.experts.gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]), not `nn.Linear`, and bitsandbytes quantizes
    `nn.Linear` only; they load in the run's dtype, which keeps most of an MoE checkpoint 16-bit (said at load);
  - whatever is not an `nn.Linear`: embeddings, norms, Qwen3.5's conv1d / A_log / dt_bias, MoE routers.
LoRA then goes on the 4-bit layers (PEFT's `lora.bnb.Linear4bit`: the frozen 4-bit product plus the adapter's, in the
adapter's dtype). peft's `prepare_model_for_kbit_training` is not called: it casts every non-4-bit parameter to fp32
(the ViT, embeddings, lm_head and the MoE experts: 4 bytes a weight instead of 2, e.g. +58 GB for a 30B-A3B's experts),
hooks the input embeddings of every nested model to require a gradient (the frozen-ViT activation blow-up that
finetune/model/trainable.py removes, ms-swift #10214) and turns on reentrant checkpointing; freezing, checkpointing and
input gradients are already decided in trainable.py for 4-bit and 16-bit bases alike.

Importing bitsandbytes costs about 2 s (it loads torch._dynamo and torch._inductor); it is imported here only when a
recipe quantizes, but peft imports it whenever it is installed, so a process that imports peft pays it anyway: the
default install leaves it out (`pip install -e '.[qlora]'` adds it).
"""

from __future__ import annotations

import logging

import torch

from finetune.base.errors import ConfigError
from finetune.base.families import Family

logger = logging.getLogger(__name__)

# bitsandbytes' 4-bit types that model.quantization names (finetune/recipe/keys.py QUANTIZATIONS, less "none").
QUANT_TYPES = {"nf4": "nf4"}


def require_bitsandbytes(quantization: str, load: bool = True) -> None:
    """bitsandbytes is installed (`load`: and imports), or the recipe is refused with the install command. The
    launcher asks without importing it (`load=False`: before any process starts, in milliseconds)."""
    import importlib.util

    reason = None if importlib.util.find_spec("bitsandbytes") else "it is not installed"
    if reason is None and load:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            reason = f"it does not import: {err}"
    if reason:
        raise ConfigError(
            f"model.quantization={quantization} (QLoRA) needs bitsandbytes and {reason}: pip install bitsandbytes "
            "(or pip install -e '.[qlora]'), or set model.quantization=none."
        )


def kept_in_16_bit(family: Family) -> list[str]:
    """Module paths that transformers must not quantize (`llm_int8_skip_modules`: a path matches its submodules): the
    vision tower, each merger under it (named too, so that they stay 16-bit whatever the tower's entry says) and
    lm_head."""
    tower = f"{family.inner_model}.{family.vision_tower}"
    return [tower, *(f"{tower}.{merger}" for merger in family.mergers), family.lm_head]


def quantization_config(quantization: str, family: Family, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for the recipe: 4-bit `quantization` with double quantization, computed in
    `compute_dtype` (the run's precision); the weights are stored in bytes (uint8): sharding them (FSDP's
    `bnb_4bit_quant_storage`) is not offered, the recipe check refuses FSDP and ZeRO-3."""
    from transformers import BitsAndBytesConfig

    require_bitsandbytes(quantization)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=QUANT_TYPES[quantization],
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=kept_in_16_bit(family),
    )


def four_bit_layers(model) -> list[str]:
    """Names of the model's bitsandbytes 4-bit linear layers (the base layer's name under a LoRA wrapper)."""
    import sys

    bnb = sys.modules.get("bitsandbytes")  # never imported here: a model without it has no 4-bit layer
    if bnb is None:
        return []
    return [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]


def without_cpu_repacking(model) -> None:
    """Keep bitsandbytes' 4-bit layers in the format they trained in on a CPU. On CPUs with AVX512-BF16, bitsandbytes
    0.50 repacks a layer's 4-bit weight in place into a CPU-only layout at its first forward without gradients in eval
    mode (evaluation, the export's logits) and asserts that the layer's outputs are a multiple of 32: Qwen3.5's
    `in_proj_a`/`in_proj_b` have one output per value head (4 in the tiny model, 48 in 27B) and fail there. Training
    never takes that path; the portable kernel computes the same product. GPUs are not affected."""
    for name in four_bit_layers(model):
        module = model.get_submodule(name)
        if module.weight.device.type == "cpu":
            module.support_avx512bf16_for_cpu = False


def fused_experts(model, family: Family) -> list[str]:
    """The fused expert parameters (3-D, not nn.Linear) of a mixture-of-experts model: left 16-bit by bitsandbytes."""
    if not family.expert_lora_targets:
        return []
    ends = tuple(f".{name}" for name in family.expert_lora_targets)
    return [name for name, _ in model.named_parameters() if name.endswith(ends)]


def describe(model, family: Family, quantization: str, compute_dtype: torch.dtype, hybrid: bool) -> None:
    """Log what was quantized and what was not; warn where QLoRA is known to hurt."""
    kept = "vision tower, " + ", ".join(family.mergers) + f", {family.lm_head}"
    logger.info(
        "model.quantization=%s: %d linear layers of the LLM in 4-bit %s (double quantization, computed in %s); "
        "16-bit: %s",
        quantization,
        len(four_bit_layers(model)),
        QUANT_TYPES[quantization].upper(),
        str(compute_dtype).removeprefix("torch."),
        kept,
    )
    experts = fused_experts(model, family)
    if experts:
        dtype = str(dict(model.named_parameters())[experts[0]].dtype).removeprefix("torch.")
        logger.info(
            "model.quantization=%s: %s's %d fused expert parameters stay %s (3-D parameters, not nn.Linear: "
            "bitsandbytes quantizes nn.Linear only), so most of this checkpoint is not 4-bit",
            quantization,
            family.title,
            len(experts),
            dtype,
        )
    if hybrid:
        logger.warning(
            "model.quantization=%s on %s: QLoRA is known to hurt this family: its Gated DeltaNet linear-attention "
            "layers lose more to 4-bit quantization than attention layers do (unsloth advises against QLoRA for "
            "Qwen3.5, dense and MoE, for its higher than normal quantization error); prefer model.quantization=none "
            "(LoRA on the 16-bit base) where memory allows",
            quantization,
            family.title,
        )
