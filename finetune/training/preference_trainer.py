"""DPO on our data path and forward: TRL's `DPOTrainer` for the losses (every `loss_type`, `beta`, `label_smoothing`,
`loss_weights`, `ld_alpha`, f-divergences, WPO weighting) and its metrics (rewards, margins, accuracies), fed by
our preference batches (finetune/model/preference_batching.py) and our forward (finetune/training/preference_forward.py).

How TRL is fed: its `_compute_loss(model, inputs)` calls `model(**inputs, labels=..., fused_lm_head=True)` and reads
`.log_probs`, `.entropy`, `.mean_logits`, `.is_top1` (2B x T, aligned with `completion_mask[:, 1:]`) and sums
`log_probs` per sequence. It is handed a compact view of our batch: a `completion_mask` whose row s has as many ones
(after its first column) as sequence s has completion tokens, and a callable standing in for the model that runs our
forward on the real batch and returns our per-token values left-aligned. The reference log-probs are computed here,
before TRL's part (the same forward under no_grad with the LoRA adapter disabled: the base model, no second copy),
and handed to TRL as its precomputed `ref_chosen_logps`/`ref_rejected_logps`; with a frozen vision tower the policy
forward reuses the reference forward's features, so a step makes one tower call. TRL's own reference path is thus
never used (it would toggle the model's activation checkpointing with its own settings).
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import datasets
import torch
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

from finetune.base.errors import ConfigError
from finetune.model.trainable import base_model, parameter_groups, router_aux_loss_coef
from finetune.recipe.schema import Config
from finetune.training.faults import StepGuard, bad_sample_limit, batch_summary, save_marked_checkpoint
from finetune.training.preference_forward import completion_log_probs, sequence_count, tower_is_frozen, vision_parts
from finetune.training.trainer import MOE_CONFIG_KEYS, VisionLanguageSFTTrainer, trainer_arguments


class PrecomputeReference(TrainerCallback):
    """Scores the reference once the model is prepared for training (wrapped by DDP or DeepSpeed), before step 1."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.precompute_reference()


def build_dpo_config(config: Config, precision: str, run_dir: Path) -> DPOConfig:
    m = config.method
    # KTO, ORPO and SimPO (finetune/training/preference_methods.py) read their settings from the recipe; DPOConfig
    # then carries the training arguments, beta, and its defaults for the DPO-only losses (unused).
    dpo = m.name == "dpo"
    losses = (
        dict(
            loss_type=m.loss_types,
            loss_weights=m.weights,
            label_smoothing=m.label_smoothing,
            ld_alpha=m.ld_alpha,
            f_divergence_type=m.f_divergence_type,
            f_alpha_divergence_coef=m.f_alpha_divergence_coef,
            use_weighting=m.use_weighting,
            discopop_tau=m.discopop_tau,
        )
        if dpo
        else {}
    )
    return DPOConfig(
        **trainer_arguments(config, precision, run_dir),
        beta=m.beta,
        **losses,
        # Held-out pairs scored before the first step too: the policy equals the reference there (margins 0).
        eval_on_start=bool(config.evaluation.steps),
        # Checkpointing is ours (finetune/model/trainable.py); DPOConfig would otherwise turn it on model-wide.
        gradient_checkpointing=False,
    )


def sequence_log_probs(per_token: torch.Tensor, mask: torch.Tensor, ld_alpha: float | None) -> torch.Tensor:
    """Per-sequence log-probs as TRL sums them: all completion tokens, or (LD-DPO, `ld_alpha`) the tokens both sides
    of a pair share in length plus `ld_alpha` x the longer side's tail."""
    if ld_alpha is None:
        return (per_token * mask).sum(1)
    position = mask.cumsum(1)
    lengths = mask.sum(1)
    shared = torch.minimum(*lengths.chunk(2)).repeat(2).unsqueeze(1)
    shared_mask = (position > 0) & (position <= shared) & mask.bool()
    tail_mask = (position > shared) & mask.bool()
    return (per_token * shared_mask).sum(1) + ld_alpha * (per_token * tail_mask).sum(1)


