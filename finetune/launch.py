"""What `./launch.sh [overrides]` runs: train under `accelerate launch`, then evaluate and export.

The recipe's `accelerate` group and the environment decide the processes:
  cpu          one process on the CPU (processes_per_node > 1 starts a gloo process group)
  single_gpu   one process on one GPU
  multi_gpu    one process per visible GPU (or processes_per_node) on this machine
  multi_node   NNODES machines, this one being NODE_RANK; MASTER_ADDR/MASTER_PORT reach node 0;
               GPUS_PER_NODE (default: the visible GPUs) processes on each
NNODES > 1 also works with cpu and multi_gpu (e.g. two `accelerate=cpu` launches on one machine).
The exact command is printed before it runs. Evaluation and export run once, on node 0, after training.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from finetune.config import Config, ConfigError, load_config, repo_path


def _int_env(env: dict, name: str, default: int) -> int:
    value = env.get(name, "")
    if value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} must be a whole number.") from None


def accelerate_args(config: Config, env: dict, gpu_count: int, precision: str) -> list[str]:
    """`accelerate launch` options for the recipe on this machine (pure: testable without launching)."""
    acc = config.accelerate
    if acc.mode != "cpu" and gpu_count == 0:
        raise ConfigError(f"accelerate.mode={acc.mode} needs a GPU and none is visible; use accelerate=cpu.")
    # NNODES > 1 joins several machines in any mode but single_gpu (cpu: a CPU cluster, or two launches on one
    # machine to rehearse a multi-node run); multi_node is multi_gpu that insists on the variables.
    nodes, node_rank = _int_env(env, "NNODES", 1), _int_env(env, "NODE_RANK", 0)
    if acc.mode == "single_gpu" and nodes > 1:
        raise ConfigError(f"NNODES={nodes} with accelerate=single_gpu: use accelerate=multi_node for several machines.")
    if acc.mode == "multi_node" and "NNODES" not in env:
        raise ConfigError("accelerate=multi_node needs NNODES, NODE_RANK and MASTER_ADDR set on every node "
                          "(see README, Multi-node).")
    if nodes < 1 or not 0 <= node_rank < nodes:
        raise ConfigError(f"NODE_RANK={node_rank} must be in [0, NNODES={nodes}).")
    if nodes > 1 and not env.get("MASTER_ADDR"):
        raise ConfigError(f"NNODES={nodes} needs MASTER_ADDR (node 0's address) on every node.")
    if acc.mode in ("cpu", "single_gpu"):
        per_node = acc.processes_per_node or 1
    else:
        per_node = acc.processes_per_node or _int_env(env, "GPUS_PER_NODE", gpu_count)
    total = per_node * nodes
    mixed = {"bf16": "bf16", "fp16": "fp16"}.get(precision, "no")
    args = ["--num_processes", str(total), "--num_machines", str(nodes), "--dynamo_backend", "no"]
    if config.deepspeed.config_file:
        args += ["--use_deepspeed", "--deepspeed_config_file", str(repo_path(config.deepspeed.config_file))]
    else:
        args += ["--mixed_precision", mixed]
        if total > 1:
            args.append("--multi_gpu")  # also the multi-process path on CPU (gloo), see ../shared/STACK.md
    if acc.mode == "cpu":
        # Several CPU processes go through --multi_gpu (gloo; the trainer sets use_cpu): accelerate refuses
        # --cpu together with --multi_gpu, and `--cpu --num_processes 2` would start a single process.
        args += (["--cpu"] if total == 1 else []) + ["--num_cpu_threads_per_process",
                                                     str(max(1, (os.cpu_count() or 1) // per_node))]  # fmt: skip
    if nodes > 1:
        args += ["--machine_rank", str(node_rank), "--main_process_ip", env["MASTER_ADDR"],
                 "--main_process_port", env.get("MASTER_PORT") or "29500", "--same_network"]  # fmt: skip
        if config.deepspeed.config_file:
            # One `./launch.sh` per node (by hand or srun), like DDP. accelerate's default for DeepSpeed on several
            # machines is instead to start every node from this one over pdsh with the `deepspeed` launcher.
            args += ["--deepspeed_multinode_launcher", "standard"]
    return args


def _run(cmd: list[str], filter_launcher_tracebacks: bool = False) -> int:
    print("+ " + shlex.join(cmd), flush=True)
    if filter_launcher_tracebacks:
        from finetune.launcher_output import run_quietly

        return run_quietly(cmd)
    return subprocess.call(cmd)


def summary(config: Config) -> str:
    run_dir = Path(config.trainer.output_dir)
    lines = [f"Run directory: {run_dir.resolve()}",
             f"  config:      {run_dir / 'config.yaml'}  (versions, git SHA, command: run_info.json)",
             f"  adapter:     {run_dir / 'adapter'}"]  # fmt: skip
    metrics_file = run_dir / "eval" / "metrics.json"
    if metrics_file.exists():
        m = json.loads(metrics_file.read_text())
        lines.append(f"  evaluation:  {metrics_file}  (accuracy {m['accuracy']:.3f}, chance {m['chance']:.3f})")
    report_file = Path(config.export.output_dir) / "export_report.json"
    if report_file.exists():
        r = json.loads(report_file.read_text())
        lines.append(f"  merged:      {r['merged_dir']}  (reloaded; max |logit diff| {r['max_abs_logit_diff']:.1e})")
    if config.logger.report_to == "wandb":
        lines.append(f"  wandb:       {run_dir / 'wandb'}  (offline runs: `wandb sync {run_dir / 'wandb'}/offline-run-*`)")
    elif config.logger.report_to == "tensorboard":
        lines.append(f"  tensorboard: tensorboard --logdir {run_dir}")
    return "\n".join(lines)


def replace_own_export(config: Config) -> list[str]:
    """The export inside the run directory belongs to the run that was just trained there: replace it. An export
    folder elsewhere is only replaced when the recipe says export.overwrite=true."""
    run_dir, out_dir = Path(config.trainer.output_dir).resolve(), Path(config.export.output_dir).resolve()
    return ["export.overwrite=true"] if run_dir in out_dir.parents and not config.export.overwrite else []


def main(argv: list[str] | None = None) -> int:
    import torch

    from finetune.modeling import resolve_precision, uses_gpu

    overrides = sys.argv[1:] if argv is None else argv
    try:
        config = load_config(overrides)  # fail here, before any process starts
        precision = resolve_precision(config.trainer.precision, uses_gpu(config))
        args = accelerate_args(config, dict(os.environ), torch.cuda.device_count(), precision)
        # A resume that cannot work fails here, once, rather than in every started process.
        from finetune.train import check_checkpoint_fits, resolve_checkpoint

        if config.trainer.resume_from_checkpoint:
            checkpoint = resolve_checkpoint(config.trainer.resume_from_checkpoint, Path(config.trainer.output_dir))
            check_checkpoint_fits(checkpoint, config, int(args[args.index("--num_processes") + 1]))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    python = sys.executable
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed otherwise warns that it fell back to CPU
    rc = _run([python, "-m", "accelerate.commands.launch", *args, "-m", "finetune.train", *overrides],
              filter_launcher_tracebacks=True)
    main_node = _int_env(dict(os.environ), "NODE_RANK", 0) == 0
    if rc != 0 or not main_node:
        return rc
    if config.evaluation.after_training and not config.evaluation.steps:  # with steps, training ended with it
        rc = _run([python, "-m", "finetune.evaluate", *overrides])
    if rc == 0 and config.export.after_training:
        rc = _run([python, "-m", "finetune.export", *overrides, *replace_own_export(config)])
    if rc == 0:
        print("\n" + summary(config))
    return rc


if __name__ == "__main__":
    sys.exit(main())
