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
from datetime import timedelta
from pathlib import Path

import datasets
import torch
import torch.distributed as dist
from accelerate import PartialState
from transformers import set_seed
from transformers.integrations import is_deepspeed_zero3_enabled

from finetune.base.errors import ConfigError, DataError, RunStopped
from finetune.base.families import family_of
from finetune.base.paths import resolve_data_file
from finetune.data import media
from finetune.data.encode import ConversationEncoder
from finetune.data.modes import LabelMode
from finetune.data.prepare import prepare_split, require_clean
from finetune.evaluation.evaluate import eval_samples as read_eval_samples
from finetune.evaluation.metrics import format_metrics
from finetune.model import attention, linear_attention, sequence_parallel
from finetune.model.load import DTYPES, load_model, load_processor, position_rule, recipe_precision, uses_gpu
from finetune.model.trainable import (
    count_parameters,
    enable_activation_checkpointing,
    make_trainable,
    part_learning_rates,
    trained_parts,
)
from finetune.recipe.data_settings import conversation_encoder, split_settings, vision_settings
from finetune.recipe.keys import PREFERENCE_METHODS
from finetune.recipe.load import load_config
from finetune.recipe.schema import Config
from finetune.records.rundir import RunDir, check_checkpoint_fits, resolve_checkpoint
from finetune.records.runinfo import write_run_info
from finetune.training.faults import out_of_memory_message
from finetune.training.loaders import loader_factory, streaming_loader
from finetune.training.periodic_eval import publish_final
from finetune.training.preference_trainer import (
    VisionLanguageDPOTrainer,
    build_dpo_config,
    completion_loader_factory,
    pair_loader_factory,
)
from finetune.training.reward_eval import finish_reward_evaluation
from finetune.training.trainer import VisionLanguageSFTTrainer, build_sft_config

logger = logging.getLogger("finetune.train")
RULE_NOTES = {
    "qwen": "text after an image or video resumes at the largest position + 1, as Qwen pre-trained and vLLM/SGLang "
    "serve",
    "transformers": "the installed transformers' rule: text after a video resumes at start + max(h, w)/merge, "
    "which vLLM/SGLang do not use; for models served with transformers' own generate",
}


def skip_deepspeed_shm_build() -> None:
    """DeepSpeed on CPUs compiles its shared-memory all-reduce (a C++ op: about a minute of both cores, and again for
    every new virtual environment path) when it opens its process group. Only tensor-parallel inference (AutoTP's
    `inference_all_reduce`) calls that op, never ZeRO training, so a CPU run marks it unavailable and skips the build;
    on GPUs DeepSpeed's CUDA accelerator has no such op."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # the probed table DeepSpeed consults


def load_for_training(config: Config, precision: str):
    """The model as every method trains it: loaded in the training precision (partitioned under ZeRO-3), frozen and
    LoRA'd per `parts`, activation checkpointing, the attention implementation; with the position rule and whether
    batches carry varlen boundaries. Returns (model, rule, boundaries)."""
    stage = config.deepspeed.zero_stage
    if stage in (2, 3) and PartialState().num_processes == 1 and not config.deepspeed.offloads("param"):
        logger.warning(
            "DeepSpeed ZeRO-%d in a single process shards nothing and costs time and memory; use deepspeed=none "
            "(./launch.sh refuses this combination)",
            stage,
        )
    if is_deepspeed_zero3_enabled():
        logger.info("ZeRO-3: loading the weights partitioned across the ranks (deepspeed.zero.Init)")
    set_seed(config.trainer.seed)
    # QLoRA quantizes while loading, on the device the weights load to: this rank's (DDP, ZeRO-2: each holds the
    # whole 4-bit base); a 16-bit model loads on the CPU and the trainer moves it.
    quantized = config.model.quantization != "none"
    model = load_model(config.model, precision, device_map={"": PartialState().device} if quantized else None)
    # Again after loading, so that LoRA's initialisation draws the same numbers however the model was built: under
    # ZeRO-3 (deepspeed.zero.Init) the modules are constructed for real, and some draw in __init__ (Qwen3.5's Gated
    # DeltaNet initialises A_log there), which shifted every LoRA matrix against a single-process run.
    set_seed(config.trainer.seed)
    model = make_trainable(model, config)
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

    requested, split = config.model.attn_implementation, config.trainer.sequence_parallel
    if split > 1 and requested == "auto":
        requested = "varlen"  # a split row keeps its samples apart by their boundaries (no mask): never sdpa
    implementation, note = attention.choose(requested, uses_gpu(config), PartialState().device, DTYPES[precision])
    sequence_parallel.check(
        split,
        model.config.model_type,
        model.config.get_text_config(),
        PartialState().num_processes,
        implementation in attention.REGISTERED.values(),
    )
    attention.set_implementation(model, implementation)
    hybrid = linear_attention.is_hybrid(model.config)
    if hybrid and config.trainer.packing and (problem := linear_attention.packing_problem(model)):
        raise ConfigError(
            f"trainer.packing=true cannot keep packed samples apart in this model's linear-attention layers: {problem}. "
            "Set trainer.packing=false (one sample per row), or load the model without hub kernels or remote code."
        )
    # A hybrid model's linear-attention layers need the sample boundaries whatever the attention implementation.
    boundaries = attention.uses_boundaries(implementation) or hybrid
    logger.info("attention: %s%s", note, "; linear attention restarted at every sample boundary" if hybrid else "")
    rule = position_rule(model, config.model)
    logger.info("M-RoPE positions: model.rope_rule=%s (%s)", rule.rule, RULE_NOTES[rule.rule])
    return model, rule, boundaries


def build_trainer(config: Config, overrides: list[str], checkpoint: str | None = None):
    """Everything up to `trainer.train()`: data checked and counted, model loaded, frozen, LoRA'd, trainer built."""
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
    if config.deepspeed.zero_stage and not uses_gpu(config):
        skip_deepspeed_shm_build()
    PartialState(timeout=timedelta(seconds=config.trainer.ddp_timeout))
    if config.method.name in PREFERENCE_METHODS:
        return build_preference_trainer(config, processor, encoder, precision, run_dir)
    if config.method.is_rl:
        from finetune.training.grpo_trainer import build_grpo_trainer

        return build_grpo_trainer(config, processor, precision, run_dir, load_for_training, resolve_data_file)
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

    model, rule, boundaries = load_for_training(config, precision)
    if config.data.streaming:
        build_loader, collator = streaming_loader(config, encoder, rule, boundaries, checkpoint), None
    else:
        build_loader, collator = loader_factory(config, encoder, samples, split.totals.tolist(), rule, boundaries)
    eval_samples, eval_encoder = None, None
    if config.evaluation.steps:
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


