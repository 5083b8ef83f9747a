"""KTO, ORPO and SimPO on our data path and forward, beside DPO (finetune/training/preference_trainer.py), whose
loader, optimizer, fault guards, checkpoints and logging they share (they subclass its trainer).

- KTO: TRL's `KTOTrainer._compute_loss` (trl/trainer/kto_trainer.py) runs on a compact view of our batch, as DPO's
  does: a stand-in for the model returns our forward's per-token log-probs for TRL's two calls (the mismatched KL
  sequences, then the completions), and the reference log-probs (the LoRA adapter off) come precomputed with the batch:
  one no-grad forward of the completions and one of the KL sequences. The KL sequences are TRL's: each prompt with
  the previous completion of its batch (finetune/model/preference_batching.py `UnpairedCollator`), sharing their
  prompt's media, so a frozen tower is called once per step for all four forwards.
- ORPO and SimPO: no reference model, one forward per step. Their losses are TRL's own methods
  (trl/experimental/orpo `ORPOTrainer.odds_ratio_loss`, trl/experimental/cpo `CPOTrainer.cpo_loss` with
  loss_type=simpo) called on our length-averaged log-probs; the NLL term is the chosen replies' mean token
  cross-entropy. TRL's ORPO takes that NLL over the prompt's tokens too; ours is over the reply, the tokens SFT
  trains (the prompt is the user's, as in the ORPO paper's code).
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import torch
from trl import KTOTrainer

with warnings.catch_warnings():  # "trl.experimental is unstable": the two loss methods used here are tested
    warnings.simplefilter("ignore")
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

from finetune.recipe.schema import Config
from finetune.training.preference_forward import completion_log_probs, tower_is_frozen, vision_parts
from finetune.training.preference_trainer import VisionLanguageDPOTrainer, compact_inputs


def completion_view(batch: dict) -> torch.Tensor:
    """TRL's `completion_mask` for a batch: a leading 0, then each sequence's completion tokens left-aligned."""
    width = max(VisionLanguageDPOTrainer._completion_width(batch), 1)
    return compact_inputs(batch, width, None, None)["completion_mask"]


class KTOForward:
    """Stands in for the model in TRL's KTO `_compute_loss`: our forward on the KL batch when called with the KL view's
    input ids, else on the completions."""

    def __init__(self, model, unwrapped, features, batch: dict, kl_batch: dict | None, kl_marker):
        self.model, self.unwrapped, self.features = model, unwrapped, features
        self.batch, self.kl_batch, self.kl_marker = batch, kl_batch, kl_marker
        self.calls: list[str] = []
        self.last = None

    def __call__(self, input_ids=None, output_router_logits: bool = False, **_ignored):
        kl = input_ids is self.kl_marker
        self.calls.append("kl" if kl else "completions")
        out = completion_log_probs(
            self.model,
            self.kl_batch if kl else self.batch,
            self.unwrapped,
            self.features,
            output_router_logits=output_router_logits and not kl,
        )
        if not kl:
            self.last = out
        return SimpleNamespace(
            log_probs=out.log_probs, entropy=out.entropy, mean_logits=out.mean_logits, aux_loss=out.aux_loss
        )


class VisionLanguageKTOTrainer(VisionLanguageDPOTrainer):
    """KTO (method=kto): completions labelled desirable or not, TRL's KTO loss (loss_type kto or
    apo_zero_unpaired, desirable/undesirable weights, beta), the reference being the adapter off."""

    _compute_kl_logps = KTOTrainer._compute_kl_logps  # called by KTOTrainer._compute_loss on `self`

    def __init__(self, *, recipe: Config, **kwargs):
        super().__init__(recipe=recipe, **kwargs)
        m = recipe.method
        # The attributes TRL's KTO `_compute_loss` reads (trl/trainer/kto_trainer.py __init__ sets them alike).
        self.loss_type = m.loss_type
        self.calculate_KL = m.loss_type != "apo_zero_unpaired"
        self.desirable_weight, self.undesirable_weight = m.desirable_weight, m.undesirable_weight
        self.precompute_ref_logps = True  # ours come with every batch

    def reference_log_probs(self, model, batch: dict):
        """(reference log-probs of the completions, of the KL sequences or None, the unique media's features when
        the tower is frozen): our forward under no_grad with the adapter off; the KL forward reuses the first's
        features (the same prompts in the same order)."""
        unwrapped = self.accelerator.unwrap_model(model)
        kl_batch = batch.get("kl_batch")
        with torch.no_grad(), unwrapped.disable_adapter():
            out = completion_log_probs(model, batch, unwrapped)
            kl = completion_log_probs(model, kl_batch, unwrapped, out.features) if kl_batch is not None else None
        visual, _ = vision_parts(unwrapped)
        sums = (out.log_probs * out.mask).sum(1)
        kl_sums = None if kl is None else (kl.log_probs * kl.mask).sum(1)
        return sums, kl_sums, out.features if tower_is_frozen(visual) else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        unwrapped = self.accelerator.unwrap_model(model)
        for key in ("sample_ids", "bad_samples", "pair_index"):
            inputs.pop(key, None)
        kl_batch = inputs.pop("kl_batch", None) if self.calculate_KL else None
        labels = inputs.pop("label")
        ref, ref_kl, features = self.reference_log_probs(model, {**inputs, "kl_batch": kl_batch})
        completion = completion_view(inputs)
        compact = {
            "input_ids": torch.zeros_like(completion),
            "completion_mask": completion,
            "attention_mask": inputs["num_real_tokens"].reshape(1),
            "label": labels,
            "ref_logps": ref,
        }
        kl_marker = None
        if kl_batch is not None:
            kl_completion = completion_view(kl_batch)
            kl_marker = torch.zeros_like(kl_completion)
            compact.update(
                KL_input_ids=kl_marker,
                KL_attention_mask=kl_completion,
                KL_completion_mask=kl_completion,
                ref_KL_logps=ref_kl,
            )
        policy = KTOForward(model, unwrapped, features, inputs, kl_batch, kl_marker)
        loss = KTOTrainer._compute_loss(self, policy, compact, return_outputs=False)
        self.last_policy = policy.last
        return loss


def reference_free_loss(trainer, chosen: torch.Tensor, rejected: torch.Tensor, nll: torch.Tensor, method):
    """(loss, {metric: tensor}) of ORPO or SimPO from the pairs' average log-probs and the chosen replies' NLL, by
    TRL's own loss methods (they read only the settings on `self`, given here)."""
    if method.name == "orpo":
        settings = SimpleNamespace(beta=method.beta, accelerator=trainer.accelerator)
        losses, chosen_rewards, rejected_rewards, ratio, log_odds = ORPOTrainer.odds_ratio_loss(
            settings, chosen, rejected
        )
        extra = {"log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()}
        loss = nll - losses.mean()  # ORPOTrainer.get_batch_loss_metrics
    else:
        settings = SimpleNamespace(
            beta=method.beta,
            accelerator=trainer.accelerator,
            alpha=0.0,
            loss_type="simpo",
            simpo_gamma=method.simpo_gamma,
            label_smoothing=method.label_smoothing,
        )
        losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(settings, chosen, rejected)
        extra = {}
        loss = losses.mean() + method.cpo_alpha * nll  # CPOTrainer.get_batch_loss_metrics
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen.detach().mean(),
        "logps/rejected": rejected.detach().mean(),
        "nll_loss": nll.detach(),
        **extra,
    }
    return loss, metrics


