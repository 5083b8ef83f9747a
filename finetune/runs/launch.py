"""What `./launch.sh [overrides]` runs: train under `accelerate launch`, then evaluate and export.

The recipe's `accelerate` group and the environment decide the processes:
  auto         (the default) by the machine: NNODES > 1 -> multi_node; several GPUs (or GPUS_PER_NODE > 1) ->
               multi_gpu; one GPU -> single_gpu; no GPU -> cpu
  cpu          one process on the CPU (processes_per_node > 1 starts a gloo process group)
  single_gpu   one process on one GPU
  multi_gpu    one process per visible GPU (or processes_per_node) on this machine
  multi_node   NNODES machines, this one being NODE_RANK; MASTER_ADDR/MASTER_PORT reach node 0;
               GPUS_PER_NODE (default: the visible GPUs) processes on each
accelerate=fsdp2 is `auto` with accelerate.fsdp_version=2: PyTorch FSDP2 shards the model over the processes (any mode
but single_gpu; NNODES > 1 is the multi_node launch with the same variables); one process, or a deepspeed recipe beside
it, is refused.
NNODES > 1 also joins machines with cpu and multi_gpu (e.g. two `accelerate=cpu` launches on one machine); only
single_gpu refuses it. `--dry-run` on a machine without GPUs (a login node) prints the commands for GPUS_PER_NODE
GPUs per node; a real launch there is refused. The exact command is printed before it runs. Evaluation and export
run once, on node 0, after training.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from finetune.base.errors import ConfigError
from finetune.base.families import family_of
from finetune.recipe.budgets import summary_lines
from finetune.recipe.load import load_config, to_yaml
from finetune.recipe.schema import Config, repo_path
from finetune.records.rundir import RunDir
from finetune.runs.run_summary import file_size, summary


def _int_env(env: dict, name: str, default: int) -> int:
    value = env.get(name, "")
    if value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} must be a whole number.") from None


def resolve_mode(mode: str, env: dict, gpu_count: int) -> str:
    """The accelerate mode `auto` stands for on this machine (any other mode is itself)."""
    if mode != "auto":
        return mode
    if _int_env(env, "NNODES", 1) > 1:
        return "multi_node"
    gpus = _int_env(env, "GPUS_PER_NODE", gpu_count)
    return "multi_gpu" if gpus > 1 else "single_gpu" if gpus == 1 else "cpu"


def gpus_declared(env: dict) -> bool:
    """GPUS_PER_NODE is given: what a `--dry-run` on a machine without GPUs lays the processes out for."""
    return env.get("GPUS_PER_NODE", "") != ""


def accelerate_args(config: Config, env: dict, gpu_count: int, precision: str, dry_run: bool = False) -> list[str]:
    """`accelerate launch` options for the recipe on this machine (pure: testable without launching). With
    `dry_run`, a machine without GPUs may stand for one with GPUS_PER_NODE of them (a login node)."""
    acc = config.accelerate
    mode = resolve_mode(acc.mode, env, gpu_count)
    if mode != "cpu" and gpu_count == 0 and not (dry_run and gpus_declared(env)):
        raise ConfigError(
            f"accelerate.mode={mode} needs a GPU and none is visible; use accelerate=cpu (or, to see the commands "
            "on a machine without GPUs: GPUS_PER_NODE=<GPUs per node> ./launch.sh --dry-run ...)."
        )
    # NNODES > 1 joins several machines in any mode but single_gpu (cpu: a CPU cluster, or two launches on one
    # machine to rehearse a multi-node run); multi_node is multi_gpu that insists on the variables.
    nodes, node_rank = _int_env(env, "NNODES", 1), _int_env(env, "NODE_RANK", 0)
    if mode == "single_gpu" and nodes > 1:
        raise ConfigError(
            f"NNODES={nodes} with accelerate=single_gpu: use accelerate=multi_node (or auto) for several machines."
        )
    if mode == "multi_node" and "NNODES" not in env:
        raise ConfigError(
            "accelerate=multi_node needs NNODES, NODE_RANK and MASTER_ADDR set on every node (docs/multi-gpu.md)."
        )
    if nodes < 1 or not 0 <= node_rank < nodes:
        raise ConfigError(f"NODE_RANK={node_rank} must be in [0, NNODES={nodes}).")
    if nodes > 1 and not env.get("MASTER_ADDR"):
        raise ConfigError(f"NNODES={nodes} needs MASTER_ADDR (node 0's address) on every node.")
    if mode in ("cpu", "single_gpu"):
        per_node = acc.processes_per_node or 1
    else:
        per_node = acc.processes_per_node or _int_env(env, "GPUS_PER_NODE", gpu_count)
    total = per_node * nodes
    refuse_zero_on_one_process(config, total)
    refuse_fsdp_on_one_process(config, total)
    mixed = {"bf16": "bf16", "fp16": "fp16"}.get(precision, "no")
    args = ["--num_processes", str(total), "--num_machines", str(nodes), "--dynamo_backend", "no"]
    if config.deepspeed.config_file:
        args += ["--use_deepspeed", "--deepspeed_config_file", str(repo_path(config.deepspeed.config_file))]
    elif config.accelerate.fsdp_version:
        args += ["--mixed_precision", mixed, *fsdp_args(config)]
    else:
        args += ["--mixed_precision", mixed]
        if total > 1:
            args.append("--multi_gpu")  # also the multi-process path on CPU (gloo), see ../shared/STACK.md
    if mode == "cpu":
        # Several CPU processes go through --multi_gpu (gloo; the trainer sets use_cpu): accelerate refuses
        # --cpu together with --multi_gpu, and `--cpu --num_processes 2` would start a single process.
        # accelerate sets OMP_NUM_THREADS in every process it starts from this option: an OMP_NUM_THREADS the user
        # (or a Slurm job's cpus-per-task script, or a test runner sharing the cores) already set is kept.
        threads = _int_env(env, "OMP_NUM_THREADS", max(1, (os.cpu_count() or 1) // per_node))
        args += (["--cpu"] if total == 1 else []) + ["--num_cpu_threads_per_process", str(max(1, threads))]
    if nodes > 1:
        args += [
            "--machine_rank",
            str(node_rank),
            "--main_process_ip",
            env["MASTER_ADDR"],
            "--main_process_port",
            env.get("MASTER_PORT") or "29500",
            "--same_network",
        ]
        if config.deepspeed.config_file:
            # One `./launch.sh` per node (by hand or srun), like DDP. accelerate's default for DeepSpeed on several
            # machines is instead to start every node from this one over pdsh with the `deepspeed` launcher.
            args += ["--deepspeed_multinode_launcher", "standard"]
    return args


def fsdp_args(config: Config) -> list[str]:
    """accelerate's FSDP2 options (it reads them into its FullyShardedDataParallelPlugin in every process). Each is
    given, not left to accelerate 1.15's defaults: its `--fsdp_version` defaults to 1, whose flat units cannot hold
    frozen and LoRA parameters together. The units are the family's decoder layers and ViT blocks
    (finetune/base/families.py `shard_units`); the embeddings, the final norm with the LM head, and the rest (patch
    embed, mergers) become units of their own (accelerate's fsdp2_prepare_model). Checkpoints are sharded (each rank
    writes its shards of the trained weights and the optimizer state with torch.distributed.checkpoint); the adapter
    is gathered whole for saving (finetune/training/fsdp.py)."""
    return [
        "--use_fsdp",
        "--fsdp_version",
        str(config.accelerate.fsdp_version),
        "--fsdp_auto_wrap_policy",
        "TRANSFORMER_BASED_WRAP",
        "--fsdp_transformer_layer_cls_to_wrap",
        ",".join(family_of(config.model.family).shard_units),
        "--fsdp_reshard_after_forward",
        "true",
        "--fsdp_state_dict_type",
        "SHARDED_STATE_DICT",
        "--fsdp_offload_params",
        "false",
        "--fsdp_cpu_ram_efficient_loading",
        "false",
        "--fsdp_activation_checkpointing",
        "false",  # the recipe's trainer.gradient_checkpointing does it (finetune/model/trainable.py)
    ]


def refuse_fsdp_on_one_process(config: Config, processes: int) -> None:
    """FSDP2 shards across the ranks: one process holds every shard, and only pays FSDP's gathers."""
    if config.accelerate.fsdp_version and processes == 1:
        raise ConfigError(
            "FSDP2 (accelerate.fsdp_version=2) with a single process shards nothing: for one GPU use "
            "accelerate=single_gpu; FSDP2 pays off with several GPUs (accelerate=fsdp2 on a machine with several, or "
            "NNODES>1)."
        )


