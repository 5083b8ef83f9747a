"""RL with verifiable rewards (GRPO, DAPO, Dr.GRPO, GSPO) on our rollouts and forward: TRL's `GRPOTrainer` for the
losses (`_compute_loss`: clipping at epsilon / epsilon_high, the KL term with beta, loss_type grpo / bnpo / dr_grpo /
dapo / ..., importance_sampling_level token / sequence, num_iterations, steps_per_generation) and its metrics (kl,
entropy, clip ratios), fed by

- rollouts from finetune/evaluation/rollouts.py (`generate_rollouts`: the recipe's encoder, frame sampling and pixel
  budgets, our `qwen` positions at decoding, one vision-tower call per prompt, generation's own log-probs) instead of
  TRL's `_generate_and_score_completions`, which renders images only and rebuilds the forward's inputs without videos;
- rewards from finetune/evaluation/rewards.py (`RewardTable`: the weighted sum per completion, NoScore counted and
  adding 0), turned into advantages as TRL does (sum, then (reward - group mean) / std, `scale_rewards` group / batch
  / none, over every rank's groups);
- per-token log-probs and entropies of our forward (`completion_forward`: the G sequences of a prompt in one forward,
  laid out as training lays rows out, the prompt's media features shared; with a frozen vision side the features
  generation computed, so no second tower call) instead of TRL's `_get_per_token_logps_and_entropies`;
- the reference: the same model with the LoRA adapter off (no second copy), under no_grad, when beta > 0.

TRL's tensors are handed a compact view: `completion_ids` / `completion_mask` (B x longest completion, right-padded)
and a one-column stand-in for the prompt (never read: our forward gets the real prompt from the rollout). Each row
carries its `(rollout, k)` slot, so the forward knows which completion it is. The groups of a generation batch stay
whole and in order when it is split into micro-batches (TRL shuffles the rows): each micro-batch makes one forward per
group, the same number on every rank.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import datasets
import torch
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import nanstd, split_tensor_dict

from finetune.base.errors import ConfigError, DataError
from finetune.data.media import probe_image
from finetune.evaluation.rewards import RewardTable
from finetune.evaluation.rollouts import Rollout, completion_forward, generate_rollouts, token_logprobs
from finetune.model.media_features import vision_tower
from finetune.model.trainable import parameter_groups
from finetune.recipe.schema import Config
from finetune.records.rundir import RunDir
from finetune.training.faults import StepGuard, bad_sample_limit, save_marked_checkpoint
from finetune.training.reward_eval import as_logs as eval_logs
from finetune.training.reward_eval import evaluate_rewards_in_training

logger = logging.getLogger("finetune.grpo")


def build_grpo_config(config: Config, precision: str, run_dir: Path) -> GRPOConfig:
    from finetune.training.trainer import trainer_arguments

    m = config.method
    shared = trainer_arguments(config, precision, run_dir)
    shared.pop("max_length")  # SFT's and DPO's truncation key; a rollout's length is max_completion_length
    return GRPOConfig(
        **shared,
        num_generations=m.num_generations,
        max_completion_length=m.max_completion_length,
        temperature=m.temperature,
        top_p=m.top_p,
        top_k=m.top_k,
        beta=m.beta,
        epsilon=m.epsilon,
        epsilon_high=m.epsilon_high,
        loss_type=m.loss_type,
        scale_rewards=m.scale_rewards,
        importance_sampling_level=m.importance_sampling_level,
        num_iterations=m.num_iterations,
        steps_per_generation=m.steps_per_generation,
        mask_truncated_completions=m.mask_truncated_completions,
        # Held-out evaluation (evaluation.steps, finetune/training/reward_eval.py) takes one greedy completion per
        # prompt; TRL checks its eval batches hold whole groups of this many.
        num_generations_eval=1,
        # Scored before the first step too (the base model's rewards: what training starts from), as DPO's pairs are.
        eval_on_start=bool(config.evaluation.steps),
        # Rollouts are sampled without dropout (eval mode): the trainer's forward must see the same policy, or the
        # importance ratio and the KL would measure dropout noise.
        disable_dropout=True,
        # Checkpointing is ours (finetune/model/trainable.py); GRPOConfig would otherwise turn it on model-wide.
        gradient_checkpointing=False,
        log_completions=False,
    )


def _scored_by_the_reward_table(*args, **kwargs):
    """TRL's constructor wants a reward function; ours are the RewardTable's, applied by the trainer below."""
    raise RuntimeError("GRPO rewards are applied by VisionLanguageGRPOTrainer's RewardTable, not by TRL.")


def pad_rows(rows: list[torch.Tensor], width: int, device) -> torch.Tensor:
    """Right-pad 1-D tensors with zeros to (len(rows), width)."""
    out = torch.zeros(len(rows), width, device=device)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row.to(device)
    return out


class VisionLanguageGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with our rollouts, rewards, forward and reference (adapter off), per-part learning rates, the fault
    guards and the SFT trainer's checkpoint marking."""

    def __init__(
        self,
        *,
        model,
        args: GRPOConfig,
        processing_class,
        encoder,
        prompts: list,
        rewards: RewardTable,
        recipe: Config,
        eval_prompts: list | None = None,
    ):
        """`prompts`: finetune.data.preference.RewardPrompt items; `encoder`: the inference encoder (prompts end with
        the generation prompt); `eval_prompts`: the held-out RewardPrompts scored every evaluation.steps."""
        if args.beta and not hasattr(model, "disable_adapter"):
            raise ConfigError(
                f"method={recipe.method.name} with beta > 0 takes its reference as the model with the LoRA adapter off: "
                "train LoRA parts (parts.llm=lora), or set method.beta=0."
            )
        self._recipe, self._encoder, self._prompts, self.reward_table = recipe, encoder, prompts, rewards
        self._eval_prompts = eval_prompts or []
        # TRL's sampler draws indices of this dataset (each repeated num_generations times); the prompts are ours.
        index = datasets.Dataset.from_dict({"index": list(range(len(prompts)))})
        # Evaluation is ours (`evaluate`); Trainer only wants to know there is something to evaluate.
        held_out = datasets.Dataset.from_dict({"index": list(range(len(self._eval_prompts)))})
        super().__init__(
            model=model,
            reward_funcs=[_scored_by_the_reward_table],
            args=args,
            train_dataset=index,
            eval_dataset=held_out if self._eval_prompts else None,
            processing_class=processing_class,
        )
        # With a PEFT model and beta > 0 TRL copies the adapter as "ref"; ours is the base model with the adapter off.
        if "ref" in getattr(self.model, "peft_config", {}):
            self.model.delete_adapter("ref")
            self.model.set_adapter("default")
        # The router's auxiliary loss needs router logits our forward does not request.
        self.aux_loss_enabled = False
        # TRL's loss is already divided by the accumulation steps (or normalised per token for dapo).
        self.model_accepts_loss_kwargs = False
        self._slots: list[tuple[Rollout, int]] = []
        self._stand_in = None  # a prompt that encodes, generated in place of one whose media fail to decode
        limit = bad_sample_limit(recipe.data.max_bad_samples, len(prompts))
        self._guard = StepGuard(Path(self.args.output_dir), limit, recipe.trainer.nonfinite_loss, self.accelerator)
        self._pending_bad: list[dict] = []
        self._gap_in_loss = False
        self._trained_tokens = 0
        self.last_batch: dict | None = None
        self._tokens = {"real": 0, "seen": 0}
        self._last_log = (time.perf_counter(), 0)
        # Since the last log: seconds generating, completion tokens generated, and when the first step began (the
        # GPU benchmark's grpo mode reads the timing/ keys: benchmarks/gpu_train.py).
        self._timing = {"rollout_s": 0.0, "generated": 0, "since": None, "step": 0}

    # ----- the model's side -----
    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def _synced(self) -> bool:
        """ZeRO-3: every rank must call forward (and the tower) alike while others still generate."""
        plugin = self.accelerator.state.deepspeed_plugin
        return plugin is not None and plugin.zero_stage == 3

    def _reuses_features(self, model) -> bool:
        """A vision side that does not train: generation's features serve the trainer's and the reference forward."""
        return not any(p.requires_grad for p in vision_tower(model).parameters())

    def token_logps(self, model, slots, width: int, entropy: bool = False, wrapped=None):
        """(B x width log-probs, B x width entropies or None) of the slots' completions: one forward per rollout,
        the rollout's selected completions only, right-padded with zeros. log_softmax(logits / temperature) in fp32,
        as TRL's fused head computes them. `wrapped`: the trainer's wrapped model, which then runs the forward."""
        device = self.accelerator.device
        reuse = self._reuses_features(model)
        groups: dict[int, list[int]] = defaultdict(list)
        for i, (rollout, _) in enumerate(slots):
            groups[id(rollout)].append(i)
        logps: list[torch.Tensor | None] = [None] * len(slots)
        entropies: list[torch.Tensor | None] = [None] * len(slots)
        for rows in groups.values():
            rollout = slots[rows[0]][0]
            picked = [slots[i][1] for i in rows]
            sub = replace(rollout, completion_ids=[rollout.completion_ids[k] for k in picked])
            logits, padding = completion_forward(model, sub, reuse, synced_gpus=self._synced(), wrapped=wrapped)
            for j, i in enumerate(rows):
                tokens = torch.tensor(sub.completion_ids[j], device=logits.device)
                if entropy:  # one log-softmax for both (token_logprobs' convention: fp32, logits / temperature)
                    log_p = torch.log_softmax(logits[j, : len(tokens)].float() / self.temperature, dim=-1)
                    lp = log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
                    entropies[i] = -(log_p.exp() * log_p).sum(-1)
                else:
                    lp = token_logprobs(logits[j, : len(tokens)], tokens, self.temperature)
                logps[i] = lp if padding is None else lp + padding
        logp_tensor = torch.zeros(len(slots), width, device=device)
        ent_tensor = torch.zeros(len(slots), width, device=device) if entropy else None
        for i in range(len(slots)):
            logp_tensor[i, : len(logps[i])] = logps[i]
            if entropy:
                ent_tensor[i, : len(entropies[i])] = entropies[i].detach()
        return logp_tensor, ent_tensor

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False, **_ignored
    ):
        """TRL's hook for the policy's log-probs in `_compute_loss`: ours, of the micro-batch's slots."""
        logps, entropies = self.token_logps(self._unwrapped(), self._slots, logits_to_keep, compute_entropy, model)
        self._last_logps = logps
        return logps, entropies, None

    # ----- rollouts and rewards -----
    def _find_stand_in(self):
        if self._stand_in is None:
            for item in self._prompts:
                try:
                    self._encoder.encode(item.prompt, generation_prompt=True)
                except DataError:
                    continue
                self._stand_in = item
                break
            else:
                raise DataError(
                    "no training prompt's media decode: fix the data (python -m finetune.validate --decode)."
                )
        return self._stand_in

    @contextmanager
    def _generation_model(self):
        """The module `generate` runs: in eval mode (activation checkpointing is off there, which in training mode would
        also turn the KV cache off), its ZeRO-3 weights gathered as TRL gathers them. (TRL's own context turns
        checkpointing off and back on with its settings, model-wide: ours is per part, finetune/model/trainable.py.)"""
        unwrapped = self._unwrapped()
        was_training = unwrapped.training
        unwrapped.eval()
        try:
            if self._synced() and self.args.ds3_gather_for_generation:
                import deepspeed
                from trl.models.utils import add_hooks, remove_hooks

                with deepspeed.zero.GatheredParameters(self.model_wrapped.parameters()):
                    remove_hooks(self.model_wrapped)
                    try:
                        yield unwrapped
                    finally:
                        add_hooks(self.model_wrapped)
            else:
                yield unwrapped
        finally:
            unwrapped.train(was_training)

    def rollout_seed(self, index: int) -> int:
        """The draws of prompt `index` at this step: a function of the run's seed, the step and the prompt alone, so
        a prompt gets the same completions whichever rank samples it, in any number of processes."""
        return (self.args.seed * 1_000_003 + self.state.global_step * 10_007 + index) % 2**31

    def _sync_clock(self) -> float:
        """perf_counter once the GPU's queued work is done (CUDA kernels run asynchronously), on the CPU at once."""
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def _rollouts(self, items: list, indices: list[int]) -> tuple[list[Rollout], list[bool]]:
        """One rollout per prompt (one generate call each, on every rank alike); a prompt whose media fail to decode is
        reported and replaced by a stand-in whose completions the loss never sees. Timed for `timing/rollout_s`."""
        start = self._sync_clock()
        rollouts, kept = self._generate_each(items, indices)
        self._timing["rollout_s"] += self._sync_clock() - start
        self._timing["generated"] += sum(len(c) for rollout in rollouts for c in rollout.completion_ids)
        return rollouts, kept

    def _generate_each(self, items: list, indices: list[int]) -> tuple[list[Rollout], list[bool]]:
        m = self._recipe.method
        rollouts, kept = [], []
        with self._generation_model() as unwrapped:
            for item, index in zip(items, indices):
                ok, encoded = True, None
                try:  # encoded once: checks the media, then generation uses it
                    encoded = [self._encoder.encode(item.prompt, generation_prompt=True)]
                except DataError as err:
                    self._pending_bad.append(
                        {"id": item.id, "source": item.prompt.source, "kind": err.kind, "error": str(err)}
                    )
                    item, ok = self._find_stand_in(), False
                rollout = generate_rollouts(
                    unwrapped,
                    self._encoder,
                    [item.prompt],
                    self.num_generations,
                    m.max_completion_length,
                    m.temperature,
                    m.top_p,
                    m.top_k,
                    seed=self.rollout_seed(index),
                    synced_gpus=self._synced(),
                    encoded=encoded,
                )[0]
                rollouts.append(rollout)
                kept.append(ok)
        return rollouts, kept

    def frame_facts(self, item) -> dict:
        """What `box_iou` needs to read a solution given in the image file's pixels (finetune/evaluation/rewards.py):
        the family, and for a prompt with images the first image's (width, height) in the file and as the model saw
        it (the recipe's pixel budgets: Qwen2.5-VL answers in those pixels)."""
        facts = {"family": self._recipe.model.family}
        plans = self._encoder.image_plans(item.prompt)  # header reads, cached
        if plans:
            facts["image_size"] = probe_image(plans[0].path)
            facts["resized_size"] = (plans[0].width, plans[0].height)
        return facts

    def _score(self, items, rollouts, kept) -> torch.Tensor:
        """The reward total of every completion (NaN for a stand-in's), and the reward metrics over every rank."""
        device, names = self.accelerator.device, self.reward_table.names
        totals = torch.full((len(rollouts) * self.num_generations,), float("nan"), device=device)
        # per reward: sum of scores, completions scored, completions not scored (summed over ranks below)
        stats = torch.zeros(len(names), 3, device=device)
        for g, (item, rollout, ok) in enumerate(zip(items, rollouts, kept)):
            if not ok:
                continue
            extras = {**self.frame_facts(item), **item.extras}  # the record's own columns win
            scores = self.reward_table.score_group(rollout.texts, item.solution, item.id, extras)
            start = g * self.num_generations
            totals[start : start + self.num_generations] = torch.tensor(scores.totals, device=device)
            for r, name in enumerate(names):
                scored = [s for s in scores.scores[name] if s is not None]
                stats[r] += torch.tensor([sum(scored), len(scored), scores.no_score[name]], device=device)
        stats = self.accelerator.reduce(stats, "sum") if self.accelerator.num_processes > 1 else stats
        metrics = self._metrics["train"]
        for r, name in enumerate(names):
            total, scored, missed = stats[r].tolist()
            if scored:
                metrics[f"rewards/{name}/mean"].append(total / scored)
            metrics[f"rewards/{name}/no_score"].append(missed)
        return totals

    def _advantages(self, totals: torch.Tensor) -> torch.Tensor:
        """TRL's sum_then_normalize over every rank's groups, a stand-in's NaN rows left out, their advantage 0."""
        G, metrics = self.num_generations, self._metrics["train"]
        rewards = self.accelerator.gather(totals)
        grouped = rewards.view(-1, G)
        mean = torch.nanmean(grouped, dim=1).repeat_interleave(G)
        if self.scale_rewards == "batch":
            std = nanstd(rewards).expand_as(rewards)
        else:
            std = nanstd(grouped, dim=1).repeat_interleave(G)
        advantages = rewards - mean
        if self.scale_rewards != "none":
            advantages = advantages / (std + 1e-4)
        advantages = torch.nan_to_num(advantages, nan=0.0)
        metrics["reward"].append(torch.nanmean(rewards).item())
        metrics["reward_std"].append(nanstd(rewards).item())
        zero_std = torch.isclose(std, torch.zeros_like(std))[~torch.isnan(std)]
        metrics["frac_reward_zero_std"].append(zero_std.float().mean().item() if zero_std.numel() else 0.0)
        rank, local = self.accelerator.process_index, totals.numel()
        return advantages[rank * local : (rank + 1) * local]

    def _generate_and_score_completions(self, inputs: list[dict]) -> dict:
        device, G = self.accelerator.device, self.num_generations
        # TRL's sampler hands every prompt index G times in a row; a device's batch holds whole groups (checked).
        indices = [x["index"] for x in inputs[::G]]
        items = [self._prompts[i] for i in indices]
        rollouts, kept = self._rollouts(items, indices)
        slots = [(rollout, k) for rollout in rollouts for k in range(G)]
        completions = [rollout.completion_ids[k] for rollout, k in slots]
        width = max(len(c) for c in completions)
        ids = pad_rows([torch.tensor(c, dtype=torch.float) for c in completions], width, device).long()
        mask = pad_rows([torch.ones(len(c)) for c in completions], width, device).long()
        row_kept = torch.tensor([ok for ok in kept for _ in range(G)], device=device)
        finished = torch.tensor([f for rollout in rollouts for f in rollout.finished], device=device)
        metrics = self._metrics["train"]
        lengths = self.accelerator.gather(mask.sum(1)[row_kept]).float()
        truncated = self.accelerator.gather((~finished)[row_kept]).float()
        if lengths.numel():
            metrics["completions/mean_length"].append(lengths.mean().item())
            metrics["completions/min_length"].append(lengths.min().item())
            metrics["completions/max_length"].append(lengths.max().item())
            metrics["completions/clipped_ratio"].append(truncated.mean().item())
        loss_mask = mask * row_kept.unsqueeze(1)
        if self.mask_truncated_completions:
            loss_mask = loss_mask * finished.unsqueeze(1)
        totals = self._score(items, rollouts, kept)
        advantages = self._advantages(totals)
        sampling = pad_rows([rollout.logprobs[k] for rollout, k in slots], width, device)
        output = {
            "prompt_ids": torch.zeros(len(slots), 1, dtype=torch.long, device=device),  # never read (see module)
            "prompt_mask": torch.ones(len(slots), 1, dtype=torch.long, device=device),
            "completion_ids": ids,
            "completion_mask": loss_mask,
            "advantages": advantages,
            "num_items_in_batch": self.accelerator.gather(loss_mask.sum()).sum(),
            "sampling_per_token_logps": sampling,
            "slots": slots,
        }
        model = self._unwrapped()
        generate_every = self.args.steps_per_generation * self.num_iterations
        with torch.no_grad():
            # As TRL: the log-probs at sampling time are needed when the policy moves before a micro-batch is trained.
            if self.args.gradient_accumulation_steps % generate_every != 0:
                output["old_per_token_logps"], _ = self.token_logps(model, slots, width)
                self._log_gap(output["old_per_token_logps"], sampling, loss_mask)
            if self.beta != 0.0:
                with model.disable_adapter():
                    output["ref_per_token_logps"], _ = self.token_logps(model, slots, width)
        self._gap_in_loss = "old_per_token_logps" not in output
        return output

    def _log_gap(self, trainer_logps, sampling, mask) -> None:
        """|trainer - generation| log-probs over the completion tokens (TRL's sampling/sampling_logp_difference)."""
        delta = (trainer_logps.detach() - sampling).abs()[mask.bool()]
        local = torch.stack([delta.sum(), torch.tensor(float(delta.numel()), device=delta.device)])
        high = delta.max() if delta.numel() else torch.zeros((), device=delta.device)
        if self.accelerator.num_processes > 1:
            local, high = self.accelerator.reduce(local, "sum"), self.accelerator.gather(high.reshape(1)).max()
        metrics = self._metrics["train"]
        metrics["sampling/sampling_logp_difference/mean"].append((local[0] / local[1].clamp(min=1)).item())
        metrics["sampling/sampling_logp_difference/max"].append(high.item())

    def _prepare_inputs(self, generation_batch):
        """TRL's buffering (generate every steps_per_generation x num_iterations micro-batches, then hand out one
        slice per micro-batch), without its row shuffle: each slice keeps whole groups, in order."""
        if not self.model.training:
            return self._generate_and_score_completions(generation_batch)
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            self._buffered_inputs = split_tensor_dict(batch, self.args.steps_per_generation)
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    def _compute_loss(self, model, inputs):
        self._slots = inputs["slots"]
        self._trained_tokens = int(inputs["completion_mask"].sum())
        loss = super()._compute_loss(model, inputs)
        # Without an old-log-prob pass the policy has not moved since sampling: this forward measures the gap.
        if self._gap_in_loss and self.model.training:
            self._log_gap(self._last_logps, inputs["sampling_per_token_logps"], inputs["completion_mask"])
        return loss

    # ----- the rest of the project's trainer -----
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """The held-out prompts' greedy completions scored by the rewards (all ranks together; reward_eval.py), logged
        as eval_reward, eval_reward/<name> and eval_no_score/<name>."""
        start = self._sync_clock()
        metrics = evaluate_rewards_in_training(
            self, self._eval_prompts, self._recipe.evaluation.batch_size, Path(self.args.output_dir)
        )
        logs = eval_logs(metrics, metric_key_prefix)
        # Logged in eval mode: TRL's `log` adds the metrics of the model's current mode, and the training metrics
        # gathered since the last log belong to the next training log, not to this one.
        was_training = self.model.training
        self.model.eval()
        try:
            self.log(logs)
        finally:
            self.model.train(was_training)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, logs)
        if self._timing["since"] is not None:  # evaluation is no part of the steps' timing
            self._timing["since"] += self._sync_clock() - start
        return logs

    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        self.write_reward_summary()
        return result

    def write_reward_summary(self) -> None:
        """Per reward, the completions scored and not scored over the run (every rank's), in the run directory's
        rewards.json, which the run summary reports."""
        names = self.reward_table.names
        summary = self.reward_table.summary()
        counts = torch.tensor(
            [[summary[n]["scored"], summary[n]["no_score"]] for n in names], device=self.accelerator.device
        )
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, "sum")
        if self.is_world_process_zero():
            table = {n: {"scored": int(c[0]), "no_score": int(c[1])} for n, c in zip(names, counts.tolist())}
            RunDir(Path(self.args.output_dir)).rewards_file.write_text(json.dumps(table, indent=1) + "\n")

    def create_optimizer(self, model=None):
        """AdamW over one parameter group per (part, weight decay), each at its part's learning rate."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = parameter_groups(opt_model, self._recipe, set(self.get_decay_parameter_names(opt_model)))
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self.state.global_step
        if self._timing["since"] is None:  # the first step's start: the time before it is setup, not training
            self._timing["since"], self._timing["step"] = self._sync_clock(), step
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Prompts skipped while generating for this step, counted as SFT counts its bad samples.
        self._guard.take({"bad_samples": self._pending_bad}, step)
        self._pending_bad = []
        real = self._trained_tokens  # this micro-batch's completion tokens in the loss (set by _compute_loss)
        self._tokens["real"] += real
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
            self._log_timing(logs)
        super().log(logs, start_time)

    def _log_timing(self, logs: dict) -> None:
        """This rank's per-step means since the last log: the step's wall time (`timing/step_s`), the part spent
        generating rollouts (`timing/rollout_s`), the rest (`timing/train_s`: scoring, the old-policy and reference
        forwards, forward, backward and optimizer), generation's share of the step, the completion tokens generated
        per second of generation, and (CUDA) the peak memory since the start."""
        t = self._timing
        steps = self.state.global_step - t["step"]
        if t["since"] is None or steps <= 0:
            return
        now = self._sync_clock()
        step_s, rollout_s = (now - t["since"]) / steps, t["rollout_s"] / steps
        logs["timing/step_s"] = round(step_s, 4)
        logs["timing/rollout_s"] = round(rollout_s, 4)
        logs["timing/train_s"] = round(step_s - rollout_s, 4)
        logs["timing/rollout_share"] = round(rollout_s / max(step_s, 1e-9), 4)
        logs["rollout/tokens_per_second"] = round(t["generated"] / max(t["rollout_s"], 1e-9), 1)
        if torch.cuda.is_available():  # this rank's peaks since the start, as the SFT trainer logs them
            logs["peak_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            logs["peak_memory_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        self._timing = {"rollout_s": 0.0, "generated": 0, "since": now, "step": self.state.global_step}


def read_reward_prompts(config: Config, encoder, resolve, split: str = "train") -> list:
    """data.train (or data.eval) as RL prompts with their solutions (finetune/data/preference.py), counted as SFT
    counts its samples and stopped on (or reported) as SFT's bad samples are."""
    from finetune.data.preference import read_preference_split
    from finetune.data.prepare import require_clean

    value = getattr(config.data, split)
    data = read_preference_split(value, "prompts", config.data.media_root, resolve, config.trainer.seed, encoder)
    if not data.items and data.read and set(data.problems) == {"no_solution"}:
        # Another format altogether (SFT conversations, preference pairs): one line, not a report per record.
        raise DataError(
            f"data.{split}={value} holds no RL prompts: none of its {data.read} records has a 'solution' (or "
            f"'answer'), which method={config.method.name}'s rewards score completions against. Give data.{split} "
            "prompts in the RL format (prompt or messages ending with the user's turn, and solution)."
        )
    require_clean(data, "training" if split == "train" else "evaluation", config.data.skip_invalid, logger)
    if not data.items:
        raise DataError(f"data.{split}={value} holds no usable prompts with a solution.")
    return data.items


