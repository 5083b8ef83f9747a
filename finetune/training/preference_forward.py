"""The forward of preference training: per-token log-probs of every sequence's completion tokens, from a batch of
finetune/model/preference_batching.py.

- One vision-tower call per forward for the pairs' unique media (`encode_media_once`, finetune/training/vision_sync.py):
  the features of each unique item are repeated by the batch's `image_index`/`video_index` into the per-item tuples
  of transformers' `mm_encoder_outputs`, so the chosen and the rejected sequence of a pair read the same tensors and
  a trainable tower's gradients gather from both uses. A batch with no media runs the tower on a dummy input and adds
  0 x its output to the input embeddings, as vision_sync does: every rank calls the same modules (no ZeRO-3 hang on a
  text-only rank). The reference forward of a frozen tower reuses the policy's features (`features=`), so a step
  makes one tower call however many forwards it runs.
- The LM head runs only at the positions that predict a completion token (transformers' boolean `logits_to_keep`):
  a long video prompt never materialises (length x vocabulary) logits. log_softmax is taken in fp32.
- The result is TRL's compact view: (2B, T) tensors, each sequence's completion tokens left-aligned (T: the most
  completion tokens of any sequence), with the mask saying which entries are real.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from finetune.base.families import family_of
from finetune.training.vision_sync import encode_media_once

# Batch keys that are not model inputs (bookkeeping of the collator and of this module).
NOT_MODEL_INPUTS = (
    "labels",
    "sequence_index",
    "image_index",
    "video_index",
    "num_pairs",
    "num_sequences",
    "pair_index",
    "label",
    "kl_batch",
    "num_real_tokens",
    "sample_ids",
    "bad_samples",
    "pixel_values",
    "pixel_values_videos",
    "image_grid_thw",
    "video_grid_thw",
    "second_per_grid_ts",
    "ref_chosen_logps",
    "ref_rejected_logps",
)


@dataclass
class CompletionLogProbs:
    """(2B, T) per completion token of each sequence, left-aligned; `mask` 1 on real entries."""

    log_probs: torch.Tensor
    mask: torch.Tensor
    entropy: torch.Tensor
    mean_logits: torch.Tensor
    is_top1: torch.Tensor
    log_sum_sq_probs: torch.Tensor | None = None  # log sum_v p_v^2 (TRL's WPO weighting)
    aux_loss: torch.Tensor | None = None
    features: dict | None = None  # the unique items' features, for a reference forward to reuse


def vision_parts(model):
    """(vision tower, vision config) of a (PEFT-wrapped) Qwen-VL model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    family = family_of(base.config.model_type)
    inner = base.get_submodule(family.inner_model)
    return inner.get_submodule(family.vision_tower), inner.config.vision_config


def tower_is_frozen(visual) -> bool:
    """No parameter of the tower (mergers and any LoRA inside it included) trains: its features are fixed."""
    return not any(p.requires_grad for p in visual.parameters())


def repeat_features(unique: dict, batch: dict) -> dict:
    """`mm_encoder_outputs` for every placeholder block of the batch: the unique items' per-item tuples repeated by
    `image_index`/`video_index` (the same tensors, so gradients from every use add up)."""
    outputs = {}
    for kind, out in unique.items():
        index = batch[f"{kind}_index"].tolist()
        fields = {"pooler_output": tuple(out.pooler_output[i] for i in index)}
        deepstack = getattr(out, "deepstack_features", None)
        if deepstack is not None:
            fields["deepstack_features"] = [tuple(layer[i] for i in index) for layer in deepstack]
        outputs[kind] = type(out)(**fields)
    return outputs


