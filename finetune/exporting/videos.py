"""The videos the export's reload check hands plain transformers, when transformers cannot decode a file itself, or
would read it at another frame rate than training did.

transformers 5.23 decodes a video file only with torchcodec (torchvision 0.26 removed `read_video`), so where
torchcodec cannot load (no system FFmpeg, no root to install it: the usual case on shared clusters) the exported
processor cannot be given a path. And where it can, it takes a file's frame rate from torchcodec (`average_fps`:
frames over the decoded timestamps' span), while training, like vLLM's default loader, takes the container's
average rate (docs/fidelity.md, "Frame rate"): for variable-rate files, some B-frame files and Matroska/WebM they
differ, and so would Qwen3-VL's timestamps and Qwen2.5-VL's second_per_grid_ts (`rate_differences` lists those
videos; the report and the model card name them). Such a video is given instead what training read from the file:
  - the metadata training used (frame count, the container's frame rate, size), from our probe
    (finetune/data/media.py);
  - the frames the exported processor's own `sample_frames` picks from that metadata (the call its `preprocess`
    makes after decoding a file), decoded by our loader (PyAV), as (T, C, H, W) uint8 like torchcodec's frames;
  - those indices as the metadata's `frames_indices`, so that the `sampled_fps` it reports is the file's.
It then resizes and grids them as it would the decoded file. The report says which way each check went.
"""

from __future__ import annotations

from pathlib import Path

import torch


def transformers_decodes_video_files() -> bool:
    """What transformers' `fetch_videos` needs to decode a path: torchcodec with FFmpeg, or an old torchvision."""
    from transformers.utils.import_utils import is_torchcodec_usable
    from transformers.video_utils import is_torchvision_video_decoding_available

    return is_torchcodec_usable(decode="video") or is_torchvision_video_decoding_available()


def how_videos_were_checked(from_files: bool, other_rate: list[dict] = ()) -> str:
    if from_files and other_rate:
        return (
            f"transformers decoded each video file itself, except {len(other_rate)} that its loader reads at another "
            "frame rate than training (torchcodec's average over the timestamps, not the container's rate): those "
            "were given their frames and the trained metadata"
        )
    if from_files:
        return "transformers decoded each video file itself"
    from finetune.data.media import current_video_decoder, torchcodec_problem

    decoder = "PyAV" if current_video_decoder()[0] == "pyav" else "torchcodec"
    return (
        f"transformers cannot decode video files here (torchcodec: {torchcodec_problem() or 'not usable by transformers'}"
        f"); its processor was given each file's metadata and the frames its own sample_frames picks, decoded by "
        f"finetune's loader ({decoder})"
    )


def rate_differences(paths: list[str]) -> list[dict]:
    """The videos transformers' own loader (torchcodec, exact mode) reads with another frame count or frame rate than
    training: [{path, trained_fps, transformers_fps, trained_frames, transformers_frames}]. Empty where transformers
    does not decode with torchcodec (an old torchvision's `read_video`: not compared)."""
    from transformers.utils.import_utils import is_torchcodec_usable

    if not is_torchcodec_usable(decode="video"):
        return []
    from torchcodec.decoders import VideoDecoder

    from finetune.data.media import probe_video

    differences = []
    for path in paths:
        info, read = probe_video(path), VideoDecoder(path, seek_mode="exact").metadata
        fps, frames = float(read.average_fps or 0), int(read.num_frames or 0)
        if frames != info.total_frames or abs(fps - info.fps) > 1e-9 * info.fps:
            differences.append(
                {
                    "path": path,
                    "trained_fps": info.fps,
                    "transformers_fps": fps,
                    "trained_frames": info.total_frames,
                    "transformers_frames": frames,
                }
            )
    return differences


def frames_for_transformers(export_dir: Path, paths: list[str]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """({key: frames}, [{path, frames: key, metadata}]) for the reload check: the module docstring says what."""
    from transformers import AutoVideoProcessor
    from transformers.video_utils import VideoMetadata

    from finetune.data.media import current_video_decoder, decode_frames, probe_video

    processor = AutoVideoProcessor.from_pretrained(str(export_dir))
    tensors, entries = {}, []
    for number, path in enumerate(paths):
        info = probe_video(path)
        metadata = {
            "total_num_frames": info.total_frames,
            "fps": info.fps,
            "width": info.width,
            "height": info.height,
            "duration": info.total_frames / info.fps,
        }
        try:
            indices = [int(i) for i in processor.sample_frames(metadata=VideoMetadata(**metadata))]
        except ValueError as err:  # what transformers would have raised on the file itself
            raise RuntimeError(f"the exported processor cannot sample frames from {path}: {err}") from None
        key = f"video_{number}"
        tensors[key] = torch.from_numpy(decode_frames(info, indices)).permute(0, 3, 1, 2).contiguous()
        metadata |= {"frames_indices": indices, "video_backend": current_video_decoder()[0]}
        entries.append({"path": path, "frames": key, "metadata": metadata})
    return tensors, entries
