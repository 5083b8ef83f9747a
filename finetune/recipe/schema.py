"""Typed schemas for every recipe group, and `load_config` that composes a recipe with Hydra.

The schema is the contract: Hydra merges each recipe onto these dataclasses, so a misspelt key or a wrong
type fails while composing, and each group's `check()` rejects impossible combinations with the fix in the message.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf

from finetune.base.errors import ConfigError
from finetune.base.families import FAMILIES
from finetune.base.paths import REPO_ROOT
from finetune.recipe import legacy_keys

RECIPES_DIR = REPO_ROOT / "recipes"
GROUPS = ("model", "data", "peft", "trainer", "deepspeed", "accelerate", "logger", "experiment")
ATTENTION_CHOICES = ("auto", "sdpa", "eager", "flash_attention_2", "varlen")  # finetune/model/attention.py


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not supported; choose one of {', '.join(map(str, choices))}.")


@dataclass
class ModelConfig:
    """Which checkpoint to fine-tune and how its vision inputs are sized (Qwen's dynamic resolution)."""

    name_or_path: str = MISSING  # hub id, local directory, or tiny://qwen2_vl | tiny://qwen2_5_vl
    family: str = MISSING  # qwen2_vl | qwen2_5_vl; checked against the checkpoint's model_type
    # auto (GPU: varlen when its kernel passes a start-up check against sdpa, else sdpa; CPU: sdpa) | sdpa | eager |
    # flash_attention_2 | varlen (finetune/model/attention.py)
    attn_implementation: str = "auto"
    trust_remote_code: bool = False  # only when a recipe really needs the checkpoint's own code
    # Weights are read from safetensors only. true also reads pickled `.bin` weights (torch.load with
    # weights_only): only for checkpoints you trust; converting them to safetensors is better.
    allow_pickled_weights: bool = False
    # Where text resumes after an image or video in the M-RoPE positions (finetune/model/rope.py, README "Positions"):
    # qwen = (largest position so far) + 1, as Qwen pre-trained these models and vLLM/SGLang serve them;
    # transformers = the rule of the installed transformers (5.3+), for models served with its `generate`.
    rope_rule: str = "qwen"
    # Images: pixels per image after smart_resize (factor 28 = patch 14 x merge 2).
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 1280 * 28 * 28
    # Videos, as qwen-vl-utils for Qwen2.5-VL: fps sampling with FRAME_FACTOR 2 and min/max frame counts,
    # per-frame pixel bounds, and a total pixel budget shared by all frames of one video.
    video_fps: float = 2.0
    video_min_frames: int = 4
    video_max_frames: int = 768
    video_min_pixels: int = 128 * 28 * 28
    video_max_pixels: int = 768 * 28 * 28
    video_total_pixels: int = int(128000 * 28 * 28 * 0.9)

    def check(self) -> None:
        _choice("model.family", self.family, tuple(FAMILIES))
        _choice("model.attn_implementation", self.attn_implementation, ATTENTION_CHOICES)
        _choice("model.rope_rule", self.rope_rule, ("qwen", "transformers"))
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

    # A file, or a list of files / {path, weight, media_root} entries mixed by weight.
    train: Any = MISSING
    eval: Any = None  # held-out split(s) for generation-based evaluation
    media_root: str | None = None  # default: the folder of each dataset file
    frames_fps: float | None = None  # frame rate of videos given as frame folders/lists (or per sample)
    max_length: int = 4096  # a longer sample is an error naming it; nothing is ever cut inside a turn
    # error: over-long samples stop the run (or are skipped with skip_invalid); drop_trailing_turns: remove
    # whole trailing user/assistant turns (with their media) until the sample fits, keeping >= 1 reply.
    over_length: str = "error"
    skip_invalid: bool = False  # true: skip samples that fail validation, with a count and report
    # Samples whose media fail to decode during training are skipped and listed in bad_samples.jsonl; the run
    # stops past this many: null = max(10, 1 % of the samples), >= 1 a count, < 1 a fraction of the samples.
    max_bad_samples: float | None = None
    eval_max_samples: int | None = None
    # Processes for the token pre-pass: null = the CPUs this process may use, shared by the ranks of a node (each
    # rank counts its share of the records). Counts are stored beside the dataset in .finetune-store/.
    num_proc: int | None = None
    # true: read the records as a stream (sets too large to index, 10M+): sharded by rank and DataLoader worker,
    # counted and packed on the fly from a look-ahead buffer; needs trainer.max_steps. See README, Data at scale.
    streaming: bool = False
    stream_buffer: int = 4096  # samples packed together in streaming mode (the indexed mode's packing window)

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
        _choice("data.over_length", self.over_length, ("error", "drop_trailing_turns"))
        if self.frames_fps is not None and self.frames_fps <= 0:
            raise ConfigError(f"data.frames_fps must be positive, got {self.frames_fps}.")


PART_MODES = ("frozen", "lora", "full")


@dataclass
class PartsConfig:
    """What trains in each part of the model (finetune/model/trainable.py), one mode per part: frozen | lora | full.

    llm: embeddings, decoder layers, norm and lm_head; vision_tower: the ViT blocks and the Conv3d patch embed;
    merger: the MLP that projects vision features into the LLM (frozen or full: it never takes LoRA).
    """

    llm: str = "lora"
    vision_tower: str = "frozen"
    merger: str = "frozen"
    # Learning rates of the vision tower and the merger (their full weights or their LoRA weights);
    # null = trainer.learning_rate, which is the LLM's.
    vision_tower_lr: float | None = None
    merger_lr: float | None = None

    def modes(self) -> dict[str, str]:
        return {"llm": self.llm, "vision_tower": self.vision_tower, "merger": self.merger}

    @property
    def uses_lora(self) -> bool:
        """Whether an adapter is trained (then full parts are saved beside it and the export merges it)."""
        return "lora" in self.modes().values()

    def check(self) -> None:
        for part, mode in self.modes().items():
            _choice(f"parts.{part}", mode, PART_MODES)
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

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    use_dora: bool = False  # weight-decomposed LoRA (PEFT's DoRA)
    use_rslora: bool = False  # scale by alpha/sqrt(r) instead of alpha/r (PEFT's rsLoRA)
    # Anchored on the language model: Qwen2.5-VL's vision MLP also has gate/up/down_proj, so a bare
    # module-name list would silently put LoRA on the vision tower too. Only nn.Linear layers ever match.
    target_modules: str = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
    # ViT blocks' attention and MLP (Qwen2-VL: qkv/proj/fc1/fc2; Qwen2.5-VL: qkv/proj/gate/up/down_proj).
    # The Conv3d patch embed and the merger never take LoRA (train the merger fully with parts.merger=full).
    vision_target_modules: str = (
        r".*visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2|gate_proj|up_proj|down_proj))$"
    )

    def check(self) -> None:
        if self.r <= 0 or self.alpha <= 0:
            raise ConfigError(f"peft.r ({self.r}) and peft.alpha ({self.alpha}) must be positive for LoRA.")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"peft.dropout must be in [0, 1), got {self.dropout}.")
        for key in ("target_modules", "vision_target_modules"):
            try:
                re.compile(getattr(self, key))
            except re.error as err:
                raise ConfigError(f"peft.{key} is not a valid regular expression: {err}") from err


