"""Attention for packed training rows: which implementation trains, and our variable-length attention.

`model.attn_implementation`:
  sdpa               transformers' path: a dense boolean (B, 1, L, L) block-causal mask built from row 0 of the
                     position ids, K/V repeated for GQA, no masked block skipped; the Qwen2.5-VL ViT loops in
                     Python over its attention windows. Exact everywhere; the CPU path.
  eager              the plain matmul + softmax reference.
  flash_attention_2  transformers' own flash-attn integration (the flash-attn package on a GPU).
  varlen             ours: each sample attends only to itself, from the sample boundaries the collator computes
                     (`cu_seq_lens_q/k`, `max_length_q/k`: nothing is recomputed or synchronised per layer), one
                     kernel call per layer in the LLM and in the ViT. Kernel: flash-attn's `flash_attn_varlen_func`
                     when installed, else PyTorch's `torch.nn.attention.varlen.varlen_attn` (CUDA), else (CPU) one
                     sdpa call per sample.
  auto               (the default) on a GPU: varlen if one of its GPU kernels is there and agrees with sdpa on a
                     small packed call at start-up, else sdpa; on the CPU: sdpa.
The model is always loaded with a transformers implementation (`loading_implementation`); training then switches
to the chosen one (`use_for_training`). Generation (evaluation, predict, export) runs on sdpa: it needs the padding
mask that varlen does without.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# transformers' Qwen-VL vision attention makes one call per layer with `cu_seqlens` only for implementations whose
# name contains "flash" (else it loops over the windows in Python), hence the names.
REGISTERED = {"flash_attn": "flash_varlen_fa", "torch": "flash_varlen_torch", "per_sample": "flash_varlen_sdpa"}
KERNEL_NOTES = {
    "flash_attn": "flash-attn's flash_attn_varlen_func",
    "torch": "PyTorch's torch.nn.attention.varlen.varlen_attn",
    "per_sample": "one sdpa call per sample (CPU)",
}
BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _flash_attn_kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=scale, causal=causal)


def _torch_kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
    from torch.nn.attention.varlen import varlen_attn

    # The signature moved between releases (is_causal -> window_size; enable_gqa and scale added): ask it.
    accepts = inspect.signature(varlen_attn).parameters
    kwargs = {}
    if "window_size" in accepts:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kwargs["is_causal"] = causal
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in accepts:
            kwargs["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    if "scale" in accepts:
        kwargs["scale"] = scale
    elif scale is not None:
        q = q * (scale * q.shape[-1] ** 0.5)  # the kernel divides by sqrt(head_dim) itself
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


def _per_sample_kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
    bounds = cu_q.tolist()
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (heads, n, head_dim)
        out = F.scaled_dot_product_attention(
            qs, ks, vs, is_causal=causal, scale=scale, enable_gqa=ks.shape[0] != qs.shape[0]
        )
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs)


KERNELS = {"flash_attn": _flash_attn_kernel, "torch": _torch_kernel, "per_sample": _per_sample_kernel}


def boundaries_from_positions(position_ids: torch.Tensor | None, batch: int, length: int, device):
    """(cu_seqlens, max_length) over the flattened rows: a sequence starts wherever the text position is 0 (the
    layout of finetune/model/batching.py), or each row is one sequence. Costs a device synchronisation: the collator's
    boundaries are used whenever they are there."""
    if position_ids is None:
        starts = torch.arange(0, batch * length, length, device=device)
    else:
        starts = (position_ids.reshape(-1) == 0).nonzero().flatten()
    cu = torch.cat([starts, torch.tensor([batch * length], device=device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def varlen_attention(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    kernel: str,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    position_ids: torch.Tensor | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    **kwargs,
):
    """transformers' attention-function signature: query (B, H, L, D), key/value (B, H_kv, L, D) -> (B, L, H, D).
    Every sequence of the flattened rows attends only to itself (causally in the LLM, fully in the ViT)."""
    sequence_parallel = getattr(module, "sequence_parallel", None)
    if sequence_parallel is not None and module.training:
        # An LLM attention module of a sequence-parallel run (finetune/model/sequence_parallel.py): the all-to-all
        # around this same function, which then sees the whole row and its boundaries.
        return sequence_parallel.attend(
            functools.partial(varlen_attention, None, kernel=kernel, is_causal=module.is_causal),
            query,
            key,
            value,
            attention_mask=attention_mask,
            scaling=scaling,
            dropout=dropout,
            cu_seq_lens_q=cu_seq_lens_q,
            cu_seq_lens_k=cu_seq_lens_k,
            max_length_q=max_length_q,
            max_length_k=max_length_k,
            position_ids=position_ids,
            sliding_window=sliding_window,
            **kwargs,
        )
    if attention_mask is not None:
        raise ValueError(
            "varlen attention takes sample boundaries (cu_seq_lens), not a mask: generation and padded batches run "
            "on sdpa (finetune/model/attention.py switches it for them)."
        )
    if dropout or sliding_window:
        raise ValueError("varlen attention has no attention dropout or sliding window; use sdpa for this model.")
    batch, heads, length, head_dim = query.shape
    if cu_seq_lens_q is None:
        cu_seq_lens_q, max_length_q = boundaries_from_positions(position_ids, batch, length, query.device)
        cu_seq_lens_k, max_length_k = cu_seq_lens_q, max_length_q
    elif max_length_q is None:  # boundaries without their longest length: counted once, here
        max_length_q = int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    q, k, v = (t.transpose(1, 2).reshape(batch * length, t.shape[1], head_dim) for t in (query, key, value))
    out = KERNELS[kernel](
        q,
        k,
        v,
        cu_seq_lens_q,
        cu_seq_lens_k if cu_seq_lens_k is not None else cu_seq_lens_q,
        max_length_q,
        max_length_k if max_length_k is not None else max_length_q,
        scaling,
        causal,
    )
    return out.reshape(batch, length, heads, head_dim), None


def register() -> None:
    """Make the varlen implementations known to transformers (idempotent). No mask function is registered for
    them: transformers then builds no mask and hands the boundaries through."""
    from transformers import AttentionInterface

    for kernel, name in REGISTERED.items():
        AttentionInterface.register(name, functools.partial(varlen_attention, kernel=kernel))


def loading_implementation(requested: str) -> str:
    """The transformers implementation a model is loaded with: varlen and auto start from sdpa."""
    return "sdpa" if requested in ("auto", "varlen") else requested


def gpu_kernel() -> str | None:
    """The varlen kernel a CUDA GPU can use: flash-attn if it imports, else PyTorch's own; None without either."""
    if not torch.cuda.is_available():
        return None
    try:
        import flash_attn  # noqa: F401

        return "flash_attn"
    except ImportError:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401

        return "torch"
    except ImportError:
        return None


