"""GRPO on 2 ZeRO-3 ranks, started as users start it (`./launch.sh`): rank 0 samples for a text-only prompt, rank 1
for a video prompt; the steps finish (every rank calls the vision tower alike while generating: no hang) and give
what one process gives on the same global batch. A prompt's rollouts depend on the seed, the step and the prompt
only (`VisionLanguageGRPOTrainer.rollout_seed`), so both runs train on the same completions. The same two prompts are
the held-out set (evaluation.steps): rank 0 answers the text-only one, rank 1 the video one, greedily, before the
first step, at step 2 and at the end, and the gathered rewards and completions are those of the one process."""

import json

import pytest

from tests.helpers import DEMO
from tests.integration.test_scale_out import launch_sh, train_here

STEPS, G = 3, 4


@pytest.fixture
def prompts(tmp_path):
    video = next(r for r in json.loads((DEMO / "prompts_train.json").read_text()) if r["task"] == "direction")
    text = {"id": "text-1", "messages": [{"role": "user", "content": "Name a colour."}], "solution": "red"}
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([text, video]))
    return path


def recipe(run_dir, data, processes, *extra):
    return [
        "experiment=demo_grpo",
        "logger=none",
        f"trainer.output_dir={run_dir}",
        f"trainer.max_steps={STEPS}",
        "trainer.logging_steps=1",
        f"trainer.per_device_train_batch_size={2 * G // processes}",  # one prompt's group per rank
        f"accelerate.processes_per_node={processes}",
        f"data.train={data}",
        f"data.media_root={DEMO}",
        f"method.num_generations={G}",
        "method.max_completion_length=4",
        "method.rewards=[edit_distance]",  # graded: every group has spread, so advantages are not all 0
        f"data.eval={data}",
        "evaluation.steps=2",
        "evaluation.batch_size=1",  # one prompt per generate call in both runs: no padding differs between them
        "export.after_training=false",
        *extra,
    ]


def history(run_dir):
    return [h for h in json.loads((run_dir / "log_history.json").read_text()) if "loss" in h]


def test_two_zero3_ranks_text_only_and_video_match_one_process(tmp_path, prompts):
    single, two = tmp_path / "single", tmp_path / "two"
    train_here(recipe(single, prompts, 1))
    _, out, _ = launch_sh(recipe(two, prompts, 2, "deepspeed=zero3"), timeout=420)
    assert "--use_deepspeed" in out
    expected, got = history(single), history(two)
    assert len(expected) == len(got) == STEPS
    for e, g in zip(expected, got):
        for key in ("reward", "completions/mean_length", "rewards/edit_distance/mean"):
            assert g[key] == pytest.approx(e[key], rel=1e-5), (key, e["step"])
        for key in ("grad_norm", "kl", "loss"):
            assert g[key] == pytest.approx(e[key], rel=1e-3, abs=1e-6), (key, e["step"])
    assert expected[-1]["kl"] > 0 and expected[0]["grad_norm"] > 0
    # the run's reward counts, summed over the ranks
    counts = json.loads((two / "rewards.json").read_text())
    assert counts == json.loads((single / "rewards.json").read_text())
    assert sum(counts["edit_distance"].values()) == STEPS * 2 * G  # training's completions, not held-out ones
    # held-out evaluation: at the start, every 2 steps and at the end; the 2 ranks' shares gathered equal one process
    evaluated = [
        [h for h in json.loads((d / "log_history.json").read_text()) if "eval_reward" in h] for d in (single, two)
    ]
    assert [h["step"] for h in evaluated[1]] == [h["step"] for h in evaluated[0]] == [0, 2, STEPS]
    for e, g in zip(*evaluated):
        for key in ("eval_reward", "eval_reward/edit_distance", "eval_no_score/edit_distance"):
            assert g[key] == pytest.approx(e[key], rel=1e-5), (key, e["step"])
    published = [(d / "eval" / "predictions.jsonl").read_text().splitlines() for d in (single, two)]
    assert published[1] == published[0] and len(published[0]) == 2
    assert json.loads((two / "eval" / "metrics.json").read_text())["step"] == STEPS
    assert "evaluation:" in out and "mean reward" in out  # ./launch.sh reports it
