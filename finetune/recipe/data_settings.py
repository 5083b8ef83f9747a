"""The recipe's data settings as the typed values the data layer takes. The data layer (finetune/data/) never
reads a config object: this module is the one place that turns a recipe into a `VisionSettings`, a
`LabelMode`, a length limit and a `SplitSettings`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune.base.families import family_of
from finetune.data.modes import LabelMode
from finetune.data.vision import VisionSettings
from finetune.recipe.schema import Config

if TYPE_CHECKING:  # the encoder and the pre-pass import torch: a recipe's checks (finetune/recipe/budgets.py) do not
    from finetune.data.encode import ConversationEncoder
    from finetune.data.prepare import SplitSettings


def vision_settings(config: Config) -> VisionSettings:
    """Qwen's image and video budgets of the recipe (`model.*`), and the frame rate of frame-list videos."""
    m = config.model
    return VisionSettings(
        min_pixels=m.min_pixels,
        max_pixels=m.max_pixels,
        video_fps=m.video_fps,
        video_min_frames=m.video_min_frames,
        video_max_frames=m.video_max_frames,
        video_min_pixels=m.video_min_pixels,
        video_max_pixels=m.video_max_pixels,
        video_total_pixels=m.video_total_pixels,
        frames_fps=config.data.frames_fps,
    )


def conversation_encoder(processor, config: Config, for_training: bool = True) -> ConversationEncoder:
    """The encoder the recipe describes, rendering videos as the recipe's model family does; training and validation
    also apply its label mode and length limit (inference encodes prompts, which have no labels and are never refused
    for length)."""
    from finetune.data.encode import ConversationEncoder

    layout = family_of(config.model.family).video_layout
    if not for_training:
        return ConversationEncoder(processor, vision_settings(config), video_layout=layout)
    return ConversationEncoder(
        processor,
        vision_settings(config),
        LabelMode(config.trainer.label_mode),
        config.data.max_length,
        video_layout=layout,
    )


def split_settings(config: Config) -> SplitSettings:
    from finetune.data.prepare import SplitSettings

    d = config.data
    return SplitSettings(
        max_length=d.max_length,
        over_length=d.over_length,
        media_root=d.media_root,
        num_proc=d.num_proc,
        seed=config.trainer.seed,
    )
