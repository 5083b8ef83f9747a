"""M-RoPE positions (finetune/model/rope.py) against independent references (tests/helpers/qwen_reference.py).

- Qwen2-VL / Qwen2.5-VL: rope_rule=qwen equals `get_rope_index` of transformers 4.49.0 (Qwen's own contribution;
  run from its wheel) on 1,000+ random sequences per family, with long videos and fractional seconds per grid,
  sample by sample and in left-padded batches; and golden cases worked out by hand.
- Qwen3-VL / Qwen3-VL-MoE and Qwen3.5 / Qwen3.5-MoE (videos as timestamped frame pairs; Qwen3.5 has Qwen3-VL's
  positions): rope_rule=qwen equals Qwen's own code (Qwen3-VL's `get_rope_index` of transformers 4.57.0, the release
  in which Qwen added Qwen3-VL; the algorithm of Qwen's fine-tuning rope2d.py, cross-checked by
  tests/helpers/rope2d_crosscheck.py) sample by sample and in left-padded batches, and vLLM's
  (`_get_mrope_input_positions` of vLLM 0.33.0's qwen3_vl.py, which its Qwen3.5 classes inherit), on 1,000+ random
  sequences per
  family rendered as transformers 5.23 renders them (timestamp text, per-frame markers, the template's outer pair; a
  quarter without the outer pair, as transformers < 5.10 wrote them: the positions follow the tokens either way);
  and golden cases worked out by hand (an image, a 4-frame video with timestamps, the text after it).
- rope_rule=transformers equals the installed transformers' `get_rope_index` on the same sequences. The two rules
  differ wherever a Qwen2 video lasts longer than it is wide; on Qwen3-VL (every block one temporal index) they
  agree. The model's own `generate` follows the installed rule.
"""

import random

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from finetune.base.families import FAMILIES
from finetune.model.rope import PositionRule, batch_position_ids, install_position_rule
from tests.helpers.qwen_reference import (
    MODULES,
    reference_get_rope_index,
    reference_self,
    reference_vllm_mrope_positions,
    vllm_config,
    vllm_feature,
)
from tests.helpers.random_positions import left_padded, random_sequence

SEQUENCES = 1000
ONE_BLOCK = [f for f in FAMILIES if FAMILIES[f].video_layout == "one_block"]
FRAMES = [f for f in FAMILIES if FAMILIES[f].video_layout == "timestamped_frames"]


def test_every_family_has_a_reference():
    """Every family: Qwen's own transformers release (4.49 one-block, 4.57 timestamped frames); the latter also vLLM.
    Qwen3.5 (no Qwen release of its own before transformers 5) takes Qwen3-VL's method of 4.57, whose positions it has."""
    assert set(MODULES) == set(FAMILIES) and set(ONE_BLOCK) | set(FRAMES) == set(FAMILIES)
    assert {MODULES[f][0] for f in ONE_BLOCK} == {"4.49.0"} and {MODULES[f][0] for f in FRAMES} == {"4.57.0"}
    qwen3_5 = [f for f in FAMILIES if f.startswith("qwen3_5")]
    assert qwen3_5 and all(MODULES[f] == MODULES["qwen3_vl"] for f in qwen3_5)


@pytest.fixture(scope="module")
def configs(tiny_paths):
    return {f: AutoConfig.from_pretrained(p) for f, p in tiny_paths.items()}


@pytest.fixture(scope="module")
def sequences(configs):
    out = {}
    seeds = {"qwen2_vl": 11, "qwen2_5_vl": 12}
    for i, family in enumerate(FAMILIES):
        rng = random.Random(seeds.get(family, 100 + i))
        with_seconds = FAMILIES[family].video_seconds_scale is not None
        frames = family in FRAMES
        out[family] = [random_sequence(rng, configs[family], with_seconds, frames) for _ in range(SEQUENCES)]
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


@pytest.mark.parametrize("family", ONE_BLOCK)
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
    if family in FRAMES:
        assert differ == 0, differ  # every block has one temporal index: the rules agree (docs/fidelity.md, Qwen3-VL)
    else:
        assert differ > SEQUENCES // 8, differ  # most batches hold a video longer than it is wide


# ---------------------------------------------------------------- Qwen3-VL: Qwen's transformers 4.57 and vLLM
@pytest.mark.parametrize("family", FRAMES)
def test_qwen_rule_equals_qwens_transformers_4_57_get_rope_index(configs, sequences, family):
    config, rule = configs[family], PositionRule.for_model(configs[family], "qwen")
    assert rule.frame_blocks
    checked = split = 0
    for s in sequences[family]:  # one sample alone, as packing computes it
        expected, _ = _reference(family, config, left_padded([s], pad_id=0))
        assert torch.equal(rule.sample(s["types"], s["images"], s["videos"], s["seconds"]), expected[:, 0])
        checked += 1
        split += any(t > 1 for t, _, _ in s["videos"])
    assert checked == SEQUENCES and split > SEQUENCES // 3, split
    for start in range(0, SEQUENCES, 4):  # left-padded batches with an attention mask, as generation sees them
        batch = left_padded(sequences[family][start : start + 4], pad_id=0)
        expected, expected_deltas = _reference(family, config, batch)
        got, deltas = _ours(rule, batch)
        real = batch["attention_mask"].bool()
        assert torch.equal(got[:, real], expected[:, real])
        padding = (~real).sum(1, keepdim=True)  # 4.57's deltas count from the padded length, as 4.49's
        assert torch.equal(deltas - padding, expected_deltas)