@dataclass
class TrainerConfig:
    """Optimisation and bookkeeping; passed to TRL's SFTConfig."""

    output_dir: str = "runs/${name}"
    max_steps: int = -1  # > 0 overrides num_train_epochs
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4  # the LLM's, and every part's unless parts.vision_tower_lr / parts.merger_lr
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.03  # < 1: fraction of the total steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    precision: str = "auto"  # auto (bf16 on a GPU that supports it, else fp32) | bf16 | fp16 | fp32
    gradient_checkpointing: bool = False  # the LLM's decoder layers
    gradient_checkpointing_vision_tower: bool = False  # the ViT blocks too (only useful when they train)
    dataloader_num_workers: int = 0
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = 2
    seed: int = 42
    # Seconds a rank waits for the others at a collective before the job fails (torch.distributed's timeout; the
    # default 30 min of transformers is short for a cold pre-pass of millions of samples or a slow checkpoint).
    ddp_timeout: int = 7200
    # latest: the newest checkpoint-* in output_dir; or a checkpoint folder. Same data order, optimizer,
    # scheduler and RNG state as the interrupted run.
    resume_from_checkpoint: str | None = None
    label_mode: str = "assistant"  # assistant | last_assistant | all
    nonfinite_loss: str = "stop"  # a NaN/inf loss: stop (naming the step and samples) | skip (drop that step's update)
    # Packing: rows of whole samples up to max_tokens_per_row tokens (default data.max_length), each with its
    # own M-RoPE positions and attention; per_device_train_batch_size then counts rows. false: padded batches.
    packing: bool = False
    max_tokens_per_row: int | None = None

    def check(self) -> None:
        _choice("trainer.precision", self.precision, ("auto", "bf16", "fp16", "fp32"))
        _choice("trainer.label_mode", self.label_mode, ("assistant", "last_assistant", "all"))
        _choice("trainer.nonfinite_loss", self.nonfinite_loss, ("stop", "skip"))
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("Set trainer.max_steps > 0 or trainer.num_train_epochs > 0: nothing would be trained.")
        if self.ddp_timeout < 60:
            raise ConfigError(f"trainer.ddp_timeout={self.ddp_timeout} s is too short for any collective; use >= 60.")
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ConfigError("trainer.per_device_train_batch_size and gradient_accumulation_steps must be >= 1.")
        if self.learning_rate <= 0:
            raise ConfigError(f"trainer.learning_rate must be positive, got {self.learning_rate}.")


