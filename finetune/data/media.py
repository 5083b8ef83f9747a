"""Reading media: metadata probes (headers only) and decoders that touch only what is needed.

- `probe_image` / `probe_video` read sizes, frame counts and frame rates without decoding pixels; the token
  pre-pass runs on them alone.
- Videos come as a file (mp4/avi/mkv/webm/...), a folder of extracted frames (`ffmpeg -i v.mp4 out/%05d.jpg`)
  or a list of frame files; folders and lists need the rate they were extracted at (`frames_fps`).
- Decoding reads only the sampled frames: torchcodec seeks to each one; PyAV (the fallback when torchcodec
  cannot load the system FFmpeg) seeks to the keyframe before each and decodes forward. `video_decoder` says which
  one and why: the launcher decides once and hands its choice to every process it starts (FINETUNE_VIDEO_BACKEND),
  so no rank or DataLoader worker has to find out again and warn.
- Images: EXIF orientation applied; converted to RGB like qwen-vl-utils (RGBA on white, 16-bit scaled, not
  clipped); a huge JPEG is decoded at a reduced scale (`draft`) when the target size allows it.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
_ROTATED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_DRAFT_MIN_PIXELS = 4_000_000  # decode at reduced scale only for really large JPEGs


# ---------------------------------------------------------------- images
def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def probe_image(path: str) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), from the header only."""
    return _probe_image(path, *_stamp(path))


@functools.lru_cache(maxsize=1 << 16)  # the pre-pass probes every file; training then reuses the answers
def _probe_image(path: str, size: int, mtime_ns: int) -> tuple[int, int]:
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(0x0112) in _ROTATED_ORIENTATIONS:
            width, height = height, width
    return width, height


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    # Transparency on white, as qwen-vl-utils' to_rgb: RGBA, and also grey + alpha (LA), palettes with a
    # transparent index and RGB/grey with a transparent colour (`transparency` in the PNG's info).
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.split()[3])
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits instead of clipping
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def load_image(path: str, target: tuple[int, int] | None = None) -> Image.Image:
    """RGB image with EXIF orientation applied. With `target` (height, width), a large JPEG is decoded at the
    smallest DCT scale that is still at least twice the target, so a 50-megapixel photo never decodes in full."""
    with Image.open(path) as image:
        if target is not None and image.format == "JPEG" and image.width * image.height > _DRAFT_MIN_PIXELS:
            h, w = target
            rotated = image.getexif().get(0x0112) in _ROTATED_ORIENTATIONS
            image.draft("RGB", (2 * (h if rotated else w), 2 * (w if rotated else h)))
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image).copy()


# ---------------------------------------------------------------- videos
@dataclass(frozen=True)
class VideoInfo:
    source: str  # file path, or folder path for frame folders / lists
    total_frames: int
    fps: float
    width: int
    height: int
    frame_files: tuple[str, ...] | None = None  # set for folders and lists of frame images


