"""Frame sampling equals qwen-vl-utils; both decoders give the frames a full decode gives; images become RGB."""

import logging
import random

import av
import numpy as np
import pytest
from media_factory import write_image, write_video
from PIL import Image

import finetune.data.media as media
from finetune.data.media import VideoSettings, load_image, load_video, sample_indices, smart_nframes


def test_smart_nframes_and_indices_match_qwen_vl_utils():
    import torch
    from qwen_vl_utils.vision_process import smart_nframes as reference

    rng = random.Random(0)
    for _ in range(2000):
        total, video_fps = rng.randint(4, 3000), rng.choice([1, 2.5, 4, 12, 23.976, 24, 25, 29.97, 30, 60])
        settings = VideoSettings(rng.choice([0.5, 1, 2, 4]), rng.choice([2, 4, 6]), rng.choice([8, 16, 64, 768]))
        ele = {"fps": settings.fps, "min_frames": settings.min_frames, "max_frames": settings.max_frames}
        try:
            expected = reference(ele, total_frames=total, video_fps=video_fps)
        except ValueError:
            with pytest.raises(ValueError):
                smart_nframes(total, video_fps, settings)
            continue
        assert smart_nframes(total, video_fps, settings) == expected, (total, video_fps, settings)
        assert sample_indices(total, expected) == torch.linspace(0, total - 1, expected).round().long().tolist()


def _full_decode(path):
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])])


@pytest.mark.parametrize("suffix,codec", [(".mp4", "libx264"), (".mkv", "libx264"), (".avi", "mpeg4")])
def test_pyav_decodes_only_the_sampled_frames_exactly(tmp_path, monkeypatch, suffix, codec):
    path = write_video(tmp_path / f"v{suffix}", frames=30, fps=10, width=64, height=48, codec=codec)
    monkeypatch.setattr(media, "_backend", "pyav")
    video = load_video(str(path), VideoSettings(fps=2, min_frames=4, max_frames=768))
    assert (video.fps, video.total_frames) == (10, 30)
    assert video.indices == sample_indices(30, 6) and video.frames.shape == (6, 48, 64, 3)
    assert np.array_equal(video.frames, _full_decode(path)[video.indices])
    assert video.sampled_fps == pytest.approx(2.0)


def test_torchcodec_or_announced_fallback(tmp_path, monkeypatch, caplog):
    """With FFmpeg's libraries present torchcodec must give PyAV's frames; without them, one warning and PyAV."""
    path = write_video(tmp_path / "v.mp4", frames=16, fps=8, width=64, height=48)
    settings = VideoSettings(fps=4, min_frames=4, max_frames=768)
    monkeypatch.setattr(media, "_backend", "pyav")
    expected = load_video(str(path), settings)
    monkeypatch.setattr(media, "_backend", None)
    with caplog.at_level(logging.WARNING, logger="finetune.data.media"):
        first, second = load_video(str(path), settings), load_video(str(path), settings)
    fell_back = media._backend == "pyav"
    warnings = [r for r in caplog.records if "decoding videos with PyAV" in r.message]
    assert len(warnings) == (1 if fell_back else 0)
    for video in (first, second):
        assert video.indices == expected.indices and video.total_frames == 16 and video.fps == 8
        # H.264 decoding is exact; the YUV->RGB conversion of two FFmpeg builds may differ by rounding.
        assert np.abs(video.frames.astype(int) - expected.frames.astype(int)).max() <= 2


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "CMYK", "I;16"])
def test_images_become_rgb(tmp_path, mode):
    path = tmp_path / f"i{mode.replace(';', '')}.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
    write_image(path, 40, 30, mode=mode)
    image = load_image(str(path))
    assert image.mode == "RGB" and image.size == (40, 30)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(path, exif=exif)
    assert load_image(str(path)).size == (20, 40)
