"""A split ready for training: samples read from every source, counted by the pre-pass, problems sorted
into classes, and the sources mixed by weight. Training stops on problems unless `data.skip_invalid`, in
which case the skipped samples are counted and reported, never dropped silently."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from finetune.base.errors import DataError
from finetune.data.conversation import Sample
from finetune.data.encode import ConversationEncoder, TokenCount
from finetune.data.modes import OverLength
from finetune.data.sources import mix_order, parse_sources
from finetune.data.store import SampleTable, load_source

PROBLEM_CLASSES = {
    "missing_media": "missing media file",
    "unreadable_media": "unreadable media file",
    "bad_video": "corrupt, zero-frame or zero-duration video",
    "placeholders": "placeholder / media count mismatch",
    "unknown_role": "unknown role",
    "empty_turn": "empty or missing assistant turn",
    "too_long": "longer than data.max_length",
    "outside_root": "media path outside the media root",
    "format": "malformed record",
    "structure": "turn order the chat template cannot render",
    "duplicate_id": "the same id as an earlier sample",
    "bad_image": "corrupt or truncated image",
    "too_few_frames": "video with fewer than 2 frames",
    "aspect_ratio": "image or frame over the 200:1 aspect ratio",
    "empty_dataset": "no samples at all",
    # preference tuning and RL (finetune/data/preference.py)
    "same_reply": "chosen and rejected are the same reply",
    "missing_side": "missing or empty chosen / rejected / completion",
    "prompt_end": "prompt that does not end with the user's turn",
    "no_solution": "RL prompt without a solution",
    "bad_label": "KTO record without a true/false label",
}


@dataclass(frozen=True)
class SplitSettings:
    """How a split is read: where media live, the length limit and its policy, processes, the mixing seed."""

    max_length: int | None
    over_length: OverLength = OverLength.ERROR
    media_root: str | None = None  # default: each dataset file's folder
    num_proc: int | None = None  # pre-pass processes; None: every CPU this process may use
    seed: int = 0  # mixing order of weighted sources

    def __post_init__(self):
        object.__setattr__(self, "over_length", OverLength(self.over_length))


def drop_trailing_turns(sample: Sample, encoder: ConversationEncoder, max_length: int):
    """The number of messages to keep so that the sample, cut back to an earlier assistant reply (whole turns, media
    included), fits, with its new count; None when even the first reply does not fit."""
    messages = sample.messages
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for last in reversed(replies[:-1]):
        count = encoder.count_tokens(Sample(sample.id, messages[: last + 1], sample.source, sample.extra))
        if count.total <= max_length:
            return last + 1, count
    return None


@dataclass
class PreparedSplit:
    """The usable samples of a split (built from the store on access), their token counts, and the problems."""

    samples: SampleTable
    tokens: dict[str, np.ndarray]  # text / image / video tokens per sample, in sample order
    problems: dict[str, list[DataError]] = field(default_factory=dict)
    read: int = 0  # records read across sources
    cache_files: list[str] = field(default_factory=list)
    shortened: int = 0  # samples that lost trailing turns to fit (data.over_length=drop_trailing_turns)
    kept_per_file: dict[str, int] = field(default_factory=dict)  # usable samples per dataset file, before mixing
    counted: int = 0  # records counted by this call (the others came from the store)

    @property
    def num_problems(self) -> int:
        return sum(len(v) for v in self.problems.values())

    @property
    def totals(self) -> np.ndarray:
        return self.tokens["text"] + self.tokens["image"] + self.tokens["video"]

    def keep(self, positions) -> None:
        """Only the samples at these positions (e.g. those that decode), in order."""
        positions = np.asarray(positions, dtype=np.int64)
        self.samples = self.samples.subset(positions)
        self.tokens = {name: values[positions] for name, values in self.tokens.items()}

    @property
    def counts(self) -> list[TokenCount]:
        return [TokenCount(*map(int, c)) for c in zip(self.tokens["text"], self.tokens["image"], self.tokens["video"])]


def prepare_split(value, settings: SplitSettings, encoder: ConversationEncoder, resolve) -> PreparedSplit:
    """Every record of the split's datasets (`value`: a path, or a list of paths / {path, weight, media_root}) read
    and counted through the store, problems sorted, sources mixed. `resolve` turns a path into a file."""
    sources = parse_sources(value, settings.media_root, resolve)
    problems: dict[str, list[DataError]] = defaultdict(list)
    stores, kept, read, shortened = [], [], 0, 0
    limit, drop_turns = settings.max_length, settings.over_length is OverLength.DROP_TRAILING_TURNS
    for source in sources:
        stored = load_source(source, encoder, settings.num_proc)
        stores.append(stored)
        read += len(stored)
        if not len(stored):
            problems["empty_dataset"].append(
                DataError(
                    f"{source.path}: no records at all (an empty list or file). "
                    "Point data.train/data.eval at the right file.",
                    "empty_dataset",
                )
            )
        totals = stored.text + stored.image + stored.video
        cuts = {}  # row -> (messages kept, their count)
        for row in np.flatnonzero(np.array([k is not None for k in stored.error_kind], dtype=bool)).tolist():
            problems[stored.errors[row].kind].append(stored.errors[row])
        usable = np.array([k is None for k in stored.error_kind], dtype=bool)
        over = usable & (totals > limit) if limit else np.zeros(len(stored), dtype=bool)
        for row in np.flatnonzero(over).tolist():
            sample = SampleTable([stored.records_file], [(0, row)], tables=[stored.records])[0]
            fitted = drop_trailing_turns(sample, encoder, limit) if drop_turns else None
            if fitted is not None:
                cuts[row] = fitted
                shortened += 1
                continue
            problems["too_long"].append(
                DataError(
                    f"{sample.source}: {totals[row]} tokens (text {stored.text[row]}, image {stored.image[row]}, video "
                    f"{stored.video[row]}), {totals[row] - limit} over data.max_length={limit}",
                    "too_long",
                )
            )
        rows = np.flatnonzero(usable & ~over)
        rows = np.union1d(rows, np.array(sorted(cuts), dtype=np.int64))  # sorted: the shortened ones join in place
        part_tokens = {name: getattr(stored, name)[rows].astype(np.int64) for name in ("text", "image", "video")}
        keep = np.full(len(rows), -1, dtype=np.int64)  # messages kept by a shortened sample; -1: all
        for position, row in zip(np.searchsorted(rows, sorted(cuts)).tolist(), sorted(cuts)):
            kept_messages, count = cuts[row]
            keep[position] = kept_messages
            for name in part_tokens:
                part_tokens[name][position] = getattr(count, name)
        kept.append((rows, part_tokens, keep))
    order = mix_order([len(rows) for rows, _, _ in kept], [s.weight for s in sources], settings.seed)
    pairs = order.copy()  # (dataset, position among its kept rows) -> (dataset, record row)
    tokens = {name: np.zeros(len(order), dtype=np.int64) for name in ("text", "image", "video")}
    keep_all = np.full(len(order), -1, dtype=np.int64)
    for part, (rows, part_tokens, keep) in enumerate(kept):
        mine = order[:, 0] == part
        positions = order[mine, 1]
        pairs[mine, 1] = rows[positions]
        keep_all[mine] = keep[positions]
        for name in tokens:
            tokens[name][mine] = part_tokens[name][positions]
    cuts_by_sample = {int(i): int(keep_all[i]) for i in np.flatnonzero(keep_all >= 0)}
    samples = SampleTable([s.records_file for s in stores], pairs, cuts_by_sample, [s.records for s in stores])
    per_file = {str(source.path): len(rows) for source, (rows, _, _) in zip(sources, kept)}
    return PreparedSplit(
        samples,
        tokens,
        dict(problems),
        read,
        [str(s.records_file) for s in stores],
        shortened,
        per_file,
        sum(s.counted for s in stores),
    )


def format_problems(problems: dict[str, list[DataError]], first: int = 3) -> str:
    lines = []
    for kind, errors in sorted(problems.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"  {PROBLEM_CLASSES.get(kind, kind)}: {len(errors)}")
        lines += [f"    - {err}" for err in errors[:first]]
        if len(errors) > first:
            lines.append(f"    ... and {len(errors) - first} more")
    return "\n".join(lines)


def require_clean(split: PreparedSplit, name: str, skip_invalid: bool, logger) -> None:
    """Stop on problems (the default) or report the skipped samples (data.skip_invalid=true)."""
    if split.shortened:
        logger.warning(
            "%d %s samples lost trailing turns to fit data.max_length (data.over_length=drop_trailing_turns)",
            split.shortened,
            name,
        )
    if not split.num_problems:
        return
    if not split.read:  # every file is empty: no sample to skip, and data.skip_invalid cannot help
        raise DataError(f"the {name} data holds no records at all:\n{format_problems(split.problems)}")
    report = format_problems(split.problems)
    if skip_invalid:
        logger.warning(
            "skipping %d of %d %s samples (data.skip_invalid=true):\n%s", split.num_problems, split.read, name, report
        )
        return
    raise DataError(
        f"{split.num_problems} of {split.read} {name} samples cannot be trained on:\n{report}\n"
        "Fix them (full report: python -m finetune.validate <same overrides>) or set data.skip_invalid=true "
        "to skip them with a count."
    )
