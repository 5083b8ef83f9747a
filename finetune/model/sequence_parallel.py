"""Sequence parallelism (Ulysses): one training row split across N ranks after the vision features are merged.

Every rank of a group holds the same row (the loader repeats it: `SequenceParallelSampler`). The row is padded to a
multiple of N with ignored tokens (`pad_row`: a block of its own, no labels); its positions (3 x L M-RoPE, row 0 the
text positions), its varlen boundaries (`cu_seq_lens_*`) and its shifted labels are computed on the whole row.
The inner Qwen-VL model then runs as usual up to the language model: embeddings, one vision-tower call over the
row's media on every rank (finetune/training/vision_sync.py), the features scattered into the embeddings. A
pre-forward hook on the language model (`LanguageModelSlice`) hands it only this rank's contiguous L/N slice of the
embeddings, positions and (Qwen3-VL) DeepStack features. In each decoder layer's self-attention, an all-to-all turns
the slice's [L/N, heads] queries, keys and values into [L, heads/N], our varlen kernel attends over the whole row
with the whole row's boundaries (packed samples stay isolated), and a second all-to-all turns [L, heads/N] back
into [L/N, heads]. The all-to-all lives on the LLM's attention modules only (`install`: an attribute
finetune/model/attention.py's varlen function looks for): the vision tower never goes through it.

The loss: each rank sums its slice's token losses; the caller divides by the global count of labelled tokens
(a rank whose slice holds no labels contributes 0, never 0/0). Gradients flow back through the all-to-alls, so a
rank's parameter gradients hold part of every rank's loss; summing (or DDP/ZeRO averaging with the loss scaled by
the world size) gives the whole row's gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from finetune.base.errors import ConfigError
from finetune.data.encode import IGNORE_INDEX
from finetune.model.attention import boundaries_from_positions


def check(n: int, model_type: str, text_config, world_size: int, varlen: bool) -> None:
    """The start-up checks of `trainer.sequence_parallel=N` (`varlen`: training runs on our varlen attention):
    one ConfigError line each, with the fix."""
    if n <= 1:
        return
    if getattr(text_config, "layer_types", None) and any(t != "full_attention" for t in text_config.layer_types):
        raise ConfigError(
            f"trainer.sequence_parallel={n} cannot split {model_type}: its LLM has linear-attention layers, whose "
            "recurrent state runs along the whole sequence (a split needs that state handed from rank to rank, not "
            "built here); set trainer.sequence_parallel=1 or use a Qwen2-VL/Qwen2.5-VL/Qwen3-VL family."
        )
    heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    if heads % n or kv_heads % n:
        fits = [d for d in range(1, kv_heads + 1) if heads % d == 0 and kv_heads % d == 0]
        raise ConfigError(
            f"trainer.sequence_parallel={n} must divide the LLM's {heads} attention heads and {kv_heads} key/value "
            f"heads (each rank attends with 1/N of them); use one of {fits}."
        )
    if world_size % n:
        raise ConfigError(
            f"trainer.sequence_parallel={n} must divide the number of processes ({world_size}); launch a multiple "
            f"of {n} processes or use a divisor of {world_size}."
        )
    if not varlen:
        raise ConfigError(
            f"trainer.sequence_parallel={n} needs our varlen attention, and this run would train on another "
            "implementation (sdpa with a dropped mask would let the packed samples of a split row attend across "
            "each other); set model.attn_implementation=varlen and make sure its kernel passes its start-up check."
        )


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0 (chunk i goes to rank i, chunk j of the output came from rank j); its own
    inverse, so backward sends the gradient chunks back the same way. Works on gloo (CPU) and NCCL."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()  # the collective reads and writes flat buffers: never a permuted layout
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    return _AllToAll.apply(x, group)


class SequenceParallel:
    """One rank's place in its sequence-parallel group: `size` ranks holding one row, this rank's slice `rank`."""

    def __init__(self, group, size: int, rank: int):
        self.group, self.size, self.rank = group, size, rank
        self.calls = 0  # attention calls that went through the all-to-all (tests count them)

    @classmethod
    def from_world(cls, size: int) -> "SequenceParallel":
        """Groups of `size` consecutive ranks (the loader gives each group one row); every rank builds every group,
        as torch.distributed.new_group requires."""
        world, me = dist.get_world_size(), dist.get_rank()
        mine = None
        for start in range(0, world, size):
            group = dist.new_group(list(range(start, start + size)))
            if start <= me < start + size:
                mine = group
        return cls(mine, size, me % size)

    def span(self, length: int) -> slice:
        chunk = length // self.size
        return slice(self.rank * chunk, (self.rank + 1) * chunk)

    def heads_to_sequence(self, t: torch.Tensor) -> torch.Tensor:
        """(B, H, L/N, D) of this rank's slice -> (B, H/N, L, D): the whole row, this rank's share of the heads."""
        b, h, ls, d = t.shape
        chunks = t.reshape(b, self.size, h // self.size, ls, d).transpose(0, 1)  # (N: destination, B, H/N, L/N, D)
        got = all_to_all(chunks, self.group)  # (N: source slice, B, H/N, L/N, D)
        return got.permute(1, 2, 0, 3, 4).reshape(b, h // self.size, self.size * ls, d)

    def sequence_to_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, H/N, D), the attention output over the whole row -> (B, L/N, H, D): this rank's slice, every head."""
        b, length, hs, d = t.shape
        chunks = t.reshape(b, self.size, length // self.size, hs, d).transpose(0, 1)  # (N: dest slice, B, L/N, H/N, D)
        got = all_to_all(chunks, self.group)  # (N: source head share, B, L/N, H/N, D)
        return got.permute(1, 2, 0, 3, 4).reshape(b, length // self.size, self.size * hs, d)

    def attend(self, attention, query, key, value, **kwargs):
        """`attention` (finetune/model/attention.py's varlen function bound to its kernel) over the whole row: the
        boundaries in kwargs are the whole row's."""
        self.calls += 1
        q, k, v = (self.heads_to_sequence(t) for t in (query, key, value))
        kwargs.pop("position_ids", None)  # this slice's; the whole row's boundaries are in cu_seq_lens
        out, _ = attention(q, k, v, **kwargs)
        return self.sequence_to_heads(out), None


def attention_modules(model) -> list:
    """The self-attention modules of the LLM's decoder layers (never a vision-tower module)."""
    from finetune.base.families import family_of
    from finetune.model.rope import inner_model

    inner = inner_model(model)
    language_model = inner.get_submodule(family_of(inner.config.model_type).language_model)
    return [layer.self_attn for layer in language_model.layers]


def install(model, sp: SequenceParallel) -> int:
    """Put `sp` on the LLM's attention modules (finetune/model/attention.py's varlen function routes a module that
    has it through the all-to-all). Returns how many modules took it."""
    modules = attention_modules(model)
    for module in modules:
        module.sequence_parallel = sp
    return len(modules)


def uninstall(model) -> None:
    for module in attention_modules(model):
        module.__dict__.pop("sequence_parallel", None)


def pad_row(batch: dict, n: int) -> dict:
    """The training batch with every row padded to a multiple of `n` tokens: pad tokens, no labels, text type, and
    positions of a block of their own (0, 1, ...: a sequence of its own in the boundaries, which are recomputed)."""
    length = batch["input_ids"].shape[-1]
    extra = -length % n
    if not extra:
        return dict(batch)
    out = dict(batch)
    rows = batch["input_ids"].shape[0]

    def grow(t, value):
        return torch.cat([t, t.new_full((*t.shape[:-1], extra), value)], dim=-1)

    out["input_ids"] = grow(batch["input_ids"], 0)  # any text token: it attends only to its own block
    out["labels"] = grow(batch["labels"], IGNORE_INDEX)
    if "mm_token_type_ids" in batch:
        out["mm_token_type_ids"] = grow(batch["mm_token_type_ids"], 0)
    positions = batch["position_ids"]
    tail = torch.arange(extra, device=positions.device).expand(*positions.shape[:-1], extra)
    out["position_ids"] = torch.cat([positions, tail], dim=-1)
    if "cu_seq_lens_q" in batch:
        cu, longest = boundaries_from_positions(out["position_ids"][0], rows, length + extra, positions.device)
        out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    return out


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Position t's target is token t + 1, taken on the whole row (the last position has none)."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)


class LanguageModelSlice:
    """While a forward runs: a pre-forward hook on the language model that keeps this rank's slice of the merged
    embeddings, the positions and Qwen3-VL's DeepStack inputs (the features of the visual tokens in the slice)."""

    def __init__(self, model, sp: SequenceParallel):
        from finetune.base.families import family_of
        from finetune.model.rope import inner_model

        inner = inner_model(model)
        self.language_model = inner.get_submodule(family_of(inner.config.model_type).language_model)
        self.sp = sp

    def __enter__(self):
        self.handle = self.language_model.register_forward_pre_hook(self._before, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def _before(self, module, args, kwargs):
        embeds = kwargs["inputs_embeds"]
        span = self.sp.span(embeds.shape[1])
        kwargs = {**kwargs, "inputs_embeds": embeds[:, span]}
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"][..., span]
        mask = kwargs.get("visual_pos_masks")
        if mask is not None:
            columns = mask.nonzero()[:, 1]  # the DeepStack rows follow the mask's true entries in row-major order
            keep = (columns >= span.start) & (columns < span.stop)
            kwargs["deepstack_visual_embeds"] = [layer[keep] for layer in kwargs["deepstack_visual_embeds"]]
            kwargs["visual_pos_masks"] = mask[:, span]
        return args, kwargs


def slice_token_losses(model, batch: dict, sp: SequenceParallel, unwrapped=None) -> tuple[torch.Tensor, int]:
    """(sum of this rank's slice's token losses (fp32), its labelled-token count) of a training batch: the row
    padded to a multiple of N, the labels shifted on the whole row, the model run with its language model on this
    rank's slice. The caller divides by the global labelled count. `model` is called (as wrapped for training: DDP or
    DeepSpeed); `unwrapped`, the PEFT or transformers model under it, is where the language model is found."""
    padded = pad_row(batch, sp.size)
    targets = shifted_labels(padded.pop("labels"))[:, sp.span(padded["input_ids"].shape[1])]
    with LanguageModelSlice(model if unwrapped is None else unwrapped, sp):
        out = model(**padded, use_cache=False)
    logits = out.logits.float()
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, int((targets != IGNORE_INDEX).sum())


class SequenceParallelSampler:
    """The row sampler of a data-parallel world of W/N ranks, each batch handed out N times in a row: accelerate
    gives batch k to rank k % W, so ranks gN ... gN + N - 1 (one group) get the same rows."""

    def __init__(self, sampler, n: int):
        self.sampler, self.n = sampler, n
        self.batch_size, self.drop_last = sampler.batch_size, sampler.drop_last

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler) * self.n

    def __iter__(self):
        for batch in self.sampler:
            for _ in range(self.n):
                yield batch
