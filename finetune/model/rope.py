"""M-RoPE position ids: the one place that decides them, for training, evaluation and generation.

A sample's (3, L) ids: a text run advances all three rows by one per token; a vision block of grid (t, h, w)
lays out t x h/m x w/m tokens (m = spatial merge size) at temporal ids `floor(i * interval) + start` and
spatial ids `start + row` / `start + column`. `interval` is `second_per_grid * tokens_per_second` (in
float32) for the videos of a family whose entry names a seconds scale (`video_seconds_scale`, finetune/base/
families.py: Qwen2.5-VL's `tokens_per_second`), 1 for the others' (Qwen2-VL), and images have one temporal index (0).
A family whose videos are `timestamped_frames` (Qwen3-VL) renders each temporal patch (frame pair) as its own
block after its timestamp text: a video grid (t, h, w) is t blocks of grid (1, h, w), each at the temporal id of
its own start (time is in the timestamp text, not in the ids); `video_grid_thw` keeps one row per video.

Where the text after a vision block resumes is the rule (`model.rope_rule`):
  qwen          (largest position so far) + 1. What Qwen contributed to transformers (4.45 ... 5.2), what
                Qwen's own fine-tuning code computes, and what vLLM and SGLang serve these checkpoints with.
                Generation continues at max + 1 + k.
  transformers  start + max(h, w) / m, the rule of transformers 5.3 ... 5.23 ("Unify 3D position ids";
                huggingface/transformers#45381). It ignores how long a video is: after a 30 s clip at 2 fps
                (grid (30, 26, 30), 1 s per grid, 16 tokens before it) the text resumes at 31 instead of 75.
Both agree on images and on clips whose temporal extent is within the spatial one, and so on every
Qwen3-VL sequence (its blocks all have one temporal index).

`install_position_rule` makes a loaded model compute its own positions with the same function (its
`get_rope_index` is replaced on the instance), so `generate` prefills and decodes with the recipe's rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from finetune.base.families import FAMILIES, family_of
from finetune.recipe.keys import ROPE_RULES


@dataclass(frozen=True)
class PositionRule:
    """Everything the ids depend on besides the sample: the rule and the model's vision geometry."""

    rule: str = "qwen"
    spatial_merge_size: int = 2
    tokens_per_second: float | None = None  # set: Qwen2.5-VL spaces video frames in absolute time
    frame_blocks: bool = False  # set: each temporal patch of a video is its own (1, h, w) block (Qwen3-VL)

    @classmethod
    def for_model(cls, model_config, rule: str) -> "PositionRule":
        if rule not in ROPE_RULES:
            raise ValueError(f"rope rule {rule!r} is not one of {ROPE_RULES}")
        family = family_of(model_config.model_type)
        vision, scale = model_config.vision_config, family.video_seconds_scale
        # A family without a seconds scale (Qwen2-VL) spaces a video's frames one temporal id apart.
        tokens_per_second = getattr(vision, scale) if scale else None
        return cls(
            rule, vision.spatial_merge_size, tokens_per_second, frame_blocks=family.video_layout == "timestamped_frames"
        )

    def sample(self, mm_token_type_ids, image_grids, video_grids, second_per_grid=None) -> torch.Tensor:
        """(3, L) int64 ids of one sample; `mm_token_type_ids` is 0 text, 1 image, 2 video per token."""
        return sample_position_ids(mm_token_type_ids, image_grids, video_grids, second_per_grid, self)


def _temporal_ids(t: int, seconds: float | None, rule: PositionRule) -> torch.Tensor:
    """floor(i * second_per_grid * tokens_per_second) in float32, multiplied in each reference's order (it
    matters for the last bit when tokens_per_second is not a power of two); i without absolute time."""
    if seconds is None or rule.tokens_per_second is None:
        return torch.arange(t)
    seconds = torch.tensor(float(seconds), dtype=torch.float32)
    if rule.rule == "qwen":  # Qwen's transformers 4.49 and vLLM: range * second_per_grid * tokens_per_second
        return (torch.arange(t) * seconds * rule.tokens_per_second).long()
    return (torch.arange(t) * (rule.tokens_per_second * seconds)).long()  # transformers 5.23


def _vision_block(grid, start: int, seconds: float | None, rule: PositionRule) -> torch.Tensor:
    t, h, w = (int(v) for v in grid)
    merge = rule.spatial_merge_size
    temporal = _temporal_ids(t, seconds, rule) + start
    rows, cols = torch.arange(h // merge) + start, torch.arange(w // merge) + start
    return torch.stack(torch.meshgrid(temporal, rows, cols, indexing="ij")).reshape(3, -1)


def sample_position_ids(
    mm_token_type_ids, image_grids, video_grids, second_per_grid, rule: PositionRule
) -> torch.Tensor:
    """(3, L) int64 position ids of one sample under `rule`. Consecutive vision tokens of one kind may hold
    several blocks back to back: each consumes its grid's token count. With `rule.frame_blocks` a video grid
    (t, h, w) is consumed as t blocks of grid (1, h, w)."""
    types = torch.as_tensor(mm_token_type_ids).tolist()
    if rule.frame_blocks:
        video_grids = [(1, int(h), int(w)) for t, h, w in video_grids for _ in range(int(t))]
        second_per_grid = None  # time is in the timestamp text
    grids = {1: iter(image_grids), 2: iter(video_grids)}
    seconds = iter(second_per_grid if second_per_grid is not None else [])
    parts, current, i = [], 0, 0
    while i < len(types):
        kind, end = types[i], i
        while end < len(types) and types[end] == kind:
            end += 1
        if kind == 0:
            parts.append(torch.arange(current, current + end - i).expand(3, -1))
            current += end - i
            i = end
            continue
        while i < end:
            try:
                grid = next(grids[kind])
            except StopIteration:
                raise ValueError(f"{end - i} {'image' if kind == 1 else 'video'} tokens have no grid left") from None
            # Images have one temporal index; a Qwen2.5-VL video without its seconds per grid gets 1.0, as in
            # both references.
            block = _vision_block(grid, current, next(seconds, 1.0) if kind == 2 else None, rule)
            if block.shape[1] > end - i:
                raise ValueError(
                    f"a vision block of grid {tuple(int(v) for v in grid)} needs {block.shape[1]} "
                    f"tokens but only {end - i} follow"
                )
            parts.append(block)
            i += block.shape[1]
            if rule.rule == "qwen":
                current = int(block.max()) + 1
            else:
                current += max(int(grid[1]), int(grid[2])) // rule.spatial_merge_size
    return torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)


