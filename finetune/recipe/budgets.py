"""The recipe's worst case per image and per video in tokens, and the start-up refusal of a recipe whose budgets
cannot fit its `data.max_length`.

The worst cases are a 4000x3000 photo and a 10-minute video at 30 fps in 2160p (3840x2160; 1080p is shown too).
They are sized by the token pre-pass's own rules (finetune/data/vision.py: `smart_resize`, `smart_nframes`, the
per-frame cap that the clip budget `video_total_pixels` sets, as qwen-vl-utils' `fetch_video`) on a made-up header
(width, height, frame count, fps), at the family's patch x merge (finetune/base/families.py). Why the 10-minute
video is the worst one: past `video_max_frames` frames a longer video samples no more frames, and below it a video
with n frames gets n/2 frame pairs of at most min(video_max_pixels, 2 x video_total_pixels / n) pixels, which never
grows with fewer frames; the floor (1.05 x video_min_pixels per pair) only grows with n. Ten minutes at 2 fps is 1200
frames, past every recipe's `video_max_frames`.

Tokens of one item are its vision tokens and the text it brings: `<|vision_start|>` / `<|vision_end|>` around it
and, in the Qwen3-VL / Qwen3.5 layout (`timestamped_frames`), per frame pair a `<{s:.1f} seconds>` timestamp and
its own start/end markers. Without a tokenizer a timestamp is counted as Qwen's tokenizers split it (their
pre-tokenizers cut numbers one digit per token: `<123.5 seconds>` is `<`, `1`, `2`, `3`, `.`, `5`, ` seconds`,
`>`), every pair at the clip's last second: a bound, a few tokens above the exact count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from finetune.base.errors import ConfigError
from finetune.base.families import FAMILIES
from finetune.data.vision import FRAME_FACTOR, MERGE, PATCH, ImageSpec, smart_resize, tokens_for
from finetune.recipe.data_settings import vision_settings
from finetune.recipe.schema import Config

PHOTO = (4000, 3000)  # width, height: a 12-megapixel phone photo
VIDEO_SECONDS, VIDEO_FPS = 600, 30.0  # a 10-minute video at 30 fps
VIDEO_SIZES = ((3840, 2160), (1920, 1080))  # 2160p, 1080p
MARKERS = 2  # <|vision_start|> and <|vision_end|> around every image and video (and every timestamped frame pair)
TIMESTAMP_TEXT = 4  # `<`, `.`, ` seconds`, `>` besides the digits of `<{s:.1f} seconds>`
# Room for the conversation's text beside the largest item: Qwen's chat scaffolding (the default system prompt and
# the turn markers, ~30 tokens), a question and an answer of a few hundred tokens, the size of VQA, caption and
# video-QA samples. Longer text is still counted exactly by the pre-pass (and `validate`), which names any sample
# that does not fit. Recipes with short rows (the CPU demo's 256 tokens, the tests' 128: tiny media, one-word answers)
# keep an eighth of a row.
CONVERSATION_ALLOWANCE = 512


def conversation_allowance(max_length: int) -> int:
    return min(CONVERSATION_ALLOWANCE, max_length // 8)


@dataclass(frozen=True)
class WorstCase:
    item: str  # what was sized: "4000x3000 photo", "10-minute 3840x2160 video"
    kind: str  # "image" or "video"
    vision: int  # LLM tokens of the pixels
    text: int  # markers and timestamps the item adds
    detail: str  # how the rules sized it

    @property
    def tokens(self) -> int:
        return self.vision + self.text


def geometry(family: str) -> tuple[int, int]:
    """The family's (patch, merge) as its published processors set them (the processor classes' defaults where the
    family sets none: patch 14, merge 2)."""
    settings = (FAMILIES[family].processor_settings or {}).get("image_processor", {})
    return int(settings.get("patch_size", PATCH)), int(settings.get("merge_size", MERGE))


def image_case(config: Config) -> WorstCase:
    patch, merge = geometry(config.model.family)
    width, height = PHOTO
    h, w = ImageSpec(config.model.min_pixels, config.model.max_pixels, patch, merge).target(height, width)
    vision = tokens_for(1, h, w, patch, merge)
    return WorstCase(f"{width}x{height} photo", "image", vision, MARKERS, f"{w}x{h} px")


def video_case(config: Config, width: int, height: int) -> WorstCase:
    """The plan the pre-pass makes for this header (the steps of finetune/data/vision.py `VideoSpec.plan`, without
    the frame indices, which only the decoder needs)."""
    patch, merge = geometry(config.model.family)
    spec = vision_settings(config).video_spec({}, patch, merge)
    frames = spec.nframes_for(int(VIDEO_SECONDS * VIDEO_FPS), VIDEO_FPS)
    h, w = smart_resize(height, width, spec.min_pixels, spec.frame_max_pixels(frames), patch * merge)
    pairs, per_pair = math.ceil(frames / FRAME_FACTOR), tokens_for(1, h, w, patch, merge)
    text = MARKERS
    if FAMILIES[config.model.family].video_layout == "timestamped_frames":
        digits = sum(c.isdigit() for c in f"{VIDEO_SECONDS:.1f}")
        text += pairs * (digits + TIMESTAMP_TEXT + MARKERS)
    detail = f"{frames} frames = {pairs} pairs x {per_pair} at {w}x{h} px"
    return WorstCase(f"{VIDEO_SECONDS // 60}-minute {width}x{height} video", "video", pairs * per_pair, text, detail)


def worst_cases(config: Config) -> list[WorstCase]:
    return [image_case(config), *(video_case(config, w, h) for w, h in VIDEO_SIZES)]


def summary_lines(config: Config) -> list[str]:
    """The worst case per item against the row, for `--cfg job`, `--dry-run` and `validate`."""
    cases, max_length = worst_cases(config), config.data.max_length
    allowance = conversation_allowance(max_length)
    row = config.trainer.max_tokens_per_row
    lines = [
        f"worst case per item, in tokens (finetune/recipe/budgets.py; a {VIDEO_FPS:.0f} fps video, Qwen's rules at "
        f"this recipe's budgets):"
    ]
    for case in cases:
        extra = "markers" if case.text == MARKERS else "markers and timestamps"
        lines.append(
            f"  {case.item:<28} {case.tokens:>7,}  ({case.vision:,} vision: {case.detail}; {case.text:,} {extra})"
        )
    largest = max(case.tokens for case in cases)
    verdict = "fits" if largest + allowance <= max_length else "does NOT fit"
    lines.append(
        f"  largest + {allowance} for the conversation = {largest + allowance:,}: {verdict} data.max_length="
        f"{max_length} (trainer.max_tokens_per_row={row if row is not None else f'null = {max_length}'})"
    )
    return lines


def comment_lines(config: Config) -> str:
    """`summary_lines` as YAML comments (what `--cfg job` appends: its output stays a recipe)."""
    return "\n".join(f"# {line}" for line in summary_lines(config))


VIDEO_KEYS = "model.video_total_pixels / model.video_max_frames / model.video_max_pixels"


def check_fits(config: Config) -> None:
    """Refuse a recipe whose worst-case image or video, with room for the conversation, exceeds data.max_length."""
    max_length = config.data.max_length
    allowance = conversation_allowance(max_length)
    over = [case for case in worst_cases(config) if case.tokens + allowance > max_length]
    if not over:
        return
    worst = {}
    for case in over:  # the largest of each kind
        if case.kind not in worst or case.tokens > worst[case.kind].tokens:
            worst[case.kind] = case
    sized = "; ".join(
        f"a {case.item} plans to {case.tokens:,} tokens ({case.detail}), + {allowance} for the conversation = "
        f"{case.tokens + allowance:,}"
        for case in worst.values()
    )
    keys = " or ".join({"image": "lower model.max_pixels", "video": f"lower {VIDEO_KEYS}"}[kind] for kind in worst)
    raise ConfigError(
        f"data.max_length={max_length} cannot hold this recipe's worst case: {sized}. Samples with such media would "
        f"stop the run: {keys}, or raise data.max_length (the worst cases: finetune/recipe/budgets.py)."
    )
