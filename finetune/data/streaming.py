"""Streaming mode (`data.streaming=true`): training batches from records read as a stream, for sets too large to
index on one node (10M+ samples).

Each rank reads every `world_size`-th record (JSONL lines of other ranks are skipped without being parsed),
counts it exactly as the indexed mode does (the encoder's own `count_tokens`), and fills a look-ahead buffer of
`data.stream_buffer` samples. A full buffer is packed with the
trainer's own `pack_rows` and its rows are handed out in a seeded order, `rows_per_batch` per batch; rows left
over join the next buffer's batches. The DataLoader workers of a rank share its batches: each decodes every
`workers`-th one. The stream never ends (passes repeat with a new order), so every rank takes
every step: `trainer.max_steps` sets the length of the run.

With one process and no workers, a dataset that fits one buffer gives the very rows, order and batches of the
indexed mode. A sample that cannot be trained on (a reading, counting or decoding problem) is a bad sample:
skipped, listed in bad_samples.jsonl and bounded by `data.max_bad_samples`, as decode failures are in the
indexed mode. Resuming skips the batches already trained by counting (never decoding) their records.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from finetune.base.errors import DataError
from finetune.data.conversation import Sample
from finetune.data.modes import OverLength
from finetune.data.prepare import drop_trailing_turns
from finetune.data.sources import DatasetSource, iter_records, to_sample


def shard_records(sources: list[DatasetSource], shard: int, shards: int):
    """(record number, location, record or DataError) of one shard, in file order across the sources."""
    number = 0
    for source in sources:
        if source.path.suffix.lower() == ".jsonl":  # lines of other shards are not even parsed
            with open(source.path, "rb") as f:
                for line_no, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    if number % shards == shard:
                        where = f"{source.path}:{line_no}"
                        try:
                            yield number, where, json.loads(raw.decode("utf-8")), source
                        except (UnicodeDecodeError, json.JSONDecodeError) as err:
                            yield number, where, DataError(f"{where}: not a UTF-8 JSON line ({err}).", "format"), source
                    number += 1
        else:
            for where, record in iter_records(source.path):
                if number % shards == shard:
                    yield number, where, record, source
                number += 1


class StreamingBatches(torch.utils.data.IterableDataset):
    """Infinite training batches of one rank, built as the module docstring says."""

    def __init__(
        self,
        sources: list[DatasetSource],
        encoder,
        collator,
        *,
        budget: int,
        packing: bool,
        rows_per_batch: int,
        seed: int,
        rank: int,
        world_size: int,
        buffer_size: int,
        over_length: OverLength,
        skip_batches: int = 0,
    ):
        super().__init__()
        self.sources, self.encoder, self.collator = sources, encoder, collator  # a RowCollator
        self.budget, self.packing, self.rows_per_batch, self.seed = budget, packing, rows_per_batch, seed
        self.rank, self.world_size, self.buffer_size = rank, world_size, buffer_size
        self.drop_trailing_turns = OverLength(over_length) is OverLength.DROP_TRAILING_TURNS
        self.skip_batches = skip_batches  # batches of this rank already trained (resume)

    def _samples(self, shard: int, shards: int, problems: list[dict]):
        """(sample, total tokens) of one pass over the shard; problems are appended as bad-sample entries."""
        for number, where, record, source in shard_records(self.sources, shard, shards):
            try:
                sample = to_sample(record, number, where, source.root)
                count = self.encoder.count_tokens(sample)
                if count.total > self.budget:
                    fitted = (
                        drop_trailing_turns(sample, self.encoder, self.budget) if self.drop_trailing_turns else None
                    )
                    if fitted is None:
                        raise DataError(
                            f"{sample.source}: {count.total} tokens, over the {self.budget}-token limit.", "too_long"
                        )
                    sample = Sample(sample.id, sample.messages[: fitted[0]], sample.source, sample.extra)
                    count = fitted[1]
            except DataError as err:
                problems.append(
                    {
                        "id": str(record.get("id", number)) if isinstance(record, dict) else str(number),
                        "source": where,
                        "kind": err.kind,
                        "error": str(err),
                    }
                )
                continue
            yield sample, count.total

    def _rows(self, buffer: list[tuple[Sample, int]], pass_number: int, buffer_number: int):
        from finetune.data.packing import pack_rows

        lengths = [n for _, n in buffer]
        # The indexed mode's seeds: pack_rows(seed) and the row order of RowBatchSampler (seed + 1 + epoch).
        salt = buffer_number * 1_000_003
        rows = pack_rows(lengths, self.budget, self.seed + salt) if self.packing else [(i,) for i in range(len(buffer))]
        order = list(range(len(rows)))
        random.Random(self.seed + 1 + pass_number + salt).shuffle(order)
        return [[buffer[i][0] for i in rows[k]] for k in order]

    def _batches(self, problems: list[dict]):
        """The rank's endless sequence of batches as rows of samples (nothing decoded yet)."""
        pending: list[list[Sample]] = []  # rows not yet handed out
        pass_number = 0
        while True:
            buffer, buffer_number, seen = [], 0, False
            for item in self._samples(self.rank, self.world_size, problems):
                seen = True
                buffer.append(item)
                if len(buffer) == self.buffer_size:
                    pending += self._rows(buffer, pass_number, buffer_number)
                    buffer, buffer_number = [], buffer_number + 1
                yield from self._full_batches(pending)
            if not seen:
                raise DataError(
                    f"streaming: rank {self.rank} of {self.world_size} found no usable sample in its share "
                    "of the records (every world_size-th record). Check the data with python -m "
                    "finetune.validate, or use data.streaming=false."
                )
            if buffer:
                pending += self._rows(buffer, pass_number, buffer_number)
            yield from self._full_batches(pending)
            pass_number += 1

    def _full_batches(self, pending: list[list[Sample]]):
        """Every full batch of the pending rows, taken off the list (the rest waits for the next buffer)."""
        while len(pending) >= self.rows_per_batch:
            yield pending[: self.rows_per_batch]
            del pending[: self.rows_per_batch]

    def __iter__(self):
        # Every worker of a rank follows the rank's whole sequence (reading and counting are cheap) and decodes
        # only the batches it serves: the DataLoader takes batch k from worker k % workers, counted from where
        # this run starts. So the batches, and a resume, do not depend on the number of workers.
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        problems: list[dict] = []
        for number, rows in enumerate(self._batches(problems)):
            found, problems[:] = list(problems), []  # reported once: with the batch that follows them
            if number < self.skip_batches or (number - self.skip_batches) % workers != worker:
                continue
            yield self._collate(rows, found)

    def _collate(self, rows: list[list[Sample]], problems: list[dict]) -> dict:
        batch = self.collator.batch(rows)
        batch["bad_samples"] = problems + batch["bad_samples"]
        return batch


def checkpoint_step(checkpoint: str | None) -> int:
    """The optimizer step a checkpoint was written at (0 without one)."""
    if not checkpoint:
        return 0
    state = Path(checkpoint) / "trainer_state.json"
    return int(json.loads(state.read_text())["global_step"]) if state.exists() else 0
