"""Evaluation during training for the RL methods (finetune/training/reward_eval.py): each held-out prompt gets one
greedy completion (the most likely token at every step, on the rollouts' positions and features), scored by the
recipe's rewards with NoScore counted; a prompt whose media fail to decode goes unanswered; the ranks' shares,
gathered, give what one rank gives; the metrics reach the model card and the run summary; data.eval that holds no RL
prompts is refused in one line."""

import json

import pytest
import torch

from finetune.base.errors import DataError
from finetune.data.conversation import Sample
from finetune.data.preference import RewardPrompt, read_preference_file
from finetune.evaluation.rollouts import completion_forward, generate_rollouts
from finetune.recipe.load import load_config
from finetune.records.rundir import RunDir
from finetune.training.periodic_eval import shard
from finetune.training.reward_eval import completion_records, merge_shards, reward_metrics
from tests.helpers import DEMO
from tests.unit.training.test_grpo_trainer import _trainer, by_length, demo_prompts, never_readable

EVAL = ("data.eval=held_out.json", "evaluation.steps=1")  # the recipe's keys; the tests hand over the prompts


def _broken_prompt(tmp_path) -> RewardPrompt:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
    content = [{"type": "image", "image": str(broken)}, {"type": "text", "text": "What colour is the square?"}]
    return RewardPrompt("bad-1", Sample("bad-1", [{"role": "user", "content": content}], "test (bad-1)"), "red")


def test_each_held_out_prompt_gets_one_greedy_completion_scored_by_the_rewards(tmp_path):
    image, video = demo_prompts()
    trainer, _ = _trainer(
        tmp_path,
        *EVAL,
        rewards=((by_length, 2.0), (never_readable, 1.0)),
        eval_prompts=[image, _broken_prompt(tmp_path), video],
    )
    model = trainer.model
    model.eval()
    rollouts = generate_rollouts(
        model, trainer._encoder, [image.prompt, video.prompt], 1, trainer.max_completion_length, greedy=True
    )
    suppressed = [model.config.image_token_id, model.config.video_token_id]
    for rollout in rollouts:  # greedy: every token is the most likely one after the ones before it
        with torch.no_grad():
            logits, _ = completion_forward(model, rollout)
        tokens = rollout.completion_ids[0]
        logits[..., suppressed] = float("-inf")  # placeholders are never generated (nothing stands behind them)
        assert logits[0, : len(tokens)].argmax(-1).tolist() == tokens

    logs = trainer.evaluate()
    records = [json.loads(line) for line in (RunDir(tmp_path).eval_step_dir(0) / "predictions.jsonl").open()]
    assert [r["id"] for r in records] == [image.id, "bad-1", video.id]
    answered = [records[0], records[2]]
    assert [r["completion"] for r in answered] == [rollout.texts[0] for rollout in rollouts]
    assert records[1]["completion"] is None and "bad-1" in json.dumps(records[1]) and records[1]["error"]
    for r, item in zip(answered, (image, video)):
        assert r["solution"] == item.solution and r["prompt"]
        assert r["rewards"] == {"by_length": len(r["completion"]), "never_readable": None}
        assert r["reward"] == pytest.approx(2.0 * len(r["completion"]))  # weighted; a NoScore adds 0
    lengths = [len(r["completion"]) for r in answered]
    assert lengths != [0, 0]  # the rewards had something to score
    assert logs["eval_reward"] == pytest.approx(2.0 * sum(lengths) / 2)
    assert logs["eval_reward/by_length"] == pytest.approx(sum(lengths) / 2)
    assert logs["eval_no_score/never_readable"] == 2 and logs["eval_no_score/by_length"] == 0
    assert "eval_reward/never_readable" not in logs  # nothing scored: no mean
    metrics = json.loads((RunDir(tmp_path).eval_step_dir(0) / "metrics.json").read_text())
    assert metrics["n"] == 2 and metrics["unanswered"] == ["bad-1"]
    # held-out completions are not the run's training completions (rewards.json)
    assert trainer.reward_table.summary() == {n: {"scored": 0, "no_score": 0} for n in ("by_length", "never_readable")}