def refuse_zero_on_one_process(config: Config, processes: int) -> None:
    """ZeRO shards across the ranks: with one process there is nothing to shard across, and what is left is
    overhead (measured on one H200, the 7B video recipe: ZeRO-3 131 GiB at 0.75x the speed, against 107 GiB without
    DeepSpeed). CPU offload is the exception: it does fit a bigger model on one GPU."""
    stage = config.deepspeed.zero_stage
    if processes == 1 and stage in (2, 3) and not config.deepspeed.offloads("param"):
        raise ConfigError(
            f"DeepSpeed ZeRO-{stage} with a single process shards nothing and only costs time and memory. For one "
            "GPU use deepspeed=none, or deepspeed=zero3_offload to fit a "
            "model larger than the GPU by offloading to CPU memory; ZeRO pays off with several GPUs "
            "(accelerate=multi_gpu)."
        )


def _run(cmd: list[str], env: dict | None = None, filter_launcher_tracebacks: bool = False) -> int:
    print("+ " + shlex.join(cmd), flush=True)
    if filter_launcher_tracebacks:
        from finetune.runs.launcher_output import run_quietly

        return run_quietly(cmd, env)
    return subprocess.call(cmd, env=env)


def video_decoder_env(env: dict) -> tuple[str, dict]:
    """The start-up line naming the video decoder, and the environment for the processes the launch starts. Decided
    here once: when torchcodec cannot load, every rank, DataLoader worker, evaluation and export is told to use PyAV
    (FINETUNE_VIDEO_BACKEND=pyav) instead of each finding out, and warning, again. A forced choice that cannot work is
    refused before anything starts."""
    from finetune.data import media

    forced = env.get(media.BACKEND_VARIABLE) or None
    if forced not in (None, *media.VIDEO_BACKENDS):
        raise ConfigError(
            f"{media.BACKEND_VARIABLE}={forced}: use one of {', '.join(media.VIDEO_BACKENDS)}, or unset it (torchcodec "
            "when it can load, else PyAV)."
        )
    name, why = media.video_decoder(forced)
    if forced == "torchcodec" and media.torchcodec_problem():
        raise ConfigError(
            f"video decoder: {why}. Unset {media.BACKEND_VARIABLE} to decode with PyAV, or {media.INSTALL_FFMPEG}."
        )
    return f"video decoder: {why}", {**env, media.BACKEND_VARIABLE: "pyav"} if name == "pyav" else dict(env)


