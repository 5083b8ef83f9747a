"""Generate test images and videos (never downloaded): deterministic for a seed."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image


def write_image(path: Path, width: int, height: int, seed: int = 0, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":
        image = image.quantize(64)
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path


CODECS = {".mp4": "libx264", ".mkv": "libx264", ".avi": "mpeg4", ".webm": "libvpx-vp9", ".mov": "libx264"}


def video_frames(frames: int, width: int, height: int, seed: int = 0):
    """Distinct frames: a noise texture shifted a little more each frame, with a frame-number stripe."""
    base = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    for i in range(frames):
        frame = np.roll(base, shift=3 * i, axis=1)
        frame[: max(2, height // 8), :] = (i * 37) % 256
        yield frame


def write_video(
    path: Path,
    frames: int,
    fps,
    width: int,
    height: int,
    seed: int = 0,
    codec: str | None = None,
    gop: int = 12,
    bframes: int = 0,
    faststart: bool = False,
    frame_times: list[float] | None = None,
) -> Path:
    """A clip whose container and codec follow the suffix (mp4/mkv/mov: H.264, avi: MPEG-4, webm: VP9). `bframes`
    > 0 gives an MP4 a composition-offset (ctts) table; `faststart` puts its index (moov) before the frames.
    `frame_times` (seconds, one per frame): a variable frame rate, each frame stamped at its time (1/90000 s ticks)
    in a stream that declares `fps`; the container's average rate is then frames over duration, not `fps`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = codec or CODECS[path.suffix]
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.gop_size = gop
        if frame_times is not None:
            stream.codec_context.time_base = Fraction(1, 90000)
        if codec == "libx264":
            stream.options = {"x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}", "crf": "20"}
        for i, frame in enumerate(video_frames(frames, width, height, seed)):
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if frame_times is not None:
                picture.pts, picture.time_base = round(frame_times[i] * 90000), Fraction(1, 90000)
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_frame_folder(folder: Path, frames: int, width: int, height: int, seed: int = 0) -> Path:
    """What `ffmpeg -i video -q:v 2 -start_number 0 out/%05d.jpg` leaves: one image per frame (PNG here, lossless)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(video_frames(frames, width, height, seed)):
        Image.fromarray(frame).save(folder / f"{i:05d}.png")
    return folder


def write_dataset(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records, indent=1))
    return path
