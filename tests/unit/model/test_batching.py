"""Batches keep every input the model needs, in sample order, with the recipe's position ids."""

import pytest
import torch

from finetune.base.families import FAMILIES
from finetune.data.encode import IGNORE_INDEX, ConversationEncoder
from finetune.data.sources import load_samples
from finetune.model.batching import INFERENCE_KEYS, TRAINING_KEYS, RowCollator, inference_batch, training_batch
from finetune.model.rope import PositionRule
from finetune.recipe.data_settings import vision_settings


def _encoder(processors, family, demo_config):
    return ConversationEncoder(processors[family], vision_settings(demo_config))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_unpacked_training_batch_is_one_sample_per_row(processors, demo_config, family):
    from tests.helpers import DEMO

    samples = load_samples(DEMO / "test.json")[:6]
    encoder = _encoder(processors, family, demo_config)
    entry = FAMILIES[family]
    rule = PositionRule(
        "qwen", 2, 2 if entry.video_seconds_scale else None, frame_blocks=entry.video_layout == "timestamped_frames"
    )
    batch = RowCollator(encoder, samples, rule)([(i,) for i in range(6)])
    encoded = [encoder.encode(s) for s in samples]
    lengths = [len(e.input_ids) for e in encoded]
    assert set(batch) <= set(TRAINING_KEYS) and {"input_ids", "labels", "mm_token_type_ids", "position_ids"} <= set(
        batch
    )
    assert "attention_mask" not in batch  # sample boundaries come from position_ids row 0
    assert batch["input_ids"].shape == (6, max(lengths)) and batch["position_ids"].shape == (4, 6, max(lengths))
    assert batch["num_real_tokens"].item() == sum(lengths)
    n_images = sum(bool(s.media("image")) for s in samples)
    n_videos = sum(bool(s.media("video")) for s in samples)
    assert len(batch.get("image_grid_thw", [])) == n_images and len(batch.get("video_grid_thw", [])) == n_videos
    assert len(batch.get("second_per_grid_ts", [])) == (n_videos if FAMILIES[family].video_seconds_scale else 0)
    pad = processors[family].tokenizer.pad_token_id
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        assert batch["input_ids"][row, :n].tolist() == e.input_ids
        assert batch["labels"][row, 1:n].tolist() == e.labels[1:] and batch["labels"][row, 0] == IGNORE_INDEX
        assert (batch["input_ids"][row, n:] == pad).all() and (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert torch.equal(batch["position_ids"][0, row, :n], torch.arange(n))
        assert torch.equal(batch["position_ids"][0, row, n:], torch.arange(max(lengths) - n))  # padding: own block
        assert torch.equal(
            batch["position_ids"][1:, row, :n],
            rule.sample(
                e.mm_token_type_ids,
                [tuple(g) for g in (e.image_grid_thw.tolist() if e.image_grid_thw is not None else [])],
                [tuple(g) for g in (e.video_grid_thw.tolist() if e.video_grid_thw is not None else [])],
                e.second_per_grid_ts,
            ),
        )


def test_left_padded_inference_batch_has_the_same_positions(processors, demo_config):
    from tests.helpers import DEMO

    samples = load_samples(DEMO / "test.json")[:3]
    encoder = _encoder(processors, "qwen2_vl", demo_config)
    encoded = [encoder.encode(s) for s in samples]
    rule = PositionRule("qwen", 2, None)
    batch = inference_batch(encoded, 0, rule, padding_side="left")
    assert set(batch) <= set(INFERENCE_KEYS) | {"labels"}
    training = training_batch([[e] for e in encoded], 0, rule)
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        assert batch["input_ids"][row, -n:].tolist() == e.input_ids
        assert batch["attention_mask"][row, -n:].all() and not batch["attention_mask"][row, :-n].any()
        assert torch.equal(batch["position_ids"][:, row, -n:], training["position_ids"][1:, row, :n])
        assert not batch["position_ids"][:, row, :-n].any()
    assert "second_per_grid_ts" not in batch  # Qwen2-VL has no absolute time input
    assert torch.is_tensor(batch["mm_token_type_ids"])
