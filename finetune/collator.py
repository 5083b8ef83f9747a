"""Batching: encode each sample (media decoded here, in the data-loader workers) and pad into one batch.

The trainer's dataset holds only sample indices; the collator owns the samples and the encoder, so images
and videos are decoded lazily, once per step, and never stored in an Arrow table.
"""

from __future__ import annotations

import torch

from finetune.data.conversation import Sample
from finetune.data.encode import IGNORE_INDEX, ConversationEncoder, EncodedSample


def pad_batch(encoded: list[EncodedSample], pad_token_id: int, padding_side: str = "right") -> dict:
    """Pad token sequences to the longest one and concatenate the vision tensors in sample order.
    `mm_token_type_ids` is always included: without it Qwen2.5-VL silently falls back to 1-D positions."""
    longest = max(len(e.input_ids) for e in encoded)

    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        out = torch.full((len(rows), longest), value, dtype=torch.long)
        for i, row in enumerate(rows):
            if padding_side == "right":
                out[i, : len(row)] = torch.tensor(row)
            else:
                out[i, longest - len(row) :] = torch.tensor(row)
        return out

    batch = {
        "input_ids": pad([e.input_ids for e in encoded], pad_token_id),
        "attention_mask": pad([[1] * len(e.input_ids) for e in encoded], 0),
        "mm_token_type_ids": pad([e.mm_token_type_ids for e in encoded], 0),
        "labels": pad([e.labels for e in encoded], IGNORE_INDEX),
    }
    return {**batch, **vision_inputs(encoded)}


def vision_inputs(encoded: list[EncodedSample]) -> dict:
    """Pixels, grids and (Qwen2.5-VL) seconds per temporal patch of all samples, in sample order."""
    inputs = {}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [getattr(e, key) for e in encoded if getattr(e, key) is not None]
        if parts:
            inputs[key] = torch.cat(parts)
    seconds = [s for e in encoded for s in (e.second_per_grid_ts or [])]
    if seconds:
        inputs["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
    return inputs


class Collator:
    """For the trainer: features are `{"index": i}` rows; returns a padded training batch."""

    def __init__(self, encoder: ConversationEncoder, samples: list[Sample]):
        self.encoder = encoder
        self.samples = samples
        self.pad_token_id = encoder.tokenizer.pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        encoded = [self.encoder.encode(self.samples[f["index"]]) for f in features]
        return pad_batch(encoded, self.pad_token_id)
