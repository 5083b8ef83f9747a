"""Padded batches keep every input the model needs, in sample order."""

import torch

from finetune.collator import Collator, pad_batch
from finetune.data.sources import load_samples
from finetune.data.encode import IGNORE_INDEX, ConversationEncoder
from finetune.data.vision import VisionSettings


def test_padded_batch_of_images_and_videos(processors, demo_config):
    from conftest import DEMO

    samples = load_samples(DEMO / "test.json")[:6]
    encoder = ConversationEncoder(processors["qwen2_5_vl"], VisionSettings.from_config(demo_config.model))
    batch = Collator(encoder, samples)([{"index": i} for i in range(6)])
    encoded = [encoder.encode(s) for s in samples]
    lengths = [len(e.input_ids) for e in encoded]
    assert batch["input_ids"].shape == (6, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert set(batch) >= {"input_ids", "attention_mask", "labels", "mm_token_type_ids"}
    n_images = sum(bool(s.media("image")) for s in samples)
    n_videos = sum(bool(s.media("video")) for s in samples)
    assert len(batch.get("image_grid_thw", [])) == n_images and len(batch.get("video_grid_thw", [])) == n_videos
    assert len(batch.get("second_per_grid_ts", [])) == n_videos
    pad = processors["qwen2_5_vl"].tokenizer.pad_token_id
    for row, e in enumerate(encoded):
        assert batch["input_ids"][row, : len(e.input_ids)].tolist() == e.input_ids
        assert (batch["input_ids"][row, len(e.input_ids):] == pad).all()
        assert (batch["labels"][row, len(e.input_ids):] == IGNORE_INDEX).all()


def test_left_padding_for_generation(processors, demo_config):
    from conftest import DEMO

    samples = load_samples(DEMO / "test.json")[:3]
    encoder = ConversationEncoder(processors["qwen2_vl"], VisionSettings.from_config(demo_config.model))
    encoded = [encoder.encode(s) for s in samples]
    batch = pad_batch(encoded, 0, padding_side="left")
    for row, e in enumerate(encoded):
        assert batch["input_ids"][row, -len(e.input_ids):].tolist() == e.input_ids
        assert batch["attention_mask"][row, -1] == 1
    assert "second_per_grid_ts" not in batch  # Qwen2-VL has no absolute time input
    assert torch.is_tensor(batch["mm_token_type_ids"])