class VisionLanguageReferenceFreeTrainer(VisionLanguageDPOTrainer):
    """ORPO (method=orpo) and SimPO (method=simpo) on preference pairs: one forward per step, no reference."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        for key in ("sample_ids", "bad_samples", "pair_index"):
            inputs.pop(key, None)
        mode = "train" if self.model.training else "eval"
        unwrapped = self.accelerator.unwrap_model(model)
        out = completion_log_probs(model, inputs, unwrapped, output_router_logits=self.aux_loss_enabled)
        self.last_policy = out
        sums, counts = (out.log_probs * out.mask).sum(1), out.mask.sum(1)
        average = sums / counts.clamp(min=1)  # TRL's get_batch_logps(average_log_prob=True)
        (chosen, rejected), (chosen_counts, rejected_counts) = average.chunk(2), counts.chunk(2)
        # The mean token cross-entropy of the chosen replies (TRL's nn.CrossEntropyLoss over the chosen half).
        nll = -sums.chunk(2)[0].sum() / chosen_counts.sum().clamp(min=1)
        # A pair with an empty side (the stand-in of a batch whose pairs all failed to decode) has no odds: left out,
        # its zero-token side adds nothing; a batch of none gives a zero loss with a graph (every rank steps).
        scored = (chosen_counts > 0) & (rejected_counts > 0)
        if not bool(scored.any()):
            return (out.log_probs * out.mask).sum() * 0.0
        loss, metrics = reference_free_loss(self, chosen[scored], rejected[scored], nll, self._recipe.method)
        for key, value in metrics.items():
            self._metrics[mode][key].append(self.accelerator.gather_for_metrics(value).mean().item())
        if self.aux_loss_enabled and out.aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * out.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(out.aux_loss).mean().item())
        return loss
