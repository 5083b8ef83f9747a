"""Packed rows through hybrid language models (Qwen3.5: Gated DeltaNet linear attention in three of every four layers).

A block-diagonal attention mask keeps packed samples apart in attention layers, but a linear-attention layer carries
state along the row: a short causal convolution (kernel 4) over the projected q/k/v and a recurrent state (the gated
delta rule). In a packed row both must restart at every sample boundary, or sample 2 reads sample 1. transformers
5.23 hands the boundaries (`cu_seq_lens_q`, when the batch carries them) only to the gated delta rule, as
`cu_seqlens`; its PyTorch fallback refuses them, flash-linear-attention needs one flattened row, and the convolution
drops them on every path (PyTorch and causal-conv1d alike, which wants `seq_idx`). With no boundaries in the batch
nothing complains and the samples mix.

`install(model)` makes a hybrid model exact on packed rows, whatever is installed:
  - boundaries: a pre-hook on the language model derives `cu_seq_lens_q` from the text row of the 4-row position ids
    (finetune/model/batching.py: it restarts at 0 for every sample) when the collator did not send them;
  - convolution: ours, `boundary_causal_conv1d`, whenever boundaries are there (K shifted multiply-adds over the
    flattened rows, a tap reaching into the previous sample contributes nothing);
  - gated delta rule: with flash-linear-attention installed, its kernel on the rows flattened into one sequence with
    `cu_seqlens`; otherwise transformers' PyTorch chunked rule on the samples gathered into right-padded batches of
    like lengths (padding after a sample's end cannot reach back into it), scattered back.
Without boundaries (generation, one sample per row) transformers' own functions run unchanged. `packing_problem(model)`
names what would defeat this (a linear-attention layer whose forward is not transformers' own, e.g. a hub kernel or
remote code): packing is then refused at start-up.
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F

# transformers' modeling modules of the hybrid families: their module-level `causal_conv1d_fn` and
# `torch_chunk_gated_delta_rule` are what the Gated DeltaNet forward calls.
HYBRID_MODULES = (
    "transformers.models.qwen3_5.modeling_qwen3_5",
    "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
)
_ORIGINAL = "_finetune_original"  # where the wrapped function keeps the original


def is_hybrid(config) -> bool:
    """Whether the (outer or text) config's language model has linear-attention layers."""
    text = getattr(config, "text_config", config)
    return "linear_attention" in (getattr(text, "layer_types", None) or ())


def sequence_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) index of the sequence each flattened position belongs to."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if lengths.device.type == "cpu" and int(lengths.sum()) != total:  # checked where it costs no device sync
        raise ValueError(f"the sample boundaries cover {int(lengths.sum())} tokens, the batch has {total}")
    ids = torch.arange(len(lengths), device=cu_seqlens.device)
    return torch.repeat_interleave(ids, lengths, output_size=total)  # output_size: no sync to count it


def boundary_causal_conv1d(hidden_states, weight, bias, activation, cu_seqlens):
    """The depthwise causal convolution of (B, C, L) `hidden_states` (weight (C, K)), restarted at every boundary of
    `cu_seqlens` (over the B x L positions flattened row by row): as if each sequence were convolved alone."""
    batch, channels, length = hidden_states.shape
    kernel = weight.shape[-1]
    x = hidden_states.to(weight.dtype).permute(1, 0, 2).reshape(channels, batch * length)
    seq = sequence_ids(cu_seqlens.to(x.device), batch * length)
    out = torch.zeros_like(x) if bias is None else bias[:, None].expand_as(x).clone()
    for tap in range(kernel):  # tap k reads the input (kernel - 1 - k) positions back, as F.conv1d with left padding
        back = kernel - 1 - tap
        if back == 0:
            out = out + weight[:, tap : tap + 1] * x
            continue
        shifted = F.pad(x, (back, 0))[:, : batch * length]
        same = F.pad(seq, (back, 0), value=-1)[: batch * length] == seq
        out = out + weight[:, tap : tap + 1] * shifted * same
    if activation is not None:
        from transformers.activations import ACT2FN

        out = ACT2FN[activation](out)
    return out.reshape(channels, batch, length).permute(1, 0, 2).to(hidden_states.dtype)


@functools.lru_cache(maxsize=None)
def _external_kernel() -> bool:
    """Whether transformers' gated delta rule runs flash-linear-attention's kernel (it does when fla imports)."""
    try:
        module = importlib.import_module("fla.ops.gated_delta_rule")
    except Exception:
        return False
    return getattr(module, "chunk_gated_delta_rule", None) is not None


