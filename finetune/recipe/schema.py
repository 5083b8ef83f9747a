"""Typed schemas for every recipe group (composed by finetune/recipe/load.py).

The schema is the contract: Hydra merges each recipe onto these dataclasses, so a misspelt key or a wrong
type fails while composing, and each group's `check()` rejects impossible combinations with the fix in the message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING

from finetune.base.errors import ConfigError
from finetune.base.families import FAMILIES
from finetune.base.paths import REPO_ROOT
from finetune.recipe.keys import (
    ACCELERATE_MODES,
    AFTER_TRAINING,
    ATTENTION_CHOICES,
    DPO_LOSS_TYPES,
    F_DIVERGENCES,
    GRPO_LOSS_TYPES,
    IMPORTANCE_SAMPLING_LEVELS,
    KTO_LOSS_TYPES,
    LABEL_MODES,
    LOGGERS,
    METHODS,
    NONFINITE_LOSS,
    OVER_LENGTH,
    PART_MODES,
    PRECISIONS,
    PREFERENCE_METHODS,
    QUANTIZATIONS,
    REFERENCE_FREE,
    REPORT_TO,
    RL_METHODS,
    ROPE_RULES,
    ROUTER_MODES,
    SCALE_REWARDS,
    WANDB_MODES,
    check_choices,
    option,
)


@dataclass
class ModelConfig:
    """Which checkpoint to fine-tune and how its vision inputs are sized (Qwen's dynamic resolution)."""

    name_or_path: str = option(
        MISSING, help="Hub id, local directory, or " + " | ".join(f"tiny://{name}" for name in FAMILIES) + "."
    )
    family: str = option(
        MISSING,
        help="The model family (an entry of finetune/base/families.py); checked against the checkpoint's model_type.",
        choices=tuple(FAMILIES),
    )
    attn_implementation: str = option(
        "auto",
        help="Attention kernels (finetune/model/attention.py). auto: on a GPU varlen when its kernel passes a "
        "start-up check against sdpa, else sdpa; on the CPU sdpa.",
        choices=ATTENTION_CHOICES,
    )
    trust_remote_code: bool = option(False, help="Run the checkpoint's own code: only when a recipe really needs it.")
    allow_pickled_weights: bool = option(
        False,
        help="Weights are read from safetensors only; true also reads pickled `.bin` weights (torch.load with "
        "weights_only): only for checkpoints you trust; converting them to safetensors is better.",
    )
    rope_rule: str = option(
        "qwen",
        help="Where text resumes after an image or video in the M-RoPE positions (finetune/model/rope.py, "
        "docs/fidelity.md, Positions). qwen: (largest position so far) + 1, as Qwen pre-trained these models and "
        "vLLM/SGLang serve "
        "them; transformers: the rule of the installed transformers (5.3+), for models served with its `generate`.",
        choices=ROPE_RULES,
    )
    quantization: str = option(
        "none",
        help="The frozen LLM base weights while training (finetune/model/quantization.py). nf4: QLoRA, the LLM's "
        "linear layers in 4-bit NF4 with double quantization (bitsandbytes: `pip install -e .[qlora]`), computed in "
        "the run's precision; the vision tower, mergers, lm_head and MoE experts stay 16-bit; needs parts.llm=lora; "
        "DDP or ZeRO-2, not ZeRO-3 or FSDP. The export merges the adapter into the 16-bit base.",
        choices=QUANTIZATIONS,
    )
    min_pixels: int = option(
        4 * 28 * 28,
        help="Fewest pixels per image after smart_resize (factor = the checkpoint's patch x merge: 28 for Qwen2-VL "
        "and Qwen2.5-VL, 32 for Qwen3-VL and Qwen3.5).",
    )
    max_pixels: int = option(
        1280 * 28 * 28,
        help="Most pixels per image after smart_resize (factor = the checkpoint's patch x merge: 28 or 32).",
    )
    video_fps: float = option(
        2.0, help="Frames sampled per second of video, as qwen-vl-utils for Qwen2.5-VL (in pairs: FRAME_FACTOR 2)."
    )
    video_min_frames: int = option(4, help="Fewest frames sampled from one video (>= 2).")
    video_max_frames: int = option(768, help="Most frames sampled from one video.")
    video_min_pixels: int = option(128 * 28 * 28, help="Fewest pixels per video frame after resizing.")
    video_max_pixels: int = option(768 * 28 * 28, help="Most pixels per video frame after resizing.")
    video_total_pixels: int = option(
        int(128000 * 28 * 28 * 0.9), help="Pixel budget shared by all frames of one video (qwen-vl-utils' default)."
    )

    def check(self) -> None:
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ConfigError(
                f"model.min_pixels ({self.min_pixels}) must be positive and <= model.max_pixels ({self.max_pixels})."
            )
        if not 0 < self.video_min_pixels <= self.video_max_pixels:
            raise ConfigError(
                f"model.video_min_pixels ({self.video_min_pixels}) must be positive and <= "
                f"model.video_max_pixels ({self.video_max_pixels})."
            )
        if not 2 <= self.video_min_frames <= self.video_max_frames:
            raise ConfigError(
                f"model.video_min_frames ({self.video_min_frames}) must be >= 2 and <= model.video_max_frames "
                f"({self.video_max_frames})."
            )
        if self.video_fps <= 0:
            raise ConfigError(f"model.video_fps must be positive, got {self.video_fps}.")


@dataclass
class DataConfig:
    """Where the conversations are (LLaMA-Factory/ShareGPT, LLaVA, Qwen or HF-messages records in JSON, JSONL,
    parquet or a `save_to_disk` folder). Media paths resolve inside the media root and may not leave it."""

    train: Any = option(
        MISSING, help="A dataset file, or a list of files / {path, weight, media_root} entries mixed by weight."
    )
    eval: Any = option(
        None,
        help="Held-out split(s) for evaluation, in the forms of data.train and the method's format (SFT "
        "conversations, preference pairs, RL prompts with a solution).",
    )
    media_root: str | None = option(None, help="Where media paths resolve; null: the folder of each dataset file.")
    frames_fps: float | None = option(None, help="Frame rate of videos given as frame folders/lists (or per sample).")
    max_length: int = option(
        4096, help="Most tokens per sample: a longer sample is an error naming it; nothing is ever cut inside a turn."
    )
    over_length: str = option(
        "error",
        help="error: over-long samples stop the run (or are skipped with skip_invalid); drop_trailing_turns: remove "
        "whole trailing user/assistant turns (with their media) until the sample fits, keeping >= 1 reply.",
        choices=OVER_LENGTH,
    )
    skip_invalid: bool = option(False, help="true: skip samples that fail validation, with a count and report.")
    max_bad_samples: float | None = option(
        None,
        help="Samples whose media fail to decode during training are skipped and listed in bad_samples.jsonl; the "
        "run stops past this many: null = max(10, 1 % of the samples), >= 1 a count, < 1 a fraction of the samples.",
    )
    eval_max_samples: int | None = option(None, help="Evaluate on the first N samples of data.eval; null: all.")
    num_proc: int | None = option(
        None,
        help="Processes for the token pre-pass: null = the CPUs this process may use, shared by the ranks of a node "
        "(each rank counts its share of the records). Counts are stored beside the dataset in .finetune-store/.",
    )
    streaming: bool = option(
        False,
        help="true: read the records as a stream (sets too large to index, 10M+): sharded by rank and DataLoader "
        "worker, counted and packed on the fly from a look-ahead buffer; needs trainer.max_steps. See "
        "docs/data.md, Streaming.",
    )
    stream_buffer: int = option(
        4096, help="Samples packed together in streaming mode (the indexed mode's packing window)."
    )

    def check(self) -> None:
        if self.num_proc is not None and self.num_proc < 1:
            raise ConfigError(f"data.num_proc must be >= 1 (or null for every CPU), got {self.num_proc}.")
        if self.stream_buffer < 1:
            raise ConfigError(f"data.stream_buffer must be >= 1, got {self.stream_buffer}.")
        if self.max_length < 16:
            raise ConfigError(f"data.max_length={self.max_length} is too small to hold one chat turn.")
        for name in ("train", "eval"):
            value = getattr(self, name)
            items = value if isinstance(value, (list, tuple)) else [value]
            for item in items:
                ok = isinstance(item, str) or (isinstance(item, dict) and "path" in item)
                if not ok and not (name == "eval" and value is None):
                    raise ConfigError(
                        f"data.{name} must be a path or a list of paths / {{path, weight, media_root}}, got {item!r}."
                    )
        if self.frames_fps is not None and self.frames_fps <= 0:
            raise ConfigError(f"data.frames_fps must be positive, got {self.frames_fps}.")


@dataclass
class PartsConfig:
    """What trains in each part of the model (finetune/model/trainable.py), one mode per part."""

    llm: str = option("lora", help="Embeddings, decoder layers, norm and lm_head.", choices=PART_MODES)
    vision_tower: str = option("frozen", help="The ViT blocks and the Conv3d patch embed.", choices=PART_MODES)
    merger: str = option(
        "frozen",
        help="The MLP that projects vision features into the LLM (frozen or full: it never takes LoRA).",
        choices=PART_MODES,
    )
    vision_tower_lr: float | None = option(
        None,
        help="Learning rate of the vision tower (its full weights or its LoRA weights); null = "
        "trainer.learning_rate, which is the LLM's.",
    )
    merger_lr: float | None = option(
        None,
        help="Learning rate of the merger (its full weights); null = trainer.learning_rate, which is the LLM's.",
    )
    router: str = option(
        "frozen",
        help="The router of a mixture-of-experts LLM (Qwen3-VL-MoE, Qwen3.5-MoE: each layer's `mlp.gate`, a part of the llm): "
        "frozen (the default: which experts see a token stays the checkpoint's) or full (its weights train at the "
        "LLM's rate, with the load-balancing loss: trainer.router_aux_loss_coef). Models without experts: frozen.",
        choices=ROUTER_MODES,
    )

    def modes(self) -> dict[str, str]:
        return {"llm": self.llm, "vision_tower": self.vision_tower, "merger": self.merger}

    @property
    def uses_lora(self) -> bool:
        """Whether an adapter is trained (then full parts are saved beside it and the export merges it)."""
        return "lora" in self.modes().values()

    def check(self) -> None:
        if self.merger == "lora":
            raise ConfigError(
                "parts.merger=lora is not supported: the merger is small and trains fully if at all. "
                "Use parts.merger=full (or frozen)."
            )
        if self.llm == "full" and self.vision_tower == "lora":
            raise ConfigError(
                "parts.llm=full with parts.vision_tower=lora would save the whole LLM inside a LoRA adapter. "
                "Use parts.llm=lora with parts.vision_tower=lora, or parts.vision_tower=full for full fine-tuning."
            )
        if self.router == "full" and self.llm == "frozen":
            raise ConfigError(
                "parts.router=full trains the router inside a frozen LLM; set parts.llm=lora (or full) with it, or "
                "leave parts.router=frozen."
            )
        if set(self.modes().values()) == {"frozen"}:
            raise ConfigError(
                "Nothing would be trained: parts.llm, parts.vision_tower and parts.merger are all "
                "frozen. Set one to lora or full (e.g. parts.llm=lora)."
            )
        for part in ("vision_tower", "merger"):
            rate = getattr(self, f"{part}_lr")
            if rate is not None and rate <= 0:
                raise ConfigError(f"parts.{part}_lr must be positive, got {rate}.")
            if rate is not None and getattr(self, part) == "frozen":
                raise ConfigError(
                    f"parts.{part}_lr is set but parts.{part}=frozen: set parts.{part}=full (or "
                    f"lora), or remove parts.{part}_lr."
                )


@dataclass
class PeftConfig:
    """LoRA hyperparameters for the parts whose mode is `lora` (see `parts`): the LLM's linear layers and, with
    parts.vision_tower=lora, the ViT blocks' linear layers."""

    r: int = option(16, help="LoRA rank.")
    alpha: int = option(32, help="LoRA scale: updates are multiplied by alpha/r (alpha/sqrt(r) with use_rslora).")
    dropout: float = option(0.05, help="Dropout on the LoRA input, in [0, 1).")
    use_dora: bool = option(False, help="Weight-decomposed LoRA (PEFT's DoRA).")
    use_rslora: bool = option(False, help="Scale by alpha/sqrt(r) instead of alpha/r (PEFT's rsLoRA).")
    target_modules: Optional[str] = option(
        None,
        help="The LLM layers that take LoRA, as a regular expression on full module names; null: the family's "
        "attention and MLP projections inside the language model (finetune/base/families.py `lora_targets`). "
        "Anchor a pattern of your own on the language model: Qwen2.5-VL's vision MLP also has gate/up/down_proj. "
        "Only nn.Linear layers ever match.",
    )
    target_experts: bool = option(
        True,
        help="With parts.llm=lora on a mixture-of-experts LLM (Qwen3-VL-MoE, Qwen3.5-MoE): LoRA on every expert too (the fused "
        "`mlp.experts.gate_up_proj` / `down_proj` parameters, PEFT target_parameters: one rank-r update per "
        "expert), beside peft.target_modules; PEFT applies no dropout there, so it needs peft.dropout=0. false: "
        "the experts stay frozen. Dense models have none.",
    )
    vision_target_modules: Optional[str] = option(
        None,
        help="With parts.vision_tower=lora, the ViT layers that take LoRA (a regular expression); null: the "
        "family's attention and MLP projections of the ViT blocks (`vision_lora_targets`; Qwen2-VL "
        "qkv/proj/fc1/fc2, Qwen2.5-VL qkv/proj/gate/up/down_proj). The Conv3d patch embed and the merger never take "
        "LoRA (train the merger fully with parts.merger=full).",
    )

    def check(self) -> None:
        if self.r <= 0 or self.alpha <= 0:
            raise ConfigError(f"peft.r ({self.r}) and peft.alpha ({self.alpha}) must be positive for LoRA.")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"peft.dropout must be in [0, 1), got {self.dropout}.")
        for key in ("target_modules", "vision_target_modules"):
            if getattr(self, key) is None:
                continue
            try:
                re.compile(getattr(self, key))
            except re.error as err:
                raise ConfigError(f"peft.{key} is not a valid regular expression: {err}") from err


