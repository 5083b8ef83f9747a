"""Load images and videos with Qwen's semantics (qwen-vl-utils): RGB images, and videos sampled at a target
fps with FRAME_FACTOR 2 and min/max frame counts. Only the sampled frames are decoded.

Decoders: torchcodec when it can load the system FFmpeg, PyAV (which ships its own FFmpeg) otherwise; the
fallback is announced once per process. The real source fps and the sampled frame indices travel with the
frames, so Qwen2.5-VL's `second_per_grid_ts` is computed from the video itself, never from a guessed fps.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)
FRAME_FACTOR = 2  # frames are consumed in pairs (temporal_patch_size 2)


@dataclass
class VideoSettings:
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768


@dataclass
class DecodedVideo:
    frames: np.ndarray  # (T, H, W, 3) uint8, only the sampled frames
    fps: float  # the source's average frame rate
    total_frames: int  # frames in the source
    indices: list[int]  # which source frames were sampled

    @property
    def sampled_fps(self) -> float:
        return len(self.indices) / max(self.total_frames, 1e-6) * self.fps


def load_image(path: str) -> Image.Image:
    """RGB image with its EXIF orientation applied (phones store rotation as metadata)."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode != "RGB":
            # Palette/LA/RGBA/CMYK/16-bit: go through RGBA so transparency composes on white like qwen-vl-utils.
            if image.mode in ("RGBA", "LA", "P", "PA"):
                rgba = image.convert("RGBA")
                background = Image.new("RGB", rgba.size, (255, 255, 255))
                background.paste(rgba, mask=rgba.split()[3])
                return background
            image = image.convert("RGB")
        return image.copy()


def _floor_by(n: float, factor: int) -> int:
    return math.floor(n / factor) * factor


def _ceil_by(n: float, factor: int) -> int:
    return math.ceil(n / factor) * factor


def smart_nframes(total_frames: int, video_fps: float, settings: VideoSettings) -> int:
    """How many frames to sample: `fps` frames per second, clamped to [min_frames, max_frames] and to the
    video's length, rounded down to a multiple of FRAME_FACTOR (qwen-vl-utils' `smart_nframes`)."""
    min_frames = _ceil_by(settings.min_frames, FRAME_FACTOR)
    max_frames = _floor_by(min(settings.max_frames, total_frames), FRAME_FACTOR)
    nframes = total_frames / video_fps * settings.fps
    nframes = _floor_by(min(max(nframes, min_frames), max_frames, total_frames), FRAME_FACTOR)
    if not FRAME_FACTOR <= nframes <= total_frames:
        raise ValueError(f"cannot sample {nframes} frames from a video of {total_frames} frames")
    return nframes


def sample_indices(total_frames: int, nframes: int) -> list[int]:
    """Evenly spaced frame indices from the first to the last frame (qwen-vl-utils' linspace + round)."""
    return np.round(np.linspace(0, total_frames - 1, nframes)).astype(int).tolist()


_backend: str | None = os.environ.get("FINETUNE_VIDEO_BACKEND")  # force "pyav" or "torchcodec"


def _torchcodec_unavailable(err: Exception) -> bool:
    """torchcodec imports fine without FFmpeg and fails only when its core library loads on first use."""
    return isinstance(err, (ImportError, OSError)) or "libtorchcodec" in str(err)


def _fall_back_to_pyav(err: Exception) -> None:
    global _backend
    _backend = "pyav"
    logger.warning(
        "torchcodec cannot load FFmpeg (%s); decoding videos with PyAV instead. Install the system FFmpeg "
        "libraries (e.g. `apt-get install ffmpeg`) to use torchcodec.",
        str(err).splitlines()[0][:160],
    )


def _decode_torchcodec(path: str, settings: VideoSettings) -> DecodedVideo:
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(path, dimension_order="NHWC", num_ffmpeg_threads=1)
    fps, total = float(decoder.metadata.average_fps), int(decoder.metadata.num_frames)
    indices = sample_indices(total, smart_nframes(total, fps, settings))
    frames = decoder.get_frames_at(indices=indices).data.numpy()  # seeks to each sampled frame
    return DecodedVideo(frames, fps, total, indices)


def _pyav_frame_count(path: str) -> int:
    """Frames in the first video stream, from its packets (demuxing only, no decoding): containers such as
    MKV/WebM carry no frame count in their headers."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


def _decode_pyav(path: str, settings: VideoSettings) -> DecodedVideo:
    import av

    total = 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        total = stream.frames
    total = total or _pyav_frame_count(path)
    if fps <= 0 or total <= 0:
        raise ValueError("the video stream reports no frame rate or no frames")
    indices = sample_indices(total, smart_nframes(total, fps, settings))
    wanted, frames = set(indices), {}
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(container.streams.video[0])):
            if i in wanted:
                frames[i] = frame.to_ndarray(format="rgb24")
            if i >= indices[-1]:
                break  # never decode past the last sampled frame
    if not frames:
        raise ValueError("no frame could be decoded")
    # A stream may hold fewer frames than its header claims: repeat the last decoded one, as decoders do.
    last = frames[max(frames)]
    return DecodedVideo(np.stack([frames.get(i, last) for i in indices]), fps, total, indices)


def load_video(path: str, settings: VideoSettings) -> DecodedVideo:
    if _backend in (None, "torchcodec"):
        try:
            return _decode_torchcodec(path, settings)
        except Exception as err:
            if _backend == "torchcodec" or not _torchcodec_unavailable(err):
                raise
            _fall_back_to_pyav(err)
    return _decode_pyav(path, settings)