def test_the_ranks_shares_gathered_equal_one_rank(tmp_path):
    """Every rank scores its share (periodic_eval.shard, the last padded with a repeat); the gathered records, in
    prompt order and each prompt once, and their metrics are those of one rank scoring every prompt."""
    items, _ = read_preference_file(DEMO / "prompts_train.json", "prompts")
    prompts = [*items[:3], *[p for p in items if p.id.startswith("vid")][:2]]  # images and videos
    trainer, _ = _trainer(tmp_path, *EVAL, eval_prompts=prompts)
    names = trainer.reward_table.names
    single = completion_records(trainer, prompts, batch_size=1)
    assert len({r["completion"] for r in single}) > 1  # the prompts are told apart
    for world in (2, 3):
        tagged = []
        for rank in range(world):  # gather_object: the ranks' lists, concatenated in rank order
            indices = shard(len(prompts), rank, world)
            assert len(indices) == -(-len(prompts) // world)  # as many on every rank: lockstep generation
            tagged += list(zip(indices, completion_records(trainer, [prompts[i] for i in indices], batch_size=1)))
        gathered = merge_shards(tagged)
        assert gathered == single, world
        assert reward_metrics(gathered, names, 3) == reward_metrics(single, names, 3)


def test_the_held_out_metrics_reach_the_model_card_and_the_run_summary(tmp_path):
    from finetune.exporting.serving import model_card
    from finetune.runs.run_summary import summary

    records = [
        {"id": "a", "completion": "red", "finished": True, "reward": 1.5, "rewards": {"exact": 1.0, "opt": 1.0}},
        {"id": "b", "completion": "x", "finished": False, "reward": 0.0, "rewards": {"exact": 0.0, "opt": None}},
        {"id": "c", "completion": None, "error": "cannot decode"},
    ]
    metrics = reward_metrics(records, ["exact", "opt"], 7)
    assert metrics["n"] == 2 and metrics["reward"] == pytest.approx(0.75) and metrics["unanswered"] == ["c"]
    assert metrics["rewards"]["opt"] == {"mean": 1.0, "scored": 1, "no_score": 1}
    assert metrics["rewards"]["exact"] == {"mean": 0.5, "scored": 2, "no_score": 0}
    config = load_config(["method=grpo", "method.rewards=[choice]", "trainer.per_device_train_batch_size=8",
                          "logger=none", f"trainer.output_dir={tmp_path}"])  # fmt: skip
    card = model_card(config, {"metrics": metrics})
    assert "| opt | 2 | 1.000 | 1 |" in card and "| weighted total | 2 | 0.750 | |" in card
    run = RunDir(tmp_path)
    run.eval_dir.mkdir()
    run.metrics_file.write_text(json.dumps(metrics))
    line = (
        f"  evaluation:  {run.metrics_file}  (mean reward 0.750 over 2 prompts (exact 0.500; opt 1.000, 1 not scored))"
    )
    assert line in summary(config).splitlines()


@pytest.mark.parametrize("held_out", ["test.json", "pairs_test.json"])  # SFT conversations, preference pairs
def test_held_out_data_that_holds_no_rl_prompts_is_refused_in_one_line(held_out):
    from finetune.base.paths import resolve_data_file
    from finetune.training.grpo_trainer import read_reward_prompts

    config = load_config(
        ["method=grpo", "method.rewards=[choice]", "trainer.per_device_train_batch_size=8", "logger=none",
         f"data.eval={DEMO / held_out}", "evaluation.steps=5"]
    )  # fmt: skip
    with pytest.raises(DataError) as err:
        read_reward_prompts(config, None, resolve_data_file, "eval")
    message = str(err.value)
    assert "holds no RL prompts" in message and "'solution'" in message and "\n" not in message