def read_training_pairs(config: Config, encoder, split: str = "train") -> list[tuple]:
    """data.train (or data.eval) as (chosen, rejected) Samples: finetune/data/preference.py reads TRL's and LLaMA-Factory's pair
    formats, counts every pair as SFT counts its samples, and stops on (or reports) the bad ones as SFT does."""
    data = read_preference_items(config, encoder, "pairs", split)
    return [(pair.conversation("chosen"), pair.conversation("rejected")) for pair in data]


def read_training_completions(config: Config, encoder, split: str = "train") -> list:
    """data.train (or data.eval) as KTO's UnpairedCompletions (TRL's prompt/completion/label, LLaMA-Factory's
    kto_tag), read, counted and checked as the pairs are."""
    return read_preference_items(config, encoder, "unpaired", split)


def read_preference_items(config: Config, encoder, kind: str, split: str) -> list:
    from finetune.data.preference import read_preference_split

    value = getattr(config.data, split)
    data = read_preference_split(value, kind, config.data.media_root, resolve_data_file, config.trainer.seed, encoder)
    require_clean(data, "training" if split == "train" else "evaluation", config.data.skip_invalid, logger)
    if not data.items:
        what = "preference pairs" if kind == "pairs" else "labelled completions"
        raise DataError(f"data.{split}={value} holds no usable {what}.")
    return data.items