def replace_own_export(config: Config) -> list[str]:
    """The export inside the run directory belongs to the run that was just trained there: replace it. An export
    folder elsewhere is only replaced when the recipe says export.overwrite=true."""
    run_dir, out_dir = Path(config.trainer.output_dir).resolve(), Path(config.export.output_dir).resolve()
    return ["export.overwrite=true"] if run_dir in out_dir.parents and not config.export.overwrite else []


def prepare_launch(overrides: list[str], dry_run: bool = False) -> tuple[Config, list[str]]:
    """The checked recipe and the `accelerate launch` options for it on this machine; ConfigError otherwise."""
    import torch

    from finetune.model.load import recipe_precision

    config = load_config(overrides)  # fail here, before any process starts
    config.logger.require_backend()
    if config.model.quantization != "none":
        from finetune.model.quantization import require_bitsandbytes

        require_bitsandbytes(config.model.quantization, load=False)
    env, gpus = dict(os.environ), torch.cuda.device_count()
    precision = recipe_precision(config)
    if dry_run and gpus == 0 and gpus_declared(env) and resolve_mode(config.accelerate.mode, env, gpus) != "cpu":
        # The commands as the GPU machine will run them: the recipe's precision there (auto: bf16 on current GPUs).
        precision = "bf16" if config.trainer.precision == "auto" else config.trainer.precision
    args = accelerate_args(config, env, gpus, precision, dry_run)
    # A resume that cannot work fails here, once, rather than in every started process.
    from finetune.records.rundir import check_checkpoint_fits, resolve_checkpoint

    if config.trainer.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(config.trainer.resume_from_checkpoint, Path(config.trainer.output_dir))
        check_checkpoint_fits(checkpoint, config, int(args[args.index("--num_processes") + 1]))
    return config, args