def batch_position_ids(
    rule: PositionRule,
    mm_token_type_ids,
    image_grid_thw=None,
    video_grid_thw=None,
    second_per_grid_ts=None,
    attention_mask=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, B, L) ids of a padded batch (grids of all rows in row order; padding = attention_mask 0, its ids 0)
    and the rope deltas (B, 1): max + 1 - (the row's real tokens). transformers 5.23 adds them to the text
    positions it counts from the attention mask, so the next token sits at max + 1 (Qwen's 4.49 and vLLM count
    from the padded length instead: the same positions)."""
    types = torch.as_tensor(mm_token_type_ids)
    batch, length = types.shape
    mask = torch.ones_like(types, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    images = [] if image_grid_thw is None else image_grid_thw.tolist()
    videos = [] if video_grid_thw is None else video_grid_thw.tolist()
    seconds = [] if second_per_grid_ts is None else torch.as_tensor(second_per_grid_ts).tolist()
    positions = torch.zeros(3, batch, length, dtype=torch.long)
    deltas = torch.zeros(batch, 1, dtype=torch.long)
    used = {"image": 0, "video": 0}
    for row in range(batch):
        row_types = types[row][mask[row].to(types.device)].cpu()
        n_images = _blocks(row_types, 1, images[used["image"] :], rule.spatial_merge_size)
        n_videos = _blocks(row_types, 2, videos[used["video"] :], rule.spatial_merge_size)
        ids = sample_position_ids(
            row_types,
            images[used["image"] : used["image"] + n_images],
            videos[used["video"] : used["video"] + n_videos],
            seconds[used["video"] : used["video"] + n_videos],
            rule,
        )
        used["image"] += n_images
        used["video"] += n_videos
        positions[:, row, mask[row].cpu()] = ids
        deltas[row, 0] = (int(ids.max()) + 1 if ids.numel() else 0) - ids.shape[1]
    return positions, deltas


def _blocks(types: torch.Tensor, kind: int, grids: list, merge: int) -> int:
    """How many of `grids` (in order) the `kind` tokens of one row use up."""
    tokens, count = int((types == kind).sum()), 0
    while tokens > 0:
        if count >= len(grids):
            raise ValueError("the batch has more vision tokens than its grids describe")
        t, h, w = grids[count]
        tokens -= t * (h // merge) * (w // merge)
        count += 1
    if tokens < 0:
        raise ValueError("a row's vision tokens do not match its grids")
    return count


def install_position_rule(model, rule: PositionRule) -> None:
    """Make `model` (a Qwen-VL model, optionally under PEFT) compute positions with `rule` wherever it computes
    them itself: a forward without position ids, and `generate`'s prefill (`_prepare_position_ids_for_generation`
    calls the inner model's `get_rope_index` and stores its deltas). Decoding then continues from the last
    prompt position + 1, which under the qwen rule is max + 1 (a prompt ends in text)."""
    inner = _inner_model(model)

    def get_rope_index(
        input_ids,
        mm_token_type_ids=None,
        image_grid_thw=None,
        video_grid_thw=None,
        second_per_grid_ts=None,
        attention_mask=None,
        **_,
    ):
        if mm_token_type_ids is None:
            raise ValueError("M-RoPE positions need mm_token_type_ids (the processors return it; keep it in the batch)")
        positions, deltas = batch_position_ids(
            rule, mm_token_type_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask
        )
        return positions.to(input_ids.device), deltas.to(input_ids.device)

    inner.get_rope_index = get_rope_index
    inner.position_rule = rule


def model_position_rule(model) -> PositionRule:
    """The rule `install_position_rule` gave `model`; a model without one is refused rather than guessed."""
    rule = getattr(_inner_model(model), "position_rule", None)
    if rule is None:
        raise ValueError("this model has no position rule installed; load it with finetune.model.load.load_model")
    return rule


def inner_model(model):
    """The Qwen-VL model under `model` that holds the towers and computes positions (for callers outside this module)."""
    return _inner_model(model)


def _inner_model(model):
    """The Qwen-VL model that owns `get_rope_index` (its family's `inner_model`, `<ForConditionalGeneration>.model`),
    under PEFT or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    family = FAMILIES.get(getattr(getattr(base, "config", None), "model_type", None))
    inner = getattr(base, family.inner_model, base) if family else None
    if not hasattr(inner, "get_rope_index"):
        titles = " / ".join(f.title for f in FAMILIES.values())
        raise TypeError(f"{type(base).__name__} has no get_rope_index: not a {titles} model")
    return inner
