"""The trainer: TRL's `SFTTrainer` with our data loader, per-part learning rates, one vision-tower call per rank,
the fault guards and token throughput in the logs; and the `SFTConfig` a recipe becomes."""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import torch
from trl import SFTConfig, SFTTrainer

from finetune.model.load import uses_gpu
from finetune.model.sequence_parallel import SequenceParallel, encode_media_sharded, install, slice_token_losses
from finetune.model.trainable import base_model, parameter_groups, router_aux_loss_coef
from finetune.recipe.schema import Config, repo_path
from finetune.training import fsdp
from finetune.training.faults import StepGuard, bad_sample_limit, batch_summary, save_marked_checkpoint
from finetune.training.periodic_eval import as_logs, evaluate_in_training
from finetune.training.vision_sync import OneVisionCall

# The variable each integration reads its project from (transformers.integrations.integration_utils); trackio
# takes SFTConfig's `project`, set below. A variable the user set wins.
PROJECT_VARIABLES = {
    "mlflow": "MLFLOW_EXPERIMENT_NAME",
    "swanlab": "SWANLAB_PROJECT",
    "clearml": "CLEARML_PROJECT",
    "comet_ml": "COMET_PROJECT_NAME",
}


def configure_logger_backend(config: Config, run_dir: Path) -> list[str]:
    """Environment for the chosen logger; wandb runs offline (never blocks on a login) without an API key."""
    if config.logger.report_to != "wandb":
        if config.logger.report_to in PROJECT_VARIABLES:
            os.environ.setdefault(PROJECT_VARIABLES[config.logger.report_to], config.logger.project)
        return [] if config.logger.report_to == "none" else [config.logger.report_to]
    mode = config.logger.wandb_mode
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    os.environ.setdefault("WANDB_MODE", mode)
    os.environ.setdefault("WANDB_PROJECT", config.logger.project)
    os.environ.setdefault("WANDB_DIR", str(run_dir))
    os.environ.setdefault("WANDB_SILENT", "true")
    return ["wandb"]


def build_sft_config(config: Config, precision: str, run_dir: Path):
    return SFTConfig(**trainer_arguments(config, precision, run_dir), dataset_kwargs={"skip_prepare_dataset": True})


def trainer_arguments(config: Config, precision: str, run_dir: Path) -> dict:
    """The TrainingArguments every method's TRL config shares (SFTConfig, DPOConfig: finetune/training/
    preference_trainer.py)."""
    t = config.trainer
    return dict(
        output_dir=str(run_dir),
        run_name=config.name,
        max_steps=t.max_steps,
        num_train_epochs=t.num_train_epochs,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not uses_gpu(config),
        # Checkpointing is enabled by finetune/model/trainable.py (LLM only unless asked, reentrant where needed).
        activation_checkpointing=False,
        dataloader_num_workers=t.dataloader_num_workers,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_steps=t.save_steps,
        save_total_limit=None,  # finetune/training/faults.py rotates, after a checkpoint is marked complete
        seed=t.seed,
        ddp_timeout=t.ddp_timeout,
        # A stream resumes by counting past the trained batches itself (finetune/data/streaming.py), not by letting
        # the Trainer decode and drop them.
        ignore_data_skip=config.data.streaming,
        report_to=configure_logger_backend(config, run_dir),
        project=config.logger.project,  # trackio's project (the others read it from the environment, above)
        deepspeed=config.deepspeed.config_file and str(repo_path(config.deepspeed.config_file)),
        # Our collator does all preprocessing (video included): TRL must not touch the dataset, drop columns or
        # truncate. Lengths are checked by the encoder, which refuses (never cuts) a sample over data.max_length.
        remove_unused_columns=False,
        average_tokens_across_devices=True,  # loss = sum over all ranks' trained tokens / their global count
        # Every trainable parameter takes part in every step (finetune/training/vision_sync.py runs the vision tower on every
        # rank), so DDP need not search the graph for unused ones each step (HF turns the search on for PEFT).
        ddp_find_unused_parameters=False,
        max_length=None,
        disable_tqdm=False,
        # Generation-based evaluation (finetune/training/periodic_eval.py) every evaluation.steps optimizer steps.
        eval_strategy="steps" if config.evaluation.steps else "no",
        eval_steps=config.evaluation.steps,
    )


MOE_CONFIG_KEYS = ("output_router_logits", "router_aux_loss_coef")  # the text config's keys TRL's __init__ writes


