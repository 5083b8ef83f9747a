"""Decoders read exactly the frames a full decode gives, only the sampled ones; all video sources agree."""

import logging

import numpy as np
import pytest
from PIL import Image

import finetune.data.media as media
from finetune.data.media import decode_all_then_pick, decode_frames, load_image, probe_image, probe_video
from finetune.data.vision import VisionSettings
from tests.helpers.media_factory import write_frame_folder, write_image, write_video

SETTINGS = VisionSettings(3136, 3136 * 16, 2.0, 4, 768, 3136, 3136 * 16, 3136 * 400)


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".avi", ".webm", ".mov"])
def test_containers_probe_and_seek_exactly(tmp_path, monkeypatch, suffix):
    path = str(write_video(tmp_path / f"v{suffix}", frames=75, fps=25, width=96, height=64, gop=10))
    info = probe_video(path)
    assert (info.total_frames, info.fps, info.width, info.height) == (75, 25, 96, 64)
    plan = SETTINGS.video_spec({}).plan(info.total_frames, info.fps, info.height, info.width)
    assert len(plan.indices) == 6 and plan.indices[-1] == 74
    expected = decode_all_then_pick(path, plan.indices)
    monkeypatch.setattr(media, "_backend", "pyav")
    assert np.array_equal(decode_frames(info, plan.indices), expected)
    # Unsorted, repeated and adjacent indices, and a gap large enough to need a second seek.
    odd = [70, 3, 3, 4, 40, 0, 74]
    assert np.array_equal(media._decode_pyav(path, odd, 25.0, seek_gap=5), decode_all_then_pick(path, odd))


def test_probe_reads_the_frame_count_torchcodec_finds_and_the_rate_vllm_reads(tmp_path):
    """The header-only probe counts the frames torchcodec decodes (exact mode), and reads the frame rate vLLM's default
    loader reads: the container's average (FFmpeg's avg_frame_rate, here by ffprobe). torchcodec's own average (frame
    count over the timestamp span, what qwen-vl-utils and transformers use) differs from it for Matroska/WebM
    (millisecond timestamps): docs/fidelity.md, "Frame rate"."""
    import random

    from torchcodec.decoders import VideoDecoder

    from tests.helpers.frame_rates import container_fps

    rng = random.Random(5)
    differ = set()
    for i in range(24):
        suffix = [".mkv", ".webm", ".mp4", ".mov", ".avi"][i % 5]
        fps = rng.choice([10, 12.5, 15, 23.976, 24, 25, 29.97, 30000 / 1001, 30, 60])
        path = str(write_video(tmp_path / f"v{i}{suffix}", frames=rng.randint(4, 150), fps=fps, width=32, height=32))
        reference, info = VideoDecoder(path).metadata, probe_video(path)
        assert info.total_frames == reference.num_frames, path
        assert info.fps == container_fps(path), (path, fps)
        if abs(reference.average_fps - info.fps) > 1e-9 * info.fps:
            differ.add(suffix)
    assert differ and differ <= {".mkv", ".webm"}, differ


def test_pyav_seeks_instead_of_decoding_everything(tmp_path, monkeypatch):
    path = str(write_video(tmp_path / "long.mp4", frames=300, fps=30, width=64, height=48, gop=30))
    decoded = []
    real_decode = media.av.container.InputContainer.decode if hasattr(media, "av") else None
    import av

    original = av.container.InputContainer.decode

    def counting_decode(self, *args, **kwargs):
        for frame in original(self, *args, **kwargs):
            decoded.append(frame.pts)
            yield frame

    monkeypatch.setattr(av.container.InputContainer, "decode", counting_decode)
    frames = media._decode_pyav(path, [0, 150, 299], 30.0)
    assert frames.shape[0] == 3 and real_decode is None
    assert len(decoded) < 100, f"decoded {len(decoded)} of 300 frames to keep 3"


