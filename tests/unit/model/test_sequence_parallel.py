"""Sequence parallelism's pieces that need no second process: the start-up refusals, the row padding and label
shift, the slice of the language model's inputs (DeepStack included) and the loader's repeated rows. The 2-rank
equality with one process is tests/integration/test_sequence_parallel.py."""

from types import SimpleNamespace

import pytest
import torch

from finetune.base.errors import ConfigError
from finetune.data.encode import IGNORE_INDEX
from finetune.data.packing import RowBatchSampler
from finetune.model.attention import boundaries_from_positions
from finetune.model.sequence_parallel import (
    LanguageModelSlice,
    SequenceParallel,
    SequenceParallelSampler,
    check,
    pad_row,
    shifted_labels,
)
from finetune.recipe.load import load_config


def _text(heads=28, kv_heads=4, layer_types=None):
    return SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads, layer_types=layer_types)


def test_a_valid_split_passes_and_one_is_off():
    check(2, "qwen2_5_vl", _text(), 8, varlen=True)
    check(4, "qwen2_5_vl", _text(layer_types=["full_attention"] * 2), 8, varlen=True)
    check(1, "qwen3_5", _text(3, 3, ["linear_attention"]), 3, varlen=False)  # 1: off, nothing checked


@pytest.mark.parametrize(
    "n, text, world, varlen, says",
    [
        (8, _text(28, 4), 8, True, "must divide the LLM's 28 attention heads and 4 key/value heads"),
        (3, _text(12, 4), 6, True, "use one of [1, 2, 4]"),
        (2, _text(28, 4), 3, True, "must divide the number of processes (3)"),
        (2, _text(4, 2, ["linear_attention", "full_attention"]), 2, True, "linear-attention layers"),
        (2, _text(28, 4), 2, False, "needs our varlen attention"),
    ],
)
def test_start_up_refusals_name_the_fix(n, text, world, varlen, says):
    with pytest.raises(ConfigError) as err:
        check(n, "qwen2_5_vl", text, world, varlen)
    assert says in str(err.value) and "\n" not in str(err.value)
    assert "set " in str(err.value) or "use " in str(err.value) or "launch " in str(err.value)


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["trainer.sequence_parallel=0"], "trainer.sequence_parallel must be >= 1"),
        (["trainer.sequence_parallel=2", "model.attn_implementation=sdpa"], "model.attn_implementation=varlen"),
        (["trainer.sequence_parallel=2", "model.attn_implementation=eager"], "attend across each other"),
        (["trainer.sequence_parallel=2", "data.streaming=true", "trainer.max_steps=2"], "data.streaming=false"),
        (
            ["trainer.sequence_parallel=2", "experiment=demo_qwen3_vl_moe", "parts.router=full"],
            "load-balancing loss",
        ),
        (["trainer.sequence_parallel=2", "method=dpo"], "method=sft only"),
    ],
)
def test_recipe_refusals(overrides, says):
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    assert says in str(err.value)


def test_the_default_recipe_is_off_and_a_split_recipe_loads():
    assert load_config([]).trainer.sequence_parallel == 1
    assert load_config(["trainer.sequence_parallel=2"]).trainer.sequence_parallel == 2


def _row(lengths, boundaries=True):
    """A one-row batch of samples of `lengths` (text positions restart per sample), labels = token ids."""
    total = sum(lengths)
    position = torch.cat([torch.arange(n) for n in lengths])
    batch = {
        "input_ids": torch.arange(1, total + 1)[None],
        "labels": torch.arange(1, total + 1)[None],
        "mm_token_type_ids": torch.zeros(1, total, dtype=torch.long),
        "position_ids": torch.stack([position, position + 1, position + 2, position + 3])[:, None],
    }
    if boundaries:
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
    return batch


