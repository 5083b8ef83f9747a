"""Every batch the model sees is built here, with position ids from `finetune/model/rope.py`.

Training batches are made of rows. A row holds one sample (`trainer.packing=false`) or several whole samples
(packing); either way the layout is the same (TRAINING_KEYS):
  - no `attention_mask`: `position_ids` has 4 rows, row 0 the plain text positions restarting at 0 for every
    sample, rows 1-3 the sample's own M-RoPE ids. transformers 5.23 (Qwen2-VL/2.5-VL text model,
    `masking_utils.find_packed_sequence_indices`) reads the sample boundaries from row 0: a block-diagonal
    causal mask with sdpa/eager, varlen lengths with flash-attention. The padding at the end of a short row
    is one more block, with no loss.
  - labels keep each sample's own targets; a sample's first token is never a target (in a packed row it
    would be predicted from the previous sample).
  - `num_real_tokens`: the tokens that are not padding (the trainer logs tokens/s from it).
  - with `boundaries=True` (varlen attention, finetune/model/attention.py): `cu_seq_lens_q/k`, the cumulative sample
    lengths over the flattened rows (each row's padding one more sequence), and `max_length_q/k`, the longest, as
    a Python int: computed here on the CPU, so no layer recomputes them or waits for the GPU to count them.
Inference batches (INFERENCE_KEYS: evaluation, export checks, prediction) are padded with an attention mask,
left-padded for generation, and carry the same rule's (3, B, L) position ids.

One DataLoader serves both training modes: `RowBatchSampler` (finetune/data/packing.py) hands out rows, the
collator encodes their samples (decoding media in the data-loader workers) and builds the batch.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from finetune.base.errors import DataError
from finetune.data.encode import IGNORE_INDEX, EncodedSample
from finetune.model.attention import BOUNDARY_KEYS
from finetune.model.rope import PositionRule, batch_position_ids

VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
# `sample_ids` (per row) and `bad_samples` are bookkeeping the trainer pops before the forward.
TRAINING_KEYS = (
    (
        "input_ids",
        "labels",
        "mm_token_type_ids",
        "position_ids",
        "num_real_tokens",
        "sample_ids",
        "bad_samples",
    )
    + VISION_KEYS
    + BOUNDARY_KEYS
)
INFERENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "position_ids") + VISION_KEYS


def vision_inputs(encoded: list[EncodedSample]) -> dict:
    """Pixels, grids and (Qwen2.5-VL) seconds per temporal patch of all samples, in sample order."""
    inputs = {}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [getattr(e, key) for e in encoded if getattr(e, key) is not None]
        if parts:
            inputs[key] = torch.cat(parts)
    seconds = [s for e in encoded for s in (e.second_per_grid_ts or [])]
    if seconds:
        inputs["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
    return inputs


def sample_positions(sample: EncodedSample, rule: PositionRule) -> torch.Tensor:
    """(3, L) M-RoPE ids of one encoded sample."""
    return rule.sample(
        sample.mm_token_type_ids,
        _grids(sample.image_grid_thw),
        _grids(sample.video_grid_thw),
        sample.second_per_grid_ts,
    )


def training_batch(
    rows: list[list[EncodedSample]], pad_token_id: int, rule: PositionRule, boundaries: bool = False
) -> dict:
    """One training batch of rows (lists of encoded samples), laid out as the module docstring says."""
    longest = max(sum(len(s.input_ids) for s in row) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    types = torch.zeros((len(rows), longest), dtype=torch.long)
    position_ids = torch.zeros((4, len(rows), longest), dtype=torch.long)
    for r, row in enumerate(rows):
        offset = 0
        for s in row:
            n = len(s.input_ids)
            span = slice(offset, offset + n)
            input_ids[r, span] = torch.tensor(s.input_ids)
            labels[r, span] = torch.tensor([IGNORE_INDEX] + s.labels[1:])
            types[r, span] = torch.tensor(s.mm_token_type_ids)
            position_ids[0, r, span] = torch.arange(n)
            position_ids[1:, r, span] = sample_positions(s, rule)
            offset += n
        position_ids[:, r, offset:] = torch.arange(longest - offset)  # padding: a block of its own
    real = sum(len(s.input_ids) for row in rows for s in row)
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "mm_token_type_ids": types,
        "position_ids": position_ids,
        "num_real_tokens": torch.tensor(real),
    }
    if boundaries:
        batch.update(sequence_boundaries(rows, longest))
    return {**batch, **vision_inputs([s for row in rows for s in row])}


def sequence_boundaries(rows: list[list[EncodedSample]], longest: int) -> dict:
    """`cu_seq_lens_q/k` and `max_length_q/k` of the rows flattened into one sequence of len(rows) x longest."""
    lengths = []
    for row in rows:
        lengths += [len(s.input_ids) for s in row]
        padding = longest - sum(len(s.input_ids) for s in row)
        if padding:
            lengths.append(padding)
    cumulative = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return {
        "cu_seq_lens_q": cumulative,
        "cu_seq_lens_k": cumulative,
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
    }


def inference_batch(
    encoded: list[EncodedSample], pad_token_id: int, rule: PositionRule, padding_side: str = "left"
) -> dict:
    """Samples padded to the longest with an attention mask (left-padded by default: generation continues every
    row), `labels` included, and the rule's (3, B, L) position ids (0 on padding)."""
    longest = max(len(e.input_ids) for e in encoded)

    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        out = torch.full((len(rows), longest), value, dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(0, len(row)) if padding_side == "right" else slice(longest - len(row), longest)
            out[i, span] = torch.tensor(row, dtype=torch.long)
        return out

    batch = {
        "input_ids": pad([e.input_ids for e in encoded], pad_token_id),
        "attention_mask": pad([[1] * len(e.input_ids) for e in encoded], 0),
        "mm_token_type_ids": pad([e.mm_token_type_ids for e in encoded], 0),
        "labels": pad([e.labels for e in encoded], IGNORE_INDEX),
        **vision_inputs(encoded),
    }
    batch["position_ids"], _ = batch_position_ids(
        rule,
        batch["mm_token_type_ids"],
        batch.get("image_grid_thw"),
        batch.get("video_grid_thw"),
        batch.get("second_per_grid_ts"),
        batch["attention_mask"],
    )
    return batch


class StandInCollator:
    """What the training collators share: a batch that loses every sample (all failed to decode) is replaced by a
    stand-in (the first that encoded, no label trained: `_encode` keeps it in `_stand_in`), so that every rank still
    takes every step."""

    _stand_in = None

    def _find_stand_in(self, items, message: str, bad: list[dict]):
        """The stand-in, encoding `items` in turn until one encodes if none has yet; none does: `message` with the
        first errors."""
        for item in items:
            if self._stand_in is not None:
                break
            self._encode(item, [])
        if self._stand_in is None:
            raise DataError(f"{message}:\n" + "\n".join(b["error"] for b in bad[:5]))
        return self._stand_in


class RowCollator(StandInCollator):
    """For the training DataLoader: a list of rows (tuples of sample indices) -> `training_batch`.

    A sample that fails to encode (media corrupt past the header, which the pre-pass cannot see) is left out of
    its row and reported in the batch (`bad_samples`: id, source, problem class, message); the trainer counts
    it and stops past `data.max_bad_samples`. A batch that loses every sample is replaced by a stand-in (a sample
    that encoded, with no trained tokens), so every rank still takes every step."""

    def __init__(self, encoder, samples, rule: PositionRule, boundaries: bool = False):
        self.encoder, self.samples, self.rule, self.boundaries = encoder, samples, rule, boundaries
        self.pad_token_id = encoder.tokenizer.pad_token_id
        self._stand_in: EncodedSample | None = None

    def _encode(self, sample, bad: list[dict]) -> EncodedSample | None:
        try:
            encoded = self.encoder.encode(sample)
        except DataError as err:
            bad.append({"id": sample.id, "source": sample.source, "kind": err.kind, "error": str(err)})
            return None
        if self._stand_in is None:
            self._stand_in = replace(encoded, labels=[IGNORE_INDEX] * len(encoded.labels))
        return encoded

    def __call__(self, rows: list[tuple[int, ...]]) -> dict:
        return self.batch([[self.samples[i] for i in row] for row in rows])

    def batch(self, rows: list[list]) -> dict:
        """The training batch of rows given as lists of Samples (streaming mode calls this directly)."""
        bad: list[dict] = []
        kept = []  # rows of (encoded sample, id)
        for row in rows:
            pairs = [(e, sample.id) for sample in row if (e := self._encode(sample, bad)) is not None]
            if pairs:
                kept.append(pairs)
        if not kept:
            message = "no training sample can be encoded (every one failed to decode)"
            kept = [[(self._find_stand_in(self.samples or [], message, bad), None)]]
        batch = training_batch([[e for e, _ in row] for row in kept], self.pad_token_id, self.rule, self.boundaries)
        batch["sample_ids"] = [[sid for _, sid in row if sid is not None] for row in kept]
        batch["bad_samples"] = bad
        return batch


class RowIndex:
    """The dataset a DataLoader indexes with rows: item `row` is the row itself."""

    def __getitem__(self, row):
        return row


def training_loader(
    rows: list[tuple[int, ...]],
    collator: RowCollator,
    rows_per_batch: int,
    seed: int,
    world_size: int,
    num_workers: int,
    sequence_parallel: int = 1,
):
    """The one training DataLoader: `rows_per_batch` rows per step and device, reshuffled every epoch. With
    `sequence_parallel` N > 1, each group of N consecutive ranks gets the same rows (the data-parallel world is
    world_size / N)."""
    from torch.utils.data import DataLoader

    from finetune.data.packing import RowBatchSampler
    from finetune.model.sequence_parallel import SequenceParallelSampler

    sampler = RowBatchSampler(rows, rows_per_batch, seed, world_size // sequence_parallel)
    if sequence_parallel > 1:
        sampler = SequenceParallelSampler(sampler, sequence_parallel)
    return DataLoader(RowIndex(), batch_sampler=sampler, collate_fn=collator, num_workers=num_workers)


def _grids(grid: torch.Tensor | None) -> list[tuple[int, int, int]]:
    return [] if grid is None else [tuple(g) for g in grid.tolist()]
