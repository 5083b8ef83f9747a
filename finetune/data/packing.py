"""Rows of samples and their order: token-budget packing and the per-step sampler.

- `pack_rows`: best-fit decreasing over seeded random windows of samples, using the pre-pass token counts.
- `training_rows`: packed rows, or one sample per row without packing.
- `RowBatchSampler`: rows in a reshuffled order every epoch; every step has the same number of rows on
  every data-parallel rank (the tail wraps around instead of leaving a rank short).
How a row becomes a batch (per-sample M-RoPE, isolated attention): finetune/model/batching.py.
"""

from __future__ import annotations

import bisect
import math
import random

PACK_WINDOW = 4096  # samples packed together; larger fills rows a little better, smaller mixes them more


def pack_rows(lengths: list[int], budget: int, seed: int, window: int = PACK_WINDOW) -> list[tuple[int, ...]]:
    """Sample indices grouped into rows of at most `budget` tokens (best-fit decreasing per random window)."""
    too_long = [i for i, n in enumerate(lengths) if n > budget]
    if too_long:
        raise ValueError(f"{len(too_long)} samples are longer than the {budget}-token row budget (e.g. #{too_long[0]})")
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    rows: list[list[int]] = []
    for begin in range(0, len(order), window):
        chunk = sorted(order[begin : begin + window], key=lambda i: -lengths[i])  # stable: ties stay shuffled
        room: list[tuple[int, int]] = []  # (free tokens, row id), sorted
        for i in chunk:
            at = bisect.bisect_left(room, (lengths[i], -1))  # the fullest row that still fits
            if at < len(room):
                free, row = room.pop(at)
            else:
                free, row = budget, len(rows)
                rows.append([])
            rows[row].append(i)
            bisect.insort(room, (free - lengths[i], row))
    return [tuple(row) for row in rows]


def training_rows(lengths: list[int], packing: bool, budget: int, seed: int) -> list[tuple[int, ...]]:
    """Packed rows of at most `budget` tokens, or one sample per row."""
    return pack_rows(lengths, budget, seed) if packing else [(i,) for i in range(len(lengths))]


class RowBatchSampler:
    """Yields, per step, `rows_per_batch` rows (tuples of sample indices) for one device. Accelerate hands
    batch k to rank k % world, so the number of batches is made a multiple of `world_size`."""

    def __init__(self, rows: list[tuple[int, ...]], rows_per_batch: int, seed: int, world_size: int = 1):
        if not rows:
            raise ValueError("no rows to train on")
        self.rows = rows
        self.rows_per_batch, self.seed, self.world_size, self.epoch = rows_per_batch, seed, world_size, 0
        self.batch_size, self.drop_last = rows_per_batch, False  # what accelerate's batch-sampler sharding reads
        per_step = rows_per_batch * world_size
        self.num_batches = math.ceil(len(self.rows) / per_step) * world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        order = list(range(len(self.rows)))
        random.Random(self.seed + 1 + self.epoch).shuffle(order)
        needed = self.num_batches * self.rows_per_batch
        order = (order * math.ceil(needed / len(order)))[:needed]  # the tail wraps around: full steps everywhere
        for start in range(0, needed, self.rows_per_batch):
            yield [self.rows[i] for i in order[start : start + self.rows_per_batch]]
