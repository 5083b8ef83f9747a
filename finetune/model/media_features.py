"""Vision features of a batch's images and videos from one vision-tower call, in the form transformers' Qwen-VL
models take them as `mm_encoder_outputs`. Training (finetune/training/vision_sync.py: one call per rank and step)
and rollouts (finetune/evaluation/rollouts.py: one call per prompt, shared by its G completions) both use it."""

from __future__ import annotations

import torch

MEDIA = (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw"))


def dummy_vision_input(vision_config, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches for the smallest grid the tower accepts: 1 frame of merge x merge patches -> 1 LLM token."""
    merge = vision_config.spatial_merge_size
    channels = getattr(vision_config, "in_channels", None) or vision_config.in_chans
    patch = channels * vision_config.temporal_patch_size * vision_config.patch_size**2
    pixels = torch.zeros(merge * merge, patch, device=device, dtype=dtype)
    return pixels, torch.tensor([[1, merge, merge]], device=device)


def encode_media_once(visual, vision_config, inputs: dict) -> tuple[dict, torch.Tensor | None]:
    """Features of all images and videos in `inputs` from one tower call, as transformers' `mm_encoder_outputs`
    ({"image"/"video": the tower's output type whose per-token fields hold per-item tuples}). Per-token fields are
    the merged features (`pooler_output`) and, for Qwen3-VL, the DeepStack features of some ViT layers
    (`deepstack_features`, one tensor per layer), which the language model adds into its first layers. Without
    media: ({}, 0 x the sum of the dummy call's features, DeepStack included, so that every merger takes part)."""
    weight = next(visual.parameters())
    present = [(name, inputs[pixels], inputs[grid]) for name, pixels, grid in MEDIA if inputs.get(pixels) is not None]
    if not present:
        pixels, grid = dummy_vision_input(vision_config, weight.device, weight.dtype)
        out = visual(pixels, grid_thw=grid)
        features = [out.pooler_output, *(getattr(out, "deepstack_features", None) or [])]
        return {}, sum(f.float().sum() for f in features) * 0.0
    pixels = torch.cat([p.type(weight.dtype) for _, p, _ in present])
    grid = torch.cat([g for _, _, g in present])
    out = visual(pixels, grid_thw=grid)
    deepstack = getattr(out, "deepstack_features", None)
    outputs, start = {}, 0
    for name, _, item_grid in present:
        sizes = (item_grid.prod(-1) // vision_config.spatial_merge_size**2).tolist()
        span = slice(start, start + sum(sizes))
        fields = {"pooler_output": torch.split(out.pooler_output[span], sizes)}
        if deepstack is not None:
            fields["deepstack_features"] = [torch.split(layer[span], sizes) for layer in deepstack]
        outputs[name] = type(out)(**fields)
        start += sum(sizes)
    return outputs, None


def vision_tower(model):
    """The vision tower of `model` (a Qwen-VL model, under PEFT or not): the family's `vision_tower` path."""
    from finetune.base.families import family_of
    from finetune.model.rope import inner_model

    inner = inner_model(model)
    return inner.get_submodule(family_of(inner.config.model_type).vision_tower)


def model_media_features(model, inputs: dict, always: bool = False) -> tuple[dict, torch.Tensor | None]:
    """`encode_media_once` on `model`'s own vision tower: the features of the images and videos in `inputs`, and
    for inputs without media None (the tower is not called) or, with `always` (every rank must call the tower alike:
    ZeRO-3, DDP with a vision part that trains), the dummy call's 0 x features to add into the result."""
    if not always and not any(inputs.get(pixels) is not None for _, pixels, _ in MEDIA):
        return {}, None
    from finetune.model.rope import inner_model

    return encode_media_once(vision_tower(model), inner_model(model).config.vision_config, inputs)


def repeat_media_features(features: dict, times: int) -> dict:
    """The features of one sequence's media for `times` copies of that sequence, in row order (new objects:
    transformers' `generate` rewrites the fields of what it is given when it expands them)."""
    repeated = {}
    for name, out in features.items():
        fields = {"pooler_output": tuple(out.pooler_output) * times}
        if getattr(out, "deepstack_features", None) is not None:
            fields["deepstack_features"] = [tuple(layer) * times for layer in out.deepstack_features]
        repeated[name] = type(out)(**fields)
    return repeated


def split_media_features(features: dict, samples: list) -> list[dict]:
    """The features of a batch's media (`encode_media_once` of the samples' media in sample order) cut per sample:
    `samples` are EncodedSamples, whose grids say how many images and videos each holds."""
    parts = [{} for _ in samples]
    for name, _, grid in MEDIA:
        out, start = features.get(name), 0
        if out is None:
            continue
        for part, sample in zip(parts, samples):
            count = 0 if getattr(sample, grid) is None else len(getattr(sample, grid))
            if count:
                items = slice(start, start + count)
                fields = {"pooler_output": tuple(out.pooler_output[items])}
                if getattr(out, "deepstack_features", None) is not None:
                    fields["deepstack_features"] = [tuple(layer[items]) for layer in out.deepstack_features]
                part[name] = type(out)(**fields)
            start += count
    return parts
