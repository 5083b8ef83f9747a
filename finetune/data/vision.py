"""Qwen's vision sizing rules, as plain arithmetic on sizes and frame counts (qwen-vl-utils 0.0.14 semantics).

Both the decoding path and the metadata-only token pre-pass call these functions, which is what makes the
pre-pass exact: the same numbers decide the resize target and the token count.

- Images: `smart_resize` to multiples of the factor (patch x merge: 28 = 14 x 2 for Qwen2-VL and Qwen2.5-VL, 32 =
  16 x 2 for Qwen3-VL; qwen-vl-utils' `image_patch_size`) within [min_pixels, max_pixels]. The encoder takes the
  patch and merge sizes from the checkpoint's processor; PATCH and MERGE are the Qwen2 families' values.
- Videos: an optional [video_start, video_end] window, `fps` (or `nframes`) sampling in pairs of frames
  within [min_frames, max_frames], evenly spaced indices, and a per-frame pixel cap derived from a total
  pixel budget shared by all sampled frames (qwen-vl-utils' `fetch_video`).
Every option can be overridden per sample or per media item with the same key names as qwen-vl-utils.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PATCH, MERGE, FRAME_FACTOR = 14, 2, 2  # Qwen2-VL / Qwen2.5-VL; Qwen3-VL: patch 16 (all: merge 2, frame pairs)
FACTOR = PATCH * MERGE
MAX_RATIO = 200
IMAGE_KEYS = ("min_pixels", "max_pixels")
VIDEO_KEYS = (
    "fps",
    "nframes",
    "min_frames",
    "max_frames",
    "min_pixels",
    "max_pixels",
    "total_pixels",
    "video_start",
    "video_end",
    "frames_fps",
)


def _round_by(n: float, f: int) -> int:
    return round(n / f) * f


def _ceil_by(n: float, f: int) -> int:
    return math.ceil(n / f) * f


def _floor_by(n: float, f: int) -> int:
    return math.floor(n / f) * f


def smart_resize(
    height: int, width: int, min_pixels: float, max_pixels: float, factor: int = FACTOR
) -> tuple[int, int]:
    """(height, width) as multiples of `factor` with min_pixels <= h*w <= max_pixels, aspect ratio kept."""
    if min(height, width) <= 0:
        raise ValueError(f"image size {width}x{height} is empty")
    if max_pixels < min_pixels:
        raise ValueError(f"max_pixels {max_pixels:.0f} is below min_pixels {min_pixels:.0f}")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} exceeds {MAX_RATIO}")
    h_bar, w_bar = max(factor, _round_by(height, factor)), max(factor, _round_by(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar, w_bar = _floor_by(height / beta, factor), _floor_by(width / beta, factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = _ceil_by(height * beta, factor), _ceil_by(width * beta, factor)
    if min(h_bar, w_bar) <= 0:
        raise ValueError(f"{width}x{height} cannot fit max_pixels={max_pixels:.0f} at this aspect ratio")
    return h_bar, w_bar


def tokens_for(grid_t: int, height: int, width: int, patch: int = PATCH, merge: int = MERGE) -> int:
    """LLM tokens of one image or video of `grid_t` temporal patches at (height, width) resized pixels."""
    return grid_t * (height // patch) * (width // patch) // (merge * merge)


@dataclass(frozen=True)
class ImageSpec:
    min_pixels: int
    max_pixels: int
    patch: int = PATCH
    merge: int = MERGE

    def target(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.min_pixels, self.max_pixels, self.patch * self.merge)

    def tokens(self, height: int, width: int) -> int:
        return tokens_for(1, *self.target(height, width), self.patch, self.merge)


@dataclass(frozen=True)
class VideoPlan:
    indices: list[int]  # source frames to decode
    frames_in_range: int  # frames in the [video_start, video_end] window
    source_fps: float
    height: int  # resized frame size
    width: int
    patch: int = PATCH
    merge: int = MERGE

    @property
    def sampled_fps(self) -> float:
        return len(self.indices) / max(self.frames_in_range, 1e-6) * self.source_fps

    @property
    def second_per_grid(self) -> float:
        """Qwen2.5-VL's absolute time per temporal patch, from the real source fps."""
        return FRAME_FACTOR / self.sampled_fps

    @property
    def grid(self) -> tuple[int, int, int]:
        """The processor's `video_grid_thw` row: (temporal patches, patch rows, patch columns)."""
        return math.ceil(len(self.indices) / FRAME_FACTOR), self.height // self.patch, self.width // self.patch

    @property
    def tokens(self) -> int:
        return tokens_for(self.grid[0], self.height, self.width, self.patch, self.merge)

    @property
    def frame_tokens(self) -> int:
        """LLM tokens of one temporal patch (frame pair)."""
        return tokens_for(1, self.height, self.width, self.patch, self.merge)

    @property
    def timestamps(self) -> list[float]:
        """Seconds of each temporal patch: the mean of its frames' times (source index / source fps), the last
        frame repeated to fill a pair; exactly transformers' Qwen3VLProcessor._calculate_timestamps (Qwen3-VL
        writes them as `<{s:.1f} seconds>`)."""
        indices = list(self.indices)
        indices += indices[-1:] * (-len(indices) % FRAME_FACTOR)
        times = [index / self.source_fps for index in indices]
        return [(times[i] + times[i + FRAME_FACTOR - 1]) / 2 for i in range(0, len(times), FRAME_FACTOR)]


