"""M-RoPE positions (finetune/model/rope.py) against independent references.

- rope_rule=qwen equals `get_rope_index` of transformers 4.49.0 (Qwen's own contribution; run from its wheel,
  tests/qwen_reference.py) on 1,000+ random sequences per family, with long videos and fractional seconds
  per grid, sample by sample and in left-padded batches; and golden cases worked out by hand.
- rope_rule=transformers equals the installed transformers' `get_rope_index` on the same sequences.
- The two rules differ wherever a video lasts longer than it is wide, and the model's own `generate` follows
  the installed rule.
"""

import random

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from finetune.base.families import FAMILIES
from finetune.model.rope import PositionRule, batch_position_ids, install_position_rule
from tests.helpers.qwen_reference import MODULES, reference_get_rope_index, reference_self

SEQUENCES = 1000
SECONDS = [0.25, 0.5, 2 / 3, 1.5, 4.0, 1.0, 0.1, 1 / 3]


def random_sequence(rng: random.Random, config, with_seconds: bool) -> dict:
    """Text runs and image/video blocks, each block after <|vision_start|> as the chat template renders them.
    Videos are often long next to their frame size (t x interval >> h/2)."""
    special = {config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id}
    words = [t for t in range(3, 600) if t not in special]
    ids, types, images, videos, seconds = [], [], [], [], []

    def text(n):
        ids.extend(rng.choice(words) for _ in range(n))
        types.extend([0] * n)

    text(rng.randint(0, 12))
    for _ in range(rng.choice([0, 1, 1, 2, 2, 3, 4])):
        ids.append(config.vision_start_token_id)
        types.append(0)
        if rng.random() < 0.4:
            grid, kind = (1, 2 * rng.randint(1, 16), 2 * rng.randint(1, 16)), 1
            images.append(grid)
        else:
            t = rng.choice([1, 2, rng.randint(2, 12), rng.randint(12, 64)])
            grid, kind = (t, 2 * rng.randint(1, 10), 2 * rng.randint(1, 10)), 2
            videos.append(grid)
            seconds.append(rng.choice(SECONDS) if rng.random() < 0.8 else rng.uniform(0.05, 6.0))
        n = grid[0] * (grid[1] // 2) * (grid[2] // 2)
        ids.extend([config.image_token_id if kind == 1 else config.video_token_id] * n)
        types.extend([kind] * n)
        ids.append(config.vision_end_token_id)
        types.append(0)
        text(rng.randint(0, 9))
    text(rng.randint(1, 6))  # a prompt ends in text
    return {
        "ids": ids,
        "types": types,
        "images": images,
        "videos": videos,
        "seconds": seconds if with_seconds else None,
    }


def left_padded(batch: list[dict], pad_id: int) -> dict:
    longest = max(len(s["ids"]) for s in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    types = torch.zeros((len(batch), longest), dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for r, s in enumerate(batch):
        n = len(s["ids"])
        ids[r, longest - n :], types[r, longest - n :], mask[r, longest - n :] = (
            torch.tensor(s["ids"]),
            torch.tensor(s["types"]),
            1,
        )
    images = [g for s in batch for g in s["images"]]
    videos = [g for s in batch for g in s["videos"]]
    out = {
        "input_ids": ids,
        "mm_token_type_ids": types,
        "attention_mask": mask,
        "image_grid_thw": torch.tensor(images) if images else None,
        "video_grid_thw": torch.tensor(videos) if videos else None,
        "second_per_grid_ts": None,
    }
    if batch[0]["seconds"] is not None and videos:
        out["second_per_grid_ts"] = torch.tensor([x for s in batch for x in s["seconds"]], dtype=torch.float32)
    return out


def test_every_family_has_a_reference():
    assert MODULES.keys() == FAMILIES.keys()


@pytest.fixture(scope="module")
def configs(tiny_paths):
    return {f: AutoConfig.from_pretrained(p) for f, p in tiny_paths.items()}


@pytest.fixture(scope="module")
def sequences(configs):
    out = {}
    for family in FAMILIES:
        rng = random.Random(11 if family == "qwen2_vl" else 12)
        with_seconds = FAMILIES[family].video_seconds_scale is not None
        out[family] = [random_sequence(rng, configs[family], with_seconds) for _ in range(SEQUENCES)]
    return out


def _reference(family, config, batch):
    kwargs = {k: batch[k] for k in ("image_grid_thw", "video_grid_thw", "attention_mask")}
    if FAMILIES[family].video_seconds_scale:
        kwargs["second_per_grid_ts"] = batch["second_per_grid_ts"]
    return reference_get_rope_index(family)(reference_self(config), batch["input_ids"], **kwargs)


def _ours(rule, batch):
    return batch_position_ids(
        rule,
        batch["mm_token_type_ids"],
        batch["image_grid_thw"],
        batch["video_grid_thw"],
        batch["second_per_grid_ts"],
        batch["attention_mask"],
    )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_qwen_rule_equals_qwens_transformers_4_49_get_rope_index(configs, sequences, family):
    config, rule = configs[family], PositionRule.for_model(configs[family], "qwen")
    checked, long_videos = 0, 0
    for s in sequences[family]:  # one sample alone, as packing computes it
        batch = left_padded([s], pad_id=0)
        expected, _ = _reference(family, config, batch)
        assert torch.equal(rule.sample(s["types"], s["images"], s["videos"], s["seconds"]), expected[:, 0])
        checked += 1
        seconds = s["seconds"] or [1.0] * len(s["videos"])
        tps = rule.tokens_per_second or 1
        long_videos += any((t - 1) * sec * tps > h // 2 for (t, h, _), sec in zip(s["videos"], seconds))
    assert checked == SEQUENCES and long_videos > SEQUENCES // 4, long_videos
    for start in range(0, SEQUENCES, 4):  # left-padded batches with an attention mask, as generation sees them
        batch = left_padded(sequences[family][start : start + 4], pad_id=0)
        expected, expected_deltas = _reference(family, config, batch)
        got, deltas = _ours(rule, batch)
        real = batch["attention_mask"].bool()
        assert torch.equal(got[:, real], expected[:, real])
        padding = (~real).sum(1, keepdim=True)  # 4.49's deltas count from the padded length, 5.23's from the real one
        assert torch.equal(deltas - padding, expected_deltas)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers_rule_equals_the_installed_get_rope_index_and_differs_from_qwens(
    tiny_paths, configs, sequences, family
):
    model = AutoModelForImageTextToText.from_pretrained(tiny_paths[family])
    installed = model.model.get_rope_index  # the class's method: nothing installed on this instance
    rules = {name: PositionRule.for_model(configs[family], name) for name in ("qwen", "transformers")}
    differ = 0
    for start in range(0, SEQUENCES, 4):
        batch = left_padded(sequences[family][start : start + 4], pad_id=0)
        if batch["image_grid_thw"] is None and batch["video_grid_thw"] is None:
            continue
        kwargs = {k: batch[k] for k in ("image_grid_thw", "video_grid_thw", "attention_mask")}
        if FAMILIES[family].video_seconds_scale:
            kwargs["second_per_grid_ts"] = batch["second_per_grid_ts"]
        expected, expected_deltas = installed(batch["input_ids"], batch["mm_token_type_ids"], **kwargs)
        got, deltas = _ours(rules["transformers"], batch)
        real = batch["attention_mask"].bool()
        assert torch.equal(got[:, real], expected[:, real]) and torch.equal(deltas, expected_deltas)
        differ += not torch.equal(_ours(rules["qwen"], batch)[0][:, real], expected[:, real])
    assert differ > SEQUENCES // 8, differ  # most batches hold a video longer than it is wide


# ---------------------------------------------------------------- golden cases, worked out by hand
def _one_video(before: int, grid, seconds, tokens_per_second, after: int = 3):
    t, h, w = grid
    types = [0] * before + [2] * (t * (h // 2) * (w // 2)) + [0] * after
    return types, [grid], [seconds] if seconds is not None else None, tokens_per_second


def _first_text_after_vision(rule_name, types, videos, seconds, tokens_per_second):
    rule = PositionRule(rule_name, 2, tokens_per_second)
    ids = rule.sample(types, [], videos, seconds)
    first = len(types) - 3
    assert ids[0, first] == ids[1, first] == ids[2, first]
    return int(ids[0, first]), ids


def test_golden_qwens_docstring_example():
    # Qwen's docstring (transformers 4.49, Qwen2.5-VL): 25 tokens/s, 2 frames per patch at 1 fps -> 50 apart.
    rule = PositionRule("qwen", 2, 25)
    ids = rule.sample([2] * 12 + [0] * 5, [], [(3, 4, 4)], [2.0])
    assert ids[0].tolist() == [0, 0, 0, 0, 50, 50, 50, 50, 100, 100, 100, 100, 101, 102, 103, 104, 105]
    assert ids[1].tolist() == [0, 0, 1, 1] * 3 + [101, 102, 103, 104, 105]
    assert ids[2].tolist() == [0, 1, 0, 1] * 3 + [101, 102, 103, 104, 105]


@pytest.mark.parametrize(
    "before, grid, seconds, tokens_per_second, qwen, transformers",
    [
        (15, (84, 24, 32), 2.0, 2, 348, 31),  # huggingface/transformers#45381: 15 + 83 * 2 * 2 + 1
        (16, (30, 26, 30), 1.0, 2, 75, 31),  # a 30 s clip at 2 fps, 364 x 420 px: 16 + 29 * 2 + 1
        (16, (30, 26, 30), 0.5, 2, 46, 31),  # the same frames 0.5 s apart: 16 + 29 + 1
        (16, (30, 26, 30), None, None, 46, 31),  # Qwen2-VL: temporal ids 0..29
        (4, (2, 28, 40), 1.0, 2, 4 + 20, 4 + 20),  # a short clip: the width decides under both rules
        (7, (1, 20, 30), 0.25, 2, 7 + 15, 7 + 15),  # a one-patch clip
    ],
)
def test_golden_first_text_position_after_a_video(before, grid, seconds, tokens_per_second, qwen, transformers):
    case = _one_video(before, grid, seconds, tokens_per_second)
    assert _first_text_after_vision("qwen", *case)[0] == qwen
    assert _first_text_after_vision("transformers", *case)[0] == transformers


def test_golden_fractional_seconds_are_floored_per_patch():
    # 2/3 s per grid at 2 tokens/s: 4/3 apart -> floor(0, 1.33, 2.67, 4.0, 5.33) = 0, 1, 2, 4, 5; text at 5 + 1.
    ids = PositionRule("qwen", 2, 2).sample([2] * 5 + [0], [], [(5, 2, 2)], [2 / 3])
    assert ids[0].tolist() == [0, 1, 2, 4, 5, 6]


def test_images_advance_by_their_size_under_both_rules():
    types = [0] * 3 + [1] * (1 * 10 * 15) + [0] * 2
    for name in ("qwen", "transformers"):
        ids = PositionRule(name, 2, 2).sample(types, [(1, 20, 30)], [])
        assert ids[:, -2].tolist() == [3 + 15] * 3 and ids[0, 3:-2].max() == 3  # one temporal index


def test_back_to_back_blocks_and_mismatches():
    rule = PositionRule("qwen", 2, None)
    ids = rule.sample([1] * 4 + [1] * 1 + [0], [(1, 4, 4), (1, 2, 2)], [])  # two images with nothing between
    assert ids[:, 4].tolist() == [2, 2, 2] and ids[:, 5].tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="no grid left"):
        rule.sample([1] * 5, [(1, 4, 4)], [])
    with pytest.raises(ValueError, match="needs 4 tokens"):
        rule.sample([1] * 3 + [0], [(1, 4, 4)], [])


# ---------------------------------------------------------------- the model computes its own positions with ours
@pytest.mark.parametrize("family", list(FAMILIES))
def test_installed_rule_replaces_the_models_get_rope_index(tiny_paths, configs, sequences, family):
    model = AutoModelForImageTextToText.from_pretrained(tiny_paths[family])
    rule = PositionRule.for_model(configs[family], "qwen")
    install_position_rule(model, rule)
    batch = left_padded([s for s in sequences[family] if s["videos"]][:4], pad_id=0)
    kwargs = {k: v for k, v in batch.items() if k not in ("input_ids", "mm_token_type_ids") and v is not None}
    got, deltas = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], **kwargs)
    expected, expected_deltas = _ours(rule, batch)
    assert torch.equal(got, expected) and torch.equal(deltas, expected_deltas)
    assert model.model.position_rule == rule
