"""Check a whole dataset before a long run.

    python -m finetune.validate [hydra overrides] [--split train|eval|all] [--decode] [--row-tokens N]

Reads every record of the recipe's datasets, counts each sample's tokens from media metadata (the cached
pre-pass training uses), and reports per problem class the count and the first sample ids: missing or
unreadable media, corrupt / zero-frame / zero-duration videos, placeholder/media count mismatches, unknown
roles, empty assistant turns, samples over data.max_length (and by how much), media outside the media root.
`--decode` also decodes every image and video (slower; finds corrupt packets a header check cannot).
A preference or RL recipe's data (pairs, KTO completions, RL prompts: finetune/data/preference.py) is checked the
same way, each pair's both sides counted, plus its own classes (chosen equal to rejected, a missing side, a prompt not
ending with the user's turn, no solution, no true/false label).
Prints the token-length distribution (text / image / video) and the number of rows the samples would fill
when packed into rows of `--row-tokens` (default: the row budget training uses) by the trainer's own packing.

Exit status: 0 every sample can be trained on; 1 a problem in the data (samples, or a dataset file that is
missing, unreadable, empty or not JSON); 2 the command or recipe itself is wrong (an unknown override, ...).
"""

from __future__ import annotations

import argparse
import logging
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.base.errors import DataError
from finetune.base.paths import resolve_data_file
from finetune.data.encode import ConversationEncoder
from finetune.data.preference import count_items, read_source_data
from finetune.data.prepare import PreparedSplit, format_problems, prepare_split
from finetune.data.sources import DatasetSource, parse_sources
from finetune.recipe.budgets import summary_lines
from finetune.recipe.data_settings import conversation_encoder, split_settings
from finetune.recipe.load import load_config
from finetune.recipe.schema import Config

logger = logging.getLogger("finetune.validate")


def decode_check(split: PreparedSplit, encoder: ConversationEncoder) -> None:
    """Encode every kept sample for real; move the failures into the problem lists."""
    from tqdm import tqdm

    kept = []
    for i, sample in enumerate(tqdm(split.samples, total=len(split.samples), desc="decode check", unit="sample")):
        try:
            encoder.encode(sample)
        except DataError as err:
            split.problems.setdefault(err.kind, []).append(err)
            continue
        kept.append(i)
    split.keep(kept)


def packed_rows(lengths: list[int], row_tokens: int, seed: int) -> int:
    """The rows of `row_tokens` the samples fill, packed exactly as training packs them."""
    from finetune.data.packing import pack_rows

    return len(pack_rows(lengths, row_tokens, seed))