class MediaOnce:
    """While a forward runs: a pre-forward hook on the inner Qwen-VL model (the family's `inner_model`) that makes the
    embeddings and the unique media's features there, inside the forward the training wrapper (DDP, DeepSpeed) runs,
    as finetune/training/vision_sync.py does for SFT: every rank then calls the embeddings, the tower (or, with
    `features` given, no tower) and the language model in the same order whatever its batch holds, which ZeRO-3's
    parameter gathering needs (a rank with only text must not call a module the others do not). The features go in
    as `mm_encoder_outputs`, repeated by the batch's index; without media, 0 x the dummy call's features is added to
    the embeddings. The placeholders are found by the input ids (`get_placeholder_mask` given them), never by
    comparing embeddings (which would call the embedding layer again on ranks with media only)."""

    def __init__(self, unwrapped, batch: dict, features: dict | None):
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        family = family_of(base.config.model_type)
        self.inner = base.get_submodule(family.inner_model)
        self.visual = self.inner.get_submodule(family.vision_tower)
        self.batch, self.features = batch, features
        self.input_ids = None

    def __enter__(self):
        self.handle = self.inner.register_forward_pre_hook(self._before, with_kwargs=True)
        if hasattr(self.inner, "get_placeholder_mask"):
            self.inner.get_placeholder_mask = self._placeholder_mask
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        self.inner.__dict__.pop("get_placeholder_mask", None)

    def _placeholder_mask(self, input_ids, inputs_embeds, *args, **kwargs):
        ids = self.input_ids if input_ids is None else input_ids
        return type(self.inner).get_placeholder_mask(self.inner, ids, inputs_embeds, *args, **kwargs)

    def _before(self, module, args, kwargs):
        input_ids = kwargs["input_ids"]
        embeds = module.get_input_embeddings()(input_ids)
        if self.features is None:
            self.features, padding = encode_media_once(self.visual, self.inner.config.vision_config, self.batch)
            if padding is not None:
                embeds = embeds + padding.to(embeds.dtype)
        self.input_ids = input_ids
        outputs = repeat_features(self.features, self.batch) if self.features else None
        return args, {**kwargs, "input_ids": None, "inputs_embeds": embeds, "mm_encoder_outputs": outputs}


def completion_log_probs(
    model,
    batch: dict,
    unwrapped=None,
    features: dict | None = None,
    output_router_logits: bool = False,
) -> CompletionLogProbs:
    """Run `model` (as wrapped for training: DDP or DeepSpeed call it) on a preference batch. `unwrapped`: the PEFT
    or transformers model under the wrapper (where the tower is found); `features`: the unique items' features from
    an earlier forward of the same step (a frozen tower), which skips the tower call."""
    unwrapped = model if unwrapped is None else unwrapped
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}
    for key in ("image_grid_thw", "video_grid_thw"):  # per placeholder block; the positions come with the batch
        kind = key.split("_")[0]
        if batch.get(key) is not None:
            inputs[key] = batch[key][batch[f"{kind}_index"]]
    media = MediaOnce(unwrapped, batch, features)
    # Position j predicts token j + 1: keep the positions whose next token is a completion token.
    targets = labels[:, 1:]
    trained = targets != -100
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = trained
    if output_router_logits:
        inputs["output_router_logits"] = True
    with media:
        out = model(**inputs, logits_to_keep=keep, use_cache=False)
    features = media.features
    logits = out.logits.float()  # (N, V): the kept positions, row-major
    log_probs = logits.log_softmax(-1)
    tokens = targets[trained]
    token_log_probs = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        mean_logits = logits.mean(-1)
        is_top1 = logits.argmax(-1) == tokens
        log_sum_sq = torch.logsumexp(2 * log_probs, -1)
    sequence = batch["sequence_index"][:, 1:][trained]
    count = sequence_count(batch)
    place = _left_aligned(sequence, count)
    return CompletionLogProbs(
        log_probs=place(token_log_probs),
        mask=place(torch.ones_like(token_log_probs, dtype=torch.long)),
        entropy=place(entropy),
        mean_logits=place(mean_logits),
        is_top1=place(is_top1),
        log_sum_sq_probs=place(log_sum_sq),
        aux_loss=getattr(out, "aux_loss", None),
        features=features,
    )


def sequence_count(batch: dict) -> int:
    """The sequences of a preference batch (2B for pairs; batches made before `num_sequences` existed: 2B)."""
    return int(batch.get("num_sequences", 2 * int(batch["num_pairs"])))


def _left_aligned(sequence: torch.Tensor, count: int):
    """A function scattering per-token values (in row-major order) into (count, T), each sequence's values
    left-aligned in their order (a sequence lies within one row, so row-major order is its token order)."""
    sizes = torch.bincount(sequence, minlength=count)
    width = max(int(sizes.max()) if sequence.numel() else 0, 1)
    order = torch.argsort(sequence, stable=True)
    starts = torch.cumsum(sizes, 0) - sizes
    sorted_sequence = sequence[order]
    column = torch.arange(sequence.numel(), device=sequence.device) - starts[sorted_sequence]

    def place(values: torch.Tensor) -> torch.Tensor:
        out = values.new_zeros((count, width))
        return out.index_put((sorted_sequence, column), values[order])

    return place