def build_grpo_trainer(config: Config, processor, precision: str, run_dir: Path, load_for_training, resolve):
    """build_trainer (finetune/training/workflow.py) for the RL methods: the prompts read and counted, the rewards
    built (a reward that cannot be imported stops here, before the model loads), the same model loading, LoRA,
    precision and attention as SFT (`load_for_training`), and the GRPO trainer."""
    from finetune.evaluation.rewards import build_rewards
    from finetune.recipe.data_settings import conversation_encoder

    m = config.method
    rewards = build_rewards(list(m.rewards), Path.cwd())
    counting = conversation_encoder(processor, config)
    prompts = read_reward_prompts(config, counting, resolve)
    eval_prompts = read_reward_prompts(config, counting, resolve, "eval") if config.evaluation.steps else None
    logger.info(
        "%d prompts (method=%s: loss %s, beta %g, %d completions each, up to %d tokens); rewards %s",
        len(prompts),
        m.name,
        m.loss_type,
        m.beta,
        m.num_generations,
        m.max_completion_length,
        ", ".join(rewards.names),
    )
    if eval_prompts:
        logger.info(
            "held-out rewards on %d prompts (one greedy completion each) before the first step, every %d steps and at "
            "the end",
            len(eval_prompts),
            config.evaluation.steps,
        )
    if config.peft.dropout:
        logger.warning(
            "method=%s trains without dropout (peft.dropout=%g is not applied): the rollouts are sampled without it "
            "and the importance ratio compares the same policy; set peft.dropout=0 to silence this",
            m.name,
            config.peft.dropout,
        )
    args = build_grpo_config(config, precision, run_dir)
    model, _, _ = load_for_training(config, precision)
    trainer = VisionLanguageGRPOTrainer(
        model=model,
        args=args,
        processing_class=processor,
        encoder=conversation_encoder(processor, config, for_training=False),
        prompts=prompts,
        rewards=rewards,
        recipe=config,
        eval_prompts=eval_prompts,
    )
    trainer.data_summary = {
        "num_train_prompts": len(prompts),
        "train_data": {str(config.data.train): len(prompts)},  # the model card's training data
        "method": m.name,
        "rewards": rewards.names,
    }
    return trainer, processor, len(prompts), precision