@dataclass(frozen=True)
class VideoSpec:
    fps: float | None
    nframes: int | None
    min_frames: int
    max_frames: int
    min_pixels: int
    max_pixels: int  # per-frame cap (VIDEO_MAX_PIXELS); the total budget may lower it
    total_pixels: float
    video_start: float | None = None
    video_end: float | None = None
    frames_fps: float | None = None  # frame rate of a folder / list of frame images
    max_pixels_override: int | None = None  # a per-item max_pixels only ever lowers the computed cap
    patch: int = PATCH
    merge: int = MERGE

    def frame_range(self, total: int, fps: float) -> tuple[int, int]:
        """First and last source frame inside [video_start, video_end] (qwen-vl-utils' rounding)."""
        if fps <= 0 or total <= 0:
            raise ValueError(f"video has {total} frames at {fps} fps")
        if self.video_start is None and self.video_end is None:
            return 0, total - 1
        duration = total / fps
        start = math.ceil(max(0.0, min(self.video_start, duration)) * fps) if self.video_start is not None else 0
        end = total - 1
        if self.video_end is not None:
            end = min(math.floor(max(0.0, min(self.video_end, duration)) * fps), total - 1)
        if start >= end:
            raise ValueError(
                f"video_start={self.video_start}/video_end={self.video_end} leave no frames in a {duration:.2f} s video"
            )
        return start, end

    def nframes_for(self, total: int, fps: float) -> int:
        """How many frames to sample from `total` (qwen-vl-utils' `smart_nframes`)."""
        if total < FRAME_FACTOR:
            raise ValueError(f"{total} frame{'' if total == 1 else 's'}: too few frames")
        if self.nframes is not None:
            n = _round_by(self.nframes, FRAME_FACTOR)
        else:
            low = _ceil_by(self.min_frames, FRAME_FACTOR)
            high = _floor_by(min(self.max_frames, total), FRAME_FACTOR)
            n = _floor_by(min(max(total / fps * self.fps, low), high, total), FRAME_FACTOR)
        if not FRAME_FACTOR <= n <= total:
            raise ValueError(f"cannot sample {n} frames from {total}: set nframes between {FRAME_FACTOR} and {total}")
        return n

    def frame_max_pixels(self, nframes: int) -> float:
        cap = max(min(self.max_pixels, self.total_pixels / nframes * FRAME_FACTOR), int(self.min_pixels * 1.05))
        return cap if self.max_pixels_override is None else min(self.max_pixels_override, cap)

    def plan(self, total: int, fps: float, height: int, width: int) -> VideoPlan:
        start, end = self.frame_range(total, fps)
        in_range = end - start + 1
        n = self.nframes_for(in_range, fps)
        import torch  # here, not at the top: the recipe's worst-case sizing (finetune/recipe/budgets.py) runs without it

        # float32 torch.linspace as qwen-vl-utils: numpy's float64 rounds some indices of long videos differently.
        indices = torch.linspace(start, end, n).round().long().tolist()
        h, w = smart_resize(height, width, self.min_pixels, self.frame_max_pixels(n), self.patch * self.merge)
        return VideoPlan(indices, in_range, fps, h, w, self.patch, self.merge)


@dataclass(frozen=True)
class VisionSettings:
    """Recipe defaults; `image_spec`/`video_spec` apply a media item's own overrides on top, at the checkpoint's
    patch and merge sizes (the encoder reads them from the processor)."""

    min_pixels: int
    max_pixels: int
    video_fps: float
    video_min_frames: int
    video_max_frames: int
    video_min_pixels: int
    video_max_pixels: int
    video_total_pixels: float
    frames_fps: float | None = None

    def image_spec(self, block: dict, patch: int = PATCH, merge: int = MERGE) -> ImageSpec:
        low, high = int(block.get("min_pixels", self.min_pixels)), int(block.get("max_pixels", self.max_pixels))
        _check_budget(block, low, high, "model.min_pixels", "model.max_pixels")
        return ImageSpec(low, high, patch, merge)

    def video_spec(self, block: dict, patch: int = PATCH, merge: int = MERGE) -> VideoSpec:
        if "fps" in block and "nframes" in block:
            raise ValueError("a video takes either fps or nframes, not both")
        nframes = block.get("nframes")
        if "max_pixels" in block:  # a per-item cap only ever lowers the frame size: it must leave room for the floor
            low = int(block.get("min_pixels", self.video_min_pixels))
            _check_budget(block, low, int(block["max_pixels"]), "model.video_min_pixels", "model.video_max_pixels")
        return VideoSpec(
            fps=None if nframes is not None else float(block.get("fps", self.video_fps)),
            nframes=int(nframes) if nframes is not None else None,
            min_frames=int(block.get("min_frames", self.video_min_frames)),
            max_frames=int(block.get("max_frames", self.video_max_frames)),
            min_pixels=int(block.get("min_pixels", self.video_min_pixels)),
            max_pixels=self.video_max_pixels,
            total_pixels=float(block.get("total_pixels", self.video_total_pixels)),
            video_start=_opt_float(block.get("video_start")),
            video_end=_opt_float(block.get("video_end")),
            frames_fps=_opt_float(block.get("frames_fps", self.frames_fps)),
            max_pixels_override=int(block["max_pixels"]) if "max_pixels" in block else None,
            patch=patch,
            merge=merge,
        )


def _check_budget(block: dict, low: int, high: int, low_key: str, high_key: str) -> None:
    """A media item's pixel range must not be empty; the message names both values and where each comes from (the
    item's own key, or the recipe's), so the user knows which one to change."""
    if low <= high:
        return
    low_from = "this item's min_pixels" if "min_pixels" in block else low_key
    high_from = "this item's max_pixels" if "max_pixels" in block else high_key
    raise ValueError(
        f"min_pixels={low} ({low_from}) is larger than max_pixels={high} ({high_from}): lower {low_from} to at most "
        f"{high} or raise {high_from} to at least {low}"
    )


def _opt_float(value) -> float | None:
    return None if value is None else float(value)
