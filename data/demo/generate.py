"""Generate the tiny synthetic demo dataset (image colour QA + video direction QA).

The demo trains a tiny random-init Qwen-VL (frozen vision tower, LoRA on a 2-layer
LLM) on CPU, so both tasks are chosen to be separable from very coarse features:
a big saturated shape on black (colour), and a large white dot travelling most of
the frame on black (direction). Everything derives from --seed, so reruns give
byte-identical JSON/PNGs and identical decoded video frames.

    python data/demo/generate.py [--out data/demo] [--seed 0] \
        [--train-per-task 600] [--test-per-task 100] [--size 56]
"""
import argparse
import json
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30),
           "blue": (40, 60, 230), "yellow": (230, 220, 30)}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
IMAGE_Q = "<image>What color is the shape?"
VIDEO_Q = "<video>Which direction does the dot move?"
N_FRAMES, FPS = 8, 4
# x264 knobs: keyint=4 -> two keyframes per clip so decoders can seek; no
# B-frames/scenecut keeps the stream simple; one thread makes output deterministic.
X264_OPTS = {"crf": "18", "preset": "medium", "threads": "1",
             "x264-params": "keyint=4:min-keyint=4:scenecut=0:bframes=0:threads=1"}


def balanced_labels(rng, classes, n):
    """Equal count per class, in random order (n must divide evenly)."""
    if n % len(classes):
        raise SystemExit(f"per-task count {n} must be a multiple of {len(classes)}")
    labels = np.repeat(np.array(classes), n // len(classes))
    return [str(x) for x in rng.permutation(labels)]


def draw_shape_image(rng, colour, size):
    """Black canvas with one big filled circle/square/triangle (shape is a distractor)."""
    rgb = np.clip(np.array(COLOURS[colour]) + rng.integers(-15, 16, 3), 0, 255)
    r = int(rng.integers(14, 25))                  # radius / half-side in px
    lo, hi = r, size - 1 - r                        # keep the shape fully inside
    cx, cy = (int(v) for v in rng.integers(lo, max(lo, hi) + 1, 2))
    kind = ("circle", "square", "triangle")[int(rng.integers(3))]
    img = Image.new("RGB", (size, size), (0, 0, 0))
    d, fill = ImageDraw.Draw(img), tuple(int(c) for c in rgb)
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        d.ellipse(box, fill=fill)
    elif kind == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def dot_frames(rng, direction, size):
    """(N_FRAMES, size, size, 3) uint8: white dot of radius size/8 crossing 0.5-0.7 of the frame."""
    r = size / 8
    dist = rng.uniform(0.5, 0.7) * size
    dx, dy = DIRECTIONS[direction]
    # start on the main axis so start and end both stay inside the frame
    lo, hi = r, size - 1 - r - dist
    start = rng.uniform(lo, max(lo, hi))
    if dx < 0 or dy < 0:
        start = size - 1 - start                   # mirror: moving towards 0
    other = size / 2 - 0.5 + rng.uniform(-size / 8, size / 8)
    yy, xx = np.mgrid[0:size, 0:size]
    frames = np.zeros((N_FRAMES, size, size, 3), np.uint8)
    for i in range(N_FRAMES):
        main = start + (dx + dy) * dist * i / (N_FRAMES - 1)
        cx, cy = (main, other) if dx else (other, main)
        frames[i][(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = 255
    return frames


def write_mp4(path, frames):
    """H.264/yuv420p at FPS, with bitexact flags so no version/time strings vary."""
    with av.open(str(path), "w", format="mp4",
                 options={"fflags": "+bitexact"}) as c:
        s = c.add_stream("libx264", rate=Fraction(FPS), options=X264_OPTS)
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = "yuv420p"
        s.codec_context.flags |= av.codec.context.Flags.bitexact
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts = i
            c.mux(s.encode(vf))
        c.mux(s.encode())


def check_mp4(path):
    """Fail loudly unless the file decodes to exactly N_FRAMES frames at FPS."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        n = sum(1 for _ in c.decode(s))
        rate = s.average_rate
    if n != N_FRAMES or rate != FPS:
        raise RuntimeError(f"{path}: decoded {n} frames at {rate} fps, "
                           f"expected {N_FRAMES} at {FPS}")


def sample(split, kind, idx, label):
    is_img = kind == "img"
    rel = (f"media/images/{split}-{idx:05d}.png" if is_img
           else f"media/videos/{split}-{idx:05d}.mp4")
    return {"id": f"{kind}-{split}-{idx:05d}",
            "task": "colour" if is_img else "direction",
            "messages": [{"role": "user", "content": IMAGE_Q if is_img else VIDEO_Q},
                         {"role": "assistant", "content": label}],
            ("images" if is_img else "videos"): [rel]}


def make_split(out, split, n, size, seeds):
    """Write n images + n videos for one split; return shuffled sample list."""
    img_rng, vid_rng, mix_rng = (np.random.default_rng(s) for s in seeds)
    samples = []
    for i, label in enumerate(balanced_labels(img_rng, list(COLOURS), n), 1):
        s = sample(split, "img", i, label)
        # PIL writes no metadata chunks by default -> stable bytes
        draw_shape_image(img_rng, label, size).save(out / s["images"][0], format="PNG")
        samples.append(s)
    for i, label in enumerate(balanced_labels(vid_rng, list(DIRECTIONS), n), 1):
        s = sample(split, "vid", i, label)
        write_mp4(out / s["videos"][0], dot_frames(vid_rng, label, size))
        check_mp4(out / s["videos"][0])
        samples.append(s)
    return [samples[j] for j in mix_rng.permutation(len(samples))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-per-task", type=int, default=600)
    ap.add_argument("--test-per-task", type=int, default=100)
    ap.add_argument("--size", type=int, default=56)
    a = ap.parse_args()
    if a.size % 2:
        raise SystemExit("--size must be even (yuv420p)")
    t0 = time.time()
    for sub in ("images", "videos"):
        d = a.out / "media" / sub
        d.mkdir(parents=True, exist_ok=True)
        for old in [*d.glob("*.png"), *d.glob("*.mp4")]:   # drop stale media
            old.unlink()
    # independent streams per (split, role) so test draws never overlap train
    seeds = np.random.SeedSequence(a.seed).spawn(6)
    for split, n, ss in (("train", a.train_per_task, seeds[:3]),
                         ("test", a.test_per_task, seeds[3:])):
        samples = make_split(a.out, split, n, a.size, ss)
        with open(a.out / f"{split}.json", "w", encoding="utf-8") as f:
            json.dump(samples, f, indent=1, ensure_ascii=False)
            f.write("\n")
        print(f"{split}: {len(samples)} samples ({n} image + {n} video)")
    files = [p for p in a.out.rglob("*") if p.is_file() and p.suffix in
             (".png", ".mp4", ".json")]
    total = sum(p.stat().st_size for p in files)
    print(f"wrote {len(files)} files, {total / 1e6:.2f} MB to {a.out} "
          f"in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
