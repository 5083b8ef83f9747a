"""The command line of experiments: --help from the recipes on disk, --cfg job that re-composes, --dry-run that
starts nothing, -m sweeps with a results table (a failing job reported while the others finish, submitit's local
executor too), and rerun reproducing a finished run's losses exactly."""

import csv
import json
import subprocess
import sys

from finetune.cli.main import main
from finetune.recipe.load import load_config, to_yaml
from tests.helpers import DEMO, REPO
from tests.helpers.recipe_runs import mini_dataset, run_module

FAST = [
    "logger=none",
    "export.after_training=false",
    "trainer.logging_steps=1",
    "trainer.warmup_steps=0",
    "trainer.per_device_train_batch_size=4",
    f"data.media_root={DEMO}",
]


def test_help_lists_every_group_option_on_disk_and_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for folder in (REPO / "recipes").iterdir():
        if folder.is_dir():
            assert f"  {folder.name}:" in out
            for option in folder.glob("*.yaml"):
                assert f"    {option.stem} " in out, option
    for text in (
        "--cfg job",
        "--dry-run",
        "-m a=1,2",
        "rerun runs/<run>",
        "hydra/launcher=submitit_slurm",
        "trainer.learning_rate",
        "data.max_length",
        "4096",
        "finetune.validate",
    ):
        assert text in out, text


def test_cfg_job_prints_a_recipe_that_recomposes_to_the_same_config(tmp_path, capsys):
    overrides = ["experiment=demo_qwen2_vl", "trainer.learning_rate=2e-3", "data.max_length=512"]
    assert main(["--cfg", "job", *overrides]) == 0
    printed = capsys.readouterr().out
    saved = tmp_path / "recipe.yaml"
    saved.write_text(printed)
    recipe = "".join(line for line in printed.splitlines(keepends=True) if not line.startswith("#"))
    assert to_yaml(load_config([f"recipe_file={saved}"])) == to_yaml(load_config(overrides)) == recipe
    assert "# worst case per item, in tokens" in printed  # appended as comments: the file above still loads


def test_refusals_read_cleanly(capsys):
    assert main(["--cfg", "hydra"]) == 2 and "only `--cfg job`" in capsys.readouterr().err
    assert main(["--bogus"]) == 2 and "unknown option --bogus" in capsys.readouterr().err
    assert main(["--cfg", "job", "trainer.learning_rate=-1"]) == 2
    assert "trainer.learning_rate must be positive" in capsys.readouterr().err
    assert main(["-m", "--dry-run", "model.freeze_merger=true,false"]) == 2  # every job would fail: none starts
    assert "model.freeze_merger=true is now `parts.merger=frozen`" in capsys.readouterr().err


def test_swept_values_are_written_as_overrides():
    from finetune.runs.sweep import expand, job_dir_name, swept

    jobs = expand(["trainer.packing=true,false", "data.train=a.json,'b c.json'", "peft.r=range(2,4)", "name=x"])
    assert jobs[0] == ["trainer.packing=true", "data.train=a.json", "peft.r=2", "name=x"]
    assert jobs[-1] == ["trainer.packing=false", "data.train='b c.json'", "peft.r=3", "name=x"] and len(jobs) == 8
    grid = swept(expand(["trainer.learning_rate=1e-3,3e-3", "trainer.seed=1,2", "name=x"]))
    assert [job_dir_name(k, job) for k, job in enumerate(grid)] == [
        "0-trainer.learning_rate=0.001,trainer.seed=1",
        "1-trainer.learning_rate=0.001,trainer.seed=2",
        "2-trainer.learning_rate=0.003,trainer.seed=1",
        "3-trainer.learning_rate=0.003,trainer.seed=2",
    ]
    assert job_dir_name(0, ["data.train='b c.json'"]) == "0-data.train=_b_c.json_"


def test_dry_run_prints_the_launch_and_starts_nothing(tmp_path, capsys):
    assert main(["--dry-run", f"trainer.output_dir={tmp_path / 'run'}", "accelerate.processes_per_node=2"]) == 0
    out = capsys.readouterr().out
    assert "1 node(s) x 2 process(es) = 2" in out and "accelerate.commands.launch --num_processes 2" in out
    assert "-m finetune.evaluate" in out and "-m finetune.export" in out and not (tmp_path / "run").exists()


def _rows(sweep_dir):
    with open(sweep_dir / "sweep_results.csv") as f:
        return list(csv.DictReader(f))