@dataclass
class TrainerConfig:
    """Optimisation and bookkeeping; passed to TRL's SFTConfig."""

    output_dir: str = option(
        "runs/${name}", help="The run directory (relative to the current directory); default runs/<experiment name>."
    )
    max_steps: int = option(-1, help="Optimizer steps to train; > 0 overrides num_train_epochs.")
    num_train_epochs: float = option(1.0, help="Passes over the training data, unless max_steps > 0.")
    per_device_train_batch_size: int = option(1, help="Samples per device and step (packed rows with packing).")
    gradient_accumulation_steps: int = option(1, help="Batches per optimizer step.")
    learning_rate: float = option(
        1e-4, help="The LLM's, and every part's unless parts.vision_tower_lr / parts.merger_lr."
    )
    lr_scheduler_type: str = option("cosine", help="The learning-rate schedule (transformers' SchedulerType).")
    warmup_steps: float = option(0.03, help="Warm-up steps; < 1: fraction of the total steps.")
    weight_decay: float = option(0.0, help="AdamW weight decay.")
    max_grad_norm: float = option(1.0, help="Gradients are clipped to this norm.")
    precision: str = option("auto", help="auto: bf16 on a GPU that supports it, else fp32.", choices=PRECISIONS)
    gradient_checkpointing: bool = option(False, help="Activation checkpointing of the LLM's decoder layers.")
    gradient_checkpointing_vision_tower: bool = option(
        False, help="Activation checkpointing of the ViT blocks too (only useful when they train)."
    )
    dataloader_num_workers: int = option(0, help="DataLoader worker processes per rank (0: in the training process).")
    logging_steps: int = option(10, help="Log the loss every N optimizer steps.")
    save_steps: int = option(500, help="Save a checkpoint every N optimizer steps.")
    save_total_limit: int | None = option(
        2, help="Complete checkpoints kept in output_dir (the oldest go first); null: every one."
    )
    seed: int = option(42, help="Seed of the run: initialisation, dropout, data order and the mixing of sources.")
    ddp_timeout: int = option(
        7200,
        help="Seconds a rank waits for the others at a collective before the job fails (torch.distributed's "
        "timeout; the default 30 min of transformers is short for a cold pre-pass of millions of samples or a slow "
        "checkpoint).",
    )
    resume_from_checkpoint: str | None = option(
        None,
        help="latest: the newest checkpoint-* in output_dir; or a checkpoint folder. Same data order, optimizer, "
        "scheduler and RNG state as the interrupted run.",
    )
    label_mode: str = option(
        "assistant",
        help="Which tokens carry loss: every assistant reply, only the last one, or every token but the vision pads.",
        choices=LABEL_MODES,
    )
    nonfinite_loss: str = option(
        "stop",
        help="A NaN/inf loss: stop (naming the step and samples) or skip (drop that step's update).",
        choices=NONFINITE_LOSS,
    )
    packing: bool = option(
        False,
        help="Rows of whole samples up to max_tokens_per_row tokens, each with its own M-RoPE positions and "
        "attention; per_device_train_batch_size then counts rows. false: padded batches.",
    )
    max_tokens_per_row: int | None = option(None, help="Tokens per packed row; null = data.max_length.")
    sequence_parallel: int = option(
        1,
        help="Ranks that split each training row (Ulysses sequence parallelism, finetune/model/sequence_parallel.py): "
        "the row is cut after the vision features are merged, and an all-to-all around the LLM's attention gives "
        "each rank heads/N of the heads over the whole row, so a row N times longer fits. 1: off. N must divide the "
        "LLM's attention and key/value heads and the number of processes; needs the varlen attention; not for "
        "Qwen3.5 (linear-attention layers). Each rank encodes its share of the row's frames; the features are gathered.",
    )
    router_aux_loss_coef: float | None = option(
        None,
        help="Weight of a mixture-of-experts LLM's load-balancing loss in the training loss (transformers' "
        "load_balancing_loss_func, per micro-batch and rank); it is logged as aux_loss either way. null: the "
        "checkpoint's router_aux_loss_coef (0.001 in Qwen3-VL-MoE and Qwen3.5-MoE) with parts.router=full, 0 with a frozen router. "
        "Models without experts: null.",
    )

    def check(self) -> None:
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("Set trainer.max_steps > 0 or trainer.num_train_epochs > 0: nothing would be trained.")
        if self.ddp_timeout < 60:
            raise ConfigError(f"trainer.ddp_timeout={self.ddp_timeout} s is too short for any collective; use >= 60.")
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ConfigError("trainer.per_device_train_batch_size and gradient_accumulation_steps must be >= 1.")
        if self.learning_rate <= 0:
            raise ConfigError(f"trainer.learning_rate must be positive, got {self.learning_rate}.")
        if self.sequence_parallel < 1:
            raise ConfigError(f"trainer.sequence_parallel must be >= 1 (1: off), got {self.sequence_parallel}.")