def disagreement_with_sdpa(kernel: str, device, dtype: torch.dtype) -> str | None:
    """Runs the kernel once on a small packed call (GQA, causal and not, forward and backward) beside sdpa with the
    block mask on the same device; None when they agree, else what went wrong."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    lengths, heads, kv_heads, head_dim = [7, 33, 1, 64, 19], 4, 2, 64
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    for causal in (True, False):
        q, k, v = (
            torch.randn(1, h, total, head_dim, generator=generator).to(device, dtype).requires_grad_()
            for h in (heads, kv_heads, kv_heads)
        )
        mask = segment[:, None] == segment[None, :]
        if causal:
            mask = mask & torch.ones(total, total, dtype=torch.bool, device=device).tril()
        reference = F.scaled_dot_product_attention(
            *(t.float() for t in (q, k, v)), attn_mask=mask[None, None], enable_gqa=True
        ).transpose(1, 2)
        try:
            out, _ = varlen_attention(
                None,
                q,
                k,
                v,
                None,
                kernel=kernel,
                cu_seq_lens_q=cu,
                cu_seq_lens_k=cu,
                max_length_q=max(lengths),
                max_length_k=max(lengths),
                is_causal=causal,
            )
            reference_grad = torch.autograd.grad(reference.sum(), q)[0]
            grad = torch.autograd.grad(out.float().sum(), q)[0]
        except Exception as err:  # a kernel that cannot run here (dtype, architecture, build)
            return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        for what, got, want in (("output", out, reference), ("query gradient", grad, reference_grad)):
            got, want = got.detach().float(), want.detach().float()
            error = float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))
            if not error <= tolerance:
                return f"{'causal ' if causal else ''}{what} differs from sdpa by {error:.1e} of its scale"
    return None


def choose(requested: str, on_gpu: bool, device, dtype: torch.dtype) -> tuple[str, str]:
    """(the implementation name to train with, a line for the start-up log)."""
    if requested in ("sdpa", "eager", "flash_attention_2"):
        return requested, f"model.attn_implementation={requested}"
    kernel = gpu_kernel() if on_gpu else None
    if kernel is None:
        if requested == "auto":
            why = "no varlen GPU kernel on this machine" if on_gpu else "CPU run"
            return "sdpa", f"model.attn_implementation=auto -> sdpa with the block mask ({why})"
        return REGISTERED["per_sample"], f"varlen: {KERNEL_NOTES['per_sample']}"
    problem = disagreement_with_sdpa(kernel, device, dtype)
    if problem is not None:
        logger.warning(
            "the varlen kernel (%s) failed its start-up check against sdpa on %s (%s); training with sdpa and the "
            "block mask instead (slower, exact)",
            KERNEL_NOTES[kernel],
            device,
            problem,
        )
        return "sdpa", f"model.attn_implementation={requested} -> sdpa (the varlen kernel failed its check: {problem})"
    return REGISTERED[kernel], f"varlen: {KERNEL_NOTES[kernel]} (checked against sdpa on {device} at start-up)"


def set_implementation(model, name: str) -> None:
    """Point every config of the model (the text and vision sub-configs included) at `name`."""
    from transformers import PretrainedConfig

    if name in REGISTERED.values():
        register()
    configs = {
        id(m.config): m.config for m in model.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)
    }
    for config in configs.values():
        config._attn_implementation = name


def current_implementation(model) -> str:
    from finetune.model.trainable import base_model

    return base_model(model).config._attn_implementation


def uses_boundaries(name: str) -> bool:
    """Whether training batches should carry `cu_seq_lens_q/k` and `max_length_q/k`."""
    return name in REGISTERED.values() or name == "flash_attention_2"


@contextlib.contextmanager
def for_generation(model):
    """sdpa while generating (padded batches, a cache), then back to the training implementation."""
    name = current_implementation(model)
    if name not in REGISTERED.values():
        yield
        return
    set_implementation(model, "sdpa")
    try:
        yield
    finally:
        set_implementation(model, name)