def test_padding_is_a_block_of_its_own_without_labels():
    batch = _row([5, 4])  # 9 tokens, N = 4 -> 12
    padded = pad_row(batch, 4)
    assert padded["input_ids"].shape == (1, 12) and padded["position_ids"].shape == (4, 1, 12)
    assert torch.equal(padded["input_ids"][:, :9], batch["input_ids"])
    assert (padded["labels"][:, 9:] == IGNORE_INDEX).all() and torch.equal(padded["labels"][:, :9], batch["labels"])
    assert torch.equal(padded["position_ids"][:, 0, 9:], torch.arange(3).expand(4, 3))
    assert padded["cu_seq_lens_q"].tolist() == [0, 5, 9, 12] and padded["max_length_q"] == 5
    assert pad_row(_row([4, 4]), 4)["input_ids"].shape == (1, 8)  # a multiple already: unchanged
    cu, _ = boundaries_from_positions(padded["position_ids"][0], 1, 12, "cpu")
    assert cu.tolist() == padded["cu_seq_lens_k"].tolist()


def test_labels_shift_on_the_whole_row():
    labels = torch.tensor([[IGNORE_INDEX, 7, 8, IGNORE_INDEX, 9, 10]])
    assert shifted_labels(labels).tolist() == [[7, 8, IGNORE_INDEX, 9, 10, IGNORE_INDEX]]


def test_the_language_model_gets_each_ranks_slice_deepstack_included():
    length, hidden = 8, 3
    embeds = torch.randn(1, length, hidden)
    positions = torch.arange(4 * length).reshape(4, 1, length)
    mask = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 0]], dtype=torch.bool)
    deepstack = [torch.randn(int(mask.sum()), hidden) for _ in range(2)]
    kwargs = dict(
        inputs_embeds=embeds, position_ids=positions, visual_pos_masks=mask, deepstack_visual_embeds=deepstack
    )
    parts = []
    for rank in range(2):
        hook = LanguageModelSlice.__new__(LanguageModelSlice)
        hook.sp = SequenceParallel(None, 2, rank)
        parts.append(hook._before(None, (), dict(kwargs))[1])
    assert torch.equal(torch.cat([p["inputs_embeds"] for p in parts], 1), embeds)
    assert torch.equal(torch.cat([p["position_ids"] for p in parts], -1), positions)
    assert torch.equal(torch.cat([p["visual_pos_masks"] for p in parts], 1), mask)
    assert [len(p["deepstack_visual_embeds"][0]) for p in parts] == [2, 3]  # visual tokens in each half
    for layer in range(2):
        assert torch.equal(torch.cat([p["deepstack_visual_embeds"][layer] for p in parts]), deepstack[layer])


def test_the_ranks_of_a_group_get_the_same_rows():
    rows = [(i,) for i in range(10)]
    world, n = 4, 2
    sampler = SequenceParallelSampler(RowBatchSampler(rows, 1, 0, world // n), n)
    batches = list(sampler)
    assert len(batches) == len(sampler) and len(sampler) % world == 0
    by_rank = {r: batches[r::world] for r in range(world)}  # accelerate hands batch k to rank k % world
    assert by_rank[0] == by_rank[1] and by_rank[2] == by_rank[3]
    assert by_rank[0] != by_rank[2]
    seen = sorted(row for batch in by_rank[0] + by_rank[2] for row in batch)
    assert set(seen) == set(rows)  # the data-parallel ranks still cover the data


def test_frames_are_shared_out_in_order_and_about_evenly():
    from finetune.model.sequence_parallel import _share, frame_units

    inputs = {
        "pixel_values": torch.zeros(16 + 64, 1),
        "image_grid_thw": torch.tensor([[1, 4, 4], [1, 8, 8]]),
        "pixel_values_videos": torch.zeros(3 * 16, 1),
        "video_grid_thw": torch.tensor([[3, 4, 4]]),
    }
    units = frame_units(None, inputs)
    assert [(kind, item, row) for kind, item, row, _ in units] == [
        ("image", 0, 0),
        ("image", 1, 16),
        ("video", 0, 0),
        ("video", 0, 16),
        ("video", 0, 32),
    ]
    assert all(grid == (1, 4, 4) for kind, *_, grid in units if kind == "video")  # a video: one unit per frame pair
    for size in (1, 2, 3, 8):
        shares = _share(units, size)
        assert len(shares) == size and sum(shares, []) == list(range(len(units)))  # contiguous, in order, all once
    patches = [sum(units[i][3][1] * units[i][3][2] for i in share) for share in _share(units, 2)]
    assert patches == [80, 48]  # the 8 x 8 image outweighs the frames: split where the halves are closest
