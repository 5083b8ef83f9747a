"""Sequence parallelism (Ulysses): one training row split across N ranks after the vision features are merged.

Every rank of a group holds the same row (the loader repeats it: `SequenceParallelSampler`). The row is padded to a
multiple of N with ignored tokens (`pad_row`: a block of its own, no labels); its positions (3 x L M-RoPE, row 0 the
text positions), its varlen boundaries (`cu_seq_lens_*`) and its shifted labels are computed on the whole row.
The inner Qwen-VL model then runs as usual up to the language model: embeddings, the vision features (in training,
finetune/training/vision_sync.py's one tower call per rank, on this rank's share of the row's images and video
frames, the features of all the group's ranks gathered: `encode_media_sharded`), scattered into the embeddings. A
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
from finetune.model.media_features import MEDIA, dummy_vision_input, encode_media_once


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


class _AllGather(torch.autograd.Function):
    """all_gather of equal-shaped tensors -> (N, ...); backward sums every rank's gradient of this rank's part (an
    all-to-all and a sum: torch.distributed.nn's all_gather backward scatters from group-local ranks taken as global
    ones on gloo, which fails in any group but the world)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)  # chunk j: rank j's gradient of this rank's part
        return out.sum(0), None


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


def frame_units(vision_config, inputs: dict) -> list[tuple[str, int, int, tuple[int, int, int]]]:
    """The row's media as units the tower encodes independently, in order: (kind, item, first patch row, grid). An
    image is one unit; a video of grid (t, h, w) is t units of grid (1, h, w) (its patches are stored frame after
    frame, and the Qwen-VL ViTs attend within a temporal patch only: Qwen2/2.5-VL windows and Qwen3-VL alike)."""
    units = []
    for kind, pixels, grid in MEDIA:
        if inputs.get(pixels) is None:
            continue
        row = 0
        for item, (t, h, w) in enumerate(inputs[grid].tolist()):
            frames = [(1, h, w)] * t if kind == "video" else [(t, h, w)]
            for g in frames:
                units.append((kind, item, row, g))
                row += g[0] * g[1] * g[2]
    return units


def _share(units: list, size: int) -> list[list[int]]:
    """Contiguous runs of units per rank with about equal patch counts (a rank may get none)."""
    weights = [g[0] * g[1] * g[2] for *_, g in units]
    total, shares, start = sum(weights), [], 0
    for rank in range(size):
        end, done = start, sum(weights[:start])
        while end < len(units) and (rank == size - 1 or done + weights[end] / 2 <= total * (rank + 1) / size):
            done += weights[end]
            end += 1
        shares.append(list(range(start, end)))
        start = end
    return shares


def encode_media_sharded(visual, vision_config, inputs: dict, sp: SequenceParallel) -> tuple[dict, torch.Tensor | None]:
    """`encode_media_once` (finetune/model/media_features.py) with the row's frames shared out over the group: each
    rank runs the tower on its own images and video frames only, and the features of all ranks are gathered
    (autograd-aware: a rank's tower gets the gradient of every rank's use of its frames). Every rank calls the tower
    once whatever it holds (a rank without frames encodes the dummy input, its 0 x features returned as padding, as
    for a row without media). Returns (features as `mm_encoder_outputs`, padding or None)."""
    weight = next(visual.parameters())
    units = frame_units(vision_config, inputs)
    if not units:
        return encode_media_once(visual, vision_config, inputs)
    shares = _share(units, sp.size)
    mine = [units[i] for i in shares[sp.rank]]
    merge = vision_config.spatial_merge_size**2
    padding = None
    if mine:
        pixels = torch.cat(
            [inputs[dict((k, p) for k, p, _ in MEDIA)[kind]][row : row + t * h * w] for kind, _, row, (t, h, w) in mine]
        ).type(weight.dtype)
        grid = torch.tensor([g for *_, g in mine], device=pixels.device)
        out = visual(pixels, grid_thw=grid)
        fields = [out.pooler_output, *(getattr(out, "deepstack_features", None) or [])]
    else:
        pixels, grid = dummy_vision_input(vision_config, weight.device, weight.dtype)
        out = visual(pixels, grid_thw=grid)
        fields = [out.pooler_output, *(getattr(out, "deepstack_features", None) or [])]
        padding = sum(f.float().sum() for f in fields) * 0.0
        fields = [f[:0] for f in fields]
    counts = [sum(g[0] * g[1] * g[2] // merge for *_, g in (units[i] for i in share)) for share in shares]
    longest = max(counts)
    gathered = []
    for field in fields:  # all_gather needs equal shapes: pad to the longest share, then cut
        padded = torch.cat([field, field.new_zeros(longest - field.shape[0], field.shape[1])])
        parts = _AllGather.apply(padded, sp.group)
        gathered.append(torch.cat([part[:count] for part, count in zip(parts, counts)]))
    pooled, deepstack = gathered[0], gathered[1:]
    outputs = {}
    for kind, _, grid in MEDIA:
        if inputs.get(grid) is None:
            continue
        sizes = (inputs[grid].prod(-1) // merge).tolist()
        taken = [i for i, unit in enumerate(units) if unit[0] == kind]
        tokens = [g[0] * g[1] * g[2] // merge for *_, g in units]
        starts = [sum(tokens[:i]) for i in range(len(units))]
        rows = torch.cat([torch.arange(starts[i], starts[i] + tokens[i]) for i in taken]).to(pooled.device)
        fields = {"pooler_output": torch.split(pooled[rows], sizes)}
        if deepstack:
            fields["deepstack_features"] = [torch.split(layer[rows], sizes) for layer in deepstack]
        outputs[kind] = type(out)(**fields)
    return outputs, padding
