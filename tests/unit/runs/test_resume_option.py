"""`trainer.resume_from_checkpoint`: which checkpoint `latest` means, and clear errors when there is none.
(The resumed training itself is checked in test_scale_out.py, by killing and resuming real runs.)"""

import pytest

from finetune.base.errors import ConfigError
from finetune.recipe.load import load_config
from finetune.records.rundir import check_checkpoint_fits, resolve_checkpoint


def _checkpoint(run_dir, step, complete=True):
    """A checkpoint folder as the trainer leaves it; `complete` adds the marker written after every rank saved."""
    from finetune.records.rundir import mark_complete

    path = run_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text("{}")
    if complete:
        mark_complete(path, step)
    return path


def test_latest_is_the_highest_complete_step(tmp_path):
    _checkpoint(tmp_path, 500), _checkpoint(tmp_path, 1000)
    _checkpoint(tmp_path, 1500, complete=False)  # killed while writing: skipped
    (tmp_path / "checkpoint-2000").mkdir()  # killed before even the trainer state: skipped
    assert resolve_checkpoint("latest", tmp_path) == str(tmp_path / "checkpoint-1000")
    with pytest.raises(ConfigError, match="not a complete checkpoint folder"):
        resolve_checkpoint(str(tmp_path / "checkpoint-1500"), tmp_path)
    assert resolve_checkpoint(str(tmp_path / "checkpoint-500"), tmp_path) == str(tmp_path / "checkpoint-500")


def test_no_checkpoint_to_resume_is_an_error_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="no complete checkpoint-"):
        resolve_checkpoint("latest", tmp_path)
    with pytest.raises(ConfigError, match="not a complete checkpoint folder"):
        resolve_checkpoint(str(tmp_path), tmp_path)


def test_starting_over_a_run_with_checkpoints_says_so(tmp_path, caplog):
    _checkpoint(tmp_path, 10)
    assert resolve_checkpoint(None, tmp_path) is None
    assert "starts again from step 0" in caplog.text and "resume_from_checkpoint=latest" in caplog.text


def test_a_zero_checkpoint_resumes_only_with_deepspeed_and_as_many_ranks(tmp_path):
    checkpoint = _checkpoint(tmp_path, 4)
    (checkpoint / "global_step4").mkdir()
    for rank in range(2):
        (checkpoint / "global_step4" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    zero3, plain = load_config(["deepspeed=zero3"]), load_config([])
    check_checkpoint_fits(str(checkpoint), zero3, world_size=2)
    with pytest.raises(ConfigError, match="shards of 2 DeepSpeed ranks but this run has 4"):
        check_checkpoint_fits(str(checkpoint), zero3, world_size=4)
    with pytest.raises(ConfigError, match="same deepspeed recipe"):
        check_checkpoint_fits(str(checkpoint), plain, world_size=2)
    with pytest.raises(ConfigError, match="without DeepSpeed"):
        check_checkpoint_fits(str(_checkpoint(tmp_path, 8)), zero3, world_size=2)


def test_the_launcher_refuses_an_impossible_resume_before_starting_processes(tmp_path, capsys):
    from finetune.cli.main import main

    checkpoint = _checkpoint(tmp_path, 4)
    (checkpoint / "global_step4").mkdir()
    (checkpoint / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    overrides = [
        f"trainer.output_dir={tmp_path}",
        "trainer.resume_from_checkpoint=latest",
        "logger=none",
        "deepspeed=zero3",
        "accelerate.processes_per_node=2",
    ]
    assert main(overrides) == 2
    err = capsys.readouterr().err
    assert "shards of 1 DeepSpeed ranks but this run has 2" in err and "accelerate launch" not in err


def test_an_fsdp2_checkpoint_resumes_only_under_fsdp2(tmp_path):
    checkpoint = _checkpoint(tmp_path, 4)
    (checkpoint / "pytorch_model_fsdp_0").mkdir()
    fsdp2, plain = load_config(["accelerate=fsdp2"]), load_config([])
    check_checkpoint_fits(str(checkpoint), fsdp2, world_size=2)
    with pytest.raises(ConfigError, match="written under FSDP2: resume it with accelerate=fsdp2"):
        check_checkpoint_fits(str(checkpoint), plain, world_size=2)
    with pytest.raises(ConfigError, match="written without FSDP2"):
        check_checkpoint_fits(str(_checkpoint(tmp_path, 8)), fsdp2, world_size=2)