@pytest.mark.parametrize("family", FRAMES)
def test_qwen_rule_equals_vllms_qwen3_vl_positions(configs, sequences, family):
    config, rule = configs[family], PositionRule.for_model(configs[family], "qwen")
    positions, cfg = reference_vllm_mrope_positions(), vllm_config(config)
    for s in sequences[family]:
        features = [vllm_feature(modality, offset, grid) for modality, offset, grid in s["features"]]
        expected, delta = positions(s["ids"], features, cfg)
        ours = rule.sample(s["types"], s["images"], s["videos"], s["seconds"])
        assert torch.equal(ours, expected.long())
        assert delta == int(ours.max()) + 1 - ours.shape[1]


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


def _qwen3_golden(config, pieces):
    """A sequence from (kind, count) pieces: "text", "start", "end", "image" / "video" (count = tokens)."""
    token = {
        "text": 5,
        "start": config.vision_start_token_id,
        "end": config.vision_end_token_id,
        "image": config.image_token_id,
        "video": config.video_token_id,
    }
    ids = [token[kind] for kind, n in pieces for _ in range(n)]
    types = [{"image": 1, "video": 2}.get(kind, 0) for kind, n in pieces for _ in range(n)]
    return ids, types


def _all_agree(config, ids, types, images, videos, features):
    """Ours (qwen and transformers rules), Qwen's transformers 4.57 and vLLM on one sequence: the (3, L) ids."""
    rule = PositionRule.for_model(config, "qwen")
    ours = rule.sample(types, images, videos)
    assert torch.equal(PositionRule.for_model(config, "transformers").sample(types, images, videos), ours)
    batch = {
        "input_ids": torch.tensor([ids]),
        "image_grid_thw": torch.tensor(images) if images else None,
        "video_grid_thw": torch.tensor(videos) if videos else None,
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
    }
    assert torch.equal(_reference(config.model_type, config, batch)[0][:, 0], ours)
    feats = [vllm_feature(m, offset, grid) for m, offset, grid in features]
    assert torch.equal(reference_vllm_mrope_positions()(ids, feats, vllm_config(config))[0].long(), ours)
    return ours.tolist()


def test_golden_qwen3_an_image(configs):
    # 3 text tokens, <|vision_start|>, an image of grid (1, 4, 6) = 2 x 3 tokens, <|vision_end|>, 2 text tokens.
    config = configs[FRAMES[0]]
    ids, types = _qwen3_golden(config, [("text", 3), ("start", 1), ("image", 6), ("end", 1), ("text", 2)])
    t, h, w = _all_agree(config, ids, types, [(1, 4, 6)], [], [("image", 4, (1, 4, 6))])
    assert t == [0, 1, 2, 3] + [4] * 6 + [7, 8, 9]
    assert h == [0, 1, 2, 3] + [4, 4, 4, 5, 5, 5] + [7, 8, 9]
    assert w == [0, 1, 2, 3] + [4, 5, 6, 4, 5, 6] + [7, 8, 9]


def test_golden_qwen3_a_four_frame_video_with_timestamps_and_the_text_after_it(configs):
    # "a b" <|vision_start|> <0.2 seconds> <|vision_start|> 2x2 <|vision_end|> <1.2 seconds> <|vision_start|> 2x2
    # <|vision_end|> <|vision_end|> "x y z": 4 frames = 2 frame pairs of grid (1, 4, 4), video_grid_thw (2, 4, 4);
    # the timestamps as 3 and 2 text tokens. Each pair's block starts where its text ends, at one temporal id.
    config = configs[FRAMES[0]]
    pieces = [("text", 2), ("start", 1), ("text", 3), ("start", 1), ("video", 4), ("end", 1)]
    pieces += [("text", 2), ("start", 1), ("video", 4), ("end", 1), ("end", 1), ("text", 3)]
    ids, types = _qwen3_golden(config, pieces)
    t, h, w = _all_agree(config, ids, types, [], [(2, 4, 4)], [("video", 3, (2, 4, 4))])
    text = [0, 1, 2, 3, 4, 5, 6]  # a b <vs> <0.2 seconds> <vs>
    assert t == text + [7] * 4 + [9, 10, 11, 12] + [13] * 4 + [15, 16, 17, 18, 19]
    assert h == text + [7, 7, 8, 8] + [9, 10, 11, 12] + [13, 13, 14, 14] + [15, 16, 17, 18, 19]
    assert w == text + [7, 8, 7, 8] + [9, 10, 11, 12] + [13, 14, 13, 14] + [15, 16, 17, 18, 19]
    # Qwen2.5-VL's one block of grid (2, 4, 4) at 1 s per patch, 2 tokens/s would place the second pair 2 ids later
    # in time than the first; here time is the timestamp text and the second pair starts after the first's markers.


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
