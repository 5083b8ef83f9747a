"""Preference batches: B pairs (chosen, rejected) -> 2B sequences in the SFT training layout, with each prompt's
media once.

The sequences are TRL's [chosen..., rejected...] (sequence s < B is pair s's chosen answer, s >= B pair s - B's
rejected one), laid out by `training_batch` (finetune/model/batching.py) exactly as SFT lays out samples: one
sequence per row (padded), or several whole sequences per row (packed, `cu_seq_lens_*` for varlen attention), with
their labels and the recipe's M-RoPE positions. Added to that layout:
  - `sequence_index` (rows, length): the sequence each token belongs to, -1 on padding; the forward reads each
    sequence's completion log-probs from it (finetune/training/preference_forward.py).
  - the pixels of each pair's prompt once (the chosen side's: both sides of a pair share their prompt's media, the
    grids are checked equal), `image_grid_thw`/`video_grid_thw`/`second_per_grid_ts` of those unique items, and
    `image_index`/`video_index`: for every image (video) placeholder block in the flattened rows, in order, the unique
    item whose features fill it. The forward encodes the unique items in one tower call and repeats their features
    by the index, so the vision tower never sees a prompt's media twice.
"""

from __future__ import annotations

import json
from dataclasses import replace

import torch

from finetune.base.errors import DataError
from finetune.data.encode import IGNORE_INDEX, EncodedSample
from finetune.model.batching import StandInCollator, training_batch, vision_inputs
from finetune.model.rope import PositionRule

# Keys this module adds to the SFT training layout; `num_pairs` (B) is an int.
PREFERENCE_KEYS = ("sequence_index", "image_index", "video_index", "num_pairs", "num_sequences", "pair_index")


def pair_media_problem(chosen: EncodedSample, rejected: EncodedSample) -> str | None:
    """Why the two sides of a pair cannot share their prompt's media (None when they can)."""
    for key in ("image_grid_thw", "video_grid_thw"):
        a, b = getattr(chosen, key), getattr(rejected, key)
        if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
            return f"{key} differs between the chosen ({_shape(a)}) and the rejected ({_shape(b)}) side"
    if (chosen.second_per_grid_ts or None) != (rejected.second_per_grid_ts or None):
        return "second_per_grid_ts differs between the chosen and the rejected side"
    return None


def pack_sequences(lengths: list[int], budget: int) -> list[list[int]]:
    """Sequence indices per row, in order, each row holding whole sequences up to `budget` tokens (first fit in
    order: a batch is small, and order keeps a pair's two sides close)."""
    rows: list[list[int]] = []
    used: list[int] = []
    for i, n in enumerate(lengths):
        if n > budget:
            raise ValueError(f"a {n}-token sequence is longer than the {budget}-token row budget")
        row = next((r for r, u in enumerate(used) if u + n <= budget), None)
        if row is None:
            rows.append([])
            used.append(0)
            row = len(rows) - 1
        rows[row].append(i)
        used[row] += n
    return rows


