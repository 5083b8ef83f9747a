"""Broken files of the kinds users have: cut in half, overwritten indexes, decompression bombs, odd encodings."""

from __future__ import annotations

import json
import random
import struct
import zlib
from pathlib import Path

from tests.helpers import DEMO
from tests.helpers.media_factory import write_image, write_video
from tests.helpers.recipe_runs import mini_dataset


def cut_jpeg(path: Path) -> Path:
    """A JPEG cut in half: the header reads fine, the pixels do not."""
    write_image(path, 320, 240, seed=1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def cut_faststart_mp4(path: Path) -> Path:
    """A fast-start MP4 (index first) cut in half: the index announces frames the file no longer holds."""
    write_video(path, frames=120, fps=24, width=160, height=120, seed=2, faststart=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def garbage_ctts_mp4(path: Path) -> Path:
    """An MP4 with B-frames whose composition-offset (ctts) table is overwritten with random bytes."""
    write_video(path, frames=120, fps=24, width=160, height=120, seed=3, bframes=2, faststart=True)
    data = bytearray(path.read_bytes())
    at = data.find(b"ctts")
    assert at > 0, "no ctts box was written"
    rng = random.Random(0)
    for i in range(at + 12, at + 12 + 400):
        data[i] = rng.randrange(256)
    path.write_bytes(bytes(data))
    return path


def bomb_png(path: Path, side: int = 30000) -> Path:
    """A PNG header announcing side x side pixels (more than Pillow's decompression-bomb limit), in 69 bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    )
    return path


BAD_IDS = {"bad-cut-video", "bad-ctts-video", "bad-cut-jpeg"}


def dataset_with_bad_media(root):
    """16 good demo samples (absolute media paths) and 3 whose media fail only when decoded."""
    records = json.loads(mini_dataset(root / "good.json", per_task=8).read_text())
    for record in records:
        for key in ("images", "videos"):
            record[key] = [str(DEMO / p) for p in record.get(key, [])]
    question = {"video": "<video>Which direction does the dot move?", "image": "<image>What color is the shape?"}
    for sid, kind, path in [
        ("bad-cut-video", "video", cut_faststart_mp4(root / "cut.mp4")),
        ("bad-ctts-video", "video", garbage_ctts_mp4(root / "ctts.mp4")),
        ("bad-cut-jpeg", "image", cut_jpeg(root / "cut.jpg")),
    ]:
        records.append(
            {
                "id": sid,
                "messages": [{"role": "user", "content": question[kind]}, {"role": "assistant", "content": "left"}],
                kind + "s": [str(path)],
            }
        )
    path = root / "with_bad.json"
    path.write_text(json.dumps(records))
    return path


def bad_overrides(run_dir, data, steps=6, *extra):
    return [
        "experiment=demo",
        "logger=none",
        f"trainer.output_dir={run_dir}",
        f"trainer.max_steps={steps}",
        "trainer.logging_steps=1",
        "trainer.per_device_train_batch_size=4",
        "trainer.warmup_steps=0",
        f"data.train={data}",
        "data.media_root=/",
        "data.eval=null",
        "evaluation.after_training=false",
        "export.after_training=false",
        *extra,
    ]