@dataclass
class DeepSpeedConfig:
    """A DeepSpeed JSON config; `null` trains without DeepSpeed (plain DDP when several processes run)."""

    config_file: str | None = None  # relative paths are resolved from the repository root

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

    mode: str = "cpu"  # cpu | single_gpu | multi_gpu | multi_node
    # Processes per node; null means one per visible GPU (multi_gpu/multi_node) or 1 (cpu/single_gpu).
    processes_per_node: int | None = None

    def check(self) -> None:
        _choice("accelerate.mode", self.mode, ("cpu", "single_gpu", "multi_gpu", "multi_node"))
        if self.processes_per_node is not None and self.processes_per_node < 1:
            raise ConfigError("accelerate.processes_per_node must be >= 1 or null.")
        if self.mode == "single_gpu" and self.processes_per_node not in (None, 1):
            raise ConfigError("accelerate.mode=single_gpu runs one process; use mode=multi_gpu for more.")


@dataclass
class LoggerConfig:
    report_to: str = "wandb"  # wandb | tensorboard | none
    project: str = "qwen-vl-finetune"
    # wandb only: auto = online when WANDB_API_KEY is set, offline otherwise (sync later with `wandb sync`).
    wandb_mode: str = "auto"

    def check(self) -> None:
        _choice("logger.report_to", self.report_to, ("wandb", "tensorboard", "none"))
        _choice("logger.wandb_mode", self.wandb_mode, ("auto", "online", "offline", "disabled"))


@dataclass
class EvaluationConfig:
    """Generation-based evaluation on `data.eval`: during training every `steps` optimizer steps and at the end
    (sharded across the ranks, logged to the logger), and/or after training in one process (`./launch.sh`)."""

    after_training: bool = True  # the standalone evaluation after training (skipped when `steps` already ran it)
    steps: int | None = None  # evaluate every N steps during training and once at its end; null: never during
    max_new_tokens: int = 16
    batch_size: int = 8  # questions per generate call (per rank during training)

    def check(self) -> None:
        if self.steps is not None and self.steps <= 0:
            raise ConfigError(f"evaluation.steps must be a positive number of steps or null, got {self.steps}.")
        if self.max_new_tokens <= 0 or self.batch_size <= 0:
            raise ConfigError("evaluation.max_new_tokens and evaluation.batch_size must be positive.")


@dataclass
class ExportConfig:
    """Merge the adapter into the base weights after training, and verify the reloaded result."""

    after_training: bool = True
    output_dir: str = "${trainer.output_dir}/merged"
    overwrite: bool = False  # replace an earlier export in output_dir (never any other folder)
    dtype: str = "auto"  # auto (the training precision) | bf16 | fp16 | fp32: the dtype of the saved weights
    max_shard_size: str = "5GB"  # safetensors shards of at most this size
    # Max |logit difference| allowed between the adapter model and the reloaded merged model;
    # null = 1e-4 for fp32 weights, 5e-2 for bf16/fp16 weights.
    atol: float | None = None
    push_to_hub: str | None = None  # a Hub repo id ("user/name") to upload the export to after it passed
    hub_private: bool = True

    def check(self) -> None:
        _choice("export.dtype", self.dtype, ("auto", "bf16", "fp16", "fp32"))
        if not re.fullmatch(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)", self.max_shard_size):
            raise ConfigError(f"export.max_shard_size={self.max_shard_size!r} is not a size such as 5GB or 500MB.")


