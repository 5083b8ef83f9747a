"""`./launch.sh` picks the processes from the recipe and the environment, and refuses what cannot run."""

import pytest

from finetune.base.errors import ConfigError
from finetune.recipe.load import load_config
from finetune.runs.launch import accelerate_args


def _args(overrides, env=None, gpus=0, precision="fp32"):
    return accelerate_args(load_config(overrides), env or {}, gpus, precision)


def _opt(args, name):
    return args[args.index(name) + 1]


def test_demo_runs_one_cpu_process():
    args = _args([])
    assert "--cpu" in args and "--multi_gpu" not in args
    assert (_opt(args, "--num_processes"), _opt(args, "--num_machines"), _opt(args, "--mixed_precision")) == (
        "1",
        "1",
        "no",
    )


def test_two_cpu_processes_use_the_multi_process_launcher():
    args = _args(["accelerate.processes_per_node=2"])
    assert "--cpu" not in args and "--multi_gpu" in args and _opt(args, "--num_processes") == "2"


def test_cpu_threads_split_the_cores_unless_omp_num_threads_is_set(monkeypatch):
    """accelerate sets OMP_NUM_THREADS in the processes it starts from this option; a count already in the
    environment is kept (two 2-thread processes on 2 busy cores ran the demo 7x slower than one thread each)."""
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert _opt(_args([]), "--num_cpu_threads_per_process") == "8"
    assert _opt(_args(["accelerate.processes_per_node=2"]), "--num_cpu_threads_per_process") == "4"
    assert _opt(_args([], {"OMP_NUM_THREADS": "1"}), "--num_cpu_threads_per_process") == "1"
    with pytest.raises(ConfigError, match="OMP_NUM_THREADS='many' must be a whole number"):
        _args([], {"OMP_NUM_THREADS": "many"})


def test_gpu_modes_need_a_gpu():
    with pytest.raises(ConfigError, match="use accelerate=cpu"):
        _args(["accelerate=single_gpu"], gpus=0)


def test_multi_gpu_uses_every_visible_gpu_in_bf16():
    args = _args(["accelerate=multi_gpu"], gpus=8, precision="bf16")
    assert "--multi_gpu" in args and "--cpu" not in args
    assert (_opt(args, "--num_processes"), _opt(args, "--mixed_precision")) == ("8", "bf16")


def test_multi_node_from_the_environment():
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29555"}
    args = _args(["accelerate=multi_node", "deepspeed=zero3"], env=env, gpus=8, precision="bf16")
    assert _opt(args, "--num_processes") == "16" and _opt(args, "--num_machines") == "2"
    assert (_opt(args, "--machine_rank"), _opt(args, "--main_process_ip"), _opt(args, "--main_process_port")) == (
        "1",
        "10.1.2.3",
        "29555",
    )
    assert "--use_deepspeed" in args and _opt(args, "--deepspeed_config_file").endswith("recipes/deepspeed/zero3.json")
    assert _opt(args, "--deepspeed_multinode_launcher") == "standard"  # one launch per node, no pdsh


