"""Evaluation during training (`evaluation.steps`): generation-based metrics logged mid-run to log_history and
tensorboard, predictions written per evaluation, the last one published as the run's evaluation and equal to
what the standalone `finetune.evaluate` answers with the saved adapter."""

import json

import pytest

from finetune.training.periodic_eval import shard
from tests.helpers.recipe_runs import mini_dataset, tiny_run_overrides


def test_shards_cover_every_sample_with_equal_counts():
    for n in (1, 5, 8, 9):
        for world in (1, 2, 3, 4):
            shards = [shard(n, rank, world) for rank in range(world)]
            assert len({len(s) for s in shards}) == 1  # same number of generate calls on every rank
            assert sorted({i for s in shards for i in s}) == list(range(n))


def test_metrics_are_logged_mid_run_and_match_the_standalone_evaluation(tmp_path, caplog):
    """The train and evaluate commands in this process (their command lines are tested elsewhere)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from finetune.cli.main import run_command

    train_file = mini_dataset(tmp_path / "train.json")
    run_dir = tmp_path / "run"
    overrides = tiny_run_overrides("qwen2_5_vl", run_dir, train_file, steps=5) + [
        "evaluation.steps=2",
        "logger=tensorboard",
        "evaluation.batch_size=3",
    ]
    with caplog.at_level("INFO", logger="finetune.train"):
        assert run_command("train", overrides) == 0
    assert "evaluating on 8 held-out samples every 2 steps and at the end" in caplog.text

    history = json.loads((run_dir / "log_history.json").read_text())
    evaluated = [h["step"] for h in history if "eval_exact_match" in h]
    assert evaluated == [2, 4, 5]  # every 2 steps, then at the end
    entry = next(h for h in history if "eval_exact_match" in h)
    assert {"eval_token_f1", "eval_chance", "eval_colour_exact_match", "eval_direction_token_f1"} <= set(entry)
    assert entry["eval_chance"] == pytest.approx((4 / 2 + 4 / 3) / 8)  # colour: 2 distinct answers, direction: 3

    events = [EventAccumulator(str(f)).Reload() for f in run_dir.rglob("events.out.tfevents.*")]
    steps = sorted(
        e.step for acc in events if "eval/exact_match" in acc.Tags()["scalars"] for e in acc.Scalars("eval/exact_match")
    )
    assert steps == [2, 4, 5]

    for step in (2, 4, 5):
        records = [json.loads(line) for line in open(run_dir / "eval" / f"step-{step}" / "predictions.jsonl")]
        assert len(records) == 8 and set(records[0]) == {"id", "task", "question", "reference", "prediction"}
    final = [json.loads(line) for line in open(run_dir / "eval" / "predictions.jsonl")]
    assert final == [json.loads(line) for line in open(run_dir / "eval" / "step-5" / "predictions.jsonl")]

    assert run_command("evaluate", overrides) == 0  # the saved adapter, loaded afresh
    standalone = [json.loads(line) for line in open(run_dir / "eval" / "predictions.jsonl")]
    assert [r["prediction"] for r in standalone] == [r["prediction"] for r in final]
    assert len({r["prediction"] for r in final}) > 1  # a test of equal answers needs answers that differ
