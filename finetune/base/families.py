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
    # The classes (transformers names) of the LLM's decoder layers and of the ViT's blocks: FSDP2's sharding units
    # (`accelerate.fsdp_version=2`: each layer and block gathers its weights on its own; finetune/runs/launch.py).
    shard_units: tuple[str, ...]

    # nn.Linear names that take LoRA when the recipe leaves peft.target_modules / peft.vision_target_modules null
    # (their default): in the language model, and in the vision tower outside the mergers (the
    # names' ends). The Conv3d patch embed is never one (LLaMA-Factory #5324).
    lora_targets: tuple[str, ...]
    vision_lora_targets: tuple[str, ...]

    # A mixture-of-experts LLM (None where the LLM is dense):
    # - `expert_lora_targets`: the fused expert parameters (3-D: one slice per expert; names' ends inside a decoder
    #   layer) that take LoRA beside `lora_targets` when peft.target_experts is true (PEFT `target_parameters`: one
    #   rank-r update per expert);
    # - `router`: the module (name's end) that scores the experts for each token; frozen unless parts.router=full;
    # - `transposed_in_checkpoint`: parameters (names' ends) that the published checkpoints store with their last two
    #   dimensions swapped against transformers' in-memory layout (which transformers 5.23 also saves); the export
    #   writes them as the checkpoints do, the layout vLLM's loader expects.
    # - `per_expert_in_checkpoint`: fused expert parameters (names' ends, `<...>.experts.<projection>`) that the
    #   published checkpoints store unfused, one 2-D tensor per expert and projection: `experts.gate_up_proj`
    #   [E, 2I, H] as `experts.<e>.gate_proj.weight` and `experts.<e>.up_proj.weight` [I, H] (its two halves, gate
    #   first), `experts.down_proj` [E, H, I] as `experts.<e>.down_proj.weight` [H, I]. transformers fuses them on
    #   loading; the export and the tiny checkpoints write them so (finetune/model/checkpoint_layout.py).
    # A parameter is in at most one of the two; both None: the published layout is transformers' own.
    expert_lora_targets: tuple[str, ...] | None
    router: str | None
    transposed_in_checkpoint: tuple[str, ...] | None
    per_expert_in_checkpoint: tuple[str, ...] | None

    # Position rule (finetune/model/rope.py): the vision_config attribute that turns a video's seconds into
    # temporal position ids (times the sample's `second_per_grid_ts`); None: a video's temporal grid steps are
    # one id apart (or, with `video_layout` "timestamped_frames", each frame pair is its own block).
    video_seconds_scale: str | None

    # How a video enters the LLM, one of VIDEO_LAYOUTS (finetune/data/encode.py renders it, finetune/model/rope.py
    # positions it):
    #   "one_block"           `<|video_pad|>` expands to the video's t x h/m x w/m tokens: one vision block of grid
    #                         (t, h, w) (Qwen2-VL, Qwen2.5-VL).
    #   "timestamped_frames"  `<|video_pad|>` expands, per temporal patch (frame pair), to the text `<{s:.1f} seconds>`
    #                         (s: the mean time of the pair's two frames), `<|vision_start|>`, the frame's h/m x w/m
    #                         tokens and `<|vision_end|>`; the template's own `<|vision_start|>`/`<|vision_end|>`
    #                         around the video stay (transformers >= 5.10, vLLM). Positions treat each frame pair as
    #                         a block of grid (1, h, w); `video_grid_thw` keeps one row per video (Qwen3-VL).
    video_layout: str
    # What the exported video processor's `size` bounds, one of VIDEO_BUDGETS (finetune/exporting/serving.py writes
    # the recipe's budgets that way): "frame" (Qwen2VLVideoProcessor: the pixels of each frame; the clip's total
    # is `max_video_tokens`) or "clip" (Qwen3VLVideoProcessor: `longest_edge` bounds the pixels of all frames
    # together, `max_video_tokens` each frame's tokens).
    video_budget: str

    # Processor classes (transformers names): what the tiny checkpoint is built with and AutoProcessor returns.
    processor: str
    image_processor: str
    video_processor: str
    # The published checkpoints' preprocessor_config.json ("image_processor") and video_preprocessor_config.json
    # ("video_processor") values where they differ from the classes' defaults; the tiny build sets them. None:
    # the classes' defaults are the checkpoints' (patch 14, merge 2, temporal 2, CLIP mean/std).
    processor_settings: dict[str, dict[str, object]] | None

    # The tiny build (finetune/model/tiny.py): the vision_config key of the merger's output width (it must equal
    # the LLM's hidden size, which the tiny build sets), and the rest of the tiny vision_config.
    merger_width: str
    tiny_vision: dict[str, object]
    # text_config values of the tiny build besides finetune/model/tiny.py's TEXT_DIMS (which they override), e.g. the
    # experts of a mixture-of-experts LLM; None: TEXT_DIMS alone.
    tiny_text: dict[str, object] | None


