"""Rollouts for RL with verifiable rewards (the GRPO family): G sampled completions per prompt from transformers'
`generate`, the log-probs generation reported for the tokens it sampled, the trainer's teacher-forced log-probs of the
same tokens, and the gap between the two (logged every step).

Prompts take evaluation's path (`generation_inputs`, finetune/evaluation/evaluate.py): the recipe's encoder, frame
sampling, pixel budgets and grids, and the model's installed position rule (`qwen`: text after a vision block resumes
at max + 1, decoding continues at max + 1 + k), so a rollout is generated on what SFT trains and serving sees.

One vision-tower call per `generate` call (at most one per prompt): transformers' `num_return_sequences` would call
the tower once per modality (an image and a video prompt: twice) and then repeat the features for the G rows. Here
the prompts' images and videos go through the tower together once (`model_media_features`,
finetune/model/media_features.py) and `generate` is handed the features (`mm_encoder_outputs`), which it repeats for
the G rows itself. Each rollout keeps its prompt's: with a frozen vision side the trainer's forward reuses them
(`completion_logprobs(..., reuse_features=True)`) instead of a second call.

Generation's log-probs are recorded as it samples (`StepLogprobs`), from the model's own logits.

Log-probs follow TRL's convention (trl/trainer/utils.py `selective_log_softmax`, GRPOTrainer's fused LM head):
log_softmax(logits / temperature) in fp32 over the whole vocabulary, at the sampled token. top-k / top-p truncation and
suppressed tokens are not in them, neither on generation's side nor on the trainer's: both describe the same
temperature-scaled distribution, and their gap measures only how the two computations differ (positions, kernels,
precision, a KV cache against one full forward). TRL logs the same quantity for vLLM as
`sampling/sampling_logp_difference/{mean,max}` (|trainer - sampler| over completion tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from finetune.base.errors import ConfigError
from finetune.data.conversation import Sample
from finetune.data.encode import IGNORE_INDEX, EncodedSample
from finetune.evaluation.evaluate import generation_inputs
from finetune.model.batching import training_batch
from finetune.model.media_features import (
    MEDIA,
    model_media_features,
    repeat_media_features,
    split_media_features,
    vision_tower,
)
from finetune.model.rope import PositionRule, model_position_rule

PIXEL_KEYS = tuple(pixels for _, pixels, _ in MEDIA)


@dataclass
class Rollout:
    """The G completions of one prompt. Each completion ends at its first end-of-sequence token (kept, as TRL keeps
    it: the model is trained to stop) or at `max_new_tokens` (`finished` False: truncated)."""

    prompt_id: str
    prompt: EncodedSample  # the prompt as the model saw it: tokens, pixels, grids
    completion_ids: list[list[int]]
    texts: list[str]
    logprobs: list[torch.Tensor]  # per completion: (n,) fp32 log-probs generation reported for its sampled tokens
    finished: list[bool]
    features: dict = field(default_factory=dict, repr=False)  # the prompt's vision features (no grad), {} without media


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / temperature) in fp32 at `tokens` (TRL's convention, see the module docstring)."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _end_ids(model, encoder) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = encoder.tokenizer.eos_token_id if ids is None else ids
    return [ids] if isinstance(ids, int) else list(ids)


def _check_sampling(num_generations: int, temperature: float, top_p: float, top_k: int, prompts_per_call: int) -> None:
    if num_generations < 1:
        raise ConfigError(f"num_generations={num_generations}: a prompt needs at least 1 completion (GRPO: 2 or more).")
    if not temperature > 0:
        raise ConfigError(f"temperature={temperature}: rollouts sample; set a temperature above 0 (e.g. 1.0).")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p}: set a value in (0, 1] (1 keeps the whole distribution).")
    if prompts_per_call < 1:
        raise ConfigError(f"prompts_per_call={prompts_per_call}: set 1 or more prompts per generate call.")
    if top_k < 0:
        raise ConfigError(f"top_k={top_k}: set 0 (off) or a positive number of tokens.")


@torch.no_grad()
def generate_rollouts(
    model,
    encoder,
    prompts: list[Sample],
    num_generations: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    prompts_per_call: int = 1,
    synced_gpus: bool = False,
    encoded: list[EncodedSample] | None = None,
    greedy: bool = False,
) -> list[Rollout]:
    """`num_generations` sampled completions of each prompt (a conversation ending before the reply). Prompts go to
    `generate` `prompts_per_call` at a time (left-padded, as evaluation batches them), with one vision-tower call
    for all of their media. `model` was loaded by `finetune.model.load.load_model` (its position
    rule installed). The sampling settings are passed whole, so a checkpoint's generation_config.json (Qwen ships
    temperature 0.1, top_k 1, repetition_penalty 1.05) changes nothing; top_k=0 and top_p=1 are off. `seed` makes the
    draws repeatable without touching the caller's random state. A prompt whose media fail to decode raises its
    DataError (named by the prompt's source). `synced_gpus` (ZeRO-3): every rank keeps stepping until all have
    finished, and a chunk without media still calls the tower (on a dummy input), so every rank calls it alike.
    `encoded`: the prompts already encoded (`encoder.encode(prompt, generation_prompt=True)`, one per prompt), so a
    caller that encoded them to check their media does not decode them again. `greedy`: the most likely token at
    every step instead of a draw (held-out evaluation: one completion per prompt, sampling settings unused; the
    recorded log-probs are then at temperature 1)."""
    _check_sampling(num_generations, temperature, top_p, top_k, prompts_per_call)
    tokenizer = encoder.tokenizer
    rule = model_position_rule(model)
    device = next(model.parameters()).device
    end_ids = _end_ids(model, encoder)
    config = model.config
    # A sampled image or video placeholder would have no features behind it in the trainer's forward (TRL does so too).
    placeholders = [i for i in (config.image_token_id, getattr(config, "video_token_id", None)) if i is not None]
    if greedy:  # transformers' neutral values: no sampling setting is set, none is warned about
        temperature, top_p, top_k = 1.0, 1.0, 50
    settings = dict(
        do_sample=not greedy,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=None,
        typical_p=1.0,
        repetition_penalty=1.0,
        num_return_sequences=num_generations,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=end_ids,
        suppress_tokens=placeholders,
        synced_gpus=synced_gpus,
    )
    rollouts = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(prompts), prompts_per_call):
            chunk = prompts[start : start + prompts_per_call]
            if encoded is None:
                chunk_encoded = [encoder.encode(prompt, generation_prompt=True) for prompt in chunk]
            else:
                chunk_encoded = encoded[start : start + prompts_per_call]
            batch = generation_inputs(chunk_encoded, tokenizer.pad_token_id, rule, device)
            features, _ = model_media_features(model, batch, always=synced_gpus)  # the chunk's one tower call
            inputs = {k: v for k, v in batch.items() if k not in PIXEL_KEYS}
            with StepLogprobs(model, temperature) as recorded:
                sequences = model.generate(**inputs, mm_encoder_outputs=repeat_media_features(features, 1), **settings)
            length = batch["input_ids"].shape[1]  # left-padded: every row's completion starts here
            logprobs = recorded.result(sequences[:, length:])
            parts = zip(chunk, chunk_encoded, split_media_features(features, chunk_encoded))
            for i, (prompt, e, own) in enumerate(parts):
                rows = slice(i * num_generations, (i + 1) * num_generations)
                rollout = _rollout(prompt.id, e, sequences[rows, length:], logprobs[rows], end_ids)
                rollout.texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
                rollout.features = own
                rollouts.append(rollout)
    return rollouts


class StepLogprobs:
    """While `generate` runs: the log-prob of each sampled token, log_softmax(logits / temperature) in fp32 of the
    model's own logits (before any logits processor), kept one step at a time. A forward hook on the model holds the
    last step's log-softmax (rows x vocabulary) until the next forward's input, the token sampled from it, says which
    entry to keep; `result` takes the last step's from the sequences. (`output_logits` would hold every step's logits
    until the end: G x new tokens x vocabulary, gigabytes for a 150k vocabulary.)"""

    def __init__(self, model, temperature: float):
        self.module = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.temperature = temperature
        self.steps: list[torch.Tensor] = []
        self.pending: torch.Tensor | None = None

    def __enter__(self) -> "StepLogprobs":
        self.handle = self.module.register_forward_hook(self._after, with_kwargs=True)
        return self

    def __exit__(self, *_) -> None:
        self.handle.remove()

    def _after(self, module, args, kwargs, output) -> None:
        ids = kwargs.get("input_ids")
        if self.pending is not None:  # a decoding step: its input is the token sampled from the pending step
            self.steps.append(self.pending.gather(-1, ids[:, -1:]).squeeze(-1))
        self.pending = torch.log_softmax(output.logits[:, -1].float() / self.temperature, dim=-1)

    def result(self, sampled: torch.Tensor) -> torch.Tensor:
        """(rows, steps) log-probs of `sampled` (rows x steps, the generated part of the sequences). Under
        `synced_gpus` a rank that finished keeps stepping: its first extra forward still takes its last sampled token
        (and so records that token's log-prob), the later ones are cut off."""
        steps = self.steps + [self.pending.gather(-1, sampled[:, -1:]).squeeze(-1)]
        return torch.stack(steps[: sampled.shape[1]], dim=1).cpu()


def _rollout(prompt_id, encoded, sampled: torch.Tensor, logprobs: torch.Tensor, end_ids: list[int]) -> Rollout:
    """One prompt's G completions (its rows of the generated tokens and of their log-probs), cut at their first end
    token."""
    ids, kept, finished = [], [], []
    for row, tokens in enumerate(sampled.tolist()):
        ends = [k for k, t in enumerate(tokens) if t in end_ids]
        n = ends[0] + 1 if ends else len(tokens)
        ids.append(tokens[:n])
        kept.append(logprobs[row, :n])
        finished.append(bool(ends))
    return Rollout(prompt_id, encoded, ids, [], kept, finished)


def completion_sequences(rollout: Rollout) -> list[EncodedSample]:
    """Prompt + completion as training samples: the prompt's tokens, media and grids, the completion as text tokens
    (their positions continue after the prompt's, as in generation) and trained."""
    p = rollout.prompt
    return [
        replace(
            p,
            input_ids=p.input_ids + c,
            labels=[IGNORE_INDEX] * len(p.input_ids) + c,
            mm_token_type_ids=p.mm_token_type_ids + [0] * len(c),
        )
        for c in rollout.completion_ids
    ]


def completion_forward(
    model,
    rollout: Rollout,
    reuse_features: bool = True,
    rule: PositionRule | None = None,
    synced_gpus: bool = False,
    wrapped=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The trainer's forward over a rollout's G sequences, laid out as training lays out rows (`training_batch`: the
    rule's 4-row position ids, each row its own block, no attention mask): (logits (G, longest + 1, vocabulary) from
    the prompt's last position on, row g's first n_g predicting its completion's tokens; `padding`, a zero joined to
    the tower's graph when a text-only prompt called it on a dummy input under `synced_gpus`, else None). Gradients
    flow when enabled. `reuse_features`: the features generation computed, for a vision side that does not train (no
    tower call here; refused if any vision parameter trains: it would get no gradient). Otherwise the tower runs once
    on the prompt's media and its features serve all G rows. `rule`: the model's installed one unless given.
    `wrapped`: the model as the trainer wrapped it (DDP, DeepSpeed), which then runs the forward, so that its gradient
    synchronisation sees it; `model` is the module itself."""
    rule = rule or model_position_rule(model)
    device = next(model.parameters()).device
    sequences = completion_sequences(rollout)
    pad_id = model.generation_config.pad_token_id or 0  # the padding is a block of its own: its id is never seen
    batch = training_batch([[s] for s in sequences], pad_id, rule)
    if reuse_features:
        if torch.is_grad_enabled() and any(p.requires_grad for p in vision_tower(model).parameters()):
            raise ConfigError(
                "the vision tower or merger trains, so generation's features (computed without gradients) cannot "
                "serve the trainer's forward; use reuse_features=False, or freeze the vision parts."
            )
        features, padding = rollout.features, None
    else:
        features, padding = model_media_features(model, rollout_media(rollout, device), always=synced_gpus)
    longest = max(len(c) for c in rollout.completion_ids)
    inputs = {
        "input_ids": batch["input_ids"].to(device),
        "position_ids": batch["position_ids"].to(device),
        "mm_token_type_ids": batch["mm_token_type_ids"].to(device),
        "mm_encoder_outputs": repeat_media_features(features, len(sequences)),
        "logits_to_keep": longest + 1,  # the prompt's last position onwards: every completion token's prediction
        "use_cache": False,
    }
    for key in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts"):
        if key in batch:
            inputs[key] = batch[key].to(device)
    return (wrapped or model)(**inputs).logits, padding


def completion_logprobs(
    model,
    rollout: Rollout,
    temperature: float,
    reuse_features: bool = True,
    rule: PositionRule | None = None,
    synced_gpus: bool = False,
) -> list[torch.Tensor]:
    """The trainer's per-token log-probs of a rollout's completions: one forward over the G sequences
    (`completion_forward`, which says what `reuse_features`, `rule` and `synced_gpus` do), log_softmax(logits /
    temperature) in fp32 at each completion token. Gradients flow when enabled. With `synced_gpus` the tower runs on
    a text-only prompt too (a dummy input whose 0 x features join the result), so every rank calls it alike."""
    logits, padding = completion_forward(model, rollout, reuse_features, rule, synced_gpus)
    device = logits.device
    result = []
    for row, tokens in enumerate(rollout.completion_ids):
        n = len(tokens)
        target = torch.tensor(tokens, device=device)
        logprobs = token_logprobs(logits[row, :n], target, temperature)
        result.append(logprobs if padding is None else logprobs + padding)
    return result


def rollout_media(rollout: Rollout, device) -> dict:
    """The prompt's pixels and grids as batch keys, on `device`."""
    p = rollout.prompt
    media = {}
    for _, pixels, grid in MEDIA:
        if getattr(p, pixels) is not None:
            media[pixels], media[grid] = getattr(p, pixels).to(device), getattr(p, grid).to(device)
    return media


def logprob_gap(rollouts: list[Rollout], trainer_logprobs: list[list[torch.Tensor]]) -> dict[str, float]:
    """|trainer - generation| over every completion token of every rollout: its mean and max (TRL's
    `sampling/sampling_logp_difference/{mean,max}`), logged every step; 0.0 when no tokens were sampled."""
    gaps = [
        (t.detach().float().cpu() - r).abs()
        for rollout, trainer in zip(rollouts, trainer_logprobs, strict=True)
        for r, t in zip(rollout.logprobs, trainer, strict=True)
    ]
    flat = torch.cat(gaps) if gaps else torch.zeros(0)
    if flat.numel() == 0:
        return {"mean": 0.0, "max": 0.0}
    return {"mean": float(flat.mean()), "max": float(flat.max())}