def preference_batch(
    pairs: list[tuple[EncodedSample, EncodedSample]],
    pad_token_id: int,
    rule: PositionRule,
    budget: int | None = None,
    boundaries: bool = False,
    shared: list[int] | None = None,
) -> dict:
    """The batch of `pairs` laid out as the module docstring says: one sequence per row without `budget`, else
    packed into rows of at most `budget` tokens. A "pair" may be any tuple of sequences that follow one prompt (all
    of the same size k): the sequences are then [first of every tuple..., second of every tuple..., ...], k x B of
    them (`num_sequences`), each tuple's prompt media once (KTO: 1-tuples, one completion each). `shared[g]`: the
    earlier group whose prompt group g repeats (itself when none): its media is not added again, its placeholders
    index that group's items (KTO's completions of one prompt in one batch)."""
    if not pairs:
        raise ValueError("a preference batch needs at least one pair")
    size = len(pairs[0])
    if any(len(group) != size for group in pairs):
        raise ValueError("every group of a preference batch must hold the same number of sequences")
    for i, group in enumerate(pairs):
        for other in group[1:]:
            if problem := pair_media_problem(group[0], other):
                raise ValueError(f"pair {i}: {problem}; both answers of a pair must follow the same prompt and media")
    shared = list(range(len(pairs))) if shared is None else shared
    for g, owner in enumerate(shared):
        if owner > g or shared[owner] != owner:
            raise ValueError(f"group {g} shares the media of group {owner}, which is not an earlier group of its own")
        if problem := pair_media_problem(pairs[owner][0], pairs[g][0]):
            raise ValueError(f"group {g}: {problem} from group {owner}, whose prompt media it was given to share")
    unique = [g for g, owner in enumerate(shared) if owner == g]
    sequences = [group[j] for j in range(size) for group in pairs]
    lengths = [len(s.input_ids) for s in sequences]
    layout = [[i] for i in range(len(sequences))] if budget is None else pack_sequences(lengths, budget)
    # Pixels stay out of the rows (the unique items are added below); grids stay: they give the positions.
    stripped = [replace(s, pixel_values=None, pixel_values_videos=None) for s in sequences]
    batch = training_batch([[stripped[i] for i in row] for row in layout], pad_token_id, rule, boundaries)
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        batch.pop(key, None)
    batch.update(vision_inputs([pairs[g][0] for g in unique]))

    index = torch.full(batch["input_ids"].shape, -1, dtype=torch.long)
    offsets = {kind: _offsets([_count(pairs[g][0], kind) for g in unique]) for kind in ("image", "video")}
    position = {g: u for u, g in enumerate(unique)}
    first_item = {kind: [offsets[kind][position[owner]] for owner in shared] for kind in ("image", "video")}
    media_index: dict[str, list[int]] = {"image": [], "video": []}
    for r, row in enumerate(layout):
        offset = 0
        for s in row:
            index[r, offset : offset + lengths[s]] = s
            offset += lengths[s]
            pair = s % len(pairs)
            for kind in ("image", "video"):
                start = first_item[kind][pair]
                media_index[kind] += range(start, start + _count(sequences[s], kind))
    batch["sequence_index"] = index
    for kind in ("image", "video"):
        if media_index[kind]:
            batch[f"{kind}_index"] = torch.tensor(media_index[kind], dtype=torch.long)
    batch["num_pairs"] = len(pairs)
    batch["num_sequences"] = len(sequences)
    return batch


def completion_tokens(sequence: EncodedSample) -> int:
    """The trained (completion) tokens of one sequence, as the batch counts them (never its first token)."""
    return sum(label != IGNORE_INDEX for label in sequence.labels[1:])


def _count(sample: EncodedSample, kind: str) -> int:
    grid = getattr(sample, f"{kind}_grid_thw")
    return 0 if grid is None else len(grid)


def _offsets(counts: list[int]) -> list[int]:
    out, total = [], 0
    for n in counts:
        out.append(total)
        total += n
    return out


def _shape(grid) -> str:
    return "none" if grid is None else str(grid.tolist())


class PairCollator(StandInCollator):
    """For the preference DataLoader: a list of pair indices -> `preference_batch`. `pairs[i]` is a (chosen, rejected)
    pair of Samples (finetune/data/preference.py), each encoded by the SFT encoder with the last reply trained.

    A pair whose side fails to encode (media corrupt past the header) is left out and reported in `bad_samples`, as
    RowCollator does; a batch that loses every pair is replaced by a stand-in (a pair that encoded, with no trained
    tokens: zero gradient), so every rank still takes every step."""

    def __init__(self, encoder, pairs, rule: PositionRule, budget: int | None = None, boundaries: bool = False):
        self.encoder, self.pairs, self.rule = encoder, pairs, rule
        self.budget, self.boundaries = budget, boundaries
        self.pad_token_id = encoder.tokenizer.pad_token_id
        self._stand_in: tuple[EncodedSample, EncodedSample] | None = None

    def _encode(self, pair, bad: list[dict]):
        try:
            chosen = self.encoder.encode(pair[0])
            encoded = (chosen, self.encoder.encode(pair[1], vision=chosen.vision()))  # the prompt's media decoded once
        except DataError as err:
            sample = pair[0]
            bad.append({"id": sample.id, "source": sample.source, "kind": err.kind, "error": str(err)})
            return None
        if self._stand_in is None:
            self._stand_in = tuple(replace(e, labels=[IGNORE_INDEX] * len(e.labels)) for e in encoded)
        return encoded

    def __call__(self, indices) -> dict:
        indices = _flat(indices)
        return self.batch([self.pairs[i] for i in indices], indices)

    def batch(self, pairs: list, indices: list[int] | None = None) -> dict:
        """`pair_index`: each kept pair's index in `pairs` of the collator (-1: the stand-in, or none given), where
        precomputed reference log-probs are looked up."""
        bad: list[dict] = []
        indices = [-1] * len(pairs) if indices is None else indices
        kept = [(e, (p[0].id, i)) for p, i in zip(pairs, indices) if (e := self._encode(p, bad)) is not None]
        if not kept:
            kept = [(self._find_stand_in(self.pairs, "no preference pair can be encoded", bad), (None, -1))]
        batch = preference_batch([e for e, _ in kept], self.pad_token_id, self.rule, self.budget, self.boundaries)
        batch["sample_ids"] = [[sid] for _, (sid, _) in kept if sid is not None]
        batch["pair_index"] = torch.tensor([i for _, (_, i) in kept], dtype=torch.long)
        batch["bad_samples"] = bad
        return batch


