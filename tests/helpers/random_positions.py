"""Random token sequences for the M-RoPE position tests (tests/unit/model/test_rope.py) and the rope2d.py cross-check
(tests/helpers/rope2d_crosscheck.py): text runs and image/video blocks as the chat template renders them."""

import random

import torch

SECONDS = [0.25, 0.5, 2 / 3, 1.5, 4.0, 1.0, 0.1, 1 / 3]


def random_sequence(rng: random.Random, config, with_seconds: bool, frames: bool = False) -> dict:
    """Text runs and image/video blocks, each block after <|vision_start|> as the chat template renders them.
    Videos are often long next to their frame size (t x interval >> h/2). With `frames` (Qwen3-VL) a video is, per
    temporal patch, a timestamp (3 to 6 text tokens), <|vision_start|>, the frame's tokens and <|vision_end|>,
    inside the template's outer pair (left out for a quarter of the videos). `features`: (modality, offset where
    its placeholder's replacement starts, grid), as vLLM records them."""
    special = {config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id}
    words = [t for t in range(3, 600) if t not in special]
    ids, types, images, videos, seconds, features = [], [], [], [], [], []

    def text(n):
        ids.extend(rng.choice(words) for _ in range(n))
        types.extend([0] * n)

    def mark(token):
        ids.append(token)
        types.append(0)

    text(rng.randint(0, 12))
    for _ in range(rng.choice([0, 1, 1, 2, 2, 3, 4])):
        if rng.random() < 0.4:
            grid, kind = (1, 2 * rng.randint(1, 16), 2 * rng.randint(1, 16)), 1
            images.append(grid)
        else:
            t = rng.choice([1, 2, rng.randint(2, 12), rng.randint(12, 64)])
            grid, kind = (t, 2 * rng.randint(1, 10), 2 * rng.randint(1, 10)), 2
            videos.append(grid)
            seconds.append(rng.choice(SECONDS) if rng.random() < 0.8 else rng.uniform(0.05, 6.0))
        per_frame = (grid[1] // 2) * (grid[2] // 2)
        if frames and kind == 2:
            outer = rng.random() < 0.75
            if outer:
                mark(config.vision_start_token_id)
            features.append(("video", len(ids), grid))
            for _ in range(grid[0]):
                text(rng.randint(3, 6))  # `<12.3 seconds>`
                mark(config.vision_start_token_id)
                ids.extend([config.video_token_id] * per_frame)
                types.extend([2] * per_frame)
                mark(config.vision_end_token_id)
            if outer:
                mark(config.vision_end_token_id)
        else:
            mark(config.vision_start_token_id)
            features.append(("image" if kind == 1 else "video", len(ids), grid))
            ids.extend([config.image_token_id if kind == 1 else config.video_token_id] * (grid[0] * per_frame))
            types.extend([kind] * (grid[0] * per_frame))
            mark(config.vision_end_token_id)
        text(rng.randint(0, 9))
    text(rng.randint(1, 6))  # a prompt ends in text
    return {
        "ids": ids,
        "types": types,
        "images": images,
        "videos": videos,
        "seconds": seconds if with_seconds else None,
        "features": features,
    }


def left_padded(batch: list[dict], pad_id: int) -> dict:
    longest = max(len(s["ids"]) for s in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    types = torch.zeros((len(batch), longest), dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for r, s in enumerate(batch):
        n = len(s["ids"])
        ids[r, longest - n :], types[r, longest - n :], mask[r, longest - n :] = (
            torch.tensor(s["ids"]),
            torch.tensor(s["types"]),
            1,
        )
    images = [g for s in batch for g in s["images"]]
    videos = [g for s in batch for g in s["videos"]]
    out = {
        "input_ids": ids,
        "mm_token_type_ids": types,
        "attention_mask": mask,
        "image_grid_thw": torch.tensor(images) if images else None,
        "video_grid_thw": torch.tensor(videos) if videos else None,
        "second_per_grid_ts": None,
    }
    if batch[0]["seconds"] is not None and videos:
        out["second_per_grid_ts"] = torch.tensor([x for s in batch for x in s["seconds"]], dtype=torch.float32)
    return out
