"""`./launch.sh -m a=1,2 b=x,y`: a sweep in Hydra's override syntax, one run directory per job, and a results table.

The overrides are expanded by Hydra's own parser and basic sweeper (`a=1,2`, `range(1,4)`, `choice(x,y)`,
`experiment=a,b`, ...). Each job is the whole recipe (train -> evaluate -> export, through `accelerate launch`
like any run) in `runs/<name>/sweep-<time>/<k>-<the job's swept values>` (or under `hydra.sweep.dir=...`).
Jobs run one after another; `hydra/launcher=submitit_local` or `submitit_slurm` (with `hydra.launcher.*`
options, Hydra's submitit-plugin names) hands each job to submitit instead. A failed job is reported and the
sweep goes on. At the end, `sweep_results.md` and `sweep_results.csv` in the sweep directory hold each job's
overrides, final train loss, evaluation metrics, tokens/s and run time, best first.
"""

from __future__ import annotations

import csv
import io
import itertools
import re
import time
from pathlib import Path

from finetune.base.errors import ConfigError
from finetune.recipe import legacy_keys

LAUNCHERS = ("basic", "submitit_local", "submitit_slurm")
METRICS = ("accuracy", "exact_match", "token_f1", "choice_accuracy", "reward")  # reward: the RL methods' held-out
# hydra.launcher.* keys submitit knows without a cluster prefix (the rest become slurm_<key>)
GENERIC_SUBMITIT_KEYS = {
    "timeout_min",
    "mem_gb",
    "nodes",
    "tasks_per_node",
    "cpus_per_task",
    "gpus_per_node",
    "name",
    "stderr_to_stdout",
}


def split_sweep_options(overrides: list[str]) -> tuple[list[str], str, dict, str | None]:
    """(job overrides, launcher, its options, sweep dir) from the command line's overrides."""
    rest, launcher, options, sweep_dir = [], "basic", {}, None
    for item in overrides:
        key, _, value = item.partition("=")
        if key == "hydra/launcher":
            if value not in LAUNCHERS:
                raise ConfigError(f"hydra/launcher={value}: choose one of {', '.join(LAUNCHERS)}.")
            launcher = value
        elif key.startswith("hydra.launcher."):
            options[key.removeprefix("hydra.launcher.")] = _scalar(value)
        elif key == "hydra.sweep.dir":
            sweep_dir = value
        elif key.startswith("hydra"):
            raise ConfigError(f"{item}: only hydra/launcher, hydra.launcher.* and hydra.sweep.dir apply to a sweep.")
        else:
            rest.append(item)
    return rest, launcher, options, sweep_dir


