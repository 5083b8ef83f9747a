"""A user's mistake on the command line ends as one `error:` line that names the fix, with exit status 2: no Hydra
advice to append a `+key` (which would then be dropped silently), no search-path dump, a did-you-mean for keys,
group options and commands."""

import pytest

from finetune.cli.main import main
from finetune.recipe.overrides import GROUPS
from tests.helpers import REPO

KEY = "error: 'trainer.learning_rat' is not a recipe key; did you mean 'trainer.learning_rate'?"
# One misspelt option per group: every group answers with its own noun and folder.
OPTIONS = {
    "model": ("qwen2_5_vl_7bb", "a model", "qwen2_5_vl_7b"),
    "data": ("demmo", "a data recipe", "demo"),
    "peft": ("lorra", "a peft recipe", "lora"),
    "trainer": ("defualt", "a trainer recipe", "default"),
    "deepspeed": ("zero33", "a deepspeed recipe", "zero3"),
    "accelerate": ("multigpu", "an accelerate mode", "multi_gpu"),
    "logger": ("tensorbord", "a logger", "tensorboard"),
    "experiment": ("qwen25_vl_7b_video_lora", "an experiment", "qwen2_5_vl_7b_video_lora"),
    "method": ("dppo", "a training method", "dpo"),
}


def _refused(capsys, argv) -> str:
    """The one line `main(argv)` printed, after checking it refused with exit status 2 and nothing else."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err
    return err.rstrip("\n")


@pytest.mark.parametrize("prefix", ["", "+", "++"])
def test_an_unknown_key_is_refused_with_or_without_plus(capsys, prefix):
    """`+key` used to compose, exit 0 and drop the key (the learning rate stayed the demo's)."""
    assert _refused(capsys, [f"{prefix}trainer.learning_rat=1e-4", "--cfg", "job"]) == KEY


def test_plus_and_tilde_on_a_known_key_say_what_to_write_instead(capsys):
    assert _refused(capsys, ["+trainer.learning_rate=1e-4", "--cfg", "job"]) == (
        "error: '+trainer.learning_rate=1e-4': trainer.learning_rate is already a recipe key; drop the '+' "
        "(trainer.learning_rate=1e-4)."
    )
    assert _refused(capsys, ["~trainer.learning_rate", "--cfg", "job"]) == (
        "error: '~trainer.learning_rate': trainer.learning_rate is already a recipe key; set it instead "
        "(trainer.learning_rate=VALUE)."
    )
    assert _refused(capsys, ["+logger=none", "--cfg", "job"]) == (
        "error: '+logger=none': logger is already in the recipe; drop the '+'."
    )


def test_plus_plus_on_a_known_key_is_a_plain_override(capsys):
    assert main(["++trainer.learning_rate=0.125", "--cfg", "job"]) == 0
    assert "learning_rate: 0.125" in capsys.readouterr().out


@pytest.mark.parametrize("group", GROUPS)
def test_a_misspelt_option_of_every_group_gets_a_did_you_mean(capsys, group):
    wrong, noun, meant = OPTIONS[group]
    assert (REPO / "recipes" / group / f"{meant}.yaml").exists()
    assert _refused(capsys, [f"{group}={wrong}", "--cfg", "job"]) == (
        f"error: '{wrong}' is not {noun} (recipes/{group}/); did you mean '{meant}'?"
    )


def test_an_option_far_from_any_names_a_short_groups_choices(capsys):
    options = sorted(p.stem for p in (REPO / "recipes" / "peft").glob("*.yaml"))
    assert _refused(capsys, ["peft=qqqqqqqq", "--dry-run"]) == (
        f"error: 'qqqqqqqq' is not a peft recipe (recipes/peft/); choose one of {', '.join(options)}."
    )


def test_the_same_checks_hold_for_the_other_commands(capsys):
    assert _refused(capsys, ["validate", "trainer.learning_rat=1e-4"]) == KEY
    assert _refused(capsys, ["validate", "experiment=qwen25_vl_7b_video_lora"]).startswith(
        "error: 'qwen25_vl_7b_video_lora' is not an experiment"
    )


def test_a_misspelt_command_gets_a_did_you_mean(capsys):
    assert _refused(capsys, ["valdiate", "x.json"]) == "error: 'valdiate' is not a command; did you mean 'validate'?"
    assert _refused(capsys, ["evalute"]) == "error: 'evalute' is not a command; did you mean 'evaluate'?"
    assert _refused(capsys, ["frobnicate"]) == (
        "error: 'frobnicate' is not a command, flag or override (key=value); see ./launch.sh --help."
    )
    assert _refused(capsys, ["name"]) == "error: 'name' needs a value: name=VALUE."


def test_a_wrong_type_is_one_line_without_hydras_advice(capsys):
    line = _refused(capsys, ["trainer.learning_rate=fast", "--cfg", "job"])
    assert line.startswith("error: trainer.learning_rate=fast: ") and "could not be converted to Float" in line


def test_validate_names_a_missing_file_before_it_loads_the_processor(capsys, monkeypatch, tmp_path):
    """For a real model the processor is a download: a missing data file is said first, and nothing is loaded."""
    import finetune.model.load

    def no_download(*args, **kwargs):
        raise AssertionError("the processor was loaded although a data file is missing")

    monkeypatch.setattr(finetune.model.load, "load_processor", no_download)
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "data.train=missing.json"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"train: Dataset file 'missing.json' not found (looked at {tmp_path / 'missing.json'}, {REPO / 'missing.json'}).",
        "FAILED: 1 problems would stop training.",
    ]


def _no_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_several_nodes_on_single_gpu_name_the_modes_that_join_machines(capsys, monkeypatch):
    _no_gpu(monkeypatch)
    for name, value in {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "h", "GPUS_PER_NODE": "1"}.items():
        monkeypatch.setenv(name, value)
    assert _refused(capsys, ["--dry-run", "accelerate=single_gpu"]) == (
        "error: NNODES=2 with accelerate=single_gpu: use accelerate=multi_node (or auto) for several machines."
    )


def test_a_dry_run_on_a_machine_without_gpus_prints_the_gpu_commands(capsys, monkeypatch):
    _no_gpu(monkeypatch)
    monkeypatch.delenv("NNODES", raising=False)
    monkeypatch.setenv("GPUS_PER_NODE", "8")
    assert main(["--dry-run", "accelerate=multi_gpu", "logger=none"]) == 0
    out = capsys.readouterr().out
    assert "--num_processes 8 --num_machines 1 --dynamo_backend no --mixed_precision bf16 --multi_gpu" in out
    assert "(no GPU visible here: laid out for GPUS_PER_NODE=8 GPUs per node)" in out
    monkeypatch.delenv("GPUS_PER_NODE")
    assert _refused(capsys, ["--dry-run", "accelerate=multi_gpu"]) == (
        "error: accelerate.mode=multi_gpu needs a GPU and none is visible; use accelerate=cpu (or, to see the "
        "commands on a machine without GPUs: GPUS_PER_NODE=<GPUs per node> ./launch.sh --dry-run ...)."
    )