@dataclass
class DeepSpeedConfig:
    """A DeepSpeed JSON config; `null` trains without DeepSpeed (plain DDP when several processes run)."""

    config_file: str | None = option(
        None, help="A DeepSpeed JSON file (relative paths from the repository root); null: no DeepSpeed."
    )

    def check(self) -> None:
        if self.config_file is not None and not repo_path(self.config_file).is_file():
            raise ConfigError(f"deepspeed.config_file={self.config_file!r} does not exist.")

    def _zero(self) -> dict:
        if not self.config_file:
            return {}
        import json

        return json.loads(repo_path(self.config_file).read_text()).get("zero_optimization", {})

    @property
    def zero_stage(self) -> int:
        """The ZeRO stage of the DeepSpeed config (0 without DeepSpeed)."""
        return int(self._zero().get("stage", 0))

    def offloads(self, what: str = "optimizer") -> bool:
        """Whether the config offloads the `optimizer` (or `param`) state to CPU or NVMe."""
        return self._zero().get(f"offload_{what}", {}).get("device", "none") not in (None, "none")


@dataclass
class AccelerateConfig:
    """How `./launch.sh` starts the training processes (see finetune/runs/launch.py)."""

    mode: str = option(
        "auto",
        help="Where the processes run: on the CPU, one GPU, every GPU of this machine, or several machines; auto: "
        "by the machine (NNODES>1: multi_node, several GPUs: multi_gpu, one: single_gpu, none: cpu).",
        choices=ACCELERATE_MODES,
    )
    processes_per_node: int | None = option(
        None, help="Processes per node; null means one per visible GPU (multi_gpu/multi_node) or 1 (cpu/single_gpu)."
    )
    fsdp_version: int | None = option(
        None,
        help="2: shard parameters, gradients and optimizer state over the processes with PyTorch FSDP2 (fully_shard; "
        "each LLM decoder layer and ViT block a unit, bf16 parameters with fp32 gradient reduction on GPUs, sharded "
        "checkpoints; accelerate=fsdp2); null: no FSDP (DDP, or DeepSpeed with a deepspeed recipe).",
    )

    def check(self) -> None:
        if self.processes_per_node is not None and self.processes_per_node < 1:
            raise ConfigError("accelerate.processes_per_node must be >= 1 or null.")
        if self.fsdp_version not in (None, 2):
            raise ConfigError(
                f"accelerate.fsdp_version={self.fsdp_version}: only 2 (FSDP2) is supported; FSDP1 cannot hold frozen "
                "and LoRA parameters in one unit. Use accelerate.fsdp_version=2 (or null)."
            )
        if self.mode == "single_gpu" and self.processes_per_node not in (None, 1):
            raise ConfigError("accelerate.mode=single_gpu runs one process; use mode=multi_gpu for more.")


