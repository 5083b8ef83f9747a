"""Sizing and sampling arithmetic equals qwen-vl-utils 0.0.14 itself, on many random cases."""

import math
import random

import pytest
import qwen_vl_utils.vision_process as ref
import torch

from finetune.data.vision import FACTOR, VideoPlan, VideoSpec, VisionSettings, smart_resize

N_CASES = 12_000


def test_smart_resize_matches_qwen_vl_utils():
    rng = random.Random(0)
    checked = 0
    for _ in range(N_CASES):
        h = rng.choice([rng.randint(1, 40), rng.randint(1, 1200), rng.randint(1, 8000)])
        w = rng.choice([rng.randint(1, 40), rng.randint(1, 1200), rng.randint(1, 8000)])
        lo = rng.choice([4, 16, 64, 128, 256]) * FACTOR * FACTOR
        hi = lo * rng.choice([1, 2, 5, 20, 100, 400]) + rng.choice([0, 1, 777])
        checked += 1
        try:
            expected = ref.smart_resize(h, w, factor=FACTOR, min_pixels=lo, max_pixels=hi)
        except ValueError:
            with pytest.raises(ValueError):
                smart_resize(h, w, lo, hi)
            continue
        if min(expected) <= 0:  # qwen-vl-utils returns an empty size here; we refuse it
            with pytest.raises(ValueError):
                smart_resize(h, w, lo, hi)
            continue
        assert smart_resize(h, w, lo, hi) == expected, (h, w, lo, hi)
    assert checked == N_CASES


def _reference_plan(ele, total, fps):
    start, end, in_range = ref.calculate_video_frame_range(ele, total, fps)
    n = ref.smart_nframes(ele, total_frames=in_range, video_fps=fps)
    return torch.linspace(start, end, n).round().long().tolist(), in_range


def test_frame_sampling_matches_qwen_vl_utils():
    rng = random.Random(1)
    settings = VisionSettings(3136, 3136, 2.0, 4, 768, 128 * 784, 768 * 784, 128000 * 784 * 0.9)
    compared = 0
    for _ in range(N_CASES):
        total = rng.choice([rng.randint(1, 30), rng.randint(1, 400), rng.randint(1, 20000)])
        fps = rng.choice([1, 2.5, 4, 8, 12, 23.976, 24, 25, 29.97, 30, 50, 60, 120])
        ele = {}
        if rng.random() < 0.2:
            ele["nframes"] = rng.randint(1, 80)
        else:
            ele["fps"] = rng.choice([0.25, 0.5, 1, 2, 3, 4, 8])
            if rng.random() < 0.5:
                ele["min_frames"] = rng.randint(1, 16)
            if rng.random() < 0.5:
                ele["max_frames"] = rng.randint(2, 1000)
        duration = total / fps
        if rng.random() < 0.3:
            ele["video_start"] = round(rng.uniform(-1, duration), 2)
        if rng.random() < 0.3:
            ele["video_end"] = round(rng.uniform(0, duration + 1), 2)
        spec = settings.video_spec(ele)
        try:
            indices, in_range = _reference_plan(ele, total, fps)
        except (ValueError, ZeroDivisionError):
            with pytest.raises(ValueError):
                spec.plan(total, fps, 56, 56)
            continue
        plan = spec.plan(total, fps, 56, 56)
        assert (plan.indices, plan.frames_in_range) == (indices, in_range), (total, fps, ele)
        assert plan.sampled_fps == pytest.approx(len(indices) / in_range * fps)
        compared += 1
    assert compared > N_CASES * 0.5


def test_video_frame_size_follows_the_total_pixel_budget():
    """fetch_video's per-frame cap: min(VIDEO_MAX, total / n * 2), floored at 1.05 * min; max_pixels lowers it."""
    rng = random.Random(2)
    for _ in range(N_CASES):
        n = rng.choice([2, 4, 8, 16, 64, 256, 768])
        h, w = rng.randint(28, 2160), rng.randint(28, 3840)
        if max(h, w) / min(h, w) > 200:
            continue
        ele = {
            "min_pixels": rng.choice([32, 64, 128]) * 784,
            "total_pixels": rng.choice([2048, 24576, 128000 * 0.9]) * 784,
        }
        if rng.random() < 0.3:
            ele["max_pixels"] = rng.choice([64, 256, 768]) * 784
        frame_max = max(
            min(ref.VIDEO_MAX_TOKEN_NUM * 784, ele["total_pixels"] / n * ref.FRAME_FACTOR),
            int(ele["min_pixels"] * 1.05),
        )
        frame_max = min(ele.get("max_pixels", frame_max), frame_max)
        settings = VisionSettings(3136, 3136, 2.0, 4, 768, 128 * 784, 768 * 784, 128000 * 784 * 0.9)
        if ele.get("max_pixels", math.inf) < ele["min_pixels"]:  # qwen-vl-utils asserts; we name both values
            with pytest.raises(ValueError, match=rf"min_pixels={ele['min_pixels']} .* larger than max_pixels="):
                settings.video_spec({**ele, "nframes": n})
            continue
        spec = settings.video_spec({**ele, "nframes": n})
        try:
            expected = ref.smart_resize(h, w, factor=FACTOR, min_pixels=ele["min_pixels"], max_pixels=frame_max)
        except AssertionError:  # qwen-vl-utils asserts max >= min; we raise a ValueError that names both
            with pytest.raises(ValueError, match="below min_pixels"):
                smart_resize(h, w, spec.min_pixels, spec.frame_max_pixels(n))
            continue
        if min(expected) <= 0:  # an empty frame size from qwen-vl-utils; we refuse it
            with pytest.raises(ValueError, match="cannot fit"):
                smart_resize(h, w, spec.min_pixels, spec.frame_max_pixels(n))
            continue
        assert smart_resize(h, w, spec.min_pixels, spec.frame_max_pixels(n)) == expected


