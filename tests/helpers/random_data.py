"""Random media and conversations shared by the parity tests (deterministic for a seed)."""

import random

from tests.helpers.media_factory import write_image, write_video

WORDS = "what is shown here the red dot moves left right up down and then stops twice quickly".split()


def build_media_pool(root):
    rng = random.Random(0)
    images = []
    for i in range(16):
        w, h = (
            rng.choice([rng.randint(8, 64), rng.randint(60, 600)]),
            rng.choice([rng.randint(8, 64), rng.randint(60, 600)]),
        )
        mode, suffix = rng.choice(
            [("RGB", "png"), ("RGB", "jpg"), ("RGBA", "png"), ("L", "png"), ("P", "png"), ("RGB", "webp")]
        )
        images.append(write_image(root / f"i{i}.{suffix}", w, h, seed=i, mode=mode).name)
    videos = []
    for i, suffix in enumerate([".mp4", ".mp4", ".mp4", ".avi", ".mkv", ".webm", ".mp4", ".mov", ".mp4", ".avi"]):
        fps = rng.choice([4, 10, 12.5, 24, 25, 30000 / 1001, 30])
        w, h = 2 * rng.randint(16, 100 if suffix == ".webm" else 160), 2 * rng.randint(16, 90)
        videos.append(
            write_video(root / f"v{i}{suffix}", frames=rng.randint(6, 120), fps=fps, width=w, height=h, seed=i).name
        )
    return root, images, videos


# Replies that begin or end with whitespace and newlines (every record but one in six, every turn): where Qwen's
# tokenizers merge whitespace runs, `assistant\n` + `\n\nreply` tokenizes to other ids whole than in pieces.
REPLY_WHITESPACE = [("", ""), ("\n", ""), ("", "\n"), ("\n\n", "  "), (" \n", " \n\n"), ("  ", "\t")]


def random_record(rng, images, videos, index):
    record = {"id": f"r{index}", "messages": [], "images": [], "videos": []}
    if rng.random() < 0.3:
        record["messages"].append({"role": "system", "content": " ".join(rng.sample(WORDS, 4)).capitalize() + "."})
    for _ in range(rng.randint(1, 3)):
        parts = [" ".join(rng.sample(WORDS, rng.randint(1, 6)))]
        for _ in range(rng.choice([0, 0, 1, 1, 2])):
            kind = rng.choice(["image", "video"])
            record[kind + "s"].append(rng.choice(images if kind == "image" else videos))
            parts.insert(rng.randint(0, len(parts)), f"<{kind}>")
        record["messages"].append({"role": "user", "content": " ".join(parts) + "?"})
        before, after = REPLY_WHITESPACE[index % len(REPLY_WHITESPACE)]  # chosen without drawing from `rng`
        record["messages"].append(
            {"role": "assistant", "content": before + " ".join(rng.sample(WORDS, rng.randint(1, 5))) + "." + after}
        )
    # Per-sample options, with qwen-vl-utils' key names.
    if rng.random() < 0.3:
        record["max_pixels"] = rng.choice([16, 64, 512]) * 784
    if rng.random() < 0.3:
        record["min_pixels"] = rng.choice([8, 16, 32]) * 784
    if rng.random() < 0.2:
        record["nframes"] = rng.choice([2, 4, 6, 8, 16])
    elif rng.random() < 0.4:
        record["fps"] = rng.choice([0.5, 1, 2, 4, 8])
    for key, choices in [
        ("min_frames", [2, 4, 8]),
        ("max_frames", [4, 8, 16, 128]),
        ("total_pixels", [1024 * 784, 20480 * 784]),
        ("video_start", [0.2, 0.5, 1.0]),
        ("video_end", [0.8, 1.5, 3.0]),
    ]:
        if rng.random() < 0.2:
            record[key] = rng.choice(choices)
    return record