@dataclass
class LoggerConfig:
    """Where the training metrics go (none: the console only)."""

    report_to: str = option(
        "wandb",
        help="The metrics backend: any of transformers' integrations (its package installed); none: the console only.",
        choices=REPORT_TO,
    )
    project: str = option(
        "qwen-vl-finetune",
        help="The project the run is logged under (wandb, trackio, mlflow's experiment, swanlab, clearml, comet_ml); "
        "the backend's own variable (e.g. WANDB_PROJECT) wins when set.",
    )
    wandb_mode: str = option(
        "auto",
        help="wandb only: auto = online when WANDB_API_KEY is set, offline otherwise (sync later with `wandb sync`).",
        choices=WANDB_MODES,
    )

    def check(self) -> None:
        """Nothing beyond its keys' choices, which `Config.check` checks for every group (whether the backend is
        installed is asked where training starts, `require_backend`: a saved run's export needs no logger)."""

    def require_backend(self) -> None:
        """Refuse, before any process starts, a backend whose package is missing, naming what to install."""
        import importlib.util
        import os

        if self.report_to == "kubeflow" and not os.environ.get("KUBEFLOW_TRAINER_SERVER_URL"):
            raise ConfigError(
                "logger.report_to=kubeflow reports to a Kubeflow TrainJob, which sets KUBEFLOW_TRAINER_SERVER_URL; "
                "it is not set here (or logger=none)."
            )
        modules, install = LOGGERS.get(self.report_to, ((), ""))
        for module in modules:
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:  # a dotted name whose parent package is missing
                found = False
            if not found:
                package = "the " + " and ".join(install.split()) + " package" + ("s" if " " in install else "")
                raise ConfigError(
                    f"logger.report_to={self.report_to} needs {package}: pip install {install} (or logger=none)."
                )


@dataclass
class EvaluationConfig:
    """Generation-based evaluation on `data.eval`: during training every `steps` optimizer steps and at the end
    (sharded across the ranks, logged to the logger), and/or after training in one process (`./launch.sh`)."""

    after_training: str = option(
        "auto",
        help="The standalone evaluation after training (skipped when `steps` already ran it). auto: whenever "
        "data.eval is set and method=sft (the other methods' data.eval holds pairs or RL prompts, scored during "
        "training by `steps`); true: always (data.eval required; method=sft only); false: never (the end-of-run "
        "summary says so when data.eval is set).",
        choices=AFTER_TRAINING,
    )
    steps: int | None = option(
        None,
        help="Evaluate every N steps during training and once at its end; null: never during training. With "
        "method=dpo: the held-out pairs' loss, preference accuracy and reward margins (eval_rewards/*). With an RL "
        "method (grpo, dapo, dr_grpo, gspo): one greedy completion per held-out prompt (data.eval: RL prompts with a "
        "solution), scored by method.rewards, before the first step too: eval_reward (mean weighted total), "
        "eval_reward/<name>, eval_no_score/<name>; eval/step-N/ and the last in eval/.",
    )
    max_new_tokens: int = option(
        16, help="Tokens generated per answer at most (method=sft; the RL methods use method.max_completion_length)."
    )
    batch_size: int = option(8, help="Questions per generate call (per rank during training).")

    def __post_init__(self) -> None:
        # A YAML or command-line true/false arrives as OmegaConf's str() of a bool ("True"/"False"): one spelling.
        self.after_training = str(self.after_training).lower()

    def check(self) -> None:
        if self.steps is not None and self.steps <= 0:
            raise ConfigError(f"evaluation.steps must be a positive number of steps or null, got {self.steps}.")
        if self.max_new_tokens <= 0 or self.batch_size <= 0:
            raise ConfigError("evaluation.max_new_tokens and evaluation.batch_size must be positive.")