VIDEO_LAYOUTS = ("one_block", "timestamped_frames")
VIDEO_BUDGETS = ("frame", "clip")

# The module layout and LLM LoRA targets Qwen2-VL and Qwen2.5-VL share (transformers 5.23).
QWEN_VL_LAYOUT = dict(
    inner_model="model",
    vision_tower="visual",
    mergers=("merger",),
    language_model="language_model",
    lm_head="lm_head",
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)

# Qwen3-VL (dense and MoE, transformers 5.23): the same paths, and DeepStack's mergers beside the final one
# (`visual.deepstack_merger_list.N` project intermediate ViT layers' features into the first LLM layers).
QWEN3_VL_LAYOUT = dict(QWEN_VL_LAYOUT, mergers=("merger", "deepstack_merger_list"))

# What the published Qwen3-VL checkpoints ship in preprocessor_config.json / video_preprocessor_config.json (the
# same files for every size; see recipes/model/qwen3_vl_*.yaml): patch 16, merge 2 (32 x 32 pixels per LLM token),
# temporal patch 2, mean = std = 0.5; images 64 ... 16384 tokens (65536 ... 16777216 pixels); videos a
# `longest_edge` of 25165824 pixels summed over the sampled frames (12288 tokens) and a `shortest_edge` of 4096.
QWEN3_VL_GEOMETRY = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
QWEN3_VL_PROCESSORS = {
    "image_processor": dict(QWEN3_VL_GEOMETRY, size={"shortest_edge": 65536, "longest_edge": 16777216}),
    "video_processor": dict(QWEN3_VL_GEOMETRY, size={"shortest_edge": 4096, "longest_edge": 25165824}),
}
# The tiny ViT: 2 blocks; DeepStack taps both (the real ones tap 3 of 24-27 blocks).
QWEN3_VL_TINY_VISION = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
    num_position_embeddings=64,  # an 8 x 8 table, interpolated to each grid (2304 = 48 x 48 in the real ones)
    deepstack_visual_indexes=[0, 1],
    initializer_range=0.1,
)
# Qwen3's text config has its own head_dim (128 by default); the interleaved M-RoPE sections of the real models are
# [24, 20, 20] of head_dim 128 (T H W T H W ...); for head_dim 16 (8 frequencies) [3, 3, 2] is the same interleave.
QWEN3_VL_TINY_TEXT = dict(
    head_dim=16,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 5000000.0,
        "mrope_section": [3, 3, 2],
        "mrope_interleaved": True,
    },
)

