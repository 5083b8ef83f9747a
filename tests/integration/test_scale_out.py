"""Several processes on the CPU, started the way users start them (`./launch.sh`, i.e. `accelerate launch`):
DDP and DeepSpeed ZeRO-3 reproduce the single-process losses, a rehearsed 2-node ZeRO-3 run saves a loadable
adapter and exports, ranks with different modalities do not hang, and killed runs resume exactly.

Every run: the tiny Qwen2.5-VL, 8 image + 8 video samples packed into rows of <= 128 tokens, 2 rows per step
(one per rank, or both on the single process), 6 steps, so 2 epochs. The per-family tests train on text, image and
video samples together, one family per distinct path (tests/helpers/family_paths.py: one-block and timestamped
videos, DeepStack, both expert layouts, linear attention); what differs between families inside a rank is tested for
every family in this process (tests/unit: packing, positions, one vision call per forward, the saved adapter).
"""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from finetune.base.families import FAMILIES
from tests.helpers import REPO
from tests.helpers.family_paths import FAMILY_PER_PATH
from tests.helpers.recipe_runs import mini_dataset, tiny_run_overrides

KILL_AT, STEPS = 4, 6


def _run(cmd, env_extra=None, timeout=420, expect_ok=True):
    """Run a command in its own process group; on timeout kill the whole group and fail (never hang)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "FINETUNE_VENV": sys.prefix, **(env_extra or {})}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{cmd[:4]} did not finish within {timeout}s (hung):\n{err[-4000:]}") from None
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{out[-3000:]}\n{err[-6000:]}")
    return proc.returncode, out, err


def launch_sh(overrides, env_extra=None, timeout=420):
    return _run(["bash", str(REPO / "launch.sh"), *overrides], env_extra, timeout)


def harness(overrides, env_extra, timeout=420, expect_ok=True):
    """tests/helpers/distributed_harness.py under the same `accelerate launch` options ./launch.sh would use."""
    from finetune.recipe.load import load_config
    from finetune.runs.launch import accelerate_args

    args = accelerate_args(load_config(overrides), {}, 0, "fp32")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *args,
        "tests/helpers/distributed_harness.py",
        *overrides,
    ]
    return _run(cmd, {"DS_ACCELERATOR": "cpu", **env_extra}, timeout, expect_ok)


def losses(run_dir):
    history = json.loads((run_dir / "log_history.json").read_text())
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def train_here(overrides):
    """A one-process reference run in this process: what is compared is the multi-process run, started as users start
    it; the one-process launch has tests of its own (tests/integration/test_demo_end_to_end.py, test_experiments.py)."""
    from finetune.cli.main import run_command

    assert run_command("train", overrides) == 0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return mini_dataset(tmp_path_factory.mktemp("scale_out") / "train.json", per_task=8)


def recipe(run_dir, data, processes, *extra, family="qwen2_5_vl"):
    return tiny_run_overrides(family, run_dir, data, steps=STEPS) + [
        "trainer.packing=true",
        "trainer.max_tokens_per_row=128",
        "data.max_length=128",
        f"trainer.per_device_train_batch_size={2 // processes}",
        f"accelerate.processes_per_node={processes}",
        "trainer.save_steps=2",
        "evaluation.after_training=false",
        "export.after_training=false",
        *extra,
    ]


VISION_TRAINING = (
    "parts.vision_tower=lora",
    "parts.merger=full",
    "parts.vision_tower_lr=1e-3",
    "trainer.gradient_checkpointing_vision_tower=true",
)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, data):
    """The 1-process losses of a recipe variant, run once per module."""
    runs = {}

    def losses_for(*extra):
        if extra not in runs:
            run_dir = tmp_path_factory.mktemp("single")
            train_here(recipe(run_dir, data, 1, *extra))
            runs[extra] = losses(run_dir)
        return runs[extra]

    return losses_for


@pytest.mark.parametrize("backend", ["ddp", "zero3", "zero3_vision_training"])
def test_two_processes_match_the_single_process_losses(tmp_path, data, single_process, backend):
    """Same global batch (2 rows), split over 2 ranks: the same losses. Every run checkpoints activations (DDP
    non-reentrant, ZeRO-3 with LoRA reentrant, see finetune/model/trainable.py), so DDP and ZeRO-3 on the LLM share one
    single-process reference; the vision variant adds ViT LoRA and a fully trained merger at their own rates."""
    extra = {
        "ddp": ("trainer.gradient_checkpointing=true",),
        "zero3": ("trainer.gradient_checkpointing=true",),
        "zero3_vision_training": ("trainer.gradient_checkpointing=true", *VISION_TRAINING),
    }[backend]
    backend_options = ["deepspeed=zero3"] if backend.startswith("zero3") else []
    _, out, err = launch_sh(recipe(tmp_path, data, 2, *backend_options, *extra))
    assert "--num_processes 2" in out and ("--use_deepspeed" in out) == backend.startswith("zero3")
    if backend.startswith("zero3"):
        assert "activation checkpointing (reentrant) on the LLM" in err and "deepspeed.zero.Init" in err
    expected = single_process(*extra)
    assert len(expected) == STEPS
    assert losses(tmp_path) == pytest.approx(expected, abs=1e-4)


def text_records(count: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": str(2 * i)},
            ]
        }
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    """4 image, 4 video and 4 text-only samples, interleaved: packed rows of text, images and videos together."""
    path = mini_dataset(tmp_path_factory.mktemp("mixed") / "train.json", per_task=4)
    media = json.loads(path.read_text())
    texts = text_records(4)
    path.write_text(json.dumps([r for i in range(4) for r in (media[2 * i], media[2 * i + 1], texts[i])]))
    return path


# LoRA on the LLM (Qwen3-VL-MoE: attention and every expert), every merger trained fully (Qwen3-VL: DeepStack's too),
# activation checkpointing (reentrant under ZeRO-3 with LoRA).
FAMILY_TRAINING = ("trainer.gradient_checkpointing=true", "parts.merger=full")


# Qwen2.5-VL (the one-block path): test_two_processes_match_the_single_process_losses; its text-only rows on a rank of
# their own: test_every_rank_computes_every_trained_gradient.
@pytest.mark.parametrize("family", [f for f in FAMILY_PER_PATH if f != "qwen2_5_vl"])
def test_two_zero3_processes_match_one_on_mixed_rows(tmp_path, mixed_data, family):
    """Each path: the same global batch of packed text/image/video rows on one process (no DeepSpeed) and split
    over 2 ZeRO-3 ranks gives the same losses; the trained mergers (DeepStack's included) end up in the adapter."""
    from safetensors import safe_open

    single, two = tmp_path / "single", tmp_path / "two"
    train_here(recipe(single, mixed_data, 1, *FAMILY_TRAINING, family=family))
    _, out, err = launch_sh(recipe(two, mixed_data, 2, "deepspeed=zero3", *FAMILY_TRAINING, family=family))
    assert "--use_deepspeed" in out and "activation checkpointing (reentrant) on the LLM" in err
    expected = losses(single)
    assert len(expected) == STEPS
    assert losses(two) == pytest.approx(expected, abs=1e-4)
    entry = FAMILIES[family]
    with safe_open(str(two / "adapter" / "adapter_model.safetensors"), "pt") as f:
        saved = list(f.keys())
    for merger in entry.mergers:
        assert any(f".{entry.vision_tower}.{merger}." in k for k in saved), merger
    if entry.expert_lora_targets:
        assert any(".experts." in k and "lora_" in k for k in saved)


@pytest.mark.parametrize("family", FAMILY_PER_PATH)
def test_every_rank_computes_every_trained_gradient_and_evaluates_in_lockstep(tmp_path, family):
    """Rank 0 trains on text-only rows, rank 1 on video rows, under ZeRO-3 with LoRA (Qwen3-VL-MoE: on the experts
    too), every merger trained and both towers checkpointed: every collective pairs up (bounded: fails, never hangs),
    at every step each rank's own backward computes the gradient of every trainable weight (the DeepStack mergers'
    on the text-only rank included: one vision call per rank, finetune/training/vision_sync.py), and the LoRA and
    merger gradients are non-zero where the rank's data reaches them.
    The same run evaluates every 2 steps (evaluation.steps): each rank generates for its share of the held-out text
    and video samples in lockstep (synced generate, one vision-tower call per forward), nothing hangs, and the gathered
    predictions equal those of the standalone single-process evaluation of the saved adapter. (One run per path for
    both: each 2-rank launch costs ~20 s of imports and start-up on the CPU.)"""
    from safetensors import safe_open

    from finetune.model.tiny import TEXT_DIMS
    from tests.helpers import DEMO
    from tests.helpers.recipe_runs import run_module

    records = json.loads((DEMO / "train.json").read_text())
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(text_records(4) + [r for r in records if r["task"] == "direction"][:4]))
    overrides = recipe(
        tmp_path / "run",
        data,
        2,
        "deepspeed=zero3",
        "trainer.max_steps=4",
        "evaluation.steps=2",
        "evaluation.batch_size=3",
        *FAMILY_TRAINING,
        "parts.vision_tower=lora",
        "trainer.gradient_checkpointing_vision_tower=true",
        family=family,
    )
    grads = tmp_path / "grads"
    grads.mkdir()
    _, _, err = harness(overrides, {"HARNESS_SPLIT_MODALITIES": "1", "HARNESS_GRADS_DIR": str(grads)}, timeout=300)
    # A new dataset: each rank counts half of its records (finetune/data/store.py) and they exchange the counts.
    assert "token pre-pass mixed.json (rank 0: 4 of 8)" in err and "token pre-pass mixed.json (rank 1: 4 of 8)" in err
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4]
    entry = FAMILIES[family]
    with safe_open(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"), "pt") as f:
        weights = {k: f.get_tensor(k) for k in f.keys()}
    # ViT LoRA B starts at zero: non-zero means gradients reached it through reentrant-checkpointed ViT blocks.
    vit_lora_b = [t for k, t in weights.items() if f".{entry.vision_tower}.blocks." in k and "lora_B" in k]
    assert vit_lora_b and all(t.abs().max() > 0 for t in vit_lora_b)
    for merger in entry.mergers:
        assert any(f".{entry.vision_tower}.{merger}." in k for k in weights), merger
    for rank, modality in ((0, "text"), (1, "video")):
        steps = [json.loads(line) for line in (grads / f"rank-{rank}.jsonl").read_text().splitlines()]
        assert [s["step"] for s in steps] == [1, 2, 3, 4]
        for step in steps:
            trainable, computed, nonzero = set(step["trainable"]), set(step["computed"]), set(step["nonzero"])
            assert computed == trainable, (rank, sorted(trainable - computed)[:5])
            by_merger = {
                m: {n for n in trainable if f".{entry.vision_tower}.{m}." in n} for m in entry.mergers
            }  # Qwen3-VL: `merger` and `deepstack_merger_list` (each DeepStack merger wrapped on its own)
            assert all(by_merger.values()), {m: len(names) for m, names in by_merger.items()}
            # LoRA B starts at zero, so A's gradient is zero in step 1; B's is not wherever the data reaches it
            llm_lora = {n for n in trainable if ".language_model." in n and ("lora_B" in n or step["step"] > 1)}
            assert llm_lora and llm_lora <= nonzero, (rank, sorted(llm_lora - nonzero)[:5])
            if entry.expert_lora_targets:
                assert any(".experts." in n for n in llm_lora)
            if modality == "video":  # the video rank's media reach the merger and the DeepStack mergers that feed
                # a layer before the last: DeepStack merger i's features join layer i's output at the video's own
                # positions, which carry no label, so after the last layer nothing reads them (gradient 0 everywhere)
                last = f".deepstack_merger_list.{TEXT_DIMS['num_hidden_layers'] - 1}."
                reached = {n for n in set().union(*by_merger.values()) if last not in n}
                assert reached <= nonzero, sorted(reached - nonzero)[:5]

    history = json.loads((tmp_path / "run" / "log_history.json").read_text())
    assert [h["step"] for h in history if "eval_exact_match" in h] == [2, 4]
    in_training = [json.loads(line) for line in open(tmp_path / "run" / "eval" / "predictions.jsonl")]
    run_module("finetune.evaluate", overrides)
    standalone = [json.loads(line) for line in open(tmp_path / "run" / "eval" / "predictions.jsonl")]
    assert len(in_training) == 8 and in_training == standalone


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rehearsed_two_node_zero3_run_saves_a_loadable_adapter_and_exports(tmp_path, data):
    """Two ./launch.sh invocations on this machine, NNODES=2 and NODE_RANK=0/1, one process each."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from finetune.model.tiny import tiny_checkpoint

    overrides = recipe(tmp_path, data, 1, "deepspeed=zero3", "trainer.max_steps=2", "export.after_training=true")
    env = {"NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    nodes = [
        subprocess.Popen(
            ["bash", str(REPO / "launch.sh"), *overrides],
            cwd=REPO,
            start_new_session=True,
            env={**os.environ, **env, "NODE_RANK": str(rank), "FINETUNE_VENV": sys.prefix},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=420) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, f"{out[-2000:]}\n{err[-5000:]}"
    assert "--num_machines 2" in outputs[1][0] and "--machine_rank 1" in outputs[1][0]
    assert "merged:" in outputs[0][0] and "merged:" not in outputs[1][0]  # node 0 exports, node 1 only trains
    assert sorted(losses(tmp_path)) == [1, 2]

    # The adapter holds full-shape weights gathered from the partitions, and loads in one plain process.
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    base = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint("qwen2_5_vl"))
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    weights = dict(model.named_parameters())
    assert saved and all(t.numel() > 0 for t in saved.values())
    for key, tensor in saved.items():
        loaded = weights[key.replace(".weight", ".default.weight")]
        assert loaded.shape == tensor.shape and torch.equal(loaded.detach(), tensor)
    assert any(t.abs().max() > 0 for k, t in saved.items() if "lora_B" in k)  # it trained
    report = json.loads((tmp_path / "merged" / "export_report.json").read_text())
    assert report["max_abs_logit_diff"] < 1e-4


def test_a_killed_zero3_run_resumes_with_the_uninterrupted_losses(tmp_path, data):
    """2 ranks under ZeRO-3: SIGKILL right after checkpoint-4, resume with trainer.resume_from_checkpoint=latest:
    steps 5-6 equal an uninterrupted run's. Dropout is on, so the RNG state must be restored too; step 4 is
    mid-epoch, so is the data position. (One process killed and resumed, with dropout and mid-epoch:
    tests/integration/test_faults.py, test_a_kill_while_a_checkpoint_is_written_never_leaves_one_that_resume_loads.)"""
    processes, extra = 2, ["deepspeed=zero3", "peft.dropout=0.1"]
    uninterrupted = tmp_path / "uninterrupted"
    launch_sh(recipe(uninterrupted, data, processes, *extra))
    run_dir = tmp_path / "killed"
    code, _, _ = harness(
        recipe(run_dir, data, processes, *extra), {"HARNESS_KILL_AT_STEP": str(KILL_AT)}, expect_ok=False
    )
    assert code != 0 and (run_dir / f"checkpoint-{KILL_AT}").is_dir() and not (run_dir / "adapter").exists()
    _, _, err = launch_sh(recipe(run_dir, data, processes, *extra, "trainer.resume_from_checkpoint=latest"))
    assert f"resuming from {run_dir / f'checkpoint-{KILL_AT}'}" in err
    expected, resumed = losses(uninterrupted), losses(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(KILL_AT + 1, STEPS + 1):
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6), step
    assert expected[KILL_AT + 1] != pytest.approx(expected[KILL_AT], abs=1e-3)  # the steps do differ


def test_a_rank_that_dies_ends_the_job_quickly_with_a_clear_message(tmp_path, data):
    """Rank 1 is SIGKILLed at step 3 of a 2-rank DDP run: the job ends within a bounded time (the launcher stops the
    other rank instead of letting it wait in a collective), and our launcher summarises it in one line."""
    import time

    from finetune.runs.launcher_output import LauncherTracebackFilter, summary

    start = time.monotonic()
    rc, _, err = harness(recipe(tmp_path, data, 2), {"HARNESS_KILL_RANK": "1:3"}, timeout=300, expect_ok=False)
    assert rc != 0 and time.monotonic() - start < 150
    kept = []
    filtered = LauncherTracebackFilter(kept.append)
    filtered.feed(err.encode())
    filtered.close()
    assert b"ChildFailedError" not in b"".join(kept) and "ChildFailedError" in err
    assert (
        summary(filtered.failure, rc)
        == "training process (rank 1) was killed by SIGKILL; the other processes were stopped."
    )


def test_bad_samples_are_skipped_alike_on_every_rank_and_worker(tmp_path):
    """2-rank DDP, one data-loader worker per rank, 3 samples whose media fail to decode: every step is taken on both
    ranks (losses logged for all of them), and the three are reported once each."""
    from finetune.records.rundir import RunDir
    from tests.helpers.broken_media import BAD_IDS, bad_overrides, dataset_with_bad_media

    data = dataset_with_bad_media(tmp_path)
    overrides = bad_overrides(
        tmp_path / "run",
        data,
        6,
        "accelerate.processes_per_node=2",
        "trainer.per_device_train_batch_size=2",
        "trainer.dataloader_num_workers=1",
    )
    launch_sh(overrides)
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4, 5, 6]
    reported = [json.loads(line) for line in open(RunDir(tmp_path / "run").bad_samples_file)]
    assert {r["id"] for r in reported} == BAD_IDS


def test_streaming_on_two_ranks_with_workers_takes_every_step(tmp_path, data):
    """data.streaming=true under 2 DDP ranks with a DataLoader worker each: every step is taken on both ranks (the
    stream never runs dry) and the run ends normally."""
    launch_sh(recipe(tmp_path / "run", data, 2, "data.streaming=true", "trainer.dataloader_num_workers=1"))
    assert sorted(losses(tmp_path / "run")) == list(range(1, STEPS + 1))
