"""With several processes, every forward runs the vision tower exactly once, whatever its batch holds.

Under ZeRO-3 a module's parameters are all-gathered from every rank when it runs (forward, and backward when it
trains). A rank whose batch has no image, or no video, would skip those gathers while the others wait in them:
a hang, or gloo's "collective mismatch" (QwenLM/Qwen2.5-VL #126, LLaMA-Factory #5616, ms-swift #4918). DDP
with a trainable merger or ViT fails the same way in its gradient all-reduce.

transformers calls the tower once for the images and once more for the videos of a batch. Instead, a
pre-forward hook on the inner Qwen-VL model (`model.model`) runs it once on the images and videos together
(their patches have the same size, and the tower attends within each item only, so each item's features
are the same) and hands the features to the model as `mm_encoder_outputs` (Qwen3-VL's DeepStack features
included). A batch with no media runs it on
a one-token dummy input and adds 0 x its output to the input embeddings: the loss and every gradient are
unchanged while the same parameters take part in backward on every rank. Every rank thus runs: embeddings,
vision tower, language model.

The embeddings go to the model as `inputs_embeds` (Qwen3-VL takes input_ids or inputs_embeds, not both). Without
input_ids transformers finds the placeholder tokens by comparing every embedding with the image and video tokens'
embeddings, calling the embedding layer again once per token kind and modality present: under ZeRO-3 each call is
a gather, so a rank with media would gather while a text-only rank does not (gloo: "collective mismatch"). While
this hook's forward runs, the inner model's `get_placeholder_mask` is given the input_ids instead: the same masks,
exact, and no embedding call beyond the one every rank makes.

One call also matters for training the ViT under ZeRO-3 with reentrant checkpointing: each checkpointed
block's gradient is then delivered by a separate inner backward, and ZeRO-3 keeps only the last delivery of
a parameter used twice in one step, so the image call's ViT gradients would be silently overwritten by the
video call's (tests/integration/test_scale_out.py trains ViT LoRA on a rank with video only beside a text-only rank).
"""

from __future__ import annotations

from finetune.base.families import family_of
from finetune.model.media_features import encode_media_once


class OneVisionCall:
    """The pre-forward hook described above, active while training. Install it after DeepSpeed has wrapped the
    model: ZeRO-3 records each step's module order from its own hooks and checks all ranks recorded the same."""

    def __init__(self, inner_model):
        # The hook sits on the inner model (the family's `inner_model`), so the tower is found below it.
        self.visual = inner_model.get_submodule(family_of(inner_model.config.model_type).vision_tower)
        self.vision_config = inner_model.config.vision_config
        self.handle = inner_model.register_forward_pre_hook(self._before, with_kwargs=True)
        # Evaluation during training (sharded generate, every rank stepping in lockstep) needs the same one call.
        self.in_evaluation = False
        # The input_ids of the forward this hook replaced by embeddings, for the placeholder masks (see above).
        self.input_ids = None
        self.inner_model = inner_model
        # How the features are made: one tower call on the batch's media; with sequence parallelism, each rank's
        # share of the row's frames and a gather (finetune/model/sequence_parallel.py `encode_media_sharded`).
        self.encode = encode_media_once
        self.after = inner_model.register_forward_hook(self._after)
        if hasattr(inner_model, "get_placeholder_mask"):
            inner_model.get_placeholder_mask = self._placeholder_mask

    def _placeholder_mask(self, input_ids, inputs_embeds, *args, **kwargs):
        ids = self.input_ids if input_ids is None and self.input_ids is not None else input_ids
        return type(self.inner_model).get_placeholder_mask(self.inner_model, ids, inputs_embeds, *args, **kwargs)

    def _after(self, module, args, output):
        self.input_ids = None

    def _before(self, module, args, kwargs):
        self.input_ids = None
        if not module.training and not self.in_evaluation:
            return None
        if (
            kwargs.get("input_ids") is None
            or kwargs.get("inputs_embeds") is not None
            or kwargs.get("mm_encoder_outputs") is not None
        ):
            return None
        embeds = module.get_input_embeddings()(kwargs["input_ids"])  # the model's own order: embeddings first
        # Evaluation's sharded generation gives each rank its own prompts: never a group's shared row.
        encode = encode_media_once if self.in_evaluation else self.encode
        features, padding = encode(self.visual, self.vision_config, kwargs)
        if padding is not None:
            embeds = embeds + padding.to(embeds.dtype)
        # The embeddings replace input_ids (Qwen3-VL accepts only one of them); the placeholders are found by the
        # ids kept here (`_placeholder_mask`). The grids stay: they give the M-RoPE positions.
        self.input_ids = kwargs["input_ids"]
        return args, {
            **kwargs,
            "input_ids": None,
            "inputs_embeds": embeds,
            "pixel_values": None,
            "pixel_values_videos": None,
            "mm_encoder_outputs": features,
        }

    def remove(self) -> None:
        self.handle.remove()
        self.after.remove()
        self.inner_model.__dict__.pop("get_placeholder_mask", None)
