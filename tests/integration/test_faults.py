"""Faults during a run: bad samples found at decode time, a kill or a full disk while a checkpoint is written, a
NaN loss, refusals through the launcher, secrets in the environment, pickled weights.

Faults are injected by tests/helpers/distributed_harness.py into the real `finetune.train` (see its docstring).
"""

import json
import os
import subprocess
import sys

import pytest

from finetune.records.rundir import RunDir, is_complete
from tests.helpers import REPO
from tests.helpers.broken_media import BAD_IDS, bad_overrides, dataset_with_bad_media
from tests.helpers.recipe_runs import mini_dataset, run_module, tiny_run_overrides


def harness(overrides, env, expect_rc=0):
    result = subprocess.run(
        [sys.executable, "tests/helpers/distributed_harness.py", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **env},
    )
    assert result.returncode == expect_rc, f"exit {result.returncode}:\n{result.stderr[-5000:]}"
    return result


def losses(run_dir):
    return {h["step"]: h["loss"] for h in json.loads((run_dir / "log_history.json").read_text()) if "loss" in h}


def test_samples_that_fail_to_decode_are_skipped_reported_and_bounded(tmp_path):
    data = dataset_with_bad_media(tmp_path)
    run_dir = tmp_path / "run"
    result = run_module("finetune.train", bad_overrides(run_dir, data, 6, "data.max_bad_samples=3"))
    assert sorted(losses(run_dir)) == [1, 2, 3, 4, 5, 6]  # trained to the last step
    reported = [json.loads(line) for line in open(RunDir(run_dir).bad_samples_file)]
    assert {r["id"] for r in reported} == BAD_IDS and len(reported) == 3
    assert {r["kind"] for r in reported} == {"bad_video", "bad_image"}
    assert all(f"skipping sample {sid}" in result.stderr for sid in BAD_IDS)

    validate = run_module(
        "finetune.validate",
        [
            f"data.train={data}",
            "data.media_root=/",
            "data.eval=null",
            "evaluation.after_training=false",
            "--split",
            "train",
            "--decode",
        ],
        expect_failure=True,
    )
    listed = {sid for sid in BAD_IDS if f"(id {sid})" in validate.stdout}
    assert listed == BAD_IDS and "FAILED: 3 problems" in validate.stdout

    # Past data.max_bad_samples the run stops, naming where the list is.
    stopped = run_module(
        "finetune.train", bad_overrides(tmp_path / "strict", data, 6, "data.max_bad_samples=1"), expect_failure=True
    )
    assert stopped.returncode == 2 and "Traceback" not in stopped.stderr
    assert "more than data.max_bad_samples allows (1)" in stopped.stderr and "bad_samples.jsonl" in stopped.stderr


def _fault_run(run_dir, data, *extra):
    return tiny_run_overrides("qwen2_5_vl", run_dir, data, steps=6) + [
        "trainer.save_steps=2",
        "trainer.save_total_limit=2",
        "trainer.per_device_train_batch_size=2",
        "evaluation.after_training=false",
        "peft.dropout=0.1",
        *extra,
    ]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    data = mini_dataset(root / "train.json")
    run_module("finetune.train", _fault_run(root / "run", data))
    return data, losses(root / "run")


def test_a_kill_while_a_checkpoint_is_written_never_leaves_one_that_resume_loads(tmp_path, uninterrupted):
    from finetune.records.rundir import resolve_checkpoint

    data, expected = uninterrupted
    run_dir = tmp_path / "run"
    harness(_fault_run(run_dir, data), {"HARNESS_KILL_DURING_SAVE": "4"}, expect_rc=-9)
    assert (run_dir / "checkpoint-4").is_dir() and not is_complete(run_dir / "checkpoint-4")
    assert resolve_checkpoint("latest", run_dir) == str(run_dir / "checkpoint-2")
    run_module("finetune.train", _fault_run(run_dir, data, "trainer.resume_from_checkpoint=latest"))
    resumed = losses(run_dir)  # steps 1-2 come back with checkpoint-2's state, 3-6 are trained again
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6] and resumed == pytest.approx(expected, abs=1e-6)
    assert [step for step, _ in RunDir(run_dir).checkpoints()] == [4, 6]  # rotation: the newest two complete ones


def test_out_of_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, uninterrupted):
    from finetune.records.rundir import resolve_checkpoint

    data, _ = uninterrupted
    run_dir = tmp_path / "run"
    result = harness(_fault_run(run_dir, data), {"HARNESS_FULL_DISK_AT_STEP": "4"}, expect_rc=2)
    assert "out of disk space while writing" in result.stderr and "Traceback" not in result.stderr
    assert is_complete(run_dir / "checkpoint-2") and not is_complete(run_dir / "checkpoint-4")
    assert resolve_checkpoint("latest", run_dir) == str(run_dir / "checkpoint-2")


