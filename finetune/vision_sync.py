"""Every rank runs the vision tower the same number of times per step, whatever its batch holds.

Under ZeRO-3 a module's parameters are all-gathered from every rank when it runs (forward, and backward when it
trains). A rank whose batch has no image, or no video, would skip those gathers while the others wait in them:
a hang, or gloo's "collective mismatch" (QwenLM/Qwen2.5-VL #126, LLaMA-Factory #5616, ms-swift #4918). DDP
with a trainable merger or ViT fails the same way in its gradient all-reduce.

So, with more than one process, before the real tower calls the tower runs once on a one-token dummy input
for every modality the batch lacks: every rank then runs embeddings, vision, vision, language model, in that
order (ZeRO-3 also checks that every rank recorded the same module order). The dummy output joins the input
embeddings multiplied by zero, so the loss and every gradient are unchanged while the same parameters take
part in backward on every rank.
"""

from __future__ import annotations

import torch

MODALITIES = ("pixel_values", "pixel_values_videos")


def dummy_vision_input(vision_config, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches for the smallest grid the tower accepts: 1 frame of merge x merge patches -> 1 LLM token."""
    merge = vision_config.spatial_merge_size
    channels = getattr(vision_config, "in_channels", None) or vision_config.in_chans
    patch = channels * vision_config.temporal_patch_size * vision_config.patch_size**2
    pixels = torch.zeros(merge * merge, patch, device=device, dtype=dtype)
    return pixels, torch.tensor([[1, merge, merge]], device=device)


def missing_modality_calls(visual, vision_config, inputs: dict) -> torch.Tensor | None:
    """Run the tower once per modality absent from `inputs`; returns 0 * (sum of outputs), or None if none."""
    missing = [key for key in MODALITIES if inputs.get(key) is None]
    if not missing:
        return None
    weight = next(visual.parameters())
    pixels, grid = dummy_vision_input(vision_config, weight.device, weight.dtype)
    total = torch.zeros((), device=pixels.device)
    for _ in missing:
        out = visual(pixels, grid_thw=grid)
        merged = out.pooler_output if hasattr(out, "pooler_output") else out
        total = total + merged.float().sum() * 0.0
    return total


class EqualVisionCalls:
    """A pre-forward hook on the inner Qwen-VL model (`model.model`), active while training. It embeds the tokens
    itself, then runs the dummy tower calls, and hands the model `inputs_embeds` + 0 * their output (input_ids
    stay: they locate the media placeholders). The model's forward embeds before its own tower calls, so every
    rank runs: embeddings, vision x 2, language model. Install it after DeepSpeed has wrapped the model: ZeRO-3
    records each step's module order from its own hooks and checks that all ranks recorded the same."""

    def __init__(self, inner_model):
        self.visual, self.vision_config = inner_model.visual, inner_model.config.vision_config
        self.handle = inner_model.register_forward_pre_hook(self._before, with_kwargs=True)

    def _before(self, module, args, kwargs):
        if not module.training or kwargs.get("inputs_embeds") is not None or kwargs.get("input_ids") is None:
            return None
        embeds = module.get_input_embeddings()(kwargs["input_ids"])
        padding = missing_modality_calls(self.visual, self.vision_config, kwargs)
        if padding is not None:
            embeds = embeds + padding.to(embeds.dtype)
        return args, {**kwargs, "inputs_embeds": embeds}

    def remove(self) -> None:
        self.handle.remove()