def build_preference_trainer(config: Config, processor, encoder, precision: str, run_dir: Path):
    """build_trainer for a preference method (dpo, kto, orpo, simpo): the pairs (KTO: the labelled completions) read
    and counted, the same model loading, LoRA, precision and attention as SFT, and the method's trainer
    (finetune/training/preference_trainer.py, preference_methods.py)."""
    from finetune.training.preference_methods import VisionLanguageKTOTrainer, VisionLanguageReferenceFreeTrainer

    method = config.method
    args = build_dpo_config(config, precision, run_dir)
    encoder = ConversationEncoder(
        processor,
        vision_settings(config),
        LabelMode.LAST_ASSISTANT,  # a pair trains its reply only, never an earlier turn of the prompt
        config.data.max_length,
        video_layout=family_of(config.model.family).video_layout,
    )
    unpaired = method.name == "kto"
    read = read_training_completions if unpaired else read_training_pairs
    loader_factory_ = completion_loader_factory if unpaired else pair_loader_factory
    items = read(config, encoder)
    if unpaired:
        desirable = sum(item.desirable for item in items)
        # TRL's KTOTrainer suggests weights from this balance (the KTO paper's Eq. 8); ours are the recipe's.
        logger.info(
            "%d desirable and %d undesirable completions (method.desirable_weight %g, undesirable_weight %g)",
            desirable,
            len(items) - desirable,
            method.desirable_weight,
            method.undesirable_weight,
        )
    logger.info(
        "%d %s (method=%s, loss %s, beta %g)",
        len(items),
        "labelled completions" if unpaired else "preference pairs",
        method.name,
        method.loss_type,
        method.beta,
    )
    model, rule, boundaries = load_for_training(config, precision)
    build_loader, collator = loader_factory_(config, encoder, items, rule, boundaries)
    collators = {"train": collator}
    eval_loader, eval_items = None, []
    if config.evaluation.steps:
        eval_items = read(config, encoder, "eval")
        eval_loader, collators["eval"] = loader_factory_(config, encoder, eval_items, rule, boundaries)
        logger.info(
            "preference %s on %d held-out %s every %d steps",
            "rewards and KL" if unpaired else "accuracy and reward margins",
            len(eval_items),
            "completions" if unpaired else "pairs",
            config.evaluation.steps,
        )
    trainer_class = {
        "dpo": VisionLanguageDPOTrainer,
        "kto": VisionLanguageKTOTrainer,
        "orpo": VisionLanguageReferenceFreeTrainer,
        "simpo": VisionLanguageReferenceFreeTrainer,
    }[method.name]
    trainer = trainer_class(
        model=model,
        args=args,
        processing_class=processor,
        train_loader=build_loader,
        recipe=config,
        train_size=len(items),
        eval_loader=eval_loader,
        eval_size=len(eval_items),
        reference_collators=collators if method.precompute_ref_log_probs else None,
    )
    trainer.data_summary = {
        "num_train_completions" if unpaired else "num_train_pairs": len(items),
        "method": method.name,
    }
    return trainer, processor, len(items), precision


def train(config: Config, overrides: list[str]) -> Path:
    config.logger.require_backend()  # `finetune train` started by hand: before the model loads
    run_dir = Path(config.trainer.output_dir)
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
        raise RunStopped(out_of_memory_message(config, trainer.state.global_step, trainer.last_batch, err)) from None
    if config.evaluation.steps and config.method.is_rl:
        finish_reward_evaluation(trainer, run_dir)
    elif config.evaluation.steps and config.method.name != "sft":
        finish_preference_evaluation(trainer, run_dir)
    elif config.evaluation.steps:
        step = trainer.state.global_step
        if not any(h.get("step") == step and "eval_exact_match" in h for h in trainer.state.log_history):
            trainer.evaluate()  # the trainer evaluates at multiples of the interval (and at the end in some versions)
        if trainer.is_world_process_zero():
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


PREFERENCE_METRICS = (
    "eval_loss",
    "eval_rewards/accuracies",
    "eval_rewards/margins",
    "eval_rewards/chosen",
    "eval_rewards/rejected",
    "eval_kl",
)


def finish_preference_evaluation(trainer, run_dir: Path) -> None:
    """The held-out pairs (KTO: completions) scored at the last step too, and every evaluation's preference metrics
    (accuracy and mean reward margin; KTO: rewards, margin and KL) written to eval/preference_metrics.json."""
    step = trainer.state.global_step
    if not any(h.get("step") == step and "eval_loss" in h for h in trainer.state.log_history):
        trainer.evaluate()
    if not trainer.is_world_process_zero():
        return
    history = [
        {"step": h["step"], **{k: h[k] for k in PREFERENCE_METRICS if k in h}}
        for h in trainer.state.log_history
        if "eval_loss" in h
    ]
    eval_dir = RunDir(run_dir).eval_dir
    eval_dir.mkdir(parents=True, exist_ok=True)
    (eval_dir / "preference_metrics.json").write_text(json.dumps(history, indent=1))
    last = history[-1]
    logger.info(
        "held-out data at step %d: %s",
        step,
        ", ".join(f"{k.removeprefix('eval_')} {last[k]:.4f}" for k in PREFERENCE_METRICS if k in last),
    )


def leave_process_group() -> None:
    """Every rank leaves together, and the process group is torn down while the interpreter is still alive. Left to
    interpreter shutdown, Gloo's worker threads can abort a rank that finished its work with SIGABRT ("terminate
    called without an active exception"; pytorch/pytorch#179291), which fails a run that trained and saved."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str]) -> None:
    """`finetune train [overrides]` (finetune/cli/main.py turns refusals into one line, exit 2)."""
    train(load_config(argv), argv)