def test_sweep_gives_a_run_per_job_and_a_table_of_their_own_numbers(tmp_path):
    train = mini_dataset(tmp_path / "mini.json", per_task=4)
    sweep_dir = tmp_path / "sweep"
    result = run_module(
        "finetune",
        [
            "-m",
            *FAST,
            f"data.train={train}",
            f"data.eval={train}",
            "data.eval_max_samples=4",
            "trainer.max_steps=2",
            "evaluation.steps=2",  # evaluated inside the training processes: no evaluation process per job
            "trainer.learning_rate=1e-3,3e-3",  # two jobs (a grid's jobs and names: the test above)
            "trainer.seed=2",
            f"hydra.sweep.dir={sweep_dir}",
        ],
    )
    rows = _rows(sweep_dir)
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == [
        "0-trainer.learning_rate=0.001",
        "1-trainer.learning_rate=0.003",
    ]
    for row in rows:
        run = sweep_dir / row["run_dir"].split("/")[-1]
        history = json.loads((run / "log_history.json").read_text())
        metrics = json.loads((run / "eval" / "metrics.json").read_text())
        assert float(row["train_loss"]) == [h["loss"] for h in history if "loss" in h][-1]
        assert float(row["eval_accuracy"]) == metrics["accuracy"] and float(row["eval_token_f1"]) == metrics["token_f1"]
        assert f"output_dir: {run}\n" in (run / "config.yaml").read_text()
    keys = [(-float(r["eval_accuracy"]), float(r["train_loss"])) for r in rows]
    assert keys == sorted(keys)  # best first
    assert (sweep_dir / "sweep_results.md").read_text().count("| ok |") == 2 and "Sweep results" in result.stdout


def test_a_failing_job_is_reported_while_submitit_runs_the_other(tmp_path):
    """One sweep for two behaviours: submitit's local executor runs the jobs, and the job with a bad value fails
    and is reported while the other finishes."""
    train = mini_dataset(tmp_path / "mini.json", per_task=2)
    sweep_dir = tmp_path / "sweep"
    result = run_module(
        "finetune",
        [
            "-m",
            *FAST,
            f"data.train={train}",
            "evaluation.after_training=false",
            "trainer.max_steps=1",
            "trainer.learning_rate=-1,2e-3",
            "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=10",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        expect_failure=True,
    )
    rows = {r["overrides"]: r for r in _rows(sweep_dir)}
    assert rows["trainer.learning_rate=0.002"]["status"] == "ok" and rows["trainer.learning_rate=0.002"]["train_loss"]
    assert rows["trainer.learning_rate=-1"]["status"] == "failed"
    assert "trainer.learning_rate must be positive" in rows["trainer.learning_rate=-1"]["error"]
    assert "1 of 2 jobs failed" in result.stdout
    assert len(list((sweep_dir / ".submitit").glob("*_log.out"))) == 2  # both ran as submitit jobs


def test_rerun_reproduces_the_losses_and_refuses_changed_data(tmp_path):
    train = mini_dataset(tmp_path / "mini.json", per_task=4)
    first = tmp_path / "first"
    run_module(
        "finetune",
        [
            *FAST,
            f"data.train={train}",
            "evaluation.after_training=false",
            "trainer.max_steps=5",
            f"trainer.output_dir={first}",
            "peft.dropout=0.1",
        ],
    )
    again = tmp_path / "again"
    run_module("finetune", ["rerun", str(first), f"trainer.output_dir={again}"])

    def losses(run):
        return [h["loss"] for h in json.loads((run / "log_history.json").read_text()) if "loss" in h]

    assert len(losses(first)) == 5 and losses(again) == losses(first)
    train.write_text(train.read_text().replace("colour", "color"))
    refused = run_module("finetune", ["rerun", str(first)], expect_failure=True)
    assert (
        refused.returncode == 2 and "the data changed since the run" in refused.stderr and str(train) in refused.stderr
    )


def test_tab_completion_in_bash_offers_what_is_on_disk(tmp_path):
    """The script `./launch.sh --completion bash` prints, sourced into bash and asked as bash asks it (the word
    under the cursor split at `=`): group options from recipes/, schema keys, part modes, flags, subcommands."""
    from finetune.cli.recipe_help import group_options

    script = tmp_path / "complete.sh"
    result = subprocess.run([sys.executable, "-m", "finetune", "--completion", "bash"], capture_output=True, text=True)
    script.write_text(result.stdout)
    lines = [
        "./launch.sh model=tiny",
        "./launch.sh trainer.pack",
        "./launch.sh re",
        "./launch.sh data.train=x re",
        "./launch.sh parts.vision_tower=",
        "./launch.sh --dry",
        "./launch.sh experiment=",
    ]
    probe = (
        f'source {script}\nt() {{ COMP_LINE="$1"; COMP_POINT=${{#COMP_LINE}}; COMP_WORDS=(./launch.sh); COMP_CWORD=1; '
    )
    probe += '_finetune_launch_complete; echo "${COMPREPLY[*]}"; }\n' + "\n".join(f"t '{line}'" for line in lines)
    replies = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True).stdout.splitlines()
    experiments = " ".join(option for option, _ in group_options()["experiment"])
    assert replies == [
        " ".join(option for option, _ in group_options()["model"] if option.startswith("tiny")),
        "trainer.packing=",
        "rerun",
        "",
        "frozen lora full",
        "--dry-run",
        experiments,
    ]
