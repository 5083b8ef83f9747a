"""Packing vs padded batching on a mixed image/video/text dataset with a realistic length spread, side by
side in one run, on the same samples (already encoded, so only training compute is timed). Both modes are
what training builds (finetune/model/batching.py): padded = one sample per row padded to the longest of its batch,
packed = rows of whole samples.

    .venv/bin/python benchmarks/packing.py [--samples 256] [--family qwen2_5_vl] [--batch 8] [--row-tokens 4096]

Prints, for each mode: rows (steps x rows), real-token fraction (real tokens / tokens the model computes),
and trained tokens/s of forward + backward + optimizer step with LoRA on the tiny model (CPU, fp32).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.base.families import FAMILIES  # noqa: E402
from finetune.data.conversation import Sample  # noqa: E402
from finetune.data.encode import ConversationEncoder  # noqa: E402
from finetune.data.packing import pack_rows  # noqa: E402
from finetune.data.vision import VisionSettings  # noqa: E402
from finetune.model.batching import training_batch  # noqa: E402
from finetune.model.rope import PositionRule  # noqa: E402

WORDS = "the a dot moves left right up down red green blue small large frame scene person walks runs".split()
SETTINGS = VisionSettings(4 * 784, 256 * 784, 2.0, 4, 16, 32 * 784, 64 * 784, 1024 * 784)


def make_samples(root: Path, n: int, seed: int) -> list[Sample]:
    from tests.helpers.media_factory import write_video

    rng = random.Random(seed)
    images = []
    for i in range(8):
        w, h = rng.randint(100, 600), rng.randint(100, 600)
        images.append(str(root / f"i{i}.png"))
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images[-1])
    videos = [
        str(
            write_video(
                root / f"v{i}.mp4",
                frames=rng.randint(8, 40),
                fps=4,
                width=2 * rng.randint(40, 120),
                height=2 * rng.randint(40, 90),
                seed=i,
            )
        )
        for i in range(6)
    ]
    samples = []
    for i in range(n):
        words = int(min(1500, rng.lognormvariate(4.5, 1.0)))  # long-tailed text lengths
        content = []
        kind = rng.random()
        if kind < 0.35:
            content.append({"type": "image", "image": rng.choice(images)})
        elif kind < 0.55:
            content.append({"type": "video", "video": rng.choice(videos)})
        content.append({"type": "text", "text": " ".join(rng.choice(WORDS) for _ in range(words))})
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60)))
        samples.append(
            Sample(
                str(i),
                [
                    {"role": "user", "content": content},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                ],
                str(i),
            )
        )
    return samples


def train_pass(model, batches: list[dict]) -> tuple[float, int, int]:
    """Seconds for one pass of forward/backward/step over `batches`; real and computed tokens."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model(**{k: v for k, v in batches[0].items() if k != "num_real_tokens"}, use_cache=False).loss.backward()  # warm-up
    optimizer.zero_grad()
    start = time.perf_counter()
    for batch in batches:
        model(**{k: v for k, v in batch.items() if k != "num_real_tokens"}, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    seconds = time.perf_counter() - start
    computed = sum(b["input_ids"].numel() for b in batches)
    real = sum(int(b["num_real_tokens"]) for b in batches)
    return seconds, real, computed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--family", default="qwen2_5_vl", choices=sorted(FAMILIES))
    parser.add_argument("--batch", type=int, default=8, help="samples per padded batch")
    parser.add_argument("--row-tokens", type=int, default=2048)
    parser.add_argument(
        "--hidden",
        type=int,
        default=64,
        help="LLM width: 64 is the tiny test model; wider makes the linear layers dominate as in real models",
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from finetune.model.tiny import tiny_checkpoint
    from finetune.model.trainable import default_lora_patterns

    path = tiny_checkpoint(args.family)
    processor = AutoProcessor.from_pretrained(path)
    encoder = ConversationEncoder(processor, SETTINGS)
    with tempfile.TemporaryDirectory() as tmp:
        samples = make_samples(Path(tmp), args.samples, seed=0)
        encoded = [encoder.encode(s) for s in samples]
    lengths = [len(e.input_ids) for e in encoded]
    pad_id = processor.tokenizer.pad_token_id
    torch.manual_seed(0)
    config = AutoModelForImageTextToText.from_pretrained(path).config
    heads = max(4, args.hidden // 64)
    config.text_config.update(
        {
            "hidden_size": args.hidden,
            "intermediate_size": 4 * args.hidden,
            "num_attention_heads": heads,
            "num_key_value_heads": heads // 2,
            "num_hidden_layers": args.layers,
            "layer_types": ["full_attention"] * args.layers,
        }
    )
    head_dim = args.hidden // heads
    config.text_config.rope_parameters["mrope_section"] = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    setattr(config.vision_config, FAMILIES[args.family].merger_width, args.hidden)  # the merger feeds the LLM
    model = AutoModelForImageTextToText.from_config(config)
    targets = default_lora_patterns(FAMILIES[args.family])["llm"]  # the LLM's, as training picks them
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    rule = PositionRule.for_model(model.config, "qwen")

    order = list(range(len(encoded)))
    random.Random(1).shuffle(order)
    padded = [
        training_batch([[encoded[i]] for i in order[s : s + args.batch]], pad_id, rule)
        for s in range(0, len(order), args.batch)
    ]
    rows = pack_rows(lengths, args.row_tokens, seed=1)
    packed = [training_batch([[encoded[i] for i in row]], pad_id, rule) for row in rows]
    trained = sum(sum(label != -100 for label in e.labels[1:]) for e in encoded)

    print(
        f"{len(encoded)} samples ({args.family}, LLM hidden {args.hidden} x {args.layers} layers, LoRA r=8, CPU fp32, "
        f"rows of {args.row_tokens} tokens vs batches of {args.batch}): tokens per sample min {min(lengths)}, "
        f"median {int(np.median(lengths))}, p95 {int(np.percentile(lengths, 95))}, max {max(lengths)}; "
        f"{sum(lengths):,} real tokens, {trained:,} trained"
    )
    results, timings = {}, {"padded batching": [], "packing": []}
    for _ in range(args.repeats):  # alternate the modes and keep each one's best pass: robust to machine noise
        for name, batches in (("padded batching", padded), ("packing", packed)):
            timings[name].append(train_pass(model, batches))
    for name, batches in (("padded batching", padded), ("packing", packed)):
        seconds, real, computed = min(timings[name])
        results[name] = trained / seconds
        print(
            f"  {name:<16} {len(batches):>4} steps  real-token fraction {real / computed:6.3f}  "
            f"{trained / seconds:9.1f} trained tokens/s  {real / seconds:9.1f} real tokens/s"
        )
    print(
        f"  packing / padded: {results['packing'] / results['padded batching']:.2f}x trained tokens/s; rows filled to "
        f"{sum(lengths) / (len(rows) * args.row_tokens):.1%} of {args.row_tokens} tokens"
    )


if __name__ == "__main__":
    main()
