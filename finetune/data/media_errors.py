"""Every media failure becomes a DataError that names the sample and the file, says what is wrong in words, and
says how to fix it. Nothing a decoder raises reaches the user as a traceback.

Problem classes (what `validate` groups by): missing_media, unreadable_media, bad_image, bad_video,
too_few_frames, aspect_ratio.
"""

from __future__ import annotations

import os
import re

from PIL import Image

from finetune.base.errors import DataError

FIXES = {
    "missing_media": "Check the path (media paths are relative to the dataset file's folder or data.media_root) or "
    "remove the sample.",
    "unreadable_media": "Make the file readable by the user running training.",
    "bad_image": "The file is truncated or not an image: re-save it (e.g. `convert in.jpg out.jpg`) or remove the "
    "sample.",
    "image_too_large": "Downscale it (e.g. `convert in.png -resize '8000x8000>' out.png`): Pillow refuses images "
    "this large as a possible decompression bomb.",
    "bad_video": "The file is truncated or corrupt: re-encode it (e.g. `ffmpeg -i in.mp4 -c:v libx264 out.mp4`) or "
    "remove the sample. `python -m finetune.validate --decode` lists every such file.",
    "too_few_frames": "A video needs at least 2 frames (Qwen encodes frames in pairs); if it is a still image, list it "
    "as an image.",
    "aspect_ratio": "Crop or pad it: Qwen-VL refuses images and frames more than 200 times wider than tall (or the "
    "reverse).",
}


def _reason(err: Exception) -> str:
    """The decoder's first line, in words where the decoders' own are cryptic."""
    text = str(err).strip()
    text = text.splitlines()[0] if text else type(err).__name__
    text = re.sub(r"^\w+, /\S+\.(?:cpp|h):\d+, ", "", text)  # torchcodec prefixes its C++ source location
    if "Could not seek" in text or "Operation not permitted" in text:  # torchcodec / PyAV on a corrupt index
        return f"the decoder cannot seek in it: its index is corrupt ({text.split('.')[0]})"
    index = re.search(r"Invalid frame index=(\d+).*less than (\d+)", text)  # torchcodec
    if index:
        return f"frame {index.group(1)} is not in the file, which holds {index.group(2)} decodable frames ({text})"
    if "Invalid data found" in text or "push packet" in text:  # PyAV / torchcodec
        return f"corrupt data in the video stream ({text})"
    return text


def media_error(sample, kind: str, name: str, path, err: Exception) -> DataError:
    """The DataError for `err`, raised while probing or decoding the `kind` ("image"/"video") `name` of `sample`."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    reason = _reason(err)
    if any(not os.path.exists(p) for p in paths):
        problem, fix, reason = "missing_media", FIXES["missing_media"], "no such file"
    elif not all(os.access(p, os.R_OK) for p in paths):  # FFmpeg also reports corrupt data as EPERM: ask the file
        problem, fix = "unreadable_media", FIXES["unreadable_media"]
    elif isinstance(err, Image.DecompressionBombError):
        pixels = re.search(r"\((\d+) pixels\)", reason)
        reason = f"{int(pixels.group(1)):,} pixels" if pixels else reason
        problem, fix = "unreadable_media", FIXES["image_too_large"]
    elif "nframes" in reason or "video_start" in reason:  # the sample's own options do not fit this video
        problem, fix = "format", "Change the sample's options."
    elif "aspect ratio" in reason:
        problem, fix = "aspect_ratio", FIXES["aspect_ratio"]
    elif kind == "video" and "too few frames" in reason:
        problem, fix = "too_few_frames", FIXES["too_few_frames"]
    elif kind == "video":
        problem, fix = "bad_video", FIXES["bad_video"]
    else:
        problem, fix = "bad_image", FIXES["bad_image"]
    return DataError(f"{sample.source}: {kind} {name}: {reason}. {fix}", problem)
