"""finetune/training/fsdp.py: the FSDP2 plugin a process ends up with, without starting processes."""

from types import SimpleNamespace

import pytest
import torch

from finetune.base.errors import ConfigError
from finetune.training import fsdp

LAUNCHER_ENV = {  # what `accelerate launch` with finetune/runs/launch.py's fsdp_args puts in every process
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_TRANSFORMER_CLS_TO_WRAP": "Qwen2_5_VLDecoderLayer,Qwen2_5_VLVisionBlock",
    "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
}


def _trainer(mixed_precision: str, plugin=None):
    state = SimpleNamespace(mixed_precision=mixed_precision, num_processes=2, distributed_type="MULTI_CPU")
    if plugin is not None:
        state.fsdp_plugin = plugin
    return SimpleNamespace(accelerator=SimpleNamespace(state=state), is_fsdp_enabled=plugin is not None)


@pytest.fixture
def launcher_env(monkeypatch):
    for name, value in LAUNCHER_ENV.items():
        monkeypatch.setenv(name, value)


def test_cpu_processes_get_the_launchers_fsdp2_plugin(launcher_env):
    """accelerate leaves a gloo group of CPU processes without FSDP: the launcher's plugin is put in place."""
    from accelerate.utils import DistributedType

    trainer = _trainer("no")
    fsdp.engage(trainer)
    state = trainer.accelerator.state
    assert trainer.is_fsdp_enabled and state.distributed_type == DistributedType.FSDP
    assert state.fsdp_plugin.fsdp_version == 2
    assert state.fsdp_plugin.transformer_cls_names_to_wrap == ["Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"]


def test_bf16_parameters_reduce_gradients_in_fp32(launcher_env):
    """accelerate's own bf16 policy also reduces in bf16; ours gathers and computes in bf16, reduces in fp32."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    plugin.set_mixed_precision("bf16")
    assert plugin.mixed_precision_policy.reduce_dtype == torch.bfloat16  # what accelerate alone would do
    trainer = _trainer("bf16", plugin)
    fsdp.engage(trainer)
    policy = trainer.accelerator.state.fsdp_plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)


def test_a_process_started_without_the_fsdp_options_is_refused(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    with pytest.raises(ConfigError, match="not started with accelerate's FSDP options: start it with ./launch.sh"):
        fsdp.engage(_trainer("no"))


def test_an_fsdp1_plugin_is_refused(launcher_env, monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    monkeypatch.setenv("FSDP_VERSION", "1")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "FULL_SHARD")
    with pytest.raises(ConfigError, match="FSDP version 1; the recipe asks for FSDP2"):
        fsdp.engage(_trainer("no", FullyShardedDataParallelPlugin()))