class PolicyForward:
    """Stands in for the model in TRL's `_compute_loss`: our forward on `batch`, TRL's output fields."""

    def __init__(self, model, unwrapped, features):
        self.model, self.unwrapped, self.features = model, unwrapped, features
        self.last = None

    def __call__(self, batch, output_router_logits: bool = False, **_ignored):
        out = completion_log_probs(
            self.model, batch, self.unwrapped, self.features, output_router_logits=output_router_logits
        )
        self.last = out
        return SimpleNamespace(
            log_probs=out.log_probs,
            entropy=out.entropy,
            mean_logits=out.mean_logits,
            is_top1=out.is_top1,
            log_sum_sq_probs=out.log_sum_sq_probs,
            aux_loss=out.aux_loss,
        )


def compact_inputs(batch: dict, width: int, ref_chosen, ref_rejected) -> dict:
    """The inputs TRL's `_compute_loss` reads, for 2B sequences of up to `width` completion tokens: `completion_mask`
    (a leading 0, then each sequence's completion tokens left-aligned), `input_ids` (only its shape is used),
    `attention_mask` (only summed: the batch's real tokens), the reference sums, and our batch for the forward."""
    counts = (batch["labels"][:, 1:] != -100) & (batch["sequence_index"][:, 1:] >= 0)
    sequences = sequence_count(batch)
    per_sequence = torch.bincount(batch["sequence_index"][:, 1:][counts], minlength=sequences)
    columns = torch.arange(width, device=per_sequence.device)
    completion = torch.zeros(sequences, width + 1, dtype=torch.long, device=per_sequence.device)
    completion[:, 1:] = (columns < per_sequence.unsqueeze(1)).long()
    return {
        "input_ids": torch.zeros_like(completion),
        "completion_mask": completion,
        "attention_mask": batch["num_real_tokens"].reshape(1),
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
        "batch": batch,
    }