def boundary_gated_delta_rule(rule, query, key, value, g, beta, cu_seqlens, **kwargs):
    """`rule` (transformers' chunked gated delta rule: tensors (B, L, heads, dim), g and beta (B, L, heads)) with the
    recurrent state restarted at every boundary of `cu_seqlens` (over the flattened rows)."""
    if kwargs.get("initial_state") is not None or kwargs.get("output_final_state"):
        raise ValueError("packed rows run without a cache: no initial or final recurrent state")
    batch, length = query.shape[:2]
    flat = [t.reshape(1, batch * length, *t.shape[2:]) for t in (query, key, value, g, beta)]
    if _external_kernel():  # one flattened sequence, the boundaries as cu_seqlens (fla's varlen convention)
        out, state = rule(*flat[:3], g=flat[3], beta=flat[4], cu_seqlens=cu_seqlens.long(), **kwargs)
        return out.reshape(batch, length, *out.shape[2:]), state
    # PyTorch: each sequence its own row of a right-padded batch (zeros after its end), sequences of like length
    # together (lengths up to one 64-token chunk, then by powers of two: at most 2x the work of the unpadded row).
    starts = cu_seqlens[:-1].long()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    buckets = torch.clamp(torch.ceil(torch.log2(lengths.clamp(min=1).double())), min=6).long()
    result = None
    for bucket in buckets.unique().tolist():
        members = (buckets == bucket).nonzero().flatten()
        steps = torch.arange(int(lengths[members].max()), device=starts.device)
        valid = steps[None, :] < lengths[members, None]  # (sequences, longest)
        index = (starts[members, None] + steps[None, :]).clamp(max=batch * length - 1)
        gathered = [torch.where(_expand(valid, t), t[0][index], t.new_zeros(())) for t in flat]
        out, state = rule(*gathered[:3], g=gathered[3], beta=gathered[4], **kwargs)
        if result is None:
            result = out.new_zeros(batch * length, *out.shape[2:])
        result[index[valid]] = out[valid]
    return result.reshape(batch, length, *result.shape[1:]), state


def _expand(valid: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return valid.reshape(*valid.shape, *([1] * (t.dim() - 2)))


def _conv_with_boundaries(original):
    @functools.wraps(original)
    def conv(hidden_states, weight, bias=None, activation=None, **kwargs):
        cu_seqlens = kwargs.get("cu_seq_lens_q")
        if cu_seqlens is None:
            return original(hidden_states, weight, bias, activation=activation, **kwargs)
        return boundary_causal_conv1d(hidden_states, weight, bias, activation, cu_seqlens)

    setattr(conv, _ORIGINAL, original)
    return conv


def _rule_with_boundaries(original):
    @functools.wraps(original)
    def rule(query, key, value, g, beta, *args, cu_seqlens=None, **kwargs):
        if cu_seqlens is None:
            return original(query, key, value, g, beta, *args, **kwargs)
        if args:
            raise TypeError("the gated delta rule takes its options by keyword here")
        for name in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
            kwargs.pop(name, None)
        return boundary_gated_delta_rule(original, query, key, value, g, beta, cu_seqlens, **kwargs)

    setattr(rule, _ORIGINAL, original)
    return rule


def _patch_modules() -> None:
    """Wrap the two functions in every hybrid modeling module (idempotent; a no-op without boundaries)."""
    for name in HYBRID_MODULES:
        module = importlib.import_module(name)
        if not hasattr(module.causal_conv1d_fn, _ORIGINAL):
            module.causal_conv1d_fn = _conv_with_boundaries(module.causal_conv1d_fn)
        if not hasattr(module.torch_chunk_gated_delta_rule, _ORIGINAL):
            module.torch_chunk_gated_delta_rule = _rule_with_boundaries(module.torch_chunk_gated_delta_rule)


def _add_boundaries(module, args, kwargs):
    """Language-model pre-hook: `cu_seq_lens_q/k` from the text row of 4-row position ids when the batch has none
    (costs one device synchronisation per forward; the training collator sends them)."""
    position_ids = kwargs.get("position_ids")
    if (
        kwargs.get("cu_seq_lens_q") is not None
        or kwargs.get("attention_mask") is not None
        or kwargs.get("past_key_values") is not None  # generation: one sequence per row, the state carried on
        or kwargs.get("use_cache")
        or position_ids is None
        or position_ids.dim() != 3
        or position_ids.shape[0] != 4
    ):
        return None
    from finetune.model.attention import boundaries_from_positions

    batch, length = position_ids.shape[1:]
    cu, longest = boundaries_from_positions(position_ids[0], batch, length, position_ids.device)
    return args, {**kwargs, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def linear_attention_layers(model) -> list:
    return [m for name, m in model.named_modules() if name.endswith("linear_attn")]


def packing_problem(model) -> str | None:
    """Why packed rows could mix samples in this model's linear-attention layers, or None (none, or all ours)."""
    for layer in linear_attention_layers(model):
        cls = type(layer)
        if cls.__module__ not in HYBRID_MODULES:
            return f"{cls.__module__}.{cls.__name__} is not transformers' Gated DeltaNet"
        forward = getattr(layer.forward, "__func__", layer.forward)
        if forward is not cls.forward or cls.forward.__module__ != cls.__module__:
            return f"the forward of {cls.__name__} was replaced (a hub kernel?)"
    return None


def install(model) -> None:
    """Make a hybrid model's packed rows exact (module docstring); a no-op for models without linear attention."""
    if not is_hybrid(model.config):
        return
    _patch_modules()
    for module in model.modules():
        if type(module).__name__.endswith("TextModel") and not getattr(module, "_finetune_boundary_hook", False):
            module.register_forward_pre_hook(_add_boundaries, with_kwargs=True)
            module._finetune_boundary_hook = True