class VisionLanguageSFTTrainer(SFTTrainer):
    """SFTTrainer with our data loader (finetune/model/batching.py), per-part learning rates, one vision-tower call per
    forward on every rank (finetune/training/vision_sync.py) and tokens/s logging (real and trained tokens) per device."""

    def __init__(self, *args, train_loader, recipe: Config, eval_samples=None, eval_encoder=None, **kwargs):
        self._recipe = recipe
        self._eval_samples, self._eval_encoder = eval_samples, eval_encoder
        model = kwargs["model"]
        text_config = base_model(model).config.get_text_config()
        checkpoint_values = {k: getattr(text_config, k) for k in MOE_CONFIG_KEYS if hasattr(text_config, k)}
        super().__init__(*args, **kwargs)
        # A mixture-of-experts LLM: TRL computes the load-balancing loss in every training forward when
        # `aux_loss_enabled` (the model returns its router logits), logs it as `aux_loss` and adds
        # `router_aux_loss_coef` x it to the loss (per micro-batch, divided by the accumulation steps). The weight is
        # ours (finetune/model/trainable.py: 0 with a frozen router, so the loss is logged only); TRL's own choice
        # (the config's coefficient) and what it wrote into the model config are undone: generation keeps the
        # checkpoint's `output_router_logits`, and a saved config its coefficient.
        coef = router_aux_loss_coef(model, recipe)
        if coef is not None:
            self.aux_loss_enabled, self.router_aux_loss_coef = True, coef
        for key, value in checkpoint_values.items():
            setattr(text_config, key, value)
        # transformers declares `accepts_loss_kwargs = False` on Qwen2.5-VL (not on Qwen2-VL), so Trainer would
        # not count the trained tokens of all accumulated micro-batches and ranks, and would average per-batch
        # means instead. TRL's compute_loss divides by that count itself: make Trainer always provide it.
        self.model_accepts_loss_kwargs = True
        self._train_loader = train_loader  # a callable of the world size building the training DataLoader
        self.one_vision_call = None
        self.sequence_parallel = None  # this rank's group and slice with trainer.sequence_parallel > 1
        self.last_batch: dict | None = None
        limit = bad_sample_limit(recipe.data.max_bad_samples, len(self.train_dataset))
        self._guard = StepGuard(Path(self.args.output_dir), limit, recipe.trainer.nonfinite_loss, self.accelerator)
        self._tokens = {"real": 0, "trained": 0, "seen": 0}  # this rank's real and trained tokens; all ranks' real
        self._seen_before: int | None = None  # tokens_seen of the run this one resumes
        self._last_log = (time.perf_counter(), 0, 0)
        self._waited = 0.0  # seconds spent waiting for the next batches since the last log

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self._recipe.accelerate.fsdp_version:
            fsdp.engage(self)  # fp32 gradient reduction; the same FSDP2 on CPU processes (finetune/training/fsdp.py)

    def save_model(self, output_dir=None, _internal_call=False):
        """Under FSDP2 the trained weights are gathered from the shards and saved whole (the adapter of `adapter/` and
        of each checkpoint); the Trainer itself writes none with sharded checkpoints."""
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        state_dict = fsdp.gathered_state_dict(self.model, trained_only=self._recipe.parts.uses_lora)
        self._save(output_dir or self.args.output_dir, state_dict=state_dict)

    def get_train_dataloader(self):
        loader = self._train_loader(self.accelerator.num_processes)
        if self._recipe.data.streaming:  # already this rank's own batches: accelerate must not shard them again
            return loader
        self._row_sampler = loader.batch_sampler  # finetune/data/packing.py RowBatchSampler
        return self.accelerator.prepare(loader)

    def _run_epoch(self, model, epoch, train_dataloader, *args, **kwargs):
        """The epoch reaches the row order on every path. Resuming mid-epoch on several ranks, the Trainer's own
        set_epoch stops short of it: accelerate wraps it twice there (SkipBatchSampler around BatchSamplerShard), and
        the resumed epoch would replay the first epoch's rows (seen on 2 FSDP2 ranks killed at step 4 of 3-step
        epochs: steps 5 and 6 trained on other rows than the uninterrupted run)."""
        if hasattr(getattr(self, "_row_sampler", None), "set_epoch"):
            self._row_sampler.set_epoch(epoch)
        return super()._run_epoch(model, epoch, train_dataloader, *args, **kwargs)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer's fetch of a step's batches, timed: `data_wait_fraction` in the logs is the share of the time
        spent here (collation and media decoding the DataLoader workers did not have ready)."""
        start = time.perf_counter()
        try:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        finally:
            self._waited += time.perf_counter() - start

    def create_optimizer(self, model=None):
        """AdamW over one parameter group per (part, weight decay), each at its part's learning rate;
        DeepSpeed's CPU Adam when the DeepSpeed config offloads the optimizer."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = parameter_groups(opt_model, self._recipe, set(self.get_decay_parameter_names(opt_model)))
            if self._recipe.deepspeed.offloads("optimizer"):
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                self.optimizer = DeepSpeedCPUAdam(
                    groups,
                    lr=self.args.learning_rate,
                    adamw_mode=True,
                    betas=(self.args.adam_beta1, self.args.adam_beta2),
                    eps=self.args.adam_epsilon,
                )
            else:
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
                self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.one_vision_call is None and self.accelerator.num_processes > 1:
            # One vision-tower call per forward on every rank (no ZeRO-3 hang); installed once DeepSpeed has
            # its hooks.
            self.one_vision_call = OneVisionCall(base_model(self.model).model)
        if self.sequence_parallel is None and self._recipe.trainer.sequence_parallel > 1:
            # Groups of N consecutive ranks, which the loader gives the same rows (finetune/model/sequence_parallel.py).
            self.sequence_parallel = SequenceParallel.from_world(self._recipe.trainer.sequence_parallel)
            install(self.model, self.sequence_parallel)
            # Each rank of a group encodes its share of the row's frames; the features are gathered.
            self.one_vision_call.encode = functools.partial(encode_media_sharded, sp=self.sequence_parallel)

        step = self.state.global_step
        self.last_batch = batch_summary(inputs)  # named in an out-of-memory message
        self._guard.take(inputs, step)  # samples that failed to decode; the ids of the rows
        real = int(inputs.pop("num_real_tokens"))
        if self.sequence_parallel is not None:  # the N ranks of a group share a row: each works on 1/N of it
            real //= self.sequence_parallel.size
        self._tokens["real"] += real
        trained = int((inputs["labels"] != -100).sum())
        self._tokens["trained"] += trained // (self.sequence_parallel.size if self.sequence_parallel else 1)
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Every rank checks the step together (bad samples, non-finite loss); the same exchange sums the tokens of
        # all ranks, logged as `tokens_seen` (TRL's `num_tokens` counts the rows of a batch without attention_mask).
        self._tokens["seen"] += self._guard.after_step(loss, real, step, model)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """With sequence parallelism: this rank's slice of the row (finetune/model/sequence_parallel.py), its token
        losses summed and divided by the labelled tokens of all ranks' distinct rows, times the world size (the
        gradient is averaged over every rank, the peers of a group included; each rank's backward holds a share of
        every slice's loss through the all-to-alls). Otherwise TRL's."""
        if self.sequence_parallel is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        n = self.sequence_parallel.size
        token_sum, count = slice_token_losses(model, inputs, self.sequence_parallel, unwrapped=self.model)
        if num_items_in_batch is None:  # this micro-batch's labelled tokens over every rank (each row counted N times)
            num_items_in_batch = self.accelerator.reduce(torch.tensor(float(count), device=token_sum.device), "sum")
            num_items_in_batch = num_items_in_batch * n
        distinct = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=token_sum.device) / n
        loss = token_sum / distinct.clamp_min(1) * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    def _save_checkpoint(self, model, trial):
        """The Trainer's save, then the completion marker (finetune/training/faults.py)."""
        save_marked_checkpoint(self, super()._save_checkpoint, model, trial)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """Generation-based evaluation on data.eval (all ranks together), logged as eval_* metrics."""
        e = self._recipe.evaluation
        metrics = evaluate_in_training(
            self, self._eval_samples, self._eval_encoder, e.batch_size, e.max_new_tokens, Path(self.args.output_dir)
        )
        logs = as_logs(metrics, metric_key_prefix)
        self.log(logs)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, logs)
        return logs

    def log(self, logs, start_time=None):
        if "loss" in logs and self.model.training:
            now, real, trained = time.perf_counter(), self._tokens["real"], self._tokens["trained"]
            last_time, last_real, last_trained = self._last_log
            elapsed = max(now - last_time, 1e-9)
            logs["tokens_per_second_per_device"] = round((real - last_real) / elapsed, 1)
            logs["trained_tokens_per_second_per_device"] = round((trained - last_trained) / elapsed, 1)
            logs["data_wait_fraction"] = round(min(self._waited / elapsed, 1.0), 4)
            if torch.cuda.is_available():  # this rank's peaks since the start (docs/performance.md)
                logs["peak_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                logs["peak_memory_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
            self._last_log, self._waited = (now, real, trained), 0.0
            if self._seen_before is None:
                self._seen_before = next(
                    (h["tokens_seen"] for h in reversed(self.state.log_history) if "tokens_seen" in h), 0
                )
            logs["tokens_seen"] = self._seen_before + self._tokens["seen"]
        super().log(logs, start_time)
