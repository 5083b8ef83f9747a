"""How a recipe key is declared: its default, its help text and, when its value is one of a set, its choices.

The schema's fields (finetune/recipe/schema.py) carry help and choices in `dataclasses.field(metadata=...)`, the
one place each key is documented: the checks (`check_choices`), `./launch.sh --help`, tab completion and the
key reference (docs/recipe-keys.md) read them from there. Each vocabulary is spelled once, here or in the layer below
(the data layer's enums); the modules that act on a value import it from here.

Values stay plain strings rather than Enums: OmegaConf would write an Enum's name into a saved config.yaml, and
the refusal below names the choices the way the recipes spell them.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from finetune.base.errors import ConfigError
from finetune.data.modes import LabelMode, OverLength

PART_MODES = ("frozen", "lora", "full")  # finetune/model/trainable.py
ROUTER_MODES = ("frozen", "full")  # finetune/model/trainable.py: a mixture-of-experts router
ROPE_RULES = ("qwen", "transformers")  # finetune/model/rope.py
QUANTIZATIONS = ("none", "nf4")  # finetune/model/quantization.py: the frozen LLM base weights of QLoRA
ATTENTION_CHOICES = ("auto", "sdpa", "eager", "flash_attention_2", "varlen")  # finetune/model/attention.py
PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # finetune/model/load.py (recipe_precision)
LABEL_MODES = tuple(mode.value for mode in LabelMode)
OVER_LENGTH = tuple(policy.value for policy in OverLength)
NONFINITE_LOSS = ("stop", "skip")  # finetune/training/faults.py
ACCELERATE_MODES = ("auto", "cpu", "single_gpu", "multi_gpu", "multi_node")  # finetune/runs/launch.py
# transformers' reporting integrations (its INTEGRATION_TO_CALLBACK; tests/unit/recipe/test_loggers.py keeps the two
# equal), each with what it needs here: {report_to: (modules that must import, what to install)}. Checked before any
# process starts (finetune/runs/launch.py, finetune/training/workflow.py); wandb, the default, is installed.
LOGGERS = {
    "wandb": (("wandb",), "wandb"),
    "tensorboard": (("tensorboard",), "tensorboard"),
    "mlflow": (("mlflow",), "mlflow"),
    "swanlab": (("swanlab",), "swanlab"),
    "comet_ml": (("comet_ml",), "comet-ml"),
    "clearml": (("clearml",), "clearml"),
    "trackio": (("trackio",), "trackio"),
    "neptune": (("neptune",), "neptune"),
    "dvclive": (("dvclive",), "dvclive"),
    "dagshub": (("dagshub", "mlflow"), "dagshub mlflow"),
    "azure_ml": (("azureml.core.run",), "azureml-sdk"),
    "codecarbon": (("codecarbon",), "codecarbon"),
    "flyte": (("flytekit",), "flytekit"),
    "kubeflow": ((), ""),  # no package: the variables a Kubeflow TrainJob sets (KUBEFLOW_TRAINER_SERVER_URL)
}
REPORT_TO = (*LOGGERS, "none")
WANDB_MODES = ("auto", "online", "offline", "disabled")
# Preference tuning (finetune/training/preference_*.py; kto reads unpaired data) and RL with verifiable rewards
# (presets of TRL's GRPO settings, recipes/method/<name>.yaml, one trainer: finetune/training/grpo_trainer.py)
PREFERENCE_METHODS = ("dpo", "kto", "orpo", "simpo")
RL_METHODS = ("grpo", "dapo", "dr_grpo", "gspo")
METHODS = ("sft", *PREFERENCE_METHODS, *RL_METHODS)  # finetune/training/workflow.py
REFERENCE_FREE = ("orpo", "simpo")  # no reference model: one forward per step
# TRL 1.16's KTOTrainer loss types (trl/trainer/kto_trainer.py `_compute_loss`)
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
# TRL 1.16's GRPOTrainer loss aggregations that take our per-token log-probs as they are (trl/trainer/grpo_trainer.py
# `_compute_loss`); vespo is left out (its weights read vLLM's importance-sampling ratios)
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")
SCALE_REWARDS = ("group", "batch", "none")  # TRL's scale_rewards: the std the advantages are divided by
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")  # sequence: GSPO
# TRL 1.16's DPOTrainer loss types and f-divergences (trl/trainer/dpo_trainer.py `_compute_loss`)
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
AFTER_TRAINING = ("auto", "true", "false")  # evaluation.after_training: auto = whenever data.eval is set


def option(default: Any = dataclasses.MISSING, *, help: str, choices: tuple[str, ...] = ()) -> Any:
    """A schema field with its help text and, for a value that is one of a set, its choices."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": tuple(choices)})


def help_of(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def choices_of(f: dataclasses.Field) -> tuple[str, ...]:
    return f.metadata.get("choices", ())


def refuse_outside(name: str, value, choices) -> None:
    """The one wording of a value outside its choices: the key, the value and what to choose instead."""
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        raise ConfigError(
            f"{name}={value!r} is not supported; choose one of {', '.join(map(str, choices))}"
            + (f"; did you mean '{close[0]}'?" if close else ".")
        )


def check_choices(prefix: str, group) -> None:
    """Refuse any field of `group` (a schema dataclass; its keys are `prefix.<field>`) outside its choices."""
    for f in dataclasses.fields(group):
        if choices_of(f):
            refuse_outside(f"{prefix}.{f.name}", getattr(group, f.name), choices_of(f))