# Qwen3.5 (dense `qwen3_5` and MoE `qwen3_5_moe`, transformers 5.23): natively multimodal with Qwen3-VL's processors,
# rendering and positions (Qwen3_5Model.get_rope_index splits videos into frame pairs as Qwen3-VL's does), a ViT
# without DeepStack (`visual.merger` only), and a hybrid LLM: `text_config.layer_types` mixes "linear_attention"
# layers (Gated DeltaNet, `linear_attn.*`: in_proj_qkv, in_proj_z, in_proj_b, in_proj_a, a depthwise conv1d, A_log,
# dt_bias, a gated norm, out_proj; three of four layers in the published configs) and "full_attention" layers
# (`self_attn.*`, q_proj twice as wide: queries and their output gate, q_norm/k_norm).
# LoRA targets: attention q/k/v/o, the wide linear-attention projections in_proj_qkv (queries, keys, values ahead of
# the conv), in_proj_z (the output gate) and out_proj, and the MLP's gate/up/down (the dense MLP, or in the MoE the
# shared expert's: the names match `mlp.shared_expert.*_proj` there, never the router `mlp.gate`, a
# Qwen3_5MoeTopKRouter and no nn.Linear, nor `mlp.shared_expert_gate`). Left out: `in_proj_b` / `in_proj_a`, whose
# outputs are one scalar per value head (the write strength beta = sigmoid(b) and, with A_log and dt_bias, the decay
# g): 32 wide in 4B and 35B-A3B, 48 in 27B, so a rank 8-16 update is hardly low-rank there, and it changes the
# recurrence of every later token; they stay frozen with A_log, dt_bias and conv1d (peft.target_modules can add them).
# `shared_expert_gate` (MoE, nn.Linear(H, 1): one sigmoid gate per token on the shared expert) has one output, below
# any LoRA rank; it stays frozen, as the router does.
QWEN3_5_LAYOUT = dict(
    QWEN_VL_LAYOUT,
    lora_targets=(
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "in_proj_qkv",
        "in_proj_z",
        "out_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ),
)
# The published Qwen3.5 checkpoints' processor files are not in any source reachable here (no model hub); taken to be
# Qwen3-VL's (QWEN3_VL_PROCESSORS) because Qwen3.5 ships Qwen3-VL's processor classes (transformers 5.23's auto maps:
# Qwen3VLProcessor, Qwen2VLImageProcessor, Qwen3VLVideoProcessor; vLLM 0.33.0 registers Qwen3_5(Moe)
# ForConditionalGeneration with Qwen3VLMultiModalProcessor and a Qwen3VLProcessingInfo changed only in its config
# class) and its vision config has Qwen3-VL's patch 16, merge 2 and temporal patch 2 (Qwen3_5VisionConfig defaults).
# Check a checkpoint's preprocessor_config.json / video_preprocessor_config.json against these before training.
QWEN3_5_PROCESSORS = QWEN3_VL_PROCESSORS
# The tiny ViT: Qwen3-VL's without DeepStack (Qwen3_5VisionConfig has no deepstack_visual_indexes).
QWEN3_5_TINY_VISION = {k: v for k, v in QWEN3_VL_TINY_VISION.items() if k != "deepstack_visual_indexes"}
# The tiny hybrid LLM: a linear-attention layer, then a full-attention one (the published configs: three of each four
# layers linear, `full_attention_interval` 4). Linear attention with half as many key heads as value heads, as 4B and
# 35B-A3B (16 and 32; 27B: 16 and 48: vLLM 0.33.0's tests/v1/kv_connector/unit/test_nixl_connector_hma.py and
# tests/kernels/fla/test_fused_gdn_post_conv.py) and transformers' 9B-style defaults, head dims 16.
# Rotary: Qwen3.5 rotates partial_rotary_factor 0.25 of each head (published: head_dim 256 -> 64 dims, 32 frequencies,
# interleaved mrope_section [11, 11, 10], rope_theta 1e7: vLLM 0.33.0 recipes/models/Qwen/Qwen3.5-27B.yaml). head_dim
# 16 would leave 4 rotary dims, 2 frequencies, and no width axis at all; head_dim 32 gives 8 dims, 4 frequencies,
# interleaved T H W T = [2, 1, 1], so every axis of the positions reaches the tiny model.
QWEN3_5_TINY_TEXT = dict(
    head_dim=32,
    layer_types=["linear_attention", "full_attention"],
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 10000000.0,
        "partial_rotary_factor": 0.25,
        "mrope_section": [2, 1, 1],
        "mrope_interleaved": True,
    },
)