class VisionLanguageDPOTrainer(DPOTrainer):
    """DPOTrainer with our preference loader, forward and reference (adapter off), per-part learning rates, the fault
    guards and the SFT trainer's checkpoint marking."""

    def __init__(
        self,
        *,
        model,
        args: DPOConfig,
        processing_class,
        train_loader,
        recipe: Config,
        train_size: int,
        eval_loader=None,
        eval_size: int = 0,
        reference_collators: dict | None = None,
    ):
        """`reference_collators`: {"train": PairCollator, "eval": ...} whose pairs get their reference log-probs
        computed once, when training starts (method.precompute_ref_log_probs); None: every step computes them."""
        if not hasattr(model, "disable_adapter"):
            raise ConfigError(
                f"method={recipe.method.name} runs on LoRA parts here (the reference of DPO and KTO is the model with "
                "the adapter off): train LoRA parts (parts.llm=lora), not a full copy."
            )
        self._recipe = recipe
        self._train_loader, self._eval_loader = train_loader, eval_loader
        # TRL tokenizes a text dataset itself and skips that for a vision one (an `images` column): ours is only an
        # index (the pairs come from our loader), marked as vision so that TRL leaves it alone.
        text_config = base_model(model).config.get_text_config()
        checkpoint_values = {k: getattr(text_config, k) for k in MOE_CONFIG_KEYS if hasattr(text_config, k)}
        index = datasets.Dataset.from_dict({"images": [None] * train_size})
        held_out = datasets.Dataset.from_dict({"images": [None] * eval_size}) if eval_loader else None
        super().__init__(
            model=model, args=args, train_dataset=index, eval_dataset=held_out, processing_class=processing_class
        )
        # A mixture-of-experts LLM: the load-balancing loss weighs as in SFT (finetune/model/trainable.py: 0 with a
        # frozen router, logged only), not by TRL's choice; what TRL wrote into the model config is undone.
        coef = router_aux_loss_coef(model, recipe)
        if coef is not None:
            self.aux_loss_enabled, self.router_aux_loss_coef = True, coef
        for key, value in checkpoint_values.items():
            setattr(text_config, key, value)
        # With a PEFT model TRL copies the adapter as "ref" (the reference when re-training an adapter); ours is the
        # base model with the adapter off.
        if "ref" in getattr(self.model, "peft_config", {}):
            self.model.delete_adapter("ref")
            self.model.set_adapter("default")
        # TRL's loss is a mean per micro-batch: Trainer must divide it by the accumulation steps (transformers declares
        # loss kwargs on some Qwen-VL classes, which would make Trainer skip that division).
        self.model_accepts_loss_kwargs = False
        # The reference log-probs come with every batch (computed in compute_loss, or precomputed).
        self.precompute_ref_logps = True
        self.last_batch: dict | None = None
        self._reference_collators = reference_collators or {}
        self._reference_tables: dict[str, torch.Tensor] = {}
        if self._reference_collators:
            self.add_callback(PrecomputeReference(self))
        limit = bad_sample_limit(recipe.data.max_bad_samples, train_size)
        self._guard = StepGuard(Path(self.args.output_dir), limit, recipe.trainer.nonfinite_loss, self.accelerator)
        self._tokens = {"real": 0, "seen": 0}
        self._last_log = (time.perf_counter(), 0)

    get_train_dataloader = VisionLanguageSFTTrainer.get_train_dataloader

    def get_eval_dataloader(self, eval_dataset=None):
        """The held-out pairs (data.eval), batched as in training: evaluation logs TRL's preference metrics on them
        (eval_rewards/accuracies, eval_rewards/margins, eval_loss, ...)."""
        return self.accelerator.prepare(self._eval_loader(self.accelerator.num_processes))

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def create_optimizer(self, model=None):
        """AdamW over one parameter group per (part, weight decay), each at its part's learning rate."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = parameter_groups(opt_model, self._recipe, set(self.get_decay_parameter_names(opt_model)))
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def reference_log_probs(self, model, batch: dict):
        """(per-sequence reference log-probs, the unique media features when the tower is frozen): our forward under
        no_grad with the LoRA adapter disabled."""
        unwrapped = self.accelerator.unwrap_model(model)
        with torch.no_grad(), unwrapped.disable_adapter():
            out = completion_log_probs(model, batch, unwrapped)
        logps = sequence_log_probs(out.log_probs, out.mask, self.ld_alpha)
        visual, _ = vision_parts(unwrapped)
        return logps, out.features if tower_is_frozen(visual) else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        unwrapped = self.accelerator.unwrap_model(model)
        features = None
        for key in ("sample_ids", "bad_samples"):  # bookkeeping (training_step hands it to the guard first)
            inputs.pop(key, None)
        table = self._reference_tables.get("train" if self.model.training else "eval")
        pair_index = inputs.pop("pair_index", None)
        if table is not None and pair_index is not None:  # precomputed when training started
            ref = table[pair_index.clamp(min=0)] * (pair_index >= 0).unsqueeze(1)  # -1: the stand-in, no tokens
            ref_chosen, ref_rejected = ref[:, 0], ref[:, 1]
        else:
            ref, features = self.reference_log_probs(model, inputs)
            ref_chosen, ref_rejected = ref.chunk(2)
        policy = PolicyForward(model, unwrapped, features)
        width = max(self._completion_width(inputs), 1)
        compact = compact_inputs(inputs, width, ref_chosen, ref_rejected)
        loss = self._compute_loss(policy, compact, return_outputs=False)
        self.last_policy = policy.last
        return loss

    @staticmethod
    def _completion_width(batch: dict) -> int:
        trained = batch["labels"][:, 1:] != -100
        counts = torch.bincount(batch["sequence_index"][:, 1:][trained], minlength=sequence_count(batch))
        return int(counts.max())

    def precompute_reference(self) -> None:
        """The reference log-probs of every pair (train, and eval when scored), once: our forward with the adapter
        off, images and videos included. Each rank scores every world_size-th pair, in the same number of batches on
        every rank (under ZeRO-3 each forward gathers weights from all ranks), and the ranks sum their tables."""
        model, world, rank = self.model_wrapped, self.accelerator.num_processes, self.accelerator.process_index
        per_step = self.args.per_device_train_batch_size
        was_training = model.training
        model.eval()
        for split, collator in self._reference_collators.items():
            size = len(collator.pairs)
            mine = list(range(rank, size, world))
            steps = -(-(-(-size // world)) // per_step)  # ceil(ceil(size / world) / per_step), alike on every rank
            table = torch.zeros(size, 2, device=self.accelerator.device)
            for step in range(steps):
                indices = mine[step * per_step : (step + 1) * per_step]
                padded = indices or [0]  # a rank with nothing left still runs a forward (ZeRO-3), written nowhere
                batch = self._prepare_inputs(collator(padded))
                ref, _ = self.reference_log_probs(model, batch)
                written = (
                    batch["pair_index"] >= 0 if indices else torch.zeros_like(batch["pair_index"], dtype=torch.bool)
                )
                table[batch["pair_index"][written]] = torch.stack(ref.chunk(2), 1)[written].float()
            self._reference_tables[split] = self.accelerator.reduce(table, "sum") if world > 1 else table
        model.train(was_training)

    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self.state.global_step
        self.last_batch = batch_summary(inputs)
        self._guard.take(inputs, step)
        real = int(inputs["num_real_tokens"])
        self._tokens["real"] += real
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._tokens["seen"] += self._guard.after_step(loss, real, step, model)
        return loss

    def _save_checkpoint(self, model, trial):
        """TRL's save, then the completion marker, as the SFT trainer."""
        save_marked_checkpoint(self, super()._save_checkpoint, model, trial)

    def create_model_card(self, *args, **kwargs):
        """The export writes the model card (finetune/exporting/serving.py); TRL's would name its own dataset."""

    def log(self, logs, start_time=None):
        if "loss" in logs and self.model.training:
            now, real = time.perf_counter(), self._tokens["real"]
            last_time, last_real = self._last_log
            logs["tokens_per_second_per_device"] = round((real - last_real) / max(now - last_time, 1e-9), 1)
            logs["tokens_seen"] = self._tokens["seen"]
            self._last_log = (now, real)
        super().log(logs, start_time)


