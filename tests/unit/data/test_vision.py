"""Sizing and sampling arithmetic equals qwen-vl-utils 0.0.14 itself, on many random cases."""

import math
import random

import pytest
import qwen_vl_utils.vision_process as ref
import torch

from finetune.data.vision import FACTOR, VideoSpec, VisionSettings, smart_resize

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