def test_per_item_options_override_the_recipe():
    settings = VisionSettings(3136, 3136 * 4, 2.0, 4, 768, 100352, 602112, 90316800.0, frames_fps=None)
    assert settings.image_spec({}).max_pixels == 3136 * 4
    assert settings.image_spec({"max_pixels": 3136}).max_pixels == 3136
    spec = settings.video_spec({"nframes": 8, "video_start": 1.5, "frames_fps": 30})
    assert (spec.fps, spec.nframes, spec.video_start, spec.frames_fps) == (None, 8, 1.5, 30.0)
    with pytest.raises(ValueError, match="either fps or nframes"):
        settings.video_spec({"fps": 1, "nframes": 8})
    assert isinstance(spec, VideoSpec) and math.isclose(spec.total_pixels, 90316800.0)


def test_patch_16_sizes_equal_qwen_vl_utils_image_patch_size_16():
    """Qwen3-VL: the factor is patch 16 x merge 2 = 32 (qwen-vl-utils' `image_patch_size=16`), for images and for
    video frames, whose per-frame cap is then 768 tokens of 32 x 32 pixels."""
    rng = random.Random(3)
    settings = VisionSettings(4096, 4096 * 64, 2.0, 4, 768, 128 * 1024, 768 * 1024, 128000 * 1024 * 0.9)
    compared = 0
    for _ in range(N_CASES // 4):
        h, w = rng.randint(1, 3000), rng.randint(1, 3000)
        if max(h, w) / min(h, w) > 200:
            continue
        image = settings.image_spec({}, patch=16, merge=2)
        assert image.target(h, w) == ref.smart_resize(h, w, factor=32, min_pixels=4096, max_pixels=4096 * 64)
        n = rng.choice([2, 4, 16, 128, 768])
        spec = settings.video_spec({"nframes": n, "total_pixels": rng.choice([2048, 24576]) * 1024}, patch=16, merge=2)
        frame_max = max(min(768 * 1024, spec.total_pixels / n * ref.FRAME_FACTOR), int(128 * 1024 * 1.05))
        expected = ref.smart_resize(h, w, factor=32, min_pixels=128 * 1024, max_pixels=frame_max)
        plan = spec.plan(n, 2.0, h, w)
        assert (plan.height, plan.width) == expected
        assert plan.grid == (n // 2, expected[0] // 16, expected[1] // 16)
        assert plan.tokens == n // 2 * (expected[0] // 32) * (expected[1] // 32) == n // 2 * plan.frame_tokens
        compared += 1
    assert compared > N_CASES // 8


def test_frame_pair_timestamps_equal_qwen3vl_processor():
    """Each frame pair's time is the mean of its two frames' (index / source fps), as Qwen3VLProcessor computes it from
    the sampled indices and the video's fps (its `_calculate_timestamps`)."""
    from transformers import Qwen3VLProcessor

    rng = random.Random(4)
    settings = VisionSettings(3136, 3136, 2.0, 4, 768, 3136, 3136, 3136 * 400)
    for _ in range(2000):
        total, fps = rng.randint(2, 5000), rng.choice([1, 2.5, 10, 23.976, 24, 25, 29.97, 30000 / 1001, 60])
        ele = {"nframes": rng.randint(1, 40)} if rng.random() < 0.3 else {"fps": rng.choice([0.5, 1, 2, 4])}
        if rng.random() < 0.3:
            ele["video_start"] = rng.uniform(0, total / fps / 2)
        try:
            plan = settings.video_spec(ele, patch=16).plan(total, fps, 64, 64)
        except ValueError:
            continue
        expected = Qwen3VLProcessor._calculate_timestamps(None, list(plan.indices), fps, 2)
        assert plan.timestamps == expected
        assert [f"<{t:.1f} seconds>" for t in plan.timestamps] == [f"<{t:.1f} seconds>" for t in expected]
    odd = VideoPlan([0, 10, 20], 30, 10.0, 64, 64, 16, 2)  # an odd count: the last frame fills the pair
    assert odd.timestamps == Qwen3VLProcessor._calculate_timestamps(None, [0, 10, 20], 10.0, 2) == [0.5, 2.0]
