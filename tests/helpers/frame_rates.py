"""Videos whose frame rate depends on who reads it, and the two readings (docs/fidelity.md, "Frame rate").

- `container_fps`: the container's average frame rate (FFmpeg's `avg_frame_rate`), read by the `ffprobe` of the
  system FFmpeg: what vLLM's default video loader reads (OpenCV's CAP_PROP_FPS, vllm/multimodal/video_decoders/
  opencv.py `get_video_metadata`) and hands the processor as the metadata's fps. The reference training follows.
- `torchcodec_fps`: torchcodec's exact-mode `average_fps` (frames over the decoded timestamps' span): what
  transformers' own video loader and qwen-vl-utils read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import subprocess
from fractions import Fraction

from tests.helpers.media_factory import write_video

FRAMES = 40


def write_rate_media(root) -> dict[str, str]:
    """{name: path}: NTSC rates (23.976, 29.97), a variable rate (10 fps, then 30), a clip declared 25 fps whose
    frames drift (the average is off the header's rate), both with B-frames (torchcodec then reads yet another rate), and Matroska/WebM (millisecond timestamps)."""
    vfr = [i / 10 for i in range(16)] + [1.6 + i / 30 for i in range(FRAMES - 16)]
    drift = [i * 0.0401 for i in range(FRAMES)]
    specs = {
        "ntsc_23976.mp4": dict(fps=Fraction(24000, 1001)),
        "ntsc_2997.mov": dict(fps=Fraction(30000, 1001)),
        "variable.mp4": dict(fps=30, frame_times=vfr, bframes=2),
        "drift.mp4": dict(fps=25, frame_times=drift, bframes=2),
        "ms_24.mkv": dict(fps=24),
        "ms_2997.webm": dict(fps=Fraction(30000, 1001)),
    }
    return {
        name: str(write_video(root / name, frames=FRAMES, width=96, height=64, seed=i, **spec))
        for i, (name, spec) in enumerate(specs.items())
    }


def container_fps(path: str) -> float:
    ffprobe = shutil.which("ffprobe")
    assert ffprobe, (
        "the frame-rate reference is read with ffprobe: install the system FFmpeg (`apt-get install ffmpeg`)"
    )
    out = subprocess.run(
        [
            ffprobe,
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=avg_frame_rate",
            "-of",
            "json",
            path,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(Fraction(json.loads(out)["streams"][0]["avg_frame_rate"]))


def torchcodec_fps(path: str) -> float:
    from torchcodec.decoders import VideoDecoder

    return float(VideoDecoder(path, seek_mode="exact").metadata.average_fps)


@functools.lru_cache(maxsize=None)
def _container_fps_cached(path: str) -> float:
    return container_fps(path)


@contextlib.contextmanager
def torchcodec_reads_the_container_rate():
    """Within it, torchcodec's VideoDecoder (what qwen-vl-utils and transformers' loader decode with) reports the
    container's average rate as its `average_fps`: the reference flows then sample and time frames with the rate
    training (and vLLM) use, so they compare the rest of the pipeline."""
    import torchcodec.decoders
    from torchcodec.decoders import VideoDecoder

    class ContainerRate(VideoDecoder):
        def __init__(self, source, *args, **kwargs):
            super().__init__(source, *args, **kwargs)
            if isinstance(source, (str, os.PathLike)):
                fps = _container_fps_cached(os.fspath(source))
                self.metadata = dataclasses.replace(self.metadata, average_fps=fps)

    torchcodec.decoders.VideoDecoder = ContainerRate
    try:
        yield
    finally:
        torchcodec.decoders.VideoDecoder = VideoDecoder
