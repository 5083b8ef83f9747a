"""Qwen's fine-tuning rope2d.py (`get_rope_index_3`) against transformers 4.57.0's Qwen3-VL `get_rope_index`, the
reference the position tests run (tests/helpers/qwen_reference.py).

rope2d.py lives only on GitHub (QwenLM/Qwen3-VL `qwen-vl-finetune/qwenvl/data/rope2d.py`), which CI and the
development machines cannot reach; where a copy is at hand:

    python -m tests.helpers.rope2d_crosscheck path/to/rope2d.py [--sequences 1000]

It builds the position tests' random sequences (same generator and seeds, with the real checkpoints' vision token
ids, which rope2d.py hard-codes), one at a time and in left-padded batches of 4, and exits 1 on the first sequence
where the two differ. The file is only read and run here, never stored in the repository.
"""

import argparse
import hashlib
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from tests.helpers.qwen_reference import reference_get_rope_index
from tests.helpers.random_positions import left_padded, random_sequence

# The last commit that changed rope2d.py and the file's sha256 there, as checked on 2026-11-29.
ROPE2D_COMMIT = "d2709b2dde98ddde49de979019b2670fb11b81ad"
ROPE2D_SHA256 = "97c9f8f49a3a1f782f6dacea538e3032fadfe24e5b60a630d3ae62053250542c"
# The Qwen3-VL checkpoints' ids (config.json), which rope2d.py hard-codes.
QWEN3_CONFIG = SimpleNamespace(
    image_token_id=151655,
    video_token_id=151656,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
    vision_config=SimpleNamespace(spatial_merge_size=2, tokens_per_second=None),
)
SEEDS = {"qwen3_vl": 102, "qwen3_vl_moe": 103}  # test_rope.py: 100 + the family's index in the registry


def crosscheck(rope2d_path: Path, sequences: int) -> int:
    source = rope2d_path.read_bytes()
    digest = hashlib.sha256(source).hexdigest()
    namespace: dict = {}
    exec(compile(source, str(rope2d_path), "exec"), namespace)
    rope2d = namespace["get_rope_index_3"]
    compared = 0
    for family, seed in SEEDS.items():
        reference = reference_get_rope_index(family)
        stand_in = SimpleNamespace(config=QWEN3_CONFIG)
        rng = random.Random(seed)
        samples = [random_sequence(rng, QWEN3_CONFIG, with_seconds=False, frames=True) for _ in range(sequences)]
        batches = [[s] for s in samples] + [samples[i : i + 4] for i in range(0, sequences, 4)]
        for batch in batches:
            padded = left_padded(batch, pad_id=0)
            grids = {k: padded[k] for k in ("image_grid_thw", "video_grid_thw")}
            ours = reference(stand_in, padded["input_ids"], attention_mask=padded["attention_mask"], **grids)
            theirs = rope2d(2, padded["input_ids"], *grids.values(), None, padded["attention_mask"])
            real = padded["attention_mask"].bool()
            if not (torch.equal(ours[0][:, real], theirs[0][:, real]) and torch.equal(ours[1], theirs[1])):
                print(f"{family}: rope2d.py and transformers 4.57.0 differ on {[s['ids'] for s in batch]}")
                return 1
            compared += 1
        print(f"{family}: {len(batches)} batches ({sequences} sequences alone, then by 4) equal")
    note = "" if digest == ROPE2D_SHA256 else f" (not the pinned file of {ROPE2D_COMMIT[:12]})"
    print(f"rope2d.py sha256 {digest}{note}: {compared} comparisons, all equal")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rope2d", type=Path, help="a copy of QwenLM/Qwen3-VL qwen-vl-finetune/qwenvl/data/rope2d.py")
    parser.add_argument("--sequences", type=int, default=1000)
    args = parser.parse_args(argv)
    return crosscheck(args.rope2d, args.sequences)


if __name__ == "__main__":
    sys.exit(main())