@dataclass
class ExportConfig:
    """Write the trained model as one folder after training (a LoRA adapter merged into the base weights, or the
    fully trained weights of a run with no LoRA part), and verify the reloaded result."""

    after_training: bool = option(
        True,
        help="Export (merge a LoRA adapter, or write the fully trained weights), verify and write it after training.",
    )
    output_dir: str = option("${trainer.output_dir}/merged", help="Where the merged model is written.")
    overwrite: bool = option(False, help="Replace an earlier export in output_dir (never any other folder).")
    dtype: str = option(
        "auto", help="The dtype of the saved weights; auto: the training precision.", choices=PRECISIONS
    )
    max_shard_size: str = option("5GB", help="Safetensors shards of at most this size (e.g. 5GB, 500MB).")
    atol: float | None = option(
        None,
        help="Max |logit difference| allowed between the trained model (adapter or fully trained) and the reloaded export; null = 1e-4 "
        "for fp32 weights, 5e-2 for bf16/fp16 weights.",
    )
    push_to_hub: str | None = option(
        None, help='A Hub repo id ("user/name") to upload the export to after it passed; null: no upload.'
    )
    hub_private: bool = option(True, help="The Hub repo push_to_hub creates is private.")

    def check(self) -> None:
        if not re.fullmatch(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)", self.max_shard_size):
            raise ConfigError(f"export.max_shard_size={self.max_shard_size!r} is not a size such as 5GB or 500MB.")