@dataclass
class Config:
    name: str = MISSING  # experiment name; names the run directory
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

    def check(self) -> None:
        for group in (
            self.model,
            self.data,
            self.parts,
            self.peft,
            self.trainer,
            self.deepspeed,
            self.accelerate,
            self.logger,
            self.evaluation,
            self.export,
        ):
            group.check()
        if not self.parts.uses_lora and self.export.after_training:
            raise ConfigError(
                "export.after_training=true merges a LoRA adapter, but no part has parts.<part>=lora: the weights "
                "train directly and the run directory already holds a full checkpoint. Set export.after_training=false."
            )
        if self.evaluation.after_training and not self.data.eval:
            raise ConfigError(
                "evaluation.after_training=true needs a held-out split: set data.eval=PATH or "
                "evaluation.after_training=false."
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
        if self.trainer.nonfinite_loss == "skip" and self.deepspeed.config_file:
            raise ConfigError(
                "trainer.nonfinite_loss=skip cannot drop a step's gradients under DeepSpeed (they live in "
                "its engine); use trainer.nonfinite_loss=stop with DeepSpeed."
            )
        if self.data.max_bad_samples is not None and self.data.max_bad_samples < 0:
            raise ConfigError(f"data.max_bad_samples must be >= 0 or null, got {self.data.max_bad_samples}.")
        if self.trainer.precision == "fp16" and self.deepspeed.config_file is None and not self.parts.uses_lora:
            raise ConfigError("trainer.precision=fp16 full fine-tuning is unstable for Qwen-VL; use bf16 or fp32.")


def repo_path(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else REPO_ROOT / p


def _register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node=Config)


def _explain_override_error(err: Exception, overrides: list[str]) -> str:
    """Add 'did you mean' hints to Hydra's message for misspelt keys."""
    message = str(err)
    if err.__cause__ is not None:  # Hydra's own text hides the OmegaConf reason (e.g. a type error)
        message += "\n" + str(err.__cause__).splitlines()[0]
    known = {f"{f.name}" for f in fields(Config)}
    for group_field in fields(Config):
        sub = getattr(Config(), group_field.name, None) if group_field.name != "name" else None
        if sub is not None and hasattr(sub, "__dataclass_fields__"):
            known |= {f"{group_field.name}.{f.name}" for f in fields(sub)}
    hints = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if "." in key and key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hints.append(f"'{key}' is not a recipe key" + (f"; did you mean '{close[0]}'?" if close else "."))
        elif "." not in key and key not in known and key not in GROUPS:
            close = difflib.get_close_matches(key, list(GROUPS) + sorted(known), n=1)
            hints.append(f"'{key}' is not a recipe group or key" + (f"; did you mean '{close[0]}'?" if close else "."))
    if hints:
        message += "\n" + "\n".join(hints)
    return message


def compose(overrides: list[str] | None = None):
    """Compose `recipes/config.yaml` with Hydra overrides; returns the (unresolved) DictConfig."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides or [])
    replaced = legacy_keys.check_overrides(overrides)
    if replaced:
        raise ConfigError(replaced)
    _register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=overrides)
    except Exception as err:  # Hydra wraps the real cause; keep its text and add our hints
        message = _explain_override_error(err, overrides)
        hint = legacy_keys.hint_for_error(message)
        raise ConfigError(message + ("\n" + hint if hint else "")) from None


RECIPE_FILE = "recipe_file="  # `recipe_file=runs/x/config.yaml`: a saved, resolved recipe instead of composing


def load_config(overrides: list[str] | None = None) -> Config:
    """Compose, resolve interpolations and run every schema check. Raises ConfigError with the fix.
    With `recipe_file=PATH` among the overrides, the saved recipe is the starting point (what `rerun` uses) and
    the other overrides (keys only, no groups) apply on top."""
    overrides = list(overrides or [])
    saved = [o[len(RECIPE_FILE) :] for o in overrides if o.startswith(RECIPE_FILE)]
    if saved:
        return _load_recipe_file(Path(saved[-1]), [o for o in overrides if not o.startswith(RECIPE_FILE)])
    cfg = compose(overrides)
    try:
        config = OmegaConf.to_object(cfg)  # resolves interpolations; fails on MISSING values
    except Exception as err:
        raise ConfigError(str(err)) from None
    config.check()
    return config


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def _load_recipe_file(path: Path, overrides: list[str]) -> Config:
    groups = [o for o in overrides if "." not in o.split("=", 1)[0]]
    replaced = legacy_keys.check_overrides(overrides)
    if replaced:
        raise ConfigError(replaced)
    if groups:
        raise ConfigError(
            f"{' '.join(groups)}: a saved recipe ({path}) takes key overrides only (a.b=value), not "
            "groups; compose a new recipe instead."
        )
    try:
        saved = _read_saved(path)
        cfg = OmegaConf.merge(OmegaConf.structured(Config), saved, OmegaConf.from_dotlist(overrides))
        config = OmegaConf.to_object(cfg)
    except Exception as err:
        raise ConfigError(f"{path} with {overrides}: {str(err).splitlines()[0]}") from None
    config.check()
    return config


def _read_saved(path: Path):
    """A saved recipe as a DictConfig; one written before `parts` existed is translated (with a warning)."""
    values = OmegaConf.to_container(OmegaConf.load(path))
    return OmegaConf.create(legacy_keys.migrate_saved(values, str(path)))


def load_saved_config(path: Path) -> Config:
    """A resolved recipe saved by a run (`config.yaml`) or an export (`finetune_config.yaml`), checked again."""
    try:
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), _read_saved(path)))
    except Exception as err:
        raise ConfigError(f"{path} is not a recipe this version can read: {str(err).splitlines()[0]}") from None
    config.check()
    return config
