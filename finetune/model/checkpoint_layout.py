"""The published checkpoints' tensor layout where transformers' in-memory layout differs from it.

Two ways, each named per family in finetune/base/families.py:
- `transposed_in_checkpoint`: Qwen3-VL-MoE's published checkpoints store each layer's fused experts as
  `mlp.experts.gate_up_proj` [E, H, 2I] and `mlp.experts.down_proj` [E, I, H]; transformers 5.23 holds them as
  [E, 2I, H] and [E, H, I], transposes them on load (conversion_mapping: `Transpose(1, 2, check_dims=True)`, decided
  by comparing the shapes) and saves its own layout back unchanged (the reverse operation compares the shapes too,
  and they match). vLLM's loader takes the published layout (its Qwen3-VL-MoE decoder layers load fused experts with
  `is_fused_checkpoint_transposed=True`).
- `per_expert_in_checkpoint`: Qwen3.5-MoE's published checkpoints store the experts unfused, one tensor per expert
  and projection (`mlp.experts.<e>.gate_proj.weight`, `up_proj.weight` [I, H], `down_proj.weight` [H, I]): transformers
  5.23 fuses them on load (conversion_mapping `qwen3_5_moe_text` = the `qwen2_moe` converter: MergeModulelist, then
  gate and up concatenated along dimension 1) and vLLM 0.33.0's fused-MoE loader maps each per-expert tensor into its
  `w13_weight` / `w2_weight` (RoutedExperts.build_expert_params_mapping). transformers' save happens to reverse that
  converter today; writing the split here keeps the export's layout the published one whatever it does.
The tiny checkpoints and the export write both as the published checkpoints do.
"""

from __future__ import annotations

import torch

from finetune.base.families import Family


def _ending_in(names, ends: tuple[str, ...] | None) -> list[str]:
    suffixes = tuple(f".{end}" for end in ends or ())
    return [name for name in names if suffixes and name.endswith(suffixes)]


def transposed_names(names, family: Family) -> list[str]:
    """The names among `names` that the published checkpoints store transposed."""
    return _ending_in(names, family.transposed_in_checkpoint)


def per_expert_names(names, family: Family) -> list[str]:
    """The names among `names` (fused expert parameters) that the published checkpoints store one tensor per expert."""
    return _ending_in(names, family.per_expert_in_checkpoint)


def published_names(names, family: Family) -> list[str]:
    """The parameters among `names` that the published layout stores otherwise than transformers holds them."""
    return transposed_names(names, family) + per_expert_names(names, family)


def split_per_expert(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """A fused expert parameter `<p>.<projection>` [E, out, in] as the per-expert tensors `<p>.<e>.<projection>.weight`
    [out, in]; a fused `gate_up_proj` as `<p>.<e>.gate_proj.weight` and `<p>.<e>.up_proj.weight`, the first and second
    half of its dimension 1 (transformers concatenates gate then up there, and its forward chunks them so)."""
    prefix, projection = name.rsplit(".", 1)
    if projection == "gate_up_proj":
        halves = tensor.chunk(2, dim=1)
        parts = {"gate_proj": halves[0], "up_proj": halves[1]}
    else:
        parts = {projection: tensor}
    return {
        f"{prefix}.{expert}.{part}.weight": fused[expert].contiguous()
        for expert in range(tensor.shape[0])
        for part, fused in parts.items()
    }


def published_layout(state_dict: dict[str, torch.Tensor], family: Family) -> dict[str, torch.Tensor]:
    """`state_dict` (transformers' layout) with the family's parameters in the published layout: transposed, or split
    per expert. A transposed one is refused where transformers could not tell the two layouts apart on loading
    (equal last two dimensions)."""
    transposed, split = set(transposed_names(state_dict, family)), set(per_expert_names(state_dict, family))
    square = [name for name in transposed if state_dict[name].shape[-1] == state_dict[name].shape[-2]]
    if square:
        raise ValueError(
            f"{square[0]} has shape {tuple(state_dict[square[0]].shape)}: transformers tells the published layout of "
            "fused experts from its own by their shape, and cannot for equal last two dimensions (2 x "
            "moe_intermediate_size or moe_intermediate_size equal to hidden_size)."
        )
    out = {}
    for name, tensor in state_dict.items():
        if name in transposed:
            out[name] = tensor.transpose(-1, -2).contiguous()
        elif name in split:
            out.update(split_per_expert(name, tensor))
        else:
            out[name] = tensor
    return out


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
