"""Data-path speed, measured side by side in one run on the same generated files.

    .venv/bin/python benchmarks/data_pipeline.py [--videos 6] [--seconds 30] [--fps 30] [--size 640x360]

1. Video samples/s: our path (probe -> plan -> decode only the sampled frames -> resize) with torchcodec and
   with PyAV, against decoding every frame and then subsampling. The frames must be identical.
2. Pre-pass samples/s (token counts from headers only) against full encoding through the processor, on a
   mixed image/video dataset. The counts must be identical.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import finetune.data.media as media  # noqa: E402
from finetune.data.vision import VisionSettings  # noqa: E402

SETTINGS = VisionSettings(3136, 1003520, 2.0, 4, 768, 100352, 602112, 90316800.0)


def write_video(path: Path, seconds: int, fps: int, width: int, height: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "x264-params": f"keyint={2 * fps}"}  # a keyframe every 2 s
        for i in range(seconds * fps):
            frame = np.roll(base, 4 * i, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def timed(fn, items, repeat: int = 1):
    fn(items[0])  # warm-up: library loading and first-call costs are not throughput
    start = time.perf_counter()
    for _ in range(repeat):
        results = [fn(item) for item in items]
    return results, len(items) * repeat / (time.perf_counter() - start)


def video_benchmark(paths: list[str]) -> None:
    spec = SETTINGS.video_spec({})

    def ours(path, backend):
        media._backend = backend
        info = media.probe_video(path)
        plan = spec.plan(info.total_frames, info.fps, info.height, info.width)
        return media.decode_frames(info, plan.indices)

    def decode_everything(path):
        info = media.probe_video(path)
        plan = spec.plan(info.total_frames, info.fps, info.height, info.width)
        return media.decode_all_then_pick(path, plan.indices)

    naive, naive_rate = timed(decode_everything, paths)
    pyav, pyav_rate = timed(lambda p: ours(p, "pyav"), paths)
    rows = [
        ("decode every frame, then subsample (PyAV)", naive_rate),
        ("ours: seek to sampled frames (PyAV)", pyav_rate),
    ]
    assert all(np.array_equal(a, b) for a, b in zip(naive, pyav)), "PyAV seeking returned different frames"
    try:
        codec, codec_rate = timed(lambda p: ours(p, "torchcodec"), paths)
        same = all(np.abs(a.astype(int) - b.astype(int)).max() <= 2 for a, b in zip(naive, codec))
        rows.append(("ours: seek to sampled frames (torchcodec)", codec_rate))
        assert same, "torchcodec returned different frames"
    except Exception as err:  # no system FFmpeg: torchcodec cannot run here
        print(f"(torchcodec not measured: {str(err).splitlines()[0][:100]})")
    print(f"\nvideo path, {len(paths)} videos, {len(naive[0])} frames sampled of each (frames identical):")
    for name, rate in rows:
        print(f"  {name:<45} {rate:8.2f} videos/s  {rate / naive_rate:6.1f}x")


def prepass_benchmark(root: Path, videos: list[str], n_images: int) -> None:
    from transformers import AutoProcessor

    from finetune.data.conversation import Sample
    from finetune.data.encode import ConversationEncoder
    from finetune.model.tiny import tiny_checkpoint

    rng = np.random.default_rng(0)
    samples = []
    for i in range(n_images):
        w, h = int(rng.integers(200, 1600)), int(rng.integers(200, 1200))
        path = root / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
        samples.append(
            Sample(
                f"i{i}",
                [
                    {
                        "role": "user",
                        "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": "What is it?"}],
                    },
                    {"role": "assistant", "content": [{"type": "text", "text": "Noise."}]},
                ],
                f"img{i}",
            )
        )
    for i, path in enumerate(videos):
        samples.append(
            Sample(
                f"v{i}",
                [
                    {
                        "role": "user",
                        "content": [{"type": "video", "video": path}, {"type": "text", "text": "What moves?"}],
                    },
                    {"role": "assistant", "content": [{"type": "text", "text": "Noise."}]},
                ],
                f"vid{i}",
            )
        )
    encoder = ConversationEncoder(AutoProcessor.from_pretrained(tiny_checkpoint("qwen2_5_vl")), SETTINGS)
    start = time.perf_counter()
    counts = [encoder.count_tokens(s) for s in samples]  # one process (benchmarks/data_scale.py: on every core)
    prepass_rate = len(samples) / (time.perf_counter() - start)
    media._backend = None
    encoded, encode_rate = timed(encoder.encode, samples)
    assert [c.total for c in counts] == [len(e.input_ids) for e in encoded], "pre-pass counts differ"
    print(
        f"\ntoken counts, {len(samples)} samples ({n_images} images of 0.04-1.9 MP, {len(videos)} videos), identical counts:"
    )
    print(f"  {'full encoding (decode + resize + processor)':<45} {encode_rate:8.2f} samples/s   1.0x")
    print(
        f"  {'ours: pre-pass from headers only':<45} {prepass_rate:8.2f} samples/s {prepass_rate / encode_rate:6.1f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--size", default="640x360")
    parser.add_argument("--images", type=int, default=40)
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = []
        for i in range(args.videos):
            paths.append(str(root / f"v{i}.mp4"))
            write_video(Path(paths[-1]), args.seconds, args.fps, width, height, seed=i)
        print(
            f"{args.videos} H.264 videos of {args.seconds} s at {args.fps} fps, {width}x{height}, keyframe every 2 s; "
            f"sampling at {SETTINGS.video_fps} fps"
        )
        video_benchmark(paths)
        prepass_benchmark(root, paths, args.images)


if __name__ == "__main__":
    main()
