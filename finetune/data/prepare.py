"""A split ready for training: samples read from every source, counted by the pre-pass, problems sorted
into classes, and the sources mixed by weight. Training stops on problems unless `data.skip_invalid`, in
which case the skipped samples are counted and reported, never dropped silently."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from finetune.data.conversation import DataError, Sample
from finetune.data.encode import ConversationEncoder, TokenCount
from finetune.data.lengths import token_counts
from finetune.data.sources import mix, parse_sources, read_source

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
}


def drop_trailing_turns(sample: Sample, encoder: ConversationEncoder, max_length: int):
    """The sample cut back to an earlier assistant reply (whole turns, media included) so that it fits, with
    its new count; None when even the first reply does not fit."""
    messages = sample.messages
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for last in reversed(replies[:-1]):
        shorter = Sample(sample.id, messages[: last + 1], sample.source, sample.extra)
        count = encoder.count_tokens(shorter)
        if count.total <= max_length:
            return shorter, count
    return None


@dataclass
class PreparedSplit:
    samples: list[Sample]
    counts: list[TokenCount]
    problems: dict[str, list[DataError]] = field(default_factory=dict)
    read: int = 0  # records read across sources
    cache_files: list[str] = field(default_factory=list)
    shortened: int = 0  # samples that lost trailing turns to fit (data.over_length=drop_trailing_turns)
    kept_per_file: dict[str, int] = field(default_factory=dict)  # usable samples per dataset file, before mixing

    @property
    def num_problems(self) -> int:
        return sum(len(v) for v in self.problems.values())


def prepare_split(value, data_cfg, encoder: ConversationEncoder, seed: int, resolve) -> PreparedSplit:
    sources = parse_sources(value, data_cfg.media_root, resolve)
    problems: dict[str, list[DataError]] = defaultdict(list)
    kept_per_source, read, caches, shortened = [], 0, [], 0
    for source in sources:
        samples, errors = read_source(source)
        read += len(samples) + len(errors)
        if not samples and not errors:
            problems["empty_dataset"].append(DataError(f"{source.path}: no records at all (an empty list or file). "
                                                       "Point data.train/data.eval at the right file.",
                                                       "empty_dataset"))  # fmt: skip
        for err in errors:
            problems[err.kind].append(err)
        results, cache, _ = token_counts(source, samples, encoder)
        caches.append(str(cache))
        kept = []
        for sample, result in zip(samples, results):
            if isinstance(result, DataError):
                problems[result.kind].append(result)
            elif data_cfg.max_length and result.total > data_cfg.max_length:
                if data_cfg.over_length == "drop_trailing_turns":
                    fitted = drop_trailing_turns(sample, encoder, data_cfg.max_length)
                    if fitted is not None:
                        kept.append(fitted)
                        shortened += 1
                        continue
                over = result.total - data_cfg.max_length
                problems["too_long"].append(DataError(
                    f"{sample.source}: {result.total} tokens (text {result.text}, image {result.image}, video "
                    f"{result.video}), {over} over data.max_length={data_cfg.max_length}", "too_long"))  # fmt: skip
            else:
                kept.append((sample, result))
        kept_per_source.append(kept)
    mixed = mix(kept_per_source, [s.weight for s in sources], seed)
    per_file = {str(source.path): len(kept) for source, kept in zip(sources, kept_per_source)}
    return PreparedSplit([s for s, _ in mixed], [c for _, c in mixed], dict(problems), read, caches, shortened,
                         per_file)  # fmt: skip


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
        logger.warning("%d %s samples lost trailing turns to fit data.max_length (data.over_length="
                       "drop_trailing_turns)", split.shortened, name)  # fmt: skip
    if not split.num_problems:
        return
    report = format_problems(split.problems)
    if skip_invalid:
        logger.warning("skipping %d of %d %s samples (data.skip_invalid=true):\n%s", split.num_problems, split.read,
                       name, report)  # fmt: skip
        return
    raise DataError(
        f"{split.num_problems} of {split.read} {name} samples cannot be trained on:\n{report}\n"
        "Fix them (full report: python -m finetune.validate <same overrides>) or set data.skip_invalid=true "
        "to skip them with a count."
    )
