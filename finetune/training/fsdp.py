"""FSDP2 (`accelerate.fsdp_version=2`, `accelerate=fsdp2`) in the trainer: the parts accelerate's launcher options
(finetune/runs/launch.py `fsdp_args`) do not settle.

- Precision: accelerate turns `--mixed_precision bf16` into an FSDP2 policy that also reduces gradients in bf16. Here
  parameters are gathered and computed in bf16 and gradients reduce-scattered in fp32 (LoRA's gradients are small
  sums over many tokens and ranks). The trained parameters stay fp32 (accelerate's fsdp2_prepare_model upcasts them:
  the optimizer's master copy); the frozen base stays as loaded. On the CPU everything is fp32.
- CPU processes: accelerate builds its FSDP plugin only for GPU process groups; a gloo group of CPU processes (the
  tests, a rehearsal on a login node) gets the same plugin from the launcher's FSDP_* variables here, so that the
  same code path shards, saves and resumes.
- Saving: with sharded checkpoints transformers' Trainer writes no weights file; the adapter (or, without LoRA, the
  whole trained model) is gathered from every rank's shards into full tensors on rank 0 and saved as without FSDP, in
  `adapter/` and in every checkpoint-N (which resumes from its sharded `pytorch_model_fsdp_0/` and optimizer state).
"""

from __future__ import annotations

import logging
import os

import torch

from finetune.base.errors import ConfigError

logger = logging.getLogger("finetune.fsdp")


def engage(trainer) -> None:
    """After the Trainer made its Accelerator: FSDP2 as the recipe asks (see the module docstring)."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    state = trainer.accelerator.state
    plugin = getattr(state, "fsdp_plugin", None)
    if plugin is None:
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
            raise ConfigError(
                "accelerate.fsdp_version=2 but this process was not started with accelerate's FSDP options: start it "
                "with ./launch.sh (or `accelerate launch` with the options `./launch.sh --dry-run` prints)."
            )
        plugin = FullyShardedDataParallelPlugin()  # the launcher's FSDP_* variables
        state.fsdp_plugin, state.distributed_type = plugin, DistributedType.FSDP
        trainer.is_fsdp_enabled = True
    if plugin.fsdp_version != 2:
        raise ConfigError(f"accelerate started FSDP version {plugin.fsdp_version}; the recipe asks for FSDP2.")
    if state.mixed_precision == "bf16":
        plugin.mixed_precision_policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.bfloat16
        )
    policy = plugin.mixed_precision_policy
    logger.info(
        "FSDP2 over %d processes: units %s; parameters %s, gradient reduction %s; sharded checkpoints",
        state.num_processes,
        ", ".join(plugin.transformer_cls_names_to_wrap or []),
        getattr(policy, "param_dtype", None) or "as loaded",
        getattr(policy, "reduce_dtype", None) or "as loaded",
    )


def gathered_state_dict(model, trained_only: bool) -> dict:
    """The model's weights as full tensors on rank 0 (every rank must call it: it gathers); other ranks get {}.
    `trained_only`: the trainable parameters alone (a LoRA adapter and the parts trained fully beside it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trained_only)
    return get_model_state_dict(model, options=options)