@dataclass
class MethodConfig:
    """The training method: SFT (the default), or preference tuning with TRL's losses on our data path and forward
    (finetune/training/preference_trainer.py, preference_methods.py): DPO and KTO against a reference model (the LoRA
    base, the adapter off), ORPO and SimPO without one."""

    name: str = option(
        "sft",
        help="sft: supervised fine-tuning on the replies; dpo, orpo, simpo: preference pairs (chosen/rejected), TRL's "
        "DPO, ORPO and CPO-SimPO losses; kto: completions labelled desirable or not, TRL's KTO loss; grpo, dapo, "
        "dr_grpo, gspo: RL on prompts with a solution, scored by method.rewards (TRL's GRPO losses).",
        choices=METHODS,
    )
    beta: float = option(
        0.1,
        help="DPO, KTO: the strength of the tie to the reference model (TRL's beta; IPO's tau), higher: closer to it; "
        "ORPO: the weight of the odds-ratio term (the paper's lambda, TRL's beta); SimPO: the reward scale.",
    )
    loss_type: str = option(
        "sigmoid",
        help="DPO: TRL's loss type, or several joined by + (summed, weighted by loss_weights): sigmoid (DPO), "
        "hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, "
        "discopop, sft, sigmoid_norm; e.g. sigmoid+sft (RPO). KTO: kto or apo_zero_unpaired. ORPO, SimPO: the "
        "method's name (orpo, simpo).",
    )
    loss_weights: Optional[str] = option(
        None, help="DPO: one weight per loss type, joined by + (e.g. 1.0+0.2); null: 1 each."
    )
    label_smoothing: float = option(
        0.0,
        help="DPO, SimPO: the assumed share of flipped labels (robust, exo_pair, sigmoid, simpo: conservative), in "
        "[0, 0.5).",
    )
    ld_alpha: Optional[float] = option(
        None,
        help="DPO: LD-DPO's weight of the longer answer's tokens past the shorter one's length, in [0, 1]; null: off.",
    )
    f_divergence_type: str = option(
        "reverse_kl", help="DPO: the divergence to the reference (f-DPO).", choices=F_DIVERGENCES
    )
    f_alpha_divergence_coef: float = option(1.0, help="DPO: alpha of f_divergence_type=alpha_divergence.")
    use_weighting: bool = option(False, help="DPO: WPO's weighting of each pair by its probability under the policy.")
    discopop_tau: float = option(0.05, help="DPO: the temperature of loss_type=discopop.")
    precompute_ref_log_probs: bool = option(
        False,
        help="DPO: score every pair (train and held-out) under the reference once, when training starts (the adapter "
        "off, images and videos included), instead of a reference forward every step.",
    )
    desirable_weight: float = option(1.0, help="KTO: the weight of the desirable completions' losses.")
    undesirable_weight: float = option(1.0, help="KTO: the weight of the undesirable completions' losses.")
    simpo_gamma: float = option(
        0.5, help="SimPO: the target reward margin gamma (TRL's simpo_gamma; the logits are shifted by gamma / beta)."
    )
    cpo_alpha: float = option(
        0.0, help="SimPO: the weight of the chosen answers' NLL (CPO-SimPO when > 0; TRL's cpo_alpha); 0: pure SimPO."
    )

    # ----- RL with verifiable rewards (grpo, dapo, dr_grpo, gspo: presets in recipes/method/) -----
    num_generations: int = option(
        4, help="RL: completions sampled per prompt (the group whose mean and std make the advantages), 2 or more."
    )
    max_completion_length: int = option(64, help="RL: the most tokens a completion is sampled to (then truncated).")
    temperature: float = option(1.0, help="RL: the sampling temperature (the log-probs are of logits / temperature).")
    top_p: float = option(1.0, help="RL: nucleus sampling, in (0, 1]; 1: off.")
    top_k: int = option(0, help="RL: sample from the k likeliest tokens; 0: off.")
    epsilon: float = option(
        0.2, help="RL: the clipping range of the importance ratio below 1 (and above, unless epsilon_high)."
    )
    epsilon_high: Optional[float] = option(
        None, help="RL: the clipping range above 1 (DAPO's clip-higher: 0.28); null: epsilon."
    )
    scale_rewards: str = option(
        "group",
        help="RL: divide the advantages by the std of the group, of the whole batch, or none (Dr.GRPO).",
        choices=SCALE_REWARDS,
    )
    importance_sampling_level: str = option(
        "token", help="RL: the importance ratio per token, or per sequence (GSPO).", choices=IMPORTANCE_SAMPLING_LEVELS
    )
    num_iterations: int = option(1, help="RL: optimisation passes over each batch of rollouts (GRPO's mu).")
    steps_per_generation: Optional[int] = option(
        None,
        help="RL: micro-batches each generation batch is split into (several optimizer steps per generation when above "
        "trainer.gradient_accumulation_steps, as GSPO does); null: trainer.gradient_accumulation_steps.",
    )
    mask_truncated_completions: bool = option(
        False, help="RL: leave completions cut at max_completion_length out of the loss (DAPO's overlong filtering)."
    )
    rewards: Any = option(
        None,
        help="RL: the rewards, summed per completion: names (format, choice, number, exact_match, f1, edit_distance, "
        "box_iou, temporal_iou, module.path:function, file.py:function) or {name, weight, label, keywords}.",
    )

    @property
    def is_rl(self) -> bool:
        return self.name in RL_METHODS

    @property
    def loss_types(self) -> list[str]:
        return [t.strip() for t in re.split(r"[+,]", str(self.loss_type)) if t.strip()]

    @property
    def weights(self) -> list[float] | None:
        if self.loss_weights is None:
            return None
        try:
            return [float(w) for w in re.split(r"[+,]", str(self.loss_weights))]
        except ValueError:
            raise ConfigError(f"method.loss_weights={self.loss_weights!r} must be numbers joined by +.") from None

    def check(self) -> None:
        if self.rewards and not self.is_rl:
            raise ConfigError(
                f"method.rewards is for the RL methods ({', '.join(RL_METHODS)}); method={self.name} does not score "
                "completions: remove method.rewards."
            )
        if self.is_rl:
            self.check_rl()
            return
        if self.name not in PREFERENCE_METHODS:  # sft
            return
        if self.beta <= 0:
            raise ConfigError(f"method.beta must be positive, got {self.beta}.")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"method.label_smoothing must be in [0, 0.5), got {self.label_smoothing}.")
        if self.name != "dpo":
            self._check_other()
            return
        unknown = [t for t in self.loss_types if t not in DPO_LOSS_TYPES]
        if unknown or not self.loss_types:
            raise ConfigError(
                f"method.loss_type={self.loss_type!r}: {', '.join(unknown) or 'nothing'} is not a DPO loss; choose "
                f"one or more (joined by +) of {', '.join(DPO_LOSS_TYPES)}."
            )
        if self.weights is not None and len(self.weights) != len(self.loss_types):
            raise ConfigError(
                f"method.loss_weights has {len(self.weights)} weights for {len(self.loss_types)} loss types: "
                "give one per method.loss_type, or null."
            )
        if "exo_pair" in self.loss_types and self.label_smoothing == 0:
            raise ConfigError("method.loss_type=exo_pair needs method.label_smoothing > 0 (the EXO paper uses 1e-3).")
        if self.ld_alpha is not None and not 0 <= self.ld_alpha <= 1:
            raise ConfigError(f"method.ld_alpha must be in [0, 1] or null, got {self.ld_alpha}.")
        if self.use_weighting and {"aot", "aot_unpaired"} & set(self.loss_types):
            raise ConfigError("method.use_weighting=true cannot weight loss_type aot/aot_unpaired (they sort pairs).")

    def check_rl(self) -> None:
        """The RL settings, one refusal each (TRL's GRPOConfig would refuse some later, in its own words)."""
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise ConfigError(
                f"method.loss_type={self.loss_type!r} is not a GRPO loss; choose one of {', '.join(GRPO_LOSS_TYPES)} "
                "(the presets method=grpo, dapo, dr_grpo, gspo set it)."
            )
        if not self.rewards or isinstance(self.rewards, str):
            raise ConfigError(
                f"method={self.name} needs rewards to score its completions: set method.rewards, e.g. "
                "method.rewards=[format,choice]."
            )
        if self.beta < 0:
            raise ConfigError(f"method.beta must be 0 (no KL term, no reference forward) or positive, got {self.beta}.")
        if self.num_generations < 2:
            raise ConfigError(
                f"method.num_generations={self.num_generations}: a group needs 2 or more completions (its advantages "
                "are rewards minus the group's mean)."
            )
        if self.max_completion_length < 1:
            raise ConfigError(f"method.max_completion_length must be 1 or more, got {self.max_completion_length}.")
        if not self.temperature > 0:
            raise ConfigError(f"method.temperature must be above 0 (rollouts sample), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"method.top_p must be in (0, 1] (1: off), got {self.top_p}.")
        if self.top_k < 0:
            raise ConfigError(f"method.top_k must be 0 (off) or positive, got {self.top_k}.")
        if not self.epsilon > 0:
            raise ConfigError(f"method.epsilon must be positive, got {self.epsilon}.")
        if self.epsilon_high is not None and self.epsilon_high < self.epsilon and self.loss_type != "cispo":
            raise ConfigError(
                f"method.epsilon_high={self.epsilon_high} is below method.epsilon={self.epsilon}: clip-higher widens "
                "the range above 1; set it >= epsilon or null."
            )
        if self.num_iterations < 1:
            raise ConfigError(f"method.num_iterations must be 1 or more, got {self.num_iterations}.")
        if self.steps_per_generation is not None and self.steps_per_generation < 1:
            raise ConfigError(
                f"method.steps_per_generation must be 1 or more or null, got {self.steps_per_generation}."
            )

    def _check_other(self) -> None:
        """KTO, ORPO, SimPO: their loss type, their own keys, and the DPO-only keys left at their defaults."""
        allowed = KTO_LOSS_TYPES if self.name == "kto" else (self.name,)
        if self.loss_types != [self.loss_type] or self.loss_type not in allowed:
            raise ConfigError(
                f"method.loss_type={self.loss_type!r} is not a loss of method={self.name}: set method.loss_type to "
                f"{' or '.join(allowed)} (the method group recipes/method/{self.name}.yaml sets it)."
            )
        dpo_only = {
            "loss_weights": self.loss_weights is not None,
            "ld_alpha": self.ld_alpha is not None,
            "use_weighting": self.use_weighting,
            "f_divergence_type": self.f_divergence_type != "reverse_kl",
        }
        if used := [key for key, set_ in dpo_only.items() if set_]:
            raise ConfigError(
                f"method.{used[0]} is a DPO setting; method={self.name} has no use for it: leave it unset."
            )
        if self.precompute_ref_log_probs:
            why = (
                "has no reference model"
                if self.name in REFERENCE_FREE
                else "pairs each prompt with another completion of its batch for the KL term, anew every step"
            )
            raise ConfigError(f"method.precompute_ref_log_probs=true: method={self.name} {why}; set it to false.")
        if self.label_smoothing and self.name != "simpo":
            raise ConfigError(f"method.label_smoothing is for DPO and SimPO; method={self.name} has none: set it to 0.")
        if self.name == "kto" and min(self.desirable_weight, self.undesirable_weight) <= 0:
            raise ConfigError(
                "method.desirable_weight and method.undesirable_weight must be positive, got "
                f"{self.desirable_weight} and {self.undesirable_weight}."
            )
        if self.name == "simpo" and self.cpo_alpha < 0:
            raise ConfigError(f"method.cpo_alpha must be >= 0, got {self.cpo_alpha}.")
        if self.name != "kto" and (self.desirable_weight, self.undesirable_weight) != (1.0, 1.0):
            raise ConfigError(
                f"method.desirable_weight/undesirable_weight weigh KTO's labels; method={self.name} reads pairs: "
                "leave them at 1."
            )


@dataclass
class Config:
    name: str = option(MISSING, help="The experiment name; names the run directory.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parts: PartsConfig = field(default_factory=PartsConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    accelerate: AccelerateConfig = field(default_factory=AccelerateConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    method: MethodConfig = field(default_factory=MethodConfig)

    def evaluates_after_training(self) -> bool:
        """Whether the run evaluates data.eval after training (`evaluation.after_training`: auto, true or false)."""
        if self.method.name != "sft":  # data.eval holds pairs or RL prompts: scored during training (evaluation.steps)
            return False
        return bool(self.data.eval) and self.evaluation.after_training in ("auto", "true")

    def groups(self) -> dict[str, Any]:
        """The groups of keys by their prefix (`model`, `data`, ...), in the schema's order."""
        return {f.name: getattr(self, f.name) for f in fields(self) if is_dataclass(getattr(self, f.name))}

    def check(self) -> None:
        for prefix, group in self.groups().items():
            check_choices(prefix, group)  # choices live in the fields' metadata, checked alike for every key
            group.check()
        if self.evaluation.after_training == "true" and not self.data.eval:
            raise ConfigError(
                "evaluation.after_training=true needs a held-out split: set data.eval=PATH or "
                "evaluation.after_training=auto (evaluate when data.eval is set) or false."
            )
        if self.evaluation.steps and not self.data.eval:
            raise ConfigError("evaluation.steps needs a held-out split: set data.eval=PATH or evaluation.steps=null.")
        if self.trainer.packing and (self.trainer.max_tokens_per_row or self.data.max_length) < self.data.max_length:
            raise ConfigError(
                f"trainer.max_tokens_per_row={self.trainer.max_tokens_per_row} is below data.max_length="
                f"{self.data.max_length}: a valid sample might not fit in a row. Raise it or lower data.max_length."
            )
        if self.data.streaming and self.trainer.max_steps <= 0:
            raise ConfigError(
                "data.streaming=true reads the data as an endless stream: set trainer.max_steps to the "
                "number of optimizer steps to train (epochs cannot be counted without an index)."
            )
        if self.trainer.gradient_checkpointing_vision_tower and not (
            self.trainer.gradient_checkpointing and self.parts.vision_tower != "frozen"
        ):
            raise ConfigError(
                "trainer.gradient_checkpointing_vision_tower=true needs trainer.gradient_checkpointing=true and a "
                "vision tower that trains (a frozen one keeps no activations for backward: nothing to save)."
            )
        self._check_experts()
        self._check_quantization()
        self._check_method()
        self._check_sequence_parallel()
        self._check_fsdp()
        if self.trainer.nonfinite_loss == "skip" and self.deepspeed.config_file:
            raise ConfigError(
                "trainer.nonfinite_loss=skip cannot drop a step's gradients under DeepSpeed (they live in "
                "its engine); use trainer.nonfinite_loss=stop with DeepSpeed."
            )
        if self.data.max_bad_samples is not None and self.data.max_bad_samples < 0:
            raise ConfigError(f"data.max_bad_samples must be >= 0 or null, got {self.data.max_bad_samples}.")
        if self.trainer.precision == "fp16" and self.deepspeed.config_file is None and not self.parts.uses_lora:
            raise ConfigError("trainer.precision=fp16 full fine-tuning is unstable for Qwen-VL; use bf16 or fp32.")

    def _check_sequence_parallel(self) -> None:
        """trainer.sequence_parallel against the rest of the recipe (the model's heads, its layer kinds and the
        number of processes are checked at start-up: finetune/model/sequence_parallel.py `check`)."""
        n = self.trainer.sequence_parallel
        if n == 1:
            return
        if self.model.attn_implementation not in ("varlen", "auto"):
            raise ConfigError(
                f"trainer.sequence_parallel={n} needs model.attn_implementation=varlen (or auto): with "
                f"{self.model.attn_implementation} the packed samples of a split row would attend across each other; "
                "set model.attn_implementation=varlen."
            )
        if self.method.name != "sft":
            raise ConfigError(
                f"trainer.sequence_parallel={n} is built for method=sft only; use trainer.sequence_parallel=1 with "
                f"method={self.method.name}."
            )
        if self.parts.router != "frozen" or self.trainer.router_aux_loss_coef:
            raise ConfigError(
                f"trainer.sequence_parallel={n} does not add a mixture-of-experts load-balancing loss (its router "
                "statistics would need the whole row's tokens); leave parts.router=frozen and "
                "trainer.router_aux_loss_coef=null (or 0), or set trainer.sequence_parallel=1."
            )
        if self.data.streaming:
            raise ConfigError(
                f"trainer.sequence_parallel={n} needs the same row on the {n} ranks of a group, which data.streaming="
                "true (rank-sharded records) does not give; set data.streaming=false."
            )

    def _check_fsdp(self) -> None:
        """FSDP2 (accelerate.fsdp_version=2) against what else the recipe asks for: one sharding engine, and what the
        FSDP2 path is built and tested for (finetune/training/fsdp.py, tests/integration/test_fsdp2.py)."""
        if not self.accelerate.fsdp_version:
            return
        if self.deepspeed.config_file:
            raise ConfigError(
                f"accelerate.fsdp_version=2 (FSDP2) and deepspeed.config_file={self.deepspeed.config_file} both shard "
                "the model: pick one (deepspeed=none with accelerate=fsdp2, or a deepspeed recipe without FSDP2)."
            )
        if self.method.name != "sft":
            raise ConfigError(
                f"method={self.method.name} is not built for FSDP2 (its trainer saves and gathers as DeepSpeed or DDP "
                "do): use deepspeed=zero3 (or zero2) with accelerate.fsdp_version=null."
            )
        if self.evaluation.steps:
            raise ConfigError(
                "evaluation.steps (generation during training) is not built for FSDP2: set evaluation.steps=null and "
                "evaluate the saved adapter after training (evaluation.after_training), or use deepspeed=zero3."
            )

    def _check_method(self) -> None:
        """A preference method against the rest of the recipe: what its trainer supports."""
        if self.method.name == "sft":
            return
        full = [part for part, mode in self.parts.modes().items() if mode == "full"]
        if (full or not self.parts.uses_lora) and self.method.name in REFERENCE_FREE:
            raise ConfigError(
                f"method={self.method.name} runs on LoRA parts here (the preference trainers are built on the adapter): "
                f"parts.{(full or ['llm'])[0]}=full is not supported. Use parts.llm=lora (and vision_tower=lora or "
                "frozen, merger=frozen)."
            )
        if full or not self.parts.uses_lora:
            raise ConfigError(
                f"method={self.method.name} computes the reference as the model with the LoRA adapter off, so every "
                f"trained part must be lora: parts.{(full or ['llm'])[0]}=full would move the reference too. Use "
                "parts.llm=lora (and vision_tower=lora or frozen, merger=frozen)."
            )
        if self.data.streaming:
            raise ConfigError(f"method={self.method.name} reads its data whole: set data.streaming=false.")
        if self.method.is_rl:
            self._check_rl_batches()
        if (
            self.method.name == "kto"
            and self.method.loss_type == "kto"
            and self.trainer.per_device_train_batch_size < 2
        ):
            raise ConfigError(
                "method=kto estimates its KL term from each prompt paired with another completion of the same batch: "
                "set trainer.per_device_train_batch_size >= 2 (or method.loss_type=apo_zero_unpaired, which has none)."
            )
        if self.evaluation.after_training == "true":
            held_out = "RL prompts, scored by the rewards" if self.method.is_rl else "pairs, scored"
            raise ConfigError(
                f"evaluation.after_training=true evaluates SFT answers; with method={self.method.name} data.eval holds "
                f"{held_out} during training (evaluation.steps=N, which also scores the last step). Set "
                "evaluation.after_training=auto or false."
            )

    def _check_rl_batches(self) -> None:
        """An RL method's batches against the trainer: whole groups per device."""
        t, m = self.trainer, self.method
        if t.per_device_train_batch_size % m.num_generations:
            raise ConfigError(
                f"trainer.per_device_train_batch_size={t.per_device_train_batch_size} counts completions and must hold "
                f"whole groups of method.num_generations={m.num_generations}: set it to a multiple of "
                f"{m.num_generations}."
            )

    def _check_quantization(self) -> None:
        """QLoRA (model.quantization=nf4) against the parts and the back-end: only a LoRA LLM trains on 4-bit
        weights, and only where each rank holds the whole frozen model anyway (one process, DDP, ZeRO-2)."""
        q = self.model.quantization
        if q == "none":
            return
        if self.parts.llm != "lora":
            raise ConfigError(
                f"model.quantization={q} is QLoRA, LoRA on the LLM's 4-bit linear layers (4-bit weights cannot train "
                f"themselves): parts.llm={self.parts.llm} needs parts.llm=lora, or model.quantization=none."
            )
        if self.deepspeed.zero_stage == 3:
            raise ConfigError(
                f"model.quantization={q} under DeepSpeed ZeRO-3: its zero.Init leaves bitsandbytes' 4-bit weights "
                "unpartitioned (DeepSpeed #5660: every rank holds them all, no memory saved); use deepspeed=zero2 "
                "or deepspeed=none (DDP), or model.quantization=none with ZeRO-3."
            )
        if uses_fsdp(self):
            raise ConfigError(
                f"model.quantization={q} under FSDP: bitsandbytes' 4-bit weights shard only when their storage dtype "
                "is the model's (axolotl #2992: otherwise no memory saved and no error), which no test here proves "
                "yet; use deepspeed=zero2 or DDP, or model.quantization=none with FSDP."
            )

    def _check_experts(self) -> None:
        """The mixture-of-experts keys against the family (finetune/base/families.py) and each other."""
        family = FAMILIES.get(self.model.family)
        if family is None:
            return
        moe, t = family.router is not None, self.trainer
        if not moe:
            if self.parts.router != "frozen" or t.router_aux_loss_coef is not None:
                raise ConfigError(
                    f"parts.router and trainer.router_aux_loss_coef are for mixture-of-experts models; {family.title} "
                    "has no router: leave parts.router=frozen and trainer.router_aux_loss_coef=null."
                )
            return
        if t.router_aux_loss_coef is not None and t.router_aux_loss_coef < 0:
            raise ConfigError(f"trainer.router_aux_loss_coef must be >= 0 or null, got {t.router_aux_loss_coef}.")
        lora_on_experts = self.parts.llm == "lora" and self.peft.target_experts and family.expert_lora_targets
        if lora_on_experts and self.peft.dropout:
            raise ConfigError(
                f"peft.dropout={self.peft.dropout} with LoRA on {family.title}'s fused experts "
                "(peft.target_experts=true): PEFT applies LoRA to expert parameters without dropout. Set "
                "peft.dropout=0, or peft.target_experts=false (LoRA on the attention only)."
            )
        weighted = t.router_aux_loss_coef != 0 if t.router_aux_loss_coef is not None else self.parts.router == "full"
        reentrant = t.gradient_checkpointing and self.parts.uses_lora and self.deepspeed.zero_stage == 3
        if weighted and reentrant:
            raise ConfigError(
                "A load-balancing loss in training (parts.router=full or trainer.router_aux_loss_coef > 0) gets no "
                "gradient under LoRA + ZeRO-3 with trainer.gradient_checkpointing (checkpointing is reentrant there, "
                "and transformers records the router logits inside the checkpointed layers without autograd). Set "
                "trainer.router_aux_loss_coef=0 (logged only), or train without ZeRO-3 or without checkpointing."
            )


def uses_fsdp(config: Config) -> bool:
    """Whether the recipe trains under FSDP2 (`accelerate=fsdp2`, or `accelerate.fsdp_version=2`)."""
    return bool(config.accelerate.fsdp_version)


def repo_path(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else REPO_ROOT / p