def test_a_nan_loss_stops_naming_the_step_and_samples_or_is_skipped(tmp_path, uninterrupted):
    import torch
    from safetensors.torch import load_file

    data, _ = uninterrupted
    result = harness(_fault_run(tmp_path / "stop", data), {"HARNESS_NAN_AT_STEP": "3"}, expect_rc=2)
    message = next(line for line in result.stderr.splitlines() if line.startswith("error: "))
    assert message.startswith("error: step 3: the loss is NaN or infinite (samples rank 0: ")
    named = message.split("rank 0: ")[1].split(")")[0].split(", ")
    records = {r.get("id", str(i)) for i, r in enumerate(json.loads(data.read_text()))}
    assert len(named) == 2 and set(named) <= records  # the two samples of that step's rows
    assert "trainer.nonfinite_loss=skip" in message and "Traceback" not in result.stderr

    skipped = harness(_fault_run(tmp_path / "skip", data, "trainer.nonfinite_loss=skip"), {"HARNESS_NAN_AT_STEP": "3"})
    assert "step 3: non-finite loss; its gradients were dropped" in skipped.stderr
    weights = load_file(str(tmp_path / "skip" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_a_refused_start_through_the_launcher_reads_as_a_refusal(tmp_path):
    record = {
        "messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "x"}],
        "images": ["nowhere.png"],
    }
    data = tmp_path / "missing.json"
    data.write_text(json.dumps([record]))
    result = run_module(
        "finetune",
        [
            "experiment=demo",
            "logger=none",
            f"trainer.output_dir={tmp_path / 'r'}",
            f"data.train={data}",
            "data.eval=null",
            "evaluation.after_training=false",
            "export.after_training=false",
        ],
        expect_failure=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr and "CalledProcessError" not in result.stderr
    assert "missing media file: 1" in result.stderr
    assert result.stderr.rstrip().endswith("error: training stopped with exit status 2 (the reason is above).")


def test_secrets_in_the_environment_never_reach_the_run_directory(tmp_path):
    secrets = {
        "WANDB_API_KEY": "wandb-secret-0123456789abcdef",
        "HF_TOKEN": "hf_secretTOKEN0123456789",
        "HUGGING_FACE_HUB_TOKEN": "hf_otherSECRET9876543210",
    }
    data = mini_dataset(tmp_path / "train.json", per_task=2)
    run_dir = tmp_path / "run"
    overrides = tiny_run_overrides("qwen2_5_vl", run_dir, data, steps=2) + [
        "logger=wandb",
        "logger.wandb_mode=offline",
        "trainer.save_steps=1",
        "evaluation.after_training=false",
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **secrets}
    for module in ("finetune.train", "finetune.export"):
        result = subprocess.run(
            [sys.executable, "-m", module, *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert not any(s in result.stdout + result.stderr for s in secrets.values())
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any("wandb" in str(p) for p in files) and (run_dir / "merged" / "model.safetensors").exists()
    leaked = [str(p) for p in files if any(s.encode() in p.read_bytes() for s in secrets.values())]
    assert not leaked, leaked


def test_pickled_weights_are_refused_unless_allowed(tmp_path, tiny_paths):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from finetune.base.errors import ConfigError
    from finetune.model.load import load_model
    from finetune.recipe.load import load_config

    folder = tmp_path / "pickled"  # what older tools wrote: pytorch_model.bin (a pickle), no safetensors
    AutoModelForImageTextToText.from_pretrained(tiny_paths["qwen2_5_vl"]).save_pretrained(folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    config = load_config(["experiment=demo", f"model.name_or_path={folder}"])
    with pytest.raises(ConfigError, match="holds pickled weights only .* model.allow_pickled_weights=true"):
        load_model(config.model, "fp32")
    config.model.allow_pickled_weights = True
    assert isinstance(next(load_model(config.model, "fp32").parameters()), torch.Tensor)


def test_evaluation_answers_the_rest_when_a_sample_fails_to_decode(tmp_path):
    data = dataset_with_bad_media(tmp_path)
    run_dir = tmp_path / "run"
    overrides = bad_overrides(run_dir, data, 2) + [f"data.eval={data}", "data.max_bad_samples=3"]
    run_module("finetune.train", overrides)
    result = run_module("finetune.evaluate", overrides)
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert sorted(metrics["unanswered"]) == sorted(BAD_IDS) and metrics["n"] == 16
    records = [json.loads(line) for line in open(run_dir / "eval" / "predictions.jsonl")]
    failed = [r for r in records if r["prediction"] is None]
    assert {r["id"] for r in failed} == BAD_IDS and all("re-" in r["error"] for r in failed)
    assert "cannot ask bad-cut-jpeg" in result.stderr


def test_out_of_gpu_memory_ends_with_the_recipe_values_that_lower_memory(tmp_path, monkeypatch, capsys):
    """A CUDA out-of-memory error in a training step (raised here on the CPU where the GPU would raise it) ends the
    run with exit status 2 and one message naming the step, the batch and the recipe values, no traceback."""
    import torch

    from finetune.cli.main import run_command
    from finetune.training import workflow as train

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)")

    monkeypatch.setattr(train.VisionLanguageSFTTrainer, "compute_loss", out_of_memory)
    train_file = mini_dataset(tmp_path / "train.json", per_task=2)
    overrides = tiny_run_overrides("qwen2_5_vl", tmp_path / "run", train_file, steps=2)
    assert run_command("train", overrides + ["trainer.per_device_train_batch_size=2", "trainer.packing=false"]) == 2
    err = capsys.readouterr().err
    message = err[err.index("error: out of GPU memory") :]
    assert "at step 1, a batch of 2 row(s) x " in message and "Tried to allocate 20.00 GiB" in message
    assert "patches" in message
    for key in (
        "trainer.max_tokens_per_row=",
        "model.video_max_pixels=",
        "trainer.gradient_checkpointing=",
        "deepspeed",
    ):
        assert key in message, key
    assert "Traceback" not in err