def _flat(indices) -> list[int]:
    """Pair indices from a batch sampler: ints, or rows (tuples) of them."""
    return [i for item in indices for i in (item if isinstance(item, (tuple, list)) else (item,))]


class UnpairedCollator(StandInCollator):
    """For KTO's DataLoader: a list of completion indices -> the batch of those completions (1-tuples, each prompt's
    media once) with `label` (True: desirable) and, when the KL term is estimated, `kl_batch`: the same prompts with
    the completions rotated by one within the batch, TRL's mismatched pairs (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1})
    (trl/trainer/kto_trainer.py). Sequence i of both batches follows prompt i, so both carry the same unique media in
    the same order: a frozen tower's features from one forward serve the other.

    `items[i]`: an UnpairedCompletion (finetune/data/preference.py): `.prompt`, `.completion`, `.desirable`, and
    `.conversation()`; `with_completion(item, text)` gives the item's prompt followed by another reply. A completion
    that fails to encode is left out and reported in `bad_samples`; a mismatched sequence that cannot be encoded (the
    other reply makes it longer than data.max_length) is replaced by the matched one (a log-ratio of the policy's own
    kind, never a crash)."""

    def __init__(
        self,
        encoder,
        items,
        rule: PositionRule,
        budget: int | None = None,
        boundaries: bool = False,
        kl: bool = True,
        with_completion=None,
    ):
        self.encoder, self.items, self.rule = encoder, items, rule
        self.budget, self.boundaries, self.kl = budget, boundaries, kl
        self.with_completion = with_completion
        self.pad_token_id = encoder.tokenizer.pad_token_id
        self._stand_in: tuple | None = None

    def _encode(self, item, bad: list[dict]):
        try:
            encoded = self.encoder.encode(item.conversation())
        except DataError as err:
            bad.append({"id": item.id, "source": item.prompt.source, "kind": err.kind, "error": str(err)})
            return None
        if self._stand_in is None:
            self._stand_in = (item, replace(encoded, labels=[IGNORE_INDEX] * len(encoded.labels)))
        return encoded

    def __call__(self, indices) -> dict:
        indices = _flat(indices)
        bad: list[dict] = []
        kept = [(self.items[i], e, i) for i in indices if (e := self._encode(self.items[i], bad)) is not None]
        if not kept:
            kept = [(*self._find_stand_in(self.items, "no completion can be encoded", bad), -1)]
        matched = [e for _, e, _ in kept]
        shared = shared_prompts([(item, e) for item, e, _ in kept])
        batch = self._layout(matched, shared)
        if self.kl:
            batch["kl_batch"] = self._layout([self._mismatched(kept, i) for i in range(len(kept))], shared)
        batch["label"] = torch.tensor([bool(item.desirable) for item, _, _ in kept])
        batch["sample_ids"] = [[item.id] for item, _, i in kept if i >= 0]
        batch["pair_index"] = torch.tensor([i for _, _, i in kept], dtype=torch.long)
        batch["bad_samples"] = bad
        return batch

    def _mismatched(self, kept: list, i: int) -> EncodedSample:
        """Prompt i with the reply of completion i - 1 (cyclic), encoded as SFT encodes it (reply trained)."""
        item, matched, _ = kept[i]
        if len(kept) == 1:  # one completion (or the stand-in): its own prompt, as TRL's rotation of a 1-batch
            return matched
        other = kept[i - 1][0]
        try:
            encoded = self.encoder.encode(self.with_completion(item, other.completion), vision=matched.vision())
        except DataError:
            return matched
        return encoded

    def _layout(self, sequences: list[EncodedSample], shared: list[int]) -> dict:
        groups = [(s,) for s in sequences]
        return preference_batch(groups, self.pad_token_id, self.rule, self.budget, self.boundaries, shared)


def shared_prompts(encoded: list[tuple]) -> list[int]:
    """For (item, encoded sequence) in a batch: the first earlier item with the same prompt (its messages, media
    paths included) and the same media grids, else itself. Its media is then encoded once for all of them."""
    first: dict[str, int] = {}
    shared = []
    for i, (item, sequence) in enumerate(encoded):
        key = json.dumps(item.prompt.messages, sort_keys=True, default=str)
        owner = first.setdefault(key, i)
        if owner != i and pair_media_problem(encoded[owner][1], sequence) is not None:
            owner = i
        shared.append(owner)
    return shared