# A dense LLM: no experts, no router.
# What every Qwen3-VL-style vision side shares (Qwen3-VL, Qwen3.5; dense and MoE): the ViT's LoRA targets, the processor
# classes, videos as timestamped frame pairs (time is in the text, no seconds scale) under a whole-clip budget, and
# the merger projecting to `out_hidden_size`.
QWEN3_VL_VISION_SIDE = dict(
    vision_lora_targets=("attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2"),
    video_seconds_scale=None,
    video_layout="timestamped_frames",
    video_budget="clip",
    processor="Qwen3VLProcessor",
    image_processor="Qwen2VLImageProcessor",
    video_processor="Qwen3VLVideoProcessor",
    merger_width="out_hidden_size",
)

DENSE_LLM = dict(expert_lora_targets=None, router=None, transposed_in_checkpoint=None, per_expert_in_checkpoint=None)

FAMILIES: dict[str, Family] = {
    "qwen2_vl": Family(
        model_type="qwen2_vl",
        shard_units=("Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"),
        title="Qwen2-VL",
        **QWEN_VL_LAYOUT,
        vision_lora_targets=("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
        **DENSE_LLM,
        video_seconds_scale=None,
        video_layout="one_block",
        video_budget="frame",
        processor="Qwen2VLProcessor",
        image_processor="Qwen2VLImageProcessor",
        video_processor="Qwen2VLVideoProcessor",
        processor_settings=None,
        merger_width="hidden_size",  # Qwen2-VL's ViT width is `embed_dim`
        tiny_vision=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, initializer_range=0.1),
        tiny_text=None,
    ),
    "qwen2_5_vl": Family(
        model_type="qwen2_5_vl",
        shard_units=("Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"),
        title="Qwen2.5-VL",
        **QWEN_VL_LAYOUT,
        vision_lora_targets=("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        **DENSE_LLM,
        video_seconds_scale="tokens_per_second",
        video_layout="one_block",
        video_budget="frame",
        processor="Qwen2_5_VLProcessor",
        image_processor="Qwen2VLImageProcessor",
        video_processor="Qwen2VLVideoProcessor",
        processor_settings=None,
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
        tiny_text=None,
    ),
    "qwen3_vl": Family(
        model_type="qwen3_vl",
        shard_units=("Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock"),
        title="Qwen3-VL",
        **QWEN3_VL_LAYOUT,
        **DENSE_LLM,
        **QWEN3_VL_VISION_SIDE,
        processor_settings=QWEN3_VL_PROCESSORS,
        tiny_vision=QWEN3_VL_TINY_VISION,
        # Tied input and output embeddings, as Qwen3-VL-2B/4B (8B and 32B are untied, as the MoE tiny).
        tiny_text=dict(QWEN3_VL_TINY_TEXT, tie_word_embeddings=True),
    ),
    "qwen3_vl_moe": Family(
        model_type="qwen3_vl_moe",
        shard_units=("Qwen3VLMoeTextDecoderLayer", "Qwen3VLMoeVisionBlock"),
        title="Qwen3-VL-MoE",
        # Every decoder layer's MLP is a mixture of experts (decoder_sparse_step 1, no mlp_only_layers in the published
        # configs): the nn.Linear targets are the attention projections, the experts take LoRA as parameters.
        **dict(QWEN3_VL_LAYOUT, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj")),
        # transformers 5.23 (Qwen3VLMoeTextExperts): gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I];
        # the published checkpoints: [E, H, 2I] and [E, I, H] (transformers' loader transposes them: conversion_mapping
        # `Transpose(1, 2, check_dims=True)`, by shape). The router `mlp.gate` (Qwen3VLMoeTextTopKRouter) holds one
        # [E, H] weight.
        expert_lora_targets=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
        router="mlp.gate",
        transposed_in_checkpoint=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
        per_expert_in_checkpoint=None,
        **QWEN3_VL_VISION_SIDE,
        processor_settings=QWEN3_VL_PROCESSORS,
        tiny_vision=QWEN3_VL_TINY_VISION,
        # 4 experts, 2 per token, in every layer (30B-A3B: 128 experts, 8 per token, 48 layers); untied embeddings.
        tiny_text=dict(
            QWEN3_VL_TINY_TEXT,
            num_experts=4,
            num_experts_per_tok=2,
            # 2I = 96 and I = 48, both unlike H = 64: transformers' loader tells the checkpoints' expert layout from
            # its own by shape alone, so with 2I == H (or I == H) a checkpoint in the published layout would load
            # untransposed (the export's round trip would then fail).
            moe_intermediate_size=48,
            decoder_sparse_step=1,
            tie_word_embeddings=False,
        ),
    ),
    "qwen3_5": Family(
        model_type="qwen3_5",
        shard_units=("Qwen3_5DecoderLayer", "Qwen3_5VisionBlock"),
        title="Qwen3.5",
        **QWEN3_5_LAYOUT,
        **DENSE_LLM,
        **QWEN3_VL_VISION_SIDE,
        processor_settings=QWEN3_5_PROCESSORS,
        tiny_vision=QWEN3_5_TINY_VISION,
        # Tied embeddings: whether the small published sizes tie them is not in a source reachable here; tied, the
        # dense tiny takes the export's tied path (the MoE tiny the untied one).
        tiny_text=dict(QWEN3_5_TINY_TEXT, tie_word_embeddings=True),
    ),
    "qwen3_5_moe": Family(
        model_type="qwen3_5_moe",
        shard_units=("Qwen3_5MoeDecoderLayer", "Qwen3_5MoeVisionBlock"),
        title="Qwen3.5-MoE",
        # Every decoder layer's MLP is a mixture of experts plus one shared expert (no dense MLP layers): the nn.Linear
        # gate/up/down targets are the shared expert's; the routed experts take LoRA as parameters.
        **QWEN3_5_LAYOUT,
        # transformers 5.23 (Qwen3_5MoeExperts): gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]. The
        # published checkpoints store them unfused, `mlp.experts.<e>.{gate,up,down}_proj.weight`: transformers' loader
        # fuses them (conversion_mapping: `qwen3_5_moe_text` = the `qwen2_moe` converter, MergeModulelist +
        # Concatenate(dim=1)), vLLM 0.33.0 loads them per expert (Qwen3NextSparseMoeBlock's FusedMoE with the default
        # gate_proj/up_proj/down_proj checkpoint names). The router `mlp.gate` (Qwen3_5MoeTopKRouter) holds one [E, H]
        # weight.
        expert_lora_targets=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
        router="mlp.gate",
        transposed_in_checkpoint=None,
        per_expert_in_checkpoint=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
        **QWEN3_VL_VISION_SIDE,
        processor_settings=QWEN3_5_PROCESSORS,
        tiny_vision=QWEN3_5_TINY_VISION,
        # 4 experts, 2 per token, and a shared expert in every layer (35B-A3B: 256 experts, 8 per token, 40 layers);
        # untied embeddings.
        tiny_text=dict(
            QWEN3_5_TINY_TEXT,
            num_experts=4,
            num_experts_per_tok=2,
            # 2I = 96 and I = 48 unlike H = 64, as the Qwen3-VL-MoE tiny: here the per-expert keys are fused by name,
            # not told apart by shape, so it is not needed for loading; it keeps a wrongly oriented expert tensor
            # from passing any shape check.
            moe_intermediate_size=48,
            shared_expert_intermediate_size=48,
            tie_word_embeddings=False,
        ),
    ),
}


def family_of(model_type: str) -> Family:
    """The entry of a checkpoint's `model_type`; anything else is refused with the families there are."""
    if model_type not in FAMILIES:
        known = ", ".join(f"{f.model_type} ({f.title})" for f in FAMILIES.values())
        raise ValueError(f"{model_type!r} is not a model family this project knows; it knows {known}.")
    return FAMILIES[model_type]
