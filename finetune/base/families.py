"""The model families this project fine-tunes, as data: one entry per family, read by the code that would
otherwise test family names (what trains, positions, loading, prediction, the tiny checkpoints).

Adding a family is one entry here, its recipes (recipes/model/<family>_*.yaml, recipes/model/tiny_<family>.yaml)
and a demo experiment; tests/unit/test_families.py then checks the entry against the real (tiny) model and the
per-family tests run on it. It lives in the lowest layer because the recipe layer checks `model.family` against
these names; it imports nothing heavy (transformers classes are named, not imported).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    # The checkpoint's config.json `model_type`; also the entry's key and the recipes' `model.family`.
    model_type: str
    title: str  # for messages: "Qwen2.5-VL"

    # Module paths as transformers 5.23 lays the model out (`<Family>ForConditionalGeneration`); parameter
    # names start with them. A part of the model is told apart by these paths (finetune/model/trainable.py).
    inner_model: str  # under the outer model: holds both towers and computes positions (`get_rope_index`)
    vision_tower: str  # under `inner_model`
    mergers: tuple[str, ...]  # children of the vision tower that project its features into the LLM
    language_model: str  # under `inner_model`
    lm_head: str  # under the outer model

    # nn.Linear names that take LoRA when the recipe leaves peft.target_modules / peft.vision_target_modules null
    # (their default): in the language model, and in the vision tower outside the mergers (the
    # names' ends). The Conv3d patch embed is never one (LLaMA-Factory #5324).
    lora_targets: tuple[str, ...]
    vision_lora_targets: tuple[str, ...]

    # Position rule (finetune/model/rope.py): the vision_config attribute that turns a video's seconds into
    # temporal position ids (times the sample's `second_per_grid_ts`); None: a video's temporal grid steps are
    # one id apart.
    video_seconds_scale: str | None

    # Processor classes (transformers names): what the tiny checkpoint is built with and AutoProcessor returns.
    processor: str
    image_processor: str
    video_processor: str

    # The tiny build (finetune/model/tiny.py): the vision_config key of the merger's output width (it must equal
    # the LLM's hidden size, which the tiny build sets), and the rest of the tiny vision_config.
    merger_width: str
    tiny_vision: dict[str, object]


# The module layout and LLM LoRA targets Qwen2-VL and Qwen2.5-VL share (transformers 5.23).
QWEN_VL_LAYOUT = dict(
    inner_model="model",
    vision_tower="visual",
    mergers=("merger",),
    language_model="language_model",
    lm_head="lm_head",
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)

FAMILIES: dict[str, Family] = {
    "qwen2_vl": Family(
        model_type="qwen2_vl",
        title="Qwen2-VL",
        **QWEN_VL_LAYOUT,
        vision_lora_targets=("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
        video_seconds_scale=None,
        processor="Qwen2VLProcessor",
        image_processor="Qwen2VLImageProcessor",
        video_processor="Qwen2VLVideoProcessor",
        merger_width="hidden_size",  # Qwen2-VL's ViT width is `embed_dim`
        tiny_vision=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, initializer_range=0.1),
    ),
    "qwen2_5_vl": Family(
        model_type="qwen2_5_vl",
        title="Qwen2.5-VL",
        **QWEN_VL_LAYOUT,
        vision_lora_targets=("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        video_seconds_scale="tokens_per_second",
        processor="Qwen2_5_VLProcessor",
        image_processor="Qwen2VLImageProcessor",
        video_processor="Qwen2VLVideoProcessor",
        merger_width="out_hidden_size",
        tiny_vision=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            window_size=112,
            fullatt_block_indexes=[1],
            tokens_per_second=2,  # as in Qwen2.5-VL-3B/7B/72B-Instruct
            initializer_range=0.1,
        ),
    ),
}


def family_of(model_type: str) -> Family:
    """The entry of a checkpoint's `model_type`; anything else is refused with the families there are."""
    if model_type not in FAMILIES:
        known = ", ".join(f"{f.model_type} ({f.title})" for f in FAMILIES.values())
        raise ValueError(f"{model_type!r} is not a model family this project knows; it knows {known}.")
    return FAMILIES[model_type]