def _scalar(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def _override_text(value) -> str:
    """A swept value as an override writes it (`true`, not Python's `True`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def expand(overrides: list[str]) -> list[list[str]]:
    """Every job's overrides, in the order of Hydra's basic sweeper (the last swept key varies fastest), from
    Hydra's own override parser: choices `a=1,2`, `choice(...)`, `range(...)`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Transformer

    try:
        choices = []
        for override in OverridesParser.create().parse_overrides(overrides):
            key = override.get_key_element()
            if not override.is_sweep_override():
                choices.append([f"{key}={override.get_value_element_as_str()}"])
            elif override.is_discrete_sweep():
                values = override.sweep_iterator(transformer=Transformer.encode)  # strings quoted back as typed
                choices.append([f"{key}={_override_text(value)}" for value in values])
            else:
                raise ValueError(f"{key}: an interval sweep needs an optimizing sweeper; list the values instead")
    except Exception as err:  # Hydra's parser errors: keep the first line
        raise ConfigError(f"cannot read the sweep {' '.join(overrides)}: {str(err).splitlines()[0]}") from None
    return [list(job) for job in itertools.product(*choices)]


def swept(jobs: list[list[str]]) -> list[list[str]]:
    """Per job, only the overrides that differ between jobs (what names its folder and its table row)."""
    keys = [o.split("=", 1)[0] for o in jobs[0]]
    varying = {k for i, k in enumerate(keys) if len({job[i] for job in jobs}) > 1}
    return [[o for o in job if o.split("=", 1)[0] in varying] for job in jobs]


def job_dir_name(number: int, overrides: list[str]) -> str:
    """`<k>-a=1,b=x` as Hydra names sweep folders (characters other than these become `_`)."""
    text = ",".join(overrides) or "job"
    return f"{number}-" + re.sub(r"[^A-Za-z0-9_.,=+-]+", "_", text)[:120]


def run_job(overrides: list[str], job_dir: str) -> dict:
    """One job (in this process, or in a submitit worker): the recipe's launch with its own run directory."""
    from finetune.runs.launch import execute, prepare_launch

    start = time.perf_counter()
    job = overrides + [f"trainer.output_dir='{job_dir}'"]  # quoted: the folder name holds `=` and `,`
    try:
        config, args = prepare_launch(job)
    except ConfigError as err:
        return {"status": "failed", "error": str(err).splitlines()[0], "seconds": time.perf_counter() - start}
    rc = execute(config, args, job)
    status = {"status": "ok" if rc == 0 else "failed", "seconds": time.perf_counter() - start}
    if rc:
        status["error"] = f"exit status {rc}; see the output above or {job_dir}"
    return status


def job_results(job_dir: Path) -> dict:
    """What the job's own files say: final train loss, mean tokens/s per device, evaluation metrics."""
    from finetune.records.rundir import RunDir

    out, run = {}, RunDir(job_dir)
    history = run.history()
    if history:
        losses = [h["loss"] for h in history if "loss" in h]
        speeds = [h["tokens_per_second_per_device"] for h in history if "tokens_per_second_per_device" in h]
        out["train_loss"] = losses[-1] if losses else None
        out["tokens_per_second"] = sum(speeds) / len(speeds) if speeds else None
    metrics = run.metrics()
    if metrics is not None:
        out.update({f"eval_{k}": metrics[k] for k in METRICS if metrics.get(k) is not None})
    return out


def _best_first(row: dict):
    failed = row["status"] != "ok"
    score = row.get("eval_accuracy", row.get("eval_reward"))
    loss = row.get("train_loss")
    return (failed, -score if score is not None else 0.0, loss if loss is not None else float("inf"))


def results_table(rows: list[dict]) -> tuple[str, str]:
    """(markdown, csv) of the jobs, best first: eval accuracy (RL: eval reward), then final train loss; failed jobs
    last."""
    rows = sorted(rows, key=_best_first)
    metric_columns = [f"eval_{k}" for k in METRICS if any(f"eval_{k}" in r for r in rows)]
    columns = ["job", "overrides", "status", "train_loss", *metric_columns, "tokens_per_second", "seconds", "run_dir"]

    def cell(row, column):
        value = row.get(column)
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.1f}" if column in ("tokens_per_second", "seconds") else f"{value:.4f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, c).replace("|", "/") for c in columns) + " |" for r in rows]
    failures = [f"- job {r['job']} ({r['overrides']}): {r['error']}" for r in rows if r.get("error")]
    markdown = "\n".join(lines + ([""] + failures if failures else [])) + "\n"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns + ["error"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return markdown, buffer.getvalue()


def _submitit_executor(launcher: str, options: dict, folder: Path):
    try:
        import submitit
    except ImportError:
        raise ConfigError(f"hydra/launcher={launcher} needs submitit: pip install submitit.") from None
    cluster = "local" if launcher == "submitit_local" else "slurm"
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params = {}
    for key, value in options.items():
        if key in GENERIC_SUBMITIT_KEYS:
            params[key] = value
        elif cluster == "slurm":
            params[f"slurm_{key}"] = value
    executor.update_parameters(**params)
    return executor


def run_sweep(overrides: list[str], dry_run: bool = False) -> int:
    from finetune.recipe.load import load_config

    job_overrides, launcher, options, sweep_dir = split_sweep_options(overrides)
    jobs = expand(job_overrides)
    replaced = legacy_keys.check_overrides(jobs[0])  # a replaced key would fail every job: refuse the sweep
    if replaced:
        raise ConfigError(replaced)
    names = swept(jobs)
    try:
        name = load_config(jobs[0]).name
    except ConfigError:
        name = "sweep"
    root = Path(sweep_dir or f"runs/{name}/sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    dirs = [root / job_dir_name(k, names[k]) for k in range(len(jobs))]
    print(f"sweep of {len(jobs)} jobs ({launcher} launcher) in {root}:")
    for k, job in enumerate(jobs):
        print(f"  {k}: {' '.join(names[k]) or '(the recipe as given)'} -> {dirs[k]}")
    if dry_run:
        return 0
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    if launcher == "basic":
        for k, job in enumerate(jobs):
            print(f"\n=== job {k + 1}/{len(jobs)}: {' '.join(names[k])}", flush=True)
            rows.append(run_job(job, str(dirs[k])))
    else:
        executor = _submitit_executor(launcher, options, root / ".submitit")
        submitted = [executor.submit(run_job, job, str(dirs[k].resolve())) for k, job in enumerate(jobs)]
        print(f"submitted {len(submitted)} jobs: {', '.join(str(j.job_id) for j in submitted)}; waiting", flush=True)
        for job in submitted:
            try:
                rows.append(job.result())
            except Exception as err:  # the job itself died (killed, out of memory, a node failure)
                rows.append({"status": "failed", "error": str(err).strip().splitlines()[-1][:300]})
    for k, row in enumerate(rows):
        row.update(job=k, overrides=" ".join(names[k]), run_dir=str(dirs[k]), **job_results(dirs[k]))
    markdown, table = results_table(rows)
    (root / "sweep_results.md").write_text(markdown)
    (root / "sweep_results.csv").write_text(table)
    print(f"\nSweep results ({root / 'sweep_results.md'}, .csv), best first:\n{markdown}")
    failed = sum(r["status"] != "ok" for r in rows)
    if failed:
        print(f"{failed} of {len(rows)} jobs failed.")
    return 1 if failed else 0