def _frame_files(video) -> tuple[str, ...] | None:
    if isinstance(video, (list, tuple)):
        return tuple(video)
    if os.path.isdir(video):
        files = sorted(p for p in os.listdir(video) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
        return tuple(os.path.join(video, f) for f in files)
    return None


def probe_video(video, frames_fps: float | None = None) -> VideoInfo:
    """Frame count, frame rate and size from the container (or the frame files), decoding nothing."""
    if isinstance(video, str) and os.path.isfile(video):
        return _probe_video_file(video, *_stamp(video))
    files = _frame_files(video)
    if files is not None:
        if not files:
            raise ValueError(f"no frame images in {video}")
        if not frames_fps or frames_fps <= 0:
            raise ValueError(
                "a folder or list of frames needs the rate it was extracted at: set `frames_fps` on the "
                "video (or the sample), or data.frames_fps"
            )
        width, height = probe_image(files[0])
        return VideoInfo(
            str(video if isinstance(video, str) else Path(files[0]).parent),
            len(files),
            float(frames_fps),
            width,
            height,
            files,
        )
    raise FileNotFoundError(f"no such video file or frame folder: {video}")


@functools.lru_cache(maxsize=1 << 16)
def _probe_video_file(video: str, size: int, mtime_ns: int) -> VideoInfo:
    import av

    with av.open(video) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        # The container's average frame rate (FFmpeg's `avg_frame_rate`): what vLLM's default video loader reads
        # (OpenCV's CAP_PROP_FPS) and hands the processor as the metadata's fps, for the timestamps and
        # second_per_grid_ts. Not torchcodec's `average_fps` (transformers, qwen-vl-utils), which is frames over the
        # decoded timestamps' span and differs for some files (docs/fidelity.md, "Frame rate").
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        total = stream.frames
        width, height = stream.codec_context.width, stream.codec_context.height
        if not total:  # MKV/WebM headers carry no frame count: count packets (demuxing only)
            total, _ = _count_packets(container, stream)
    if total <= 0 or fps <= 0:
        raise ValueError(f"the video has {total} frames at {fps:g} fps")
    return VideoInfo(video, total, fps, width, height)


def _count_packets(container, stream) -> tuple[int, float]:
    """Frames (packets with data) and the seconds from the first timestamp to the end of the last frame."""
    import av

    count, first, end = 0, None, None
    try:
        for packet in container.demux(stream):
            if not packet.size:
                continue
            count += 1
            if packet.pts is not None:
                stop = packet.pts + (packet.duration or 0)
                first = packet.pts if first is None else min(first, packet.pts)
                end = stop if end is None else max(end, stop)
    except av.error.EOFError:  # a header with no frames after it
        pass
    span = float((end - first) * stream.time_base) if first is not None else 0.0
    return count, span


BACKEND_VARIABLE = "FINETUNE_VIDEO_BACKEND"  # "pyav" or "torchcodec": set by the launcher for its processes
VIDEO_BACKENDS = ("torchcodec", "pyav")
_backend: str | None = os.environ.get(BACKEND_VARIABLE) or None
INSTALL_FFMPEG = "install the system FFmpeg libraries (e.g. `apt-get install ffmpeg`) to use torchcodec"


def torchcodec_problem() -> str | None:
    """Why torchcodec cannot decode videos in this environment, or None when it can. torchcodec >= 0.16 imports
    without FFmpeg and says so with `ffmpeg_major_version = None`; older ones, or a build that does not match torch,
    fail to import."""
    try:
        import torchcodec
        from torchcodec.decoders import VideoDecoder  # noqa: F401  (loads its core library)
    except Exception as err:  # ImportError, OSError, or RuntimeError from a core library that does not load
        return f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
    if getattr(torchcodec, "ffmpeg_major_version", 0) is None:
        return "torchcodec loaded but found no FFmpeg libraries"
    return None


def video_decoder(forced: str | None) -> tuple[str, str]:
    """The decoder for video files ("torchcodec" or "pyav") and why, in words: `forced` (FINETUNE_VIDEO_BACKEND's
    value) when set, else torchcodec when it can load, else PyAV (which brings its own FFmpeg)."""
    if forced == "pyav":
        return "pyav", f"PyAV ({BACKEND_VARIABLE}=pyav)"
    problem = torchcodec_problem()
    if forced == "torchcodec":
        return "torchcodec", f"torchcodec ({BACKEND_VARIABLE}=torchcodec)" + (
            f", but it cannot load here ({problem})" if problem else ""
        )
    if problem is None:
        import torchcodec

        return "torchcodec", f"torchcodec (FFmpeg {torchcodec.ffmpeg_major_version})"
    return "pyav", f"PyAV, because torchcodec cannot load here ({problem}); {INSTALL_FFMPEG}"


def current_video_decoder() -> tuple[str, str]:
    """`video_decoder` for this process, as it decodes now (after a fallback to PyAV, PyAV)."""
    return video_decoder(_backend)


def settle_video_decoder() -> tuple[str, str]:
    """Decide this process's decoder now, and hand it to the processes it starts (DataLoader workers): after a
    fallback to PyAV they decode with it from the start instead of each finding out and warning again."""
    global _backend
    name, why = current_video_decoder()
    if name == "pyav":
        _backend = "pyav"
        os.environ[BACKEND_VARIABLE] = "pyav"
    return name, why


def _torchcodec_unavailable(err: Exception) -> bool:
    """torchcodec imports fine without FFmpeg and fails only when its core library loads on first use."""
    return isinstance(err, (ImportError, OSError)) or "libtorchcodec" in str(err)


def _fall_back_to_pyav(err: Exception) -> None:
    global _backend
    _backend = "pyav"
    logger.warning(
        "torchcodec cannot load FFmpeg (%s); decoding videos with PyAV instead (%s).",
        str(err).splitlines()[0][:160],
        INSTALL_FFMPEG,
    )


def _decode_torchcodec(path: str, indices: list[int]) -> np.ndarray:
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(path, dimension_order="NHWC", num_ffmpeg_threads=1)
    return decoder.get_frames_at(indices=indices).data.numpy()


def _decode_pyav(path: str, indices: list[int], fps: float, seek_gap: int | None = None) -> np.ndarray:
    """Seek to the keyframe before each wanted frame and decode forward to it; frames closer than `seek_gap`
    to the previous one are reached by decoding on, without a new seek."""
    import av

    seek_gap = seek_gap if seek_gap is not None else max(8, int(2 * fps))
    wanted = sorted(set(indices))
    found: dict[int, np.ndarray] = {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        time_base, start = float(stream.time_base), stream.start_time or 0

        def index_of(frame) -> int:
            return round(((frame.pts if frame.pts is not None else 0) - start) * time_base * fps)

        i, position, first, sequential = 0, -1, False, False  # `position`: index of the last decoded frame
        while i < len(wanted):
            if not sequential and (position < 0 or wanted[i] - position > seek_gap):
                container.seek(start + int(wanted[i] / fps / time_base), stream=stream, backward=True)
                first = True
            for frame in container.decode(stream):
                position = index_of(frame)
                if first and position > wanted[i]:  # the seek overshot (imprecise index): decode from the start
                    container.seek(start, stream=stream, backward=True)
                    position, first, sequential = -1, False, True
                    break
                first, captured = False, False
                while i < len(wanted) and wanted[i] <= position:
                    # The first frame at or after the wanted index (exact for constant frame rates).
                    found[wanted[i]] = frame.to_ndarray(format="rgb24")
                    i, captured = i + 1, True
                if i == len(wanted) or (captured and not sequential and wanted[i] - position > seek_gap):
                    break  # done, or the next wanted frame is far: seek to it instead of decoding on
            else:  # the stream ended before the remaining frames: repeat the last one, as decoders do
                if not found:
                    raise ValueError("no frame could be decoded")
                last = found[max(found)]
                found.update({w: last for w in wanted[i:]})
                i = len(wanted)
    return np.stack([found[i] for i in indices])


def _decode_frame_files(files: tuple[str, ...], indices: list[int]) -> np.ndarray:
    frames = [np.asarray(load_image(files[i])) for i in indices]
    if len({f.shape for f in frames}) != 1:
        raise ValueError("the frame images do not all have the same size")
    return np.stack(frames)


def decode_frames(info: VideoInfo, indices: list[int]) -> np.ndarray:
    """The frames at `indices` as (T, H, W, 3) uint8."""
    if info.frame_files is not None:
        return _decode_frame_files(info.frame_files, indices)
    if _backend in (None, "torchcodec"):
        try:
            return _decode_torchcodec(info.source, indices)
        except Exception as err:
            if _backend == "torchcodec" or not _torchcodec_unavailable(err):
                raise
            _fall_back_to_pyav(err)
    return _decode_pyav(info.source, indices, info.fps)


def decode_all_then_pick(path: str, indices: list[int]) -> np.ndarray:
    """The naive way (decode every frame, keep a few). Only for benchmarks and tests."""
    import av

    with av.open(path) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    return np.stack([frames[min(i, len(frames) - 1)] for i in indices])