def pair_loader_factory(config: Config, encoder, pairs, rule, boundaries: bool):
    """A function of the world size returning the preference DataLoader: `trainer.per_device_train_batch_size` pairs
    per step and device (2x as many sequences), reshuffled every epoch, equal steps on every rank; the sequences of a
    step packed into rows of `trainer.max_tokens_per_row` (or data.max_length) tokens with trainer.packing."""
    from finetune.model.batching import training_loader
    from finetune.model.preference_batching import PairCollator

    t = config.trainer
    budget = (t.max_tokens_per_row or config.data.max_length) if t.packing else None
    collator = PairCollator(encoder, pairs, rule, budget, boundaries)
    rows = [(i,) for i in range(len(pairs))]

    def build(world_size: int):
        return training_loader(
            rows, collator, t.per_device_train_batch_size, t.seed, world_size, t.dataloader_num_workers
        )

    return build, collator


def completion_loader_factory(config: Config, encoder, items, rule, boundaries: bool):
    """pair_loader_factory for KTO: `trainer.per_device_train_batch_size` labelled completions per step and device,
    each with its mismatched KL sequence (the previous completion of the batch after its prompt) unless
    method.loss_type=apo_zero_unpaired."""
    from finetune.data.preference import UnpairedCompletion
    from finetune.model.batching import training_loader
    from finetune.model.preference_batching import UnpairedCollator

    def with_completion(item, text):
        return UnpairedCompletion(item.id, item.prompt, text, item.desirable).conversation()

    t = config.trainer
    budget = (t.max_tokens_per_row or config.data.max_length) if t.packing else None
    kl = config.method.loss_type != "apo_zero_unpaired"
    collator = UnpairedCollator(encoder, items, rule, budget, boundaries, kl, with_completion)
    rows = [(i,) for i in range(len(items))]

    def build(world_size: int):
        return training_loader(
            rows, collator, t.per_device_train_batch_size, t.seed, world_size, t.dataloader_num_workers
        )

    return build, collator