def test_nodes_of_cpu_processes_rehearse_a_multi_node_run():
    env = {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    args = _args(["deepspeed=zero3"], env=env)
    assert (_opt(args, "--num_processes"), _opt(args, "--num_machines"), _opt(args, "--machine_rank")) == (
        "2",
        "2",
        "0",
    )
    assert "--cpu" not in args and _opt(args, "--main_process_port") == "29500"


def test_single_gpu_refuses_several_nodes():
    with pytest.raises(ConfigError, match="use accelerate=multi_node"):
        _args(["accelerate=single_gpu"], env={"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "h"}, gpus=1)


def test_gpus_per_node_overrides_the_visible_count():
    env = {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "GPUS_PER_NODE": "4"}
    assert _opt(_args(["accelerate=multi_node"], env=env, gpus=8, precision="bf16"), "--num_processes") == "8"


@pytest.mark.parametrize(
    "env,message",
    [
        ({"NNODES": "2", "NODE_RANK": "0"}, "needs MASTER_ADDR"),
        ({}, "needs NNODES"),
        ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "NODE_RANK=2 must be in"),
        ({"NNODES": "two"}, "must be a whole number"),
    ],
)
def test_multi_node_mistakes(env, message):
    with pytest.raises(ConfigError, match=message):
        _args(["accelerate=multi_node"], env=env, gpus=8, precision="bf16")


def test_precision_follows_the_hardware_the_recipe_uses():
    from finetune.model.load import resolve_precision, uses_gpu

    assert resolve_precision("auto", has_gpu=False) == "fp32"
    with pytest.raises(ConfigError, match="needs a GPU"):
        resolve_precision("bf16", has_gpu=False)
    assert not uses_gpu(load_config([]))  # the demo's accelerate=cpu stays on the CPU even where GPUs exist


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_zero_on_a_single_gpu_is_refused_with_the_fix(stage):
    """Measured on one H200: ZeRO-3 with one process took 131 GiB at 0.75x the speed of no DeepSpeed."""
    for overrides, gpus in (
        ([f"deepspeed={stage}", "accelerate=single_gpu"], 8),
        ([f"deepspeed={stage}", "accelerate=multi_gpu"], 1),
    ):
        with pytest.raises(ConfigError, match="shards nothing.*deepspeed=none.*zero3_offload"):
            _args(overrides, env={}, gpus=gpus, precision="bf16")
    assert (
        _opt(
            _args(["deepspeed=zero3_offload", "accelerate=single_gpu"], env={}, gpus=1, precision="bf16"),
            "--num_processes",
        )
        == "1"
    )
    assert (
        _opt(_args([f"deepspeed={stage}", "accelerate=multi_gpu"], env={}, gpus=8, precision="bf16"), "--num_processes")
        == "8"
    )


MULTI_NODE = {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "10.0.0.1"}


@pytest.mark.parametrize(
    "env,gpus,processes,machines",
    [
        ({}, 0, "1", "1"),  # cpu
        ({}, 1, "1", "1"),  # single_gpu
        ({}, 8, "8", "1"),  # multi_gpu
        ({"GPUS_PER_NODE": "4"}, 8, "4", "1"),  # multi_gpu, as many as told
        (MULTI_NODE, 8, "16", "2"),  # multi_node
    ],
)
def test_auto_picks_the_mode_by_the_machine(env, gpus, processes, machines):
    from finetune.runs.launch import resolve_mode

    args = _args(["accelerate=auto"], env=env, gpus=gpus, precision="bf16" if gpus else "fp32")
    assert (_opt(args, "--num_processes"), _opt(args, "--num_machines")) == (processes, machines)
    assert ("--cpu" in args) == (gpus == 0)
    expected = "cpu" if not gpus else "multi_node" if "NNODES" in env else "single_gpu" if gpus == 1 else "multi_gpu"
    assert resolve_mode("auto", env, gpus) == expected


def test_auto_is_the_default_and_the_demos_stay_on_the_cpu():
    from finetune.recipe.load import compose

    assert compose(["experiment=demo", "accelerate=auto"]).accelerate.mode == "auto"
    assert load_config([]).accelerate.mode == "cpu"  # the demo experiments override it


@pytest.mark.parametrize("mode", ["multi_gpu", "multi_node", "auto"])
def test_a_dry_run_without_gpus_lays_out_the_gpus_it_is_told_of(mode):
    """A login node has no GPU: `GPUS_PER_NODE=8 ./launch.sh --dry-run` shows the commands of the GPU nodes."""
    env = {**MULTI_NODE, "GPUS_PER_NODE": "8"}
    config = load_config([f"accelerate={mode}"])
    args = accelerate_args(config, env, 0, "bf16", dry_run=True)
    assert (_opt(args, "--num_processes"), _opt(args, "--num_machines"), "--cpu" in args) == ("16", "2", False)
    with pytest.raises(ConfigError, match="needs a GPU and none is visible"):
        accelerate_args(config, env, 0, "bf16")  # the real launch on that machine is still refused
    with pytest.raises(ConfigError, match="GPUS_PER_NODE="):
        accelerate_args(config, MULTI_NODE, 0, "bf16", dry_run=True)  # no count given: nothing to lay out


def test_multi_gpu_with_several_nodes_joins_the_machines():
    args = _args(["accelerate=multi_gpu"], env=MULTI_NODE, gpus=8, precision="bf16")
    assert (_opt(args, "--num_processes"), _opt(args, "--machine_rank"), _opt(args, "--main_process_ip")) == (
        "16",
        "0",
        "10.0.0.1",
    )


# ---------------------------------------------------------------- FSDP2 (accelerate=fsdp2)


def test_fsdp2_options_reach_accelerate_as_fsdp2_with_the_familys_units(monkeypatch):
    """The options accelerate's own parser reads, and the plugin its processes build from them: FSDP2 (not
    accelerate 1.15's default 1), the family's decoder layers and ViT blocks as units, sharded checkpoints, bf16."""
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp.fully_sharded_data_parallel import StateDictType

    from finetune.base.families import FAMILIES

    args = _args(["accelerate=fsdp2", "experiment=demo_qwen3_vl"], gpus=4, precision="bf16")
    assert "--multi_gpu" not in args and "--use_deepspeed" not in args and "--cpu" not in args
    parsed = launch_command_parser().parse_args([*args, "train.py"])
    assert parsed.use_fsdp and parsed.num_processes == 4 and parsed.mixed_precision == "bf16"
    env = prepare_multi_gpu_env(parsed)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for name in list(__import__("os").environ):
        if name.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("FSDP_"):
            monkeypatch.setenv(name, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap == list(FAMILIES["qwen3_vl"].shard_units)
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT
    assert not plugin.activation_checkpointing and type(plugin.cpu_offload).__name__ == "OffloadPolicy"  # no offload


def test_fsdp2_on_several_nodes_is_the_multi_node_launch():
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29555"}
    args = _args(["accelerate=fsdp2"], env=env, gpus=8, precision="bf16")
    assert (_opt(args, "--num_processes"), _opt(args, "--num_machines"), _opt(args, "--machine_rank")) == (
        "16",
        "2",
        "1",
    )
    assert _opt(args, "--main_process_ip") == "10.1.2.3" and "--same_network" in args
    assert "--use_fsdp" in args and _opt(args, "--fsdp_version") == "2"
    assert "--deepspeed_multinode_launcher" not in args
    assert _args(["accelerate=multi_node", "accelerate.fsdp_version=2"], env=env, gpus=8, precision="bf16") == args


def test_fsdp2_on_cpu_processes_uses_the_multi_process_launcher():
    args = _args(["accelerate=fsdp2", "accelerate.processes_per_node=2"])  # no GPU: auto -> cpu, gloo
    assert "--use_fsdp" in args and "--cpu" not in args and "--multi_gpu" not in args
    assert _opt(args, "--mixed_precision") == "no" and "--num_cpu_threads_per_process" in args


@pytest.mark.parametrize(
    "overrides, gpus, message",
    [
        (["accelerate=fsdp2"], 1, "single process shards nothing: for one GPU use accelerate=single_gpu"),
        (["accelerate=fsdp2"], 0, "single process shards nothing"),
        (["accelerate=single_gpu", "accelerate.fsdp_version=2"], 1, "single process shards nothing"),
    ],
)
def test_fsdp2_on_one_process_is_refused_with_the_fix(overrides, gpus, message):
    with pytest.raises(ConfigError, match=message):
        _args(overrides, gpus=gpus, precision="bf16" if gpus else "fp32")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["accelerate=fsdp2", "deepspeed=zero3"],
            r"both shard the model: pick one \(deepspeed=none with accelerate=fsdp2",
        ),
        (
            ["accelerate=fsdp2", "accelerate.fsdp_version=1"],
            "only 2 \\(FSDP2\\) is supported; FSDP1 cannot hold frozen",
        ),
        (["accelerate=fsdp2", "method=dpo"], "method=dpo is not built for FSDP2"),
        (["accelerate=fsdp2", "evaluation.steps=2"], "evaluation.steps .* is not built for FSDP2"),
    ],
)
def test_what_fsdp2_cannot_honour_is_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(overrides)
    assert "\n" not in str(err.value)
