"""Train: compose the recipe -> load model + processor -> freeze -> LoRA -> TRL SFTTrainer -> save.

    python -m finetune.train [hydra overrides]       (what ./launch.sh runs under `accelerate launch`)

`trainer.resume_from_checkpoint=latest` continues an interrupted run from its newest checkpoint-N.

The run directory (`trainer.output_dir`) receives config.yaml, run_info.json (versions, git SHA, command),
the trainer's checkpoints, `adapter/` (LoRA adapter + processor) and log_history.json.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
from trl import SFTTrainer

from finetune.base.errors import ConfigError, DataError
from finetune.base.paths import resolve_data_file
from finetune.data import media
from finetune.model import attention
from finetune.model.load import DTYPES, recipe_precision, uses_gpu
from finetune.recipe.data_settings import conversation_encoder, split_settings
from finetune.recipe.load import load_config
from finetune.recipe.schema import Config, repo_path
from finetune.records.rundir import RunDir

logger = logging.getLogger("finetune.train")
RULE_NOTES = {
    "qwen": "text after an image or video resumes at the largest position + 1, as Qwen pre-trained and vLLM/SGLang "
    "serve",
    "transformers": "the installed transformers' rule: text after a video resumes at start + max(h, w)/merge, "
    "which vLLM/SGLang do not use; for models served with transformers' own generate",
}


def configure_logger_backend(config: Config, run_dir: Path) -> list[str]:
    """Environment for the chosen logger; wandb runs offline (never blocks on a login) without an API key."""
    if config.logger.report_to != "wandb":
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
    from trl import SFTConfig

    t = config.trainer
    return SFTConfig(
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
        deepspeed=config.deepspeed.config_file and str(repo_path(config.deepspeed.config_file)),
        # Our collator does all preprocessing (video included): TRL must not touch the dataset, drop columns or
        # truncate. Lengths are checked by the encoder, which refuses (never cuts) a sample over data.max_length.
        remove_unused_columns=False,
        average_tokens_across_devices=True,  # loss = sum over all ranks' trained tokens / their global count
        # Every trainable parameter takes part in every step (finetune/training/vision_sync.py runs the vision tower on every
        # rank), so DDP need not search the graph for unused ones each step (HF turns the search on for PEFT).
        ddp_find_unused_parameters=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        disable_tqdm=False,
        # Generation-based evaluation (finetune/training/periodic_eval.py) every evaluation.steps optimizer steps.
        eval_strategy="steps" if config.evaluation.steps else "no",
        eval_steps=config.evaluation.steps,
    )


class VisionLanguageSFTTrainer(SFTTrainer):
    """SFTTrainer with our data loader (finetune/model/batching.py), per-part learning rates, one vision-tower call per
    forward on every rank (finetune/training/vision_sync.py) and tokens/s logging (real and trained tokens) per device."""

    def __init__(self, *args, train_loader, recipe: Config, eval_samples=None, eval_encoder=None, **kwargs):
        self._recipe = recipe
        self._eval_samples, self._eval_encoder = eval_samples, eval_encoder
        super().__init__(*args, **kwargs)
        # transformers declares `accepts_loss_kwargs = False` on Qwen2.5-VL (not on Qwen2-VL), so Trainer would
        # not count the trained tokens of all accumulated micro-batches and ranks, and would average per-batch
        # means instead. TRL's compute_loss divides by that count itself: make Trainer always provide it.
        self.model_accepts_loss_kwargs = True
        self._train_loader = train_loader  # a callable of the world size building the training DataLoader
        self.one_vision_call = None
        self.last_batch: dict | None = None
        from finetune.training.faults import StepGuard, bad_sample_limit

        limit = bad_sample_limit(recipe.data.max_bad_samples, len(self.train_dataset))
        self._guard = StepGuard(Path(self.args.output_dir), limit, recipe.trainer.nonfinite_loss, self.accelerator)
        self._tokens = {"real": 0, "trained": 0, "seen": 0}  # this rank's real and trained tokens; all ranks' real
        self._seen_before: int | None = None  # tokens_seen of the run this one resumes
        self._last_log = (time.perf_counter(), 0, 0)
        self._waited = 0.0  # seconds spent waiting for the next batches since the last log

    def get_train_dataloader(self):
        loader = self._train_loader(self.accelerator.num_processes)
        if self._recipe.data.streaming:  # already this rank's own batches: accelerate must not shard them again
            return loader
        return self.accelerator.prepare(loader)

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
        from finetune.model.trainable import parameter_groups

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
            from finetune.model.trainable import base_model
            from finetune.training.vision_sync import OneVisionCall

            self.one_vision_call = OneVisionCall(base_model(self.model).model)

        step = self.state.global_step
        from finetune.training.faults import batch_summary

        self.last_batch = batch_summary(inputs)  # named in an out-of-memory message
        self._guard.take(inputs, step)  # samples that failed to decode; the ids of the rows
        real = int(inputs.pop("num_real_tokens"))
        self._tokens["real"] += real
        self._tokens["trained"] += int((inputs["labels"] != -100).sum())
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Every rank checks the step together (bad samples, non-finite loss); the same exchange sums the tokens of
        # all ranks, logged as `tokens_seen` (TRL's `num_tokens` counts the rows of a batch without attention_mask).
        self._tokens["seen"] += self._guard.after_step(loss, real, step, model)
        return loss

    def _save_checkpoint(self, model, trial):
        """The Trainer's save, then the completion marker once every rank has written (finetune/training/faults.py)."""
        from finetune.base.errors import RunStopped
        from finetune.records.rundir import mark_complete, rotate
        from finetune.training.faults import out_of_disk

        run_dir, step = Path(self.args.output_dir), self.state.global_step
        try:
            super()._save_checkpoint(model, trial)
        except Exception as err:
            if not out_of_disk(err):
                raise
            raise RunStopped(
                f"out of disk space while writing {run_dir}/checkpoint-{step} ({err}). It is not "
                "marked complete, so resuming ignores it; earlier checkpoints are intact. Free space "
                "and run again with trainer.resume_from_checkpoint=latest."
            ) from None
        self.accelerator.wait_for_everyone()
        if self.is_world_process_zero():
            mark_complete(RunDir(run_dir).checkpoint(step), step)
            rotate(run_dir, self._recipe.trainer.save_total_limit)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """Generation-based evaluation on data.eval (all ranks together), logged as eval_* metrics."""
        from finetune.training.periodic_eval import as_logs, evaluate_in_training

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
            if torch.cuda.is_available():  # this rank's peaks since the start (README, Performance)
                logs["peak_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                logs["peak_memory_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
            self._last_log, self._waited = (now, real, trained), 0.0
            if self._seen_before is None:
                self._seen_before = next(
                    (h["tokens_seen"] for h in reversed(self.state.log_history) if "tokens_seen" in h), 0
                )
            logs["tokens_seen"] = self._seen_before + self._tokens["seen"]
        super().log(logs, start_time)


def loader_factory(config: Config, encoder, samples, lengths: list[int], rule, boundaries: bool):
    """A function of the world size returning the training DataLoader: packed rows, or one sample per row."""
    from finetune.data.packing import training_rows
    from finetune.model.batching import RowCollator, training_loader

    budget = config.trainer.max_tokens_per_row or config.data.max_length
    rows = training_rows(lengths, config.trainer.packing, budget, config.trainer.seed)
    if config.trainer.packing:
        logger.info(
            "packing %d samples into %d rows of <= %d tokens (%.1f%% filled)",
            len(samples),
            len(rows),
            budget,
            100 * sum(lengths) / (len(rows) * budget),
        )
    collator = RowCollator(encoder, samples, rule, boundaries)

    def build(world_size: int):
        return training_loader(
            rows,
            collator,
            config.trainer.per_device_train_batch_size,
            config.trainer.seed,
            world_size,
            config.trainer.dataloader_num_workers,
        )

    return build, collator


def streaming_loader(config: Config, encoder, rule, boundaries: bool, checkpoint: str | None):
    """The training DataLoader of data.streaming=true (finetune/data/streaming.py)."""
    from torch.utils.data import DataLoader

    from finetune.data.sources import parse_sources
    from finetune.data.streaming import StreamingBatches, checkpoint_step
    from finetune.model.batching import RowCollator

    sources = parse_sources(config.data.train, config.data.media_root, resolve_data_file)
    if any(s.weight != 1.0 for s in sources):
        raise ConfigError(
            "data.streaming=true reads each dataset once per pass: dataset weights are not supported "
            "there. Drop the weights, or repeat/subsample the files, or use data.streaming=false."
        )
    for source in sources:
        if not source.path.exists():
            raise DataError(f"Dataset {source.path} does not exist.")
    t = config.trainer
    skip = checkpoint_step(checkpoint) * t.gradient_accumulation_steps

    def build(world_size: int):
        from accelerate import PartialState

        stream = StreamingBatches(
            sources,
            encoder,
            RowCollator(encoder, None, rule, boundaries),
            budget=t.max_tokens_per_row or config.data.max_length,
            packing=t.packing,
            rows_per_batch=t.per_device_train_batch_size,
            seed=t.seed,
            rank=PartialState().process_index,
            world_size=world_size,
            buffer_size=config.data.stream_buffer,
            over_length=config.data.over_length,
            skip_batches=skip,
        )
        return DataLoader(stream, batch_size=None, num_workers=t.dataloader_num_workers)

    return build


def build_trainer(config: Config, overrides: list[str], checkpoint: str | None = None):
    """Everything up to `trainer.train()`: data checked and counted, model loaded, frozen, LoRA'd, trainer built."""
    import datasets
    from accelerate import PartialState
    from transformers import set_seed

    from finetune.data.prepare import prepare_split, require_clean
    from finetune.model.load import load_model, load_processor, position_rule
    from finetune.model.trainable import (
        count_parameters,
        enable_activation_checkpointing,
        make_trainable,
        part_learning_rates,
        trained_parts,
    )

    run_dir = Path(config.trainer.output_dir)
    precision = recipe_precision(config)
    # Once, before any DataLoader worker exists: ./launch.sh has decided already and said so; a direct start says
    # it here when it must fall back to PyAV, and its workers then start with PyAV instead of each warning.
    announced = media.BACKEND_VARIABLE in os.environ
    decoder, why = media.settle_video_decoder()
    if decoder == "pyav" and not announced and os.environ.get("RANK", "0") == "0":
        logger.warning("video decoder: %s", why)
    processor = load_processor(config.model)
    encoder = conversation_encoder(processor, config)
    # Process group first, then the training arguments, in this order: under a DeepSpeed launch (seen on CPUs)
    # accelerate's state alone counts one process until the arguments exist, and the arguments made first leave
    # DeepSpeed's communication uninitialised (its engine then sees a world of 1). The arguments let the ranks
    # take turns below, and under ZeRO-3 make from_pretrained load each weight partitioned (deepspeed.zero.Init).
    PartialState(timeout=timedelta(seconds=config.trainer.ddp_timeout))
    args = build_sft_config(config, precision, run_dir)
    # Every sample is read and counted from media metadata before training starts (cached beside the data):
    # a bad or over-long sample stops the run here, naming it, not hours in. Every rank counts its share of the
    # records not counted yet (finetune/data/store.py) and the ranks exchange the counts.
    if config.data.streaming:
        split, samples = None, None
        logger.info(
            "streaming the training data (data.streaming=true): counted and packed on the fly, %d-sample "
            "look-ahead buffer",
            config.data.stream_buffer,
        )
    else:
        split = prepare_split(config.data.train, split_settings(config), encoder, resolve_data_file)
        require_clean(split, "training", config.data.skip_invalid, logger)
        if not split.samples:
            raise DataError(f"data.train={config.data.train} holds no usable samples.")
        samples = split.samples
        logger.info(
            "%d training samples, %s tokens (text/image/video %s/%s/%s)",
            len(samples),
            f"{int(split.totals.sum()):,}",
            *(f"{int(split.tokens[k].sum()):,}" for k in ("text", "image", "video")),
        )

    from transformers.integrations import is_deepspeed_zero3_enabled

    stage = config.deepspeed.zero_stage
    if stage in (2, 3) and PartialState().num_processes == 1 and not config.deepspeed.offloads("param"):
        logger.warning(
            "DeepSpeed ZeRO-%d in a single process shards nothing and costs time and memory; use deepspeed=none "
            "(./launch.sh refuses this combination)",
            stage,
        )
    if is_deepspeed_zero3_enabled():
        logger.info("ZeRO-3: loading the weights partitioned across the ranks (deepspeed.zero.Init)")
    set_seed(config.trainer.seed)  # before the model: LoRA initialisation draws random numbers
    model = make_trainable(load_model(config.model, precision), config)
    if config.trainer.gradient_checkpointing:
        reentrant = enable_activation_checkpointing(model, config)
        logger.info(
            "activation checkpointing (%s) on the LLM%s",
            "reentrant" if reentrant else "non-reentrant",
            " and the vision tower" if config.trainer.gradient_checkpointing_vision_tower else "",
        )
    trainable, total = count_parameters(model)
    by_part = {part: count for part, count in trained_parts(model).items() if count}
    rates = part_learning_rates(config)
    logger.info(
        "precision %s | trainable parameters %s / %s (%.2f%%): %s",
        precision,
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
        ", ".join(f"{part} {count:,} at lr {rates[part]:g}" for part, count in by_part.items()),
    )

    implementation, note = attention.choose(
        config.model.attn_implementation, uses_gpu(config), PartialState().device, DTYPES[precision]
    )
    attention.set_implementation(model, implementation)
    boundaries = attention.uses_boundaries(implementation)
    logger.info("attention: %s", note)
    rule = position_rule(model, config.model)
    logger.info("M-RoPE positions: model.rope_rule=%s (%s)", rule.rule, RULE_NOTES[rule.rule])
    if config.data.streaming:
        build_loader, collator = streaming_loader(config, encoder, rule, boundaries, checkpoint), None
    else:
        build_loader, collator = loader_factory(config, encoder, samples, split.totals.tolist(), rule, boundaries)
    eval_samples, eval_encoder = None, None
    if config.evaluation.steps:
        from finetune.evaluation.evaluate import eval_samples as read_eval_samples

        eval_encoder = conversation_encoder(processor, config, for_training=False)
        eval_samples = read_eval_samples(config, eval_encoder)
        logger.info(
            "evaluating on %d held-out samples every %d steps and at the end",
            len(eval_samples),
            config.evaluation.steps,
        )
    # TRL wants datasets; ours are unused except for their length (the base of a fractional data.max_bad_samples:
    # in streaming mode, the rows the run trains).
    t = config.trainer
    size = (
        len(samples)
        if samples is not None
        else t.max_steps * t.per_device_train_batch_size * t.gradient_accumulation_steps * PartialState().num_processes
    )
    index = datasets.Dataset.from_dict({"index": list(range(size))})
    trainer = VisionLanguageSFTTrainer(
        model=model,
        args=args,
        train_dataset=index,
        eval_dataset=index if eval_samples else None,
        data_collator=collator,
        processing_class=processor,
        train_loader=build_loader,
        recipe=config,
        eval_samples=eval_samples,
        eval_encoder=eval_encoder,
    )
    if samples is None:
        trainer.data_summary = {"num_train_samples": None, "train_data": {str(config.data.train): "streamed"}}
    else:
        most_images, most_videos = samples.media_counts()
        trainer.data_summary = {
            "num_train_samples": len(samples),
            "train_data": split.kept_per_file,
            "max_images_per_sample": most_images,
            "max_videos_per_sample": most_videos,
        }
    return trainer, processor, size, precision


def train(config: Config, overrides: list[str]) -> Path:
    from finetune.records.runinfo import write_run_info

    run_dir = Path(config.trainer.output_dir)
    from finetune.records.rundir import check_checkpoint_fits, resolve_checkpoint

    checkpoint = resolve_checkpoint(config.trainer.resume_from_checkpoint, run_dir)
    if checkpoint:  # WORLD_SIZE: set by `accelerate launch` for every rank, before any process group exists
        check_checkpoint_fits(checkpoint, config, int(os.environ.get("WORLD_SIZE", "1")))
    trainer, processor, _, precision = build_trainer(config, overrides, checkpoint)
    if trainer.is_world_process_zero():
        write_run_info(
            run_dir, config, overrides, {"precision": precision, "resumed_from": checkpoint, **trainer.data_summary}
        )
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except torch.OutOfMemoryError as err:  # torch.cuda.OutOfMemoryError: one message, not a CUDA traceback
        from finetune.base.errors import RunStopped
        from finetune.training.faults import out_of_memory_message

        raise RunStopped(out_of_memory_message(config, trainer.state.global_step, trainer.last_batch, err)) from None
    if config.evaluation.steps:
        step = trainer.state.global_step
        if not any(h.get("step") == step and "eval_exact_match" in h for h in trainer.state.log_history):
            trainer.evaluate()  # the trainer evaluates at multiples of the interval (and at the end in some versions)
        if trainer.is_world_process_zero():
            from finetune.evaluation.metrics import format_metrics
            from finetune.training.periodic_eval import publish_final

            publish_final(run_dir, step)
            print(format_metrics(RunDir(run_dir).metrics()))

    adapter_dir = RunDir(run_dir).adapter
    trainer.save_model(str(adapter_dir))
    if trainer.is_world_process_zero():
        processor.save_pretrained(str(adapter_dir))
        RunDir(run_dir).history_file.write_text(json.dumps(trainer.state.log_history, indent=1))
        logger.info("saved %s to %s", "adapter" if config.parts.uses_lora else "model", adapter_dir)
    leave_process_group()
    return adapter_dir


def leave_process_group() -> None:
    """Every rank leaves together, and the process group is torn down while the interpreter is still alive. Left to
    interpreter shutdown, Gloo's worker threads can abort a rank that finished its work with SIGABRT ("terminate
    called without an active exception"; pytorch/pytorch#179291), which fails a run that trained and saved."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str]) -> None:
    """`finetune train [overrides]` (finetune/cli/main.py turns refusals into one line, exit 2)."""
    train(load_config(argv), argv)