def test_torchcodec_matches_pyav_or_falls_back_once(tmp_path, monkeypatch, caplog):
    path = str(write_video(tmp_path / "v.mp4", frames=16, fps=8, width=64, height=48))
    info, indices = probe_video(path), [0, 5, 10, 15]
    monkeypatch.setattr(media, "_backend", "pyav")
    expected = decode_frames(info, indices)
    monkeypatch.setattr(media, "_backend", None)
    with caplog.at_level(logging.WARNING, logger="finetune.data.media"):
        first, second = decode_frames(info, indices), decode_frames(info, indices)
    fell_back = media._backend == "pyav"
    assert len([r for r in caplog.records if "decoding videos with PyAV" in r.message]) == (1 if fell_back else 0)
    for frames in (first, second):
        # H.264 decoding is exact; two FFmpeg builds may round the YUV->RGB conversion differently.
        assert frames.shape == expected.shape and np.abs(frames.astype(int) - expected.astype(int)).max() <= 2


def test_mp4_frame_folder_and_frame_list_give_the_same_plan(tmp_path):
    mp4 = str(write_video(tmp_path / "v.mp4", frames=90, fps=30, width=128, height=72))
    folder = write_frame_folder(tmp_path / "frames", frames=90, width=128, height=72)
    frame_list = sorted(str(p) for p in folder.iterdir())
    plans = []
    for source, options in [(mp4, {}), (str(folder), {"frames_fps": 30}), (frame_list, {"frames_fps": 30})]:
        spec = SETTINGS.video_spec({"fps": 4, **options})
        info = probe_video(source, spec.frames_fps)
        plans.append(spec.plan(info.total_frames, info.fps, info.height, info.width))
        assert decode_frames(info, plans[-1].indices).shape == (12, 72, 128, 3)
    assert plans[0] == plans[1] == plans[2]
    assert plans[0].second_per_grid == pytest.approx(0.5)  # 4 fps sampled, 2 frames per temporal patch
    with pytest.raises(ValueError, match="frames_fps"):
        probe_video(str(folder))


def test_bad_videos_are_reported(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 100)
    for name in ("empty.mp4", "junk.mp4"):
        with pytest.raises(Exception):
            probe_video(str(tmp_path / name))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no frame images"):
        probe_video(str(tmp_path / "nothing"), 30)


@pytest.mark.parametrize(
    "mode,suffix", [("RGBA", "png"), ("LA", "png"), ("P", "png"), ("L", "png"), ("CMYK", "jpg"), ("RGB", "webp")]
)
def test_images_become_rgb(tmp_path, mode, suffix):
    path = write_image(tmp_path / f"i.{suffix}", 40, 30, mode=mode)
    image = load_image(str(path))
    assert image.mode == "RGB" and image.size == (40, 30) and probe_image(str(path)) == (40, 30)


def test_transparent_pixels_become_white(tmp_path):
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(tmp_path / "t.png")
    assert load_image(str(tmp_path / "t.png")).getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # uint16 -> mode I;16
    grey = np.asarray(load_image(str(tmp_path / "deep.png")))[..., 0]
    assert grey.min() == 0 and 240 <= grey.max() <= 255 and len(np.unique(grey)) > 32


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(str(tmp_path / "rotated.jpg")).size == (20, 40)
    assert probe_image(str(tmp_path / "rotated.jpg")) == (20, 40)  # the pre-pass sees the displayed size


def test_huge_jpeg_is_decoded_at_reduced_scale(tmp_path):
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (2400, 3200, 3), dtype=np.uint8))
    big.save(tmp_path / "big.jpg", quality=85)
    small = load_image(str(tmp_path / "big.jpg"), target=(280, 392))
    assert small.size[0] < 3200 and small.size[0] >= 2 * 392  # decoded at 1/2 or 1/4 scale, still >= 2x target
    assert load_image(str(tmp_path / "big.jpg")).size == (3200, 2400)  # without a target: full size
