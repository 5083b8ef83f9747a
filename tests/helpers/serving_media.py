"""Media of many shapes, and the grids training and a served processor give them (shared by the serving and
export tests)."""

from __future__ import annotations

from transformers import AutoProcessor
from transformers.image_utils import load_image

from finetune.data.conversation import Sample
from tests.helpers.media_factory import write_image, write_video

IMAGES = [
    (640, 360, "jpg"),
    (1920, 1080, "png"),
    (300, 800, "webp"),
    (50, 50, "png"),
    (1234, 567, "jpg"),
    (4000, 3000, "jpg"),
]
VIDEOS = [  # (suffix, seconds, fps, width, height)
    (".mp4", 1, 30, 320, 240),
    (".avi", 5, 25, 640, 360),
    (".mkv", 12, 24, 200, 400),
    (".webm", 3, 10, 256, 144),
    (".mp4", 60, 15, 160, 90),
    (".mov", 8, 30000 / 1001, 480, 270),
    (".mp4", 20, 4, 56, 56),
]


# A recipe with other budgets than the demo's: larger images, 1 fps, up to 32 frames, and a total pixel budget that
# lowers the per-frame cap (882000 = 250 x 3528 pixels: expressible exactly by transformers' max_video_tokens); rows
# long enough for their worst case (finetune/recipe/budgets.py: a 10-minute video plans to 1,058 tokens at factor 28).
OTHER_BUDGETS = [
    "data.max_length=2048",
    "model.min_pixels=12544",
    "model.max_pixels=200704",
    "model.video_fps=1.0",
    "model.video_min_frames=3",
    "model.video_max_frames=32",
    "model.video_min_pixels=12544",
    "model.video_max_pixels=100352",
    "model.video_total_pixels=882000",
]


def write_media(root):
    images = [write_image(root / f"i{i}.{suffix}", w, h, seed=i) for i, (w, h, suffix) in enumerate(IMAGES)]
    videos = [
        write_video(root / f"v{i}{suffix}", frames=round(seconds * fps), fps=fps, width=w, height=h, seed=i)
        for i, (suffix, seconds, fps, w, h) in enumerate(VIDEOS)
    ]
    return images, videos


def trained_grids(encoder, images, videos):
    """Our training encoder's grids (at its checkpoint's patch size): images (1, h, w); videos (t, h, w, sampled fps)."""
    blocks = [{"type": "image", "image": str(p)} for p in images] + [{"type": "video", "video": str(p)} for p in videos]
    sample = Sample("s", [{"role": "user", "content": blocks}], "test")
    image_grids = [list(p.grid) for p in encoder.image_plans(sample)]
    video_grids = [[*p.grid, p.sampled_fps] for _, p in encoder.video_plans(sample)]
    return image_grids, video_grids


def served_grids(folder, images, videos):
    """What `AutoProcessor.from_pretrained(folder)` of plain transformers gives the same files, same layout."""
    served = AutoProcessor.from_pretrained(folder)
    image_grids = [served.image_processor(images=[load_image(str(p))])["image_grid_thw"][0].tolist() for p in images]
    video_grids = []
    for path in videos:
        out = served.video_processor(videos=[str(path)], return_metadata=True)
        video_grids.append([*out["video_grid_thw"][0].tolist(), out["video_metadata"][0].sampled_fps])
    return image_grids, video_grids


def assert_same_grids(trained, served):
    assert served[0] == trained[0]
    for want, got in zip(trained[1], served[1]):
        assert got[:3] == want[:3] and abs(got[3] - want[3]) <= 1e-9 * want[3], (want, got)
