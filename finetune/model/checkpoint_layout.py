"""The published checkpoints' tensor layout where transformers' in-memory layout differs from it.

Qwen3-VL-MoE's published checkpoints store each layer's fused experts as `mlp.experts.gate_up_proj` [E, H, 2I] and
`mlp.experts.down_proj` [E, I, H]; transformers 5.23 holds them as [E, 2I, H] and [E, H, I], transposes them on
load (conversion_mapping: `Transpose(1, 2, check_dims=True)`, decided by comparing the shapes) and saves its own
layout back unchanged (the reverse operation compares the shapes too, and they match). vLLM's loader takes the
published layout (its Qwen3-VL-MoE decoder layers load fused experts with `is_fused_checkpoint_transposed=True`).
The family's `transposed_in_checkpoint` (finetune/base/families.py) names those parameters; the tiny checkpoints and
the export write them as the published checkpoints do.
"""

from __future__ import annotations

import torch

from finetune.base.families import Family


def transposed_names(names, family: Family) -> list[str]:
    """The names among `names` that the published checkpoints store transposed."""
    ends = tuple(f".{name}" for name in family.transposed_in_checkpoint or ())
    return [name for name in names if ends and name.endswith(ends)]


def published_layout(state_dict: dict[str, torch.Tensor], family: Family) -> dict[str, torch.Tensor]:
    """`state_dict` (transformers' layout) with the family's transposed parameters in the published layout. Refused
    where transformers could not tell the two layouts apart on loading (equal last two dimensions)."""
    names = transposed_names(state_dict, family)
    square = [name for name in names if state_dict[name].shape[-1] == state_dict[name].shape[-2]]
    if square:
        raise ValueError(
            f"{square[0]} has shape {tuple(state_dict[square[0]].shape)}: transformers tells the published layout of "
            "fused experts from its own by their shape, and cannot for equal last two dimensions (2 x "
            "moe_intermediate_size or moe_intermediate_size equal to hidden_size)."
        )
    return {
        name: tensor.transpose(-1, -2).contiguous() if name in names else tensor for name, tensor in state_dict.items()
    }


def weight_fingerprint(tensor) -> list:
    """[shape, a number that changes when the values move to other positions] of a weight, computed the same way
    here and in the export's reload script (which imports no project code: this function's source is copied into
    it): the elements weighted by cos of their position (slice index and flat position within the slice), one slice
    of the first dimension at a time, in float64 on the CPU."""
    import torch

    total = 0.0
    slices = tensor.detach().reshape(tensor.shape[0] if tensor.dim() > 1 else 1, -1)
    for index, part in enumerate(slices):
        values = part.to("cpu", torch.float64)
        weights = torch.cos(torch.arange(values.numel(), dtype=torch.float64) * 0.43 + index)
        total += float((values * weights).sum())
    return [list(tensor.shape), total]