def histogram(values: list[int], width: int = 40, bins: int = 8) -> list[str]:
    if not values:
        return ["    (no samples)"]
    low, high = min(values), max(values)
    step = max(1, -(-(high - low + 1) // bins))
    counts = defaultdict(int)
    for v in values:
        counts[(v - low) // step] += 1
    top = max(counts.values())
    return [
        f"    {low + b * step:>7}-{low + (b + 1) * step - 1:<7} {counts[b]:>7} {'#' * max(1, round(width * counts[b] / top)) if counts[b] else ''}"
        for b in range(bins)
        if low + b * step <= high
    ]


def token_lines(title: str, tokens: dict, unit: str = "sample") -> list[str]:
    """The token-length table (text / image / video / total: min, median, p95, max, sum) and the total's histogram."""
    totals = (np.asarray(tokens["text"]) + np.asarray(tokens["image"]) + np.asarray(tokens["video"])).tolist()
    if not totals:
        return []
    lines = [f"{title:<24} min   median      p95      max      total"]
    for part in ("text", "image", "video", "total"):
        values = sorted(totals if part == "total" else np.asarray(tokens[part]).tolist())
        p95 = values[min(len(values) - 1, int(0.95 * len(values)))]
        lines.append(
            f"  {part:<18} {values[0]:>8} {int(statistics.median(values)):>8} {p95:>8} {values[-1]:>8} "
            f"{sum(values):>10,}"
        )
    lines.append(f"total tokens per {unit} (histogram):")
    return lines + histogram(totals)


def report(name: str, split: PreparedSplit, row_tokens: int, seed: int = 0) -> str:
    lines = [f"{name}: {split.read} records, {len(split.samples)} usable samples, {split.num_problems} with problems"]
    if split.shortened:
        lines.append(
            f"{split.shortened} samples lose trailing turns to fit data.max_length (data.over_length="
            "drop_trailing_turns)"
        )
    if split.num_problems:
        lines += ["problems:", format_problems(split.problems)]
    lines += token_lines("tokens per sample", split.tokens)
    totals = split.totals.tolist()
    if totals:
        fits = [t for t in totals if t <= row_tokens]
        rows = packed_rows(fits, row_tokens, seed)
        lines.append(
            f"packed into rows of {row_tokens} tokens as training packs them: {rows} rows, "
            f"{sum(fits) / max(1, rows * row_tokens):.1%} filled (one sample per row would use {len(fits)} rows)"
            + (f"; {len(totals) - len(fits)} samples are longer than a row" if len(fits) < len(totals) else "")
        )
    return "\n".join(lines)


NOUNS = {"pairs": "pairs", "unpaired": "completions", "prompts": "prompts"}


@dataclass
class PreferenceCheck:
    """One preference / RL dataset checked as `validate` checks SFT data: the report and its figures."""

    text: str
    read: int
    usable: int
    problems: dict[str, list[DataError]]

    @property
    def num_problems(self) -> int:
        return sum(len(v) for v in self.problems.values())


def check_preference_source(
    name: str, source: DatasetSource, kind: str, encoder: ConversationEncoder, decode: bool = False
) -> PreferenceCheck:
    """Every record of one dataset read as `kind` ("pairs" | "unpaired" | "prompts"; finetune/data/preference.py),
    its conversations counted (or, with `decode`, encoded) as SFT samples are: the problems by class, each named with
    its fix, and the token lengths (a pair's longer side)."""
    data = read_source_data(source, kind)
    counts = count_items(data, encoder, decode)
    noun = NOUNS[kind]
    lines = [
        f"{name} ({source.path}): {data.read} records, {len(data.items)} usable {noun}, {data.num_problems} with problems"
    ]
    if data.num_problems:
        lines += ["problems:", format_problems(data.problems)]
    tokens = {part: [getattr(c, part) for c in counts] for part in ("text", "image", "video")}
    title = "tokens per pair (longer)" if kind == "pairs" else f"tokens per {noun[:-1]}"
    lines += token_lines(title, tokens, "pair" if kind == "pairs" else noun[:-1])
    return PreferenceCheck("\n".join(lines), data.read, len(data.items), data.problems)


def validate_preference_file(
    path, kind: str, encoder: ConversationEncoder, media_root=None, decode: bool = False
) -> PreferenceCheck:
    """One dataset file (media under `media_root`, default the file's folder) checked as `kind`."""
    return check_preference_source(
        str(path), DatasetSource(Path(path), 1.0, Path(media_root) if media_root else None), kind, encoder, decode
    )


def validate_preference_split(
    name: str, value, kind: str, encoder: ConversationEncoder, media_root: str | None, decode: bool = False
) -> int:
    """`data.train` / `data.eval` of a preference or RL recipe: each source checked and reported; the problem count."""
    problems = 0
    for source in parse_sources(value, media_root, resolve_data_file):
        try:
            check = check_preference_source(name, source, kind, encoder, decode)
        except DataError as err:  # the file itself: missing, not JSON, not UTF-8
            print(f"{name}: {err}", flush=True)
            problems += 1
            continue
        print(check.text, flush=True)
        problems += check.num_problems
    return problems


def validate(
    config: Config, split_names: list[str], decode: bool, row_tokens: int | None, kind: str | None = None
) -> int:
    """`kind`: the data of a preference or RL method ("pairs" | "unpaired" | "prompts": `preference.data_kind` of the
    recipe's method); None: SFT conversations."""
    from finetune.model.load import load_processor

    problems = 0
    readable = []
    for name in split_names:  # the dataset files first: for a real model the processor is a download
        value = getattr(config.data, name)
        if value is None:
            continue
        try:
            parse_sources(value, config.data.media_root, resolve_data_file)
        except DataError as err:  # missing, or an entry that is not a path / {path, weight, media_root}
            print(f"{name}: {err}", flush=True)
            problems += 1
            continue
        readable.append((name, value))
    # A missing file stops the check here: the other splits' counts can wait until the files are right.
    if readable and not problems:  # the recipe's worst case, before the processor loads (a real model: a download)
        print("\n".join(summary_lines(config)), flush=True)
    encoder = conversation_encoder(load_processor(config.model), config) if readable and not problems else None
    for name, value in readable if encoder else []:
        if kind is not None:
            problems += validate_preference_split(name, value, kind, encoder, config.data.media_root, decode)
            continue
        try:
            split = prepare_split(value, split_settings(config), encoder, resolve_data_file)
        except DataError as err:  # the file itself: missing, not JSON, not UTF-8
            print(f"{name}: {err}", flush=True)
            problems += 1
            continue
        if decode:
            decode_check(split, encoder)
        print(
            report(
                name,
                split,
                row_tokens or config.trainer.max_tokens_per_row or config.data.max_length,
                config.trainer.seed,
            ),
            flush=True,
        )
        problems += split.num_problems
    verdict = (
        "OK: every sample can be trained on." if not problems else f"FAILED: {problems} problems would stop training."
    )
    print(verdict)
    return 1 if problems else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=("train", "eval", "all"), default="all")
    parser.add_argument("--decode", action="store_true", help="decode every image and video too")
    parser.add_argument("--row-tokens", type=int, default=None, help="row budget for the packing estimate")
    args, overrides = parser.parse_known_args(argv)
    splits = ["train", "eval"] if args.split == "all" else [args.split]
    from finetune.data.preference import data_kind

    config = load_config(overrides)
    return validate(config, splits, args.decode, args.row_tokens, data_kind(config.method.name))
