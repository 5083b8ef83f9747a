"""M-RoPE position ids for one sample, computed in the collator (no model needed).

This is the rule of transformers 5.23's `get_rope_index` for Qwen2-VL and Qwen2.5-VL, applied to one
sample at a time so that packed samples each start from position 0. Parity with the model's own
`model.model.get_rope_index` on each sample alone is tested on many random packed rows.

Text runs advance all three rows by one per token. A vision block of grid (t, h, w) lays out t x h/2 x w/2
tokens at temporal ids t_index * interval + start (interval = tokens_per_second * second_per_grid for
Qwen2.5-VL videos, 1 otherwise) and spatial ids start + row / column; the text after it resumes at
start + max(h, w) / 2.
"""

from __future__ import annotations

import torch


def sample_position_ids(
    mm_token_type_ids: list[int],
    image_grids: list[tuple[int, int, int]],
    video_grids: list[tuple[int, int, int]],
    second_per_grid: list[float] | None = None,
    spatial_merge_size: int = 2,
    tokens_per_second: float | None = None,
) -> torch.Tensor:
    """(3, L) int64 position ids of one sample. `tokens_per_second` set means Qwen2.5-VL time spacing."""
    images, videos = iter(image_grids), iter(video_grids)
    seconds = iter(second_per_grid or [])
    types = torch.tensor(mm_token_type_ids)
    # Runs of equal token types, as itertools.groupby in the reference.
    change = torch.nonzero(torch.diff(types, prepend=types[:1] - 1)).flatten().tolist() + [len(types)]
    parts, current = [], 0
    for start, end in zip(change[:-1], change[1:]):
        kind = int(types[start])
        if kind == 0:
            parts.append(torch.arange(current, current + end - start).expand(3, -1))
            current += end - start
            continue
        t, h, w = next(images) if kind == 1 else next(videos)
        interval: float | torch.Tensor = 1.0
        if kind == 2 and tokens_per_second is not None:
            # float32, as the model computes it from the float32 `second_per_grid_ts` tensor
            interval = tokens_per_second * torch.tensor(next(seconds), dtype=torch.float32)
        gh, gw = h // spatial_merge_size, w // spatial_merge_size
        temporal = (torch.arange(t) * interval).long() + current
        grid = torch.meshgrid(temporal, torch.arange(gh) + current, torch.arange(gw) + current, indexing="ij")
        block = torch.stack(grid).reshape(3, -1)
        if block.shape[1] != end - start:
            raise ValueError(f"a vision block of {end - start} tokens does not match its grid {(t, h, w)}")
        parts.append(block)
        current += max(h, w) // spatial_merge_size
    return torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
