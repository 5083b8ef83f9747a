"""Preference batches: the 2B sequences are the SFT layout of the chosen then the rejected encodings (ids, labels,
3-D positions, varlen boundaries when packed), and each prompt's pixels appear once, indexed by every sequence."""

import pytest
import torch

from finetune.base.families import FAMILIES
from finetune.data.encode import IGNORE_INDEX
from finetune.model.batching import training_batch
from finetune.model.preference_batching import UnpairedCollator, pack_sequences, preference_batch
from finetune.model.rope import PositionRule
from tests.helpers.preference_pairs import demo_completions, demo_pairs, encoded_pairs, encoder, with_completion


def _rule(family: str) -> PositionRule:
    entry = FAMILIES[family]
    return PositionRule(
        "qwen", 2, 2 if entry.video_seconds_scale else None, frame_blocks=entry.video_layout == "timestamped_frames"
    )


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kind", ["img", "vid"])
@pytest.mark.parametrize("packed", [False, True])
def test_sequences_are_the_sft_layout_and_media_is_there_once(processors, family, kind, packed):
    pairs = encoded_pairs(processors[family], kind, 2)
    rule, pad = _rule(family), processors[family].tokenizer.pad_token_id
    sequences = [c for c, _ in pairs] + [r for _, r in pairs]
    lengths = [len(s.input_ids) for s in sequences]
    budget = sum(lengths) // 2 + max(lengths) if packed else None
    batch = preference_batch(pairs, pad, rule, budget=budget, boundaries=packed)
    layout = pack_sequences(lengths, budget) if packed else [[i] for i in range(4)]
    assert (len(layout) < 4) == packed  # packing put several sequences in a row
    sft = training_batch([[sequences[i] for i in row] for row in layout], pad, rule, boundaries=packed)
    for key in ("input_ids", "labels", "position_ids", "mm_token_type_ids", "cu_seq_lens_q", "max_length_q"):
        if key in sft:
            assert (batch[key] == sft[key]) if isinstance(sft[key], int) else torch.equal(batch[key], sft[key]), key
    assert ("cu_seq_lens_q" in batch) == packed
    # each sequence's tokens are marked with its index, chosen ones first
    for r, row in enumerate(layout):
        expected = [i for i in row for _ in range(lengths[i])]
        expected += [-1] * (batch["input_ids"].shape[1] - len(expected))
        assert batch["sequence_index"][r].tolist() == expected
    # the pixels of each prompt once: the chosen encodings', in pair order
    media = "pixel_values" if kind == "img" else "pixel_values_videos"
    grid = "image_grid_thw" if kind == "img" else "video_grid_thw"
    assert torch.equal(batch[media], torch.cat([getattr(c, media) for c, _ in pairs]))
    assert torch.equal(batch[grid], torch.cat([getattr(c, grid) for c, _ in pairs]))
    other = "pixel_values_videos" if kind == "img" else "pixel_values"
    assert other not in batch
    # every placeholder block, in row-major order, names its pair's item
    index = batch["image_index" if kind == "img" else "video_index"].tolist()
    assert index == [i % 2 for row in layout for i in row]
    assert batch["num_pairs"] == 2


def test_a_pair_whose_sides_see_different_media_is_refused(processors):
    (c0, _), (c1, _) = encoded_pairs(processors["qwen2_5_vl"], "img", 2)
    mismatched = (c0, c1) if not torch.equal(c0.image_grid_thw, c1.image_grid_thw) else None
    if mismatched is None:  # same-size demo images: make the grids differ
        import dataclasses

        mismatched = (c0, dataclasses.replace(c1, image_grid_thw=c1.image_grid_thw * torch.tensor([[1, 2, 1]])))
    with pytest.raises(ValueError, match="pair 0: image_grid_thw differs"):
        preference_batch([mismatched], 0, _rule("qwen2_5_vl"))


def test_completion_labels_are_the_replies_only(processors):
    ((chosen, rejected),) = encoded_pairs(processors["qwen2_vl"], "img", 1)
    ((sample, other),) = demo_pairs("img", 1)
    batch = preference_batch([(chosen, rejected)], 0, _rule("qwen2_vl"))
    tokenizer = processors["qwen2_vl"].tokenizer
    for row, source in enumerate((sample, other)):
        trained = tokenizer.decode(batch["labels"][row][batch["labels"][row] != IGNORE_INDEX])
        assert trained.startswith(source.messages[-1]["content"][0]["text"]), trained


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kind", ["img", "vid"])
@pytest.mark.parametrize("packed", [False, True])
def test_kto_batches_are_the_sft_layout_of_each_completion_and_its_kl_sequence(processors, family, kind, packed):
    """KTO: the completions and their mismatched KL sequences (prompt i, completion i - 1: TRL's rotation) are each
    the SFT layout of that conversation, and both batches carry each prompt's media once, the same items."""
    processor = processors[family]
    enc = encoder(processor)
    items = demo_completions(kind, 2)[:3]  # 3 completions: prompts 0, 0, 1
    rule, pad = _rule(family), processor.tokenizer.pad_token_id
    lengths = [len(enc.encode(i.conversation()).input_ids) for i in items]
    budget = 2 * max(lengths) if packed else None
    batch = UnpairedCollator(enc, items, rule, budget, packed, True, with_completion)([0, 1, 2])
    expected = {
        "completions": [enc.encode(item.conversation()) for item in items],
        "kl": [enc.encode(with_completion(items[i], items[i - 1].completion)) for i in range(3)],
    }
    assert batch["label"].tolist() == [item.desirable for item in items]
    for name, part in (("completions", batch), ("kl", batch["kl_batch"])):
        sequences = expected[name]
        seq_lengths = [len(s.input_ids) for s in sequences]
        layout = pack_sequences(seq_lengths, budget) if packed else [[i] for i in range(3)]
        assert (len(layout) < 3) == packed, name
        sft = training_batch([[sequences[i] for i in row] for row in layout], pad, rule, boundaries=packed)
        for key in ("input_ids", "labels", "position_ids", "mm_token_type_ids", "cu_seq_lens_q"):
            if key in sft:
                assert torch.equal(part[key], sft[key]), (name, key)
        media = "pixel_values" if kind == "img" else "pixel_values_videos"
        # each prompt's media once (completions 0 and 1 share prompt 0), in order; the KL batch holds the same items
        prompts = [expected["completions"][0], expected["completions"][2]]
        assert torch.equal(part[media], torch.cat([getattr(s, media) for s in prompts])), name
        index = part["image_index" if kind == "img" else "video_index"].tolist()
        assert index == [[0, 0, 1][i] for row in layout for i in row], name
        assert part["num_sequences"] == 3
    trained = processor.tokenizer.decode(batch["kl_batch"]["labels"][0][batch["kl_batch"]["labels"][0] != IGNORE_INDEX])
    assert trained.startswith(items[2].completion)  # prompt 0 with the batch's last completion


def test_a_kto_batch_of_one_completion_is_its_own_kl_sequence(processors):
    processor = processors["qwen2_vl"]
    enc = encoder(processor)
    items = demo_completions("img", 1)
    batch = UnpairedCollator(enc, items, _rule("qwen2_vl"), None, False, True, with_completion)([1])
    assert torch.equal(batch["kl_batch"]["input_ids"], batch["input_ids"])
    assert batch["label"].tolist() == [False]