def commands(config: Config, args: list[str], overrides: list[str]) -> list[list[str]]:
    """The commands a run is: training under `accelerate launch`, then (on node 0) evaluation and export."""
    python = sys.executable
    steps = [[python, "-m", "accelerate.commands.launch", *args, "-m", "finetune.train", *overrides]]
    if config.evaluates_after_training() and not config.evaluation.steps:  # with steps, training ended with it
        steps.append([python, "-m", "finetune.evaluate", *overrides])
    if config.export.after_training:
        steps.append([python, "-m", "finetune.export", *overrides, *replace_own_export(config)])
    return steps


def layout(config: Config, args: list[str]) -> str:
    value = {k: args[args.index(k) + 1] for k in ("--num_processes", "--num_machines") if k in args}
    nodes, total = int(value["--num_machines"]), int(value["--num_processes"])
    engine = (
        f"DeepSpeed ({config.deepspeed.config_file})"
        if config.deepspeed.config_file
        else "FSDP2"
        if config.accelerate.fsdp_version
        else ("DDP" if total > 1 else "one process")
    )
    env = dict(os.environ)
    node_rank = _int_env(env, "NODE_RANK", 0)
    mode = config.accelerate.mode
    if mode == "auto":
        import torch

        mode = f"auto -> {resolve_mode(mode, env, torch.cuda.device_count())}"
    joined = (
        f"{nodes} machines joined at {args[args.index('--main_process_ip') + 1]}:"
        f"{args[args.index('--main_process_port') + 1]}, this one NODE_RANK={node_rank}"
        if nodes > 1
        else "this machine only"
    )
    return (
        f"{nodes} node(s) x {total // nodes} process(es) = {total} ({engine}, accelerate={mode}); {joined}; "
        "evaluation and export run on node 0 after training"
    )


def execute(config: Config, args: list[str], overrides: list[str]) -> int:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed otherwise warns that it fell back to CPU
    try:
        decoder_line, env = video_decoder_env(dict(os.environ))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(decoder_line, flush=True)
    train, *after = commands(config, args, overrides)
    # Only the samples this launch skips: a fresh start in an old run directory leaves that run's lines in place.
    skipped_from = (
        0 if config.trainer.resume_from_checkpoint else file_size(RunDir(config.trainer.output_dir).bad_samples_file)
    )
    rc = _run(train, env, filter_launcher_tracebacks=True)
    if rc != 0 or _int_env(dict(os.environ), "NODE_RANK", 0) != 0:
        return rc
    for command in after:
        rc = _run(command, env)
        if rc:
            return rc
    print("\n" + summary(config, skipped_from))
    return 0


def run_recipe(overrides: list[str], dry_run: bool = False) -> int:
    try:
        config, args = prepare_launch(overrides, dry_run)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if dry_run:
        import torch

        print(to_yaml(config))
        print("\n".join(summary_lines(config)))
        print("process layout: " + layout(config, args))
        if not torch.cuda.is_available() and "--cpu" not in args and "--num_cpu_threads_per_process" not in args:
            print(f"(no GPU visible here: laid out for GPUS_PER_NODE={os.environ['GPUS_PER_NODE']} GPUs per node)")
        try:
            print(video_decoder_env(dict(os.environ))[0])
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print("commands (not started: --dry-run):")
        for command in commands(config, args, overrides):
            print("  " + shlex.join(command))
        return 0
    return execute(config, args, overrides)
