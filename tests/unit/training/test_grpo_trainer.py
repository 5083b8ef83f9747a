"""The GRPO trainer (finetune/training/grpo_trainer.py): TRL's GRPO loss on the log-probs of our forward equals the
formula by hand (grpo, dapo, GSPO's sequence-level ratio) on fixed rollouts and rewards; the reference with the
adapter off is the base model; a few steps train, with one tower call per prompt per step, and log finite KL,
rewards and generation's log-prob gap; a reward without a score is counted and logged; a prompt whose media fail to
decode is skipped and counted as SFT's bad samples are."""

import json
import math

import pytest
import torch

from finetune.base.families import FAMILIES
from finetune.data.conversation import Sample
from finetune.data.preference import RewardPrompt, read_preference_file
from finetune.evaluation.rewards import NoScore, RewardTable
from finetune.evaluation.rollouts import completion_logprobs
from finetune.model.load import load_model, load_processor
from finetune.model.rope import inner_model
from finetune.model.trainable import make_trainable
from finetune.recipe.data_settings import conversation_encoder
from finetune.recipe.load import load_config
from finetune.records.rundir import RunDir
from finetune.training.grpo_trainer import VisionLanguageGRPOTrainer, build_grpo_config
from tests.helpers import DEMO
from tests.helpers.lora import move_lora
from tests.helpers.recipe_runs import EXPERIMENT
from tests.helpers.tolerance import assert_close_to_scale

G, PROMPTS = 4, 2  # a step: one image prompt and one video prompt, 4 completions each


def by_length(completion: str, solution, **extras) -> float:
    """A reward with spread inside every group: the completion's length in characters."""
    return float(len(completion))


def never_readable(completion: str, solution, **extras):
    return NoScore


def demo_prompts() -> list[RewardPrompt]:
    items, problems = read_preference_file(DEMO / "prompts_train.json", "prompts")
    assert not problems
    image = next(p for p in items if p.id.startswith("img"))
    video = next(p for p in items if p.id.startswith("vid"))
    return [image, video]


def _trainer(tmp_path, *overrides, rewards=((by_length, 1.0),), prompts=None, eval_prompts=None):
    config = load_config(
        [
            "method=grpo",
            "method.rewards=[exact_match]",  # the recipe's list; the tests hand the trainer their own table
            f"method.num_generations={G}",
            "method.max_completion_length=4",
            "logger=none",
            f"trainer.output_dir={tmp_path}",
            f"trainer.per_device_train_batch_size={G * PROMPTS}",
            "trainer.gradient_accumulation_steps=1",
            "trainer.max_steps=3",
            "trainer.logging_steps=1",
            "trainer.save_steps=1000",
            "trainer.dataloader_num_workers=0",
            "trainer.learning_rate=1e-2",
            "trainer.packing=false",
            "trainer.gradient_checkpointing=false",
            "parts.llm=lora",
            "parts.vision_tower=frozen",
            "parts.merger=frozen",
            "peft.dropout=0.0",
            *overrides,
        ]
    )
    processor = load_processor(config.model)
    torch.manual_seed(0)
    model = make_trainable(load_model(config.model, "fp32"), config)
    trainer = VisionLanguageGRPOTrainer(
        model=model,
        args=build_grpo_config(config, "fp32", tmp_path),
        processing_class=processor,
        encoder=conversation_encoder(processor, config, for_training=False),
        prompts=prompts or demo_prompts(),
        rewards=RewardTable(list(rewards)),
        recipe=config,
        eval_prompts=eval_prompts,
    )
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop; the tests call the loss directly
    return trainer, config


def _batch(trainer):
    """One generation batch as TRL's sampler hands it: each prompt index G times in a row."""
    torch.manual_seed(1)
    return trainer._generate_and_score_completions([{"index": i} for i in range(PROMPTS) for _ in range(G)])


def _by_hand(trainer, inputs, loss_type, level, beta, eps_low, eps_high):
    """TRL's GRPO objective written out on our per-token log-probs (finetune/evaluation/rollouts.py's
    completion_logprobs, one rollout at a time), the reference with the adapter off."""
    model = trainer.model
    slots = inputs["slots"]
    rollouts = list({id(r): r for r, _ in slots}.values())
    with torch.no_grad():
        policy = {id(r): completion_logprobs(model, r, trainer.temperature) for r in rollouts}
        with model.disable_adapter():
            ref = {id(r): completion_logprobs(model, r, trainer.temperature) for r in rollouts}
    rewards = torch.tensor([by_length(r.texts[k], None) for r, k in slots]).view(-1, G)
    advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).flatten()
    old = inputs["old_per_token_logps"]
    per_sequence, token_sum, tokens = [], 0.0, 0
    for i, (rollout, k) in enumerate(slots):
        logp, ref_logp = policy[id(rollout)][k], ref[id(rollout)][k]
        n = len(logp)
        log_ratio = logp - old[i, :n]
        if level == "sequence":
            log_ratio = log_ratio.mean().expand(n)
        ratio = log_ratio.exp()
        a = advantages[i]
        loss = -torch.minimum(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
        # TRL's use_bias_correction_kl (on by default): the KL estimate weighted by the importance ratio
        loss = loss + beta * (torch.exp(ref_logp - logp) - (ref_logp - logp) - 1) * ratio
        per_sequence.append(loss.sum() / n)
        token_sum, tokens = token_sum + loss.sum(), tokens + n
    if loss_type == "grpo":
        return torch.stack(per_sequence).mean(), advantages
    return token_sum / tokens, advantages  # dapo: over the batch's completion tokens


@pytest.mark.parametrize(
    "method, loss_type, level, beta",
    [("grpo", "grpo", "token", 0.04), ("dapo", "dapo", "token", 0.0), ("gspo", "grpo", "sequence", 0.0)],
)
def test_the_loss_is_trls_formula_on_our_log_probs(tmp_path, method, loss_type, level, beta):
    # GSPO's own epsilons are 3e-4 / 4e-4; wider ones here let the clipped and unclipped sequences both occur.
    trainer, config = _trainer(
        tmp_path,
        f"method={method}",
        "method.epsilon=0.05",
        "method.epsilon_high=0.08",
        "method.steps_per_generation=1",
        "method.mask_truncated_completions=false",  # a random model rarely ends: DAPO's filter would leave nothing
    )
    assert (trainer.loss_type, trainer.importance_sampling_level, trainer.beta) == (loss_type, level, beta)
    move_lora(trainer.model, 0.05)
    inputs = _batch(trainer)
    # Log-probs at sampling time a step away from the policy's, so that the ratios move off 1 and some clip.
    torch.manual_seed(2)
    with torch.no_grad():
        current, _ = trainer.token_logps(trainer.model, inputs["slots"], inputs["completion_ids"].shape[1])
    inputs["old_per_token_logps"] = current + 0.1 * torch.randn_like(current) * inputs["completion_mask"]
    expected, advantages = _by_hand(trainer, inputs, loss_type, level, beta, 0.05, 0.08)
    assert_close_to_scale(inputs["advantages"], advantages, rel=1e-5)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, inputs)
    assert math.isfinite(loss.item()) and abs(expected.item()) > 1e-4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    clipped = trainer._metrics["train"]["clip_ratio/region_mean"][-1]
    assert 0 < clipped < 1  # the clipping took part


def test_dapo_leaves_completions_cut_at_the_length_limit_out_of_the_loss(tmp_path):
    trainer, _ = _trainer(tmp_path, "method=dapo")
    inputs = _batch(trainer)
    finished = [rollout.finished[k] for rollout, k in inputs["slots"]]
    assert not all(finished)  # a random model at 4 tokens: most are cut
    for row, done in zip(inputs["completion_mask"], finished):
        assert bool(row.any()) == done


def test_the_reference_with_the_adapter_off_is_the_base_model(tmp_path):
    trainer, config = _trainer(tmp_path)
    move_lora(trainer.model, 0.05)
    inputs = _batch(trainer)
    base = load_model(config.model, "fp32")  # no adapter at all
    for i, (rollout, k) in enumerate(inputs["slots"]):
        with torch.no_grad():
            expected = completion_logprobs(base, rollout, trainer.temperature, reuse_features=False)[k]
        n = len(expected)
        assert_close_to_scale(inputs["ref_per_token_logps"][i, :n], expected, rel=1e-5)
    with torch.no_grad():  # and the policy is not: the adapter moved it
        policy, _ = trainer.token_logps(trainer.model, inputs["slots"], inputs["completion_ids"].shape[1])
    assert not torch.allclose(policy, inputs["ref_per_token_logps"], rtol=1e-3, atol=1e-4)


def test_a_few_steps_train_with_one_tower_call_per_prompt_and_log_kl_and_rewards(tmp_path):
    trainer, _ = _trainer(tmp_path)
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    calls = []
    handle = inner_model(trainer.model).visual.register_forward_hook(lambda *args: calls.append(1))
    try:
        trainer.train()
    finally:
        handle.remove()
    # A frozen tower: generation encodes each prompt's media once; the policy and reference forwards reuse them.
    assert len(calls) == 3 * PROMPTS
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        for key in ("loss", "kl", "reward", "rewards/by_length/mean", "entropy", "completions/mean_length"):
            assert math.isfinite(h[key]), (key, h)
        assert h["rewards/by_length/no_score"] == 0
        # generation's log-probs and the trainer's forward agree: the same positions, features and tokens
        assert h["sampling/sampling_logp_difference/max"] < 1e-4
        # the step's timing (the GPU benchmark's grpo mode): generation is part of the step, its tokens counted
        assert 0 < h["timing/rollout_s"] < h["timing/step_s"]
        assert h["timing/train_s"] == pytest.approx(h["timing/step_s"] - h["timing/rollout_s"], abs=2e-4)
        assert h["timing/rollout_share"] == pytest.approx(h["timing/rollout_s"] / h["timing/step_s"], abs=1e-3)
        generated = PROMPTS * G * h["completions/mean_length"]  # one step per log: this step's completion tokens
        assert h["rollout/tokens_per_second"] == pytest.approx(generated / h["timing/rollout_s"], rel=1e-2)
    assert logs[0]["kl"] == 0  # the first step: policy = reference
    assert logs[-1]["kl"] > 0
    moved = [n for n, p in trainer.model.named_parameters() if n in lora and not torch.equal(p, lora[n])]
    assert moved
    counts = json.loads(RunDir(tmp_path).rewards_file.read_text())
    assert counts == {"by_length": {"scored": 3 * PROMPTS * G, "no_score": 0}}


def test_a_reward_without_a_score_is_counted_logged_and_summarised(tmp_path):
    """... in training and on the held-out prompts (evaluation.steps: before the first step and at the last, which is
    evaluated once, published to eval/ and named in the run summary; their completions are not in rewards.json)."""
    from finetune.runs.run_summary import summary
    from finetune.training.reward_eval import finish_reward_evaluation

    trainer, config = _trainer(
        tmp_path,
        "trainer.max_steps=1",
        "data.eval=held_out.json",  # the recipe's key; the test hands the trainer its prompts
        "evaluation.steps=1",
        rewards=((by_length, 1.0), (never_readable, 1.0)),
        eval_prompts=demo_prompts(),
    )
    trainer.train()
    [log] = [h for h in trainer.state.log_history if "loss" in h]
    assert log["rewards/never_readable/no_score"] == PROMPTS * G
    assert "rewards/never_readable/mean" not in log  # no completion scored: no mean to show
    assert log["rewards/by_length/no_score"] == 0
    counts = json.loads(RunDir(tmp_path).rewards_file.read_text())
    assert counts["never_readable"] == {"scored": 0, "no_score": PROMPTS * G}  # training's completions only

    start, held_out = [h for h in trainer.state.log_history if "eval_reward" in h]
    assert (start["step"], held_out["step"]) == (0, 1) and held_out["eval_no_score/never_readable"] == 2
    assert "eval_reward/never_readable" not in held_out and "reward" not in held_out  # no training metric in it
    assert held_out["eval_reward"] == pytest.approx(held_out["eval_reward/by_length"], rel=1e-6)
    finish_reward_evaluation(trainer, tmp_path)  # the last step was evaluated: published, not evaluated again
    assert len([h for h in trainer.state.log_history if "eval_reward" in h]) == 2
    run = RunDir(tmp_path)
    assert run.metrics() == json.loads((run.eval_step_dir(1) / "metrics.json").read_text())
    assert (run.eval_dir / "predictions.jsonl").read_text() == (run.eval_step_dir(1) / "predictions.jsonl").read_text()

    run.adapter.mkdir(exist_ok=True)
    text = summary(config)
    assert f"never_readable: 0 completions scored, {PROMPTS * G} not scored (100%)" in text
    assert f"evaluation:  {run.metrics_file}  (mean reward {held_out['eval_reward']:.3f} over 2 prompts" in text


def test_a_prompt_whose_media_fail_to_decode_is_skipped_and_counted(tmp_path):
    good, _ = demo_prompts()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
    content = [{"type": "image", "image": str(broken)}, {"type": "text", "text": "What colour is the square?"}]
    bad = RewardPrompt("bad-1", Sample("bad-1", [{"role": "user", "content": content}], "test (bad-1)"), "red")
    trainer, _ = _trainer(tmp_path, "trainer.max_steps=1", prompts=[good, bad])
    inputs = _batch(trainer)
    rows = slice(G, 2 * G)  # the bad prompt's group: a stand-in the loss never sees
    assert int(inputs["completion_mask"][rows].sum()) == 0 and torch.all(inputs["advantages"][rows] == 0)
    assert int(inputs["completion_mask"][:G].sum()) > 0
    trainer._pending_bad.clear()
    trainer.train()
    [entry] = [json.loads(line) for line in RunDir(tmp_path).bad_samples_file.read_text().splitlines()]
    assert entry["id"] == "bad-1" and entry["step"] == 1
    assert trainer._guard.bad_total == 1


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "qwen2_5_vl"])  # qwen2_5_vl: the tests above
def test_a_step_on_every_family_reuses_generations_features_and_log_probs(tmp_path, family):
    """An image and a video prompt on each family's tiny model: one tower call per prompt (generation's), and the
    trainer's forward gives generation's log-probs (the same positions and features)."""
    trainer, _ = _trainer(tmp_path, f"experiment={EXPERIMENT[family]}", "trainer.max_steps=1")
    calls = []
    handle = inner_model(trainer.model).visual.register_forward_hook(lambda *args: calls.append(1))
    try:
        trainer.train()
    finally:
        handle.remove()
    assert len(calls) == PROMPTS
    [log] = [h for h in trainer.state.log_history if "loss" in h]
    assert math.isfinite(log["loss"]) and math.isfinite(log["reward"]) and log["grad_norm"] > 0
    assert log["sampling/sampling_logp_difference/max"] < 1e-4


@pytest.mark.parametrize("method", ["dapo", "dr_grpo", "gspo"])
def test_each_preset_trains(tmp_path, method):
    """The presets as shipped; GSPO's 4 optimizer steps per generation batch keep the sampling-time log-probs (the
    policy moves between its mini-batches), and its sequence-level ratio then leaves 1."""
    items, _ = read_preference_file(DEMO / "prompts_train.json", "prompts")
    trainer, _ = _trainer(tmp_path, f"method={method}", "trainer.max_steps=4", prompts=items[:16])
    generations = []
    original = trainer._generate_and_score_completions
    trainer._generate_and_score_completions = lambda inputs: generations.append(original(inputs)) or generations[-1]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4 and all(math.isfinite(h["loss"]) for h in logs)
    if method == "gspo":
        assert len(generations) == 1 and "old_per_token_logps" in generations[0]  # 4 steps from one generation
        assert any(h["clip_ratio/region_mean"] > 0 for h in logs[1:])  # the policy moved past GSPO's 3e-4 / 4e-4
    else:
        assert len(generations) == 4 and "old_per_token_logps" not in generations[0]


def test_generation_leaves_the_recipes_activation_checkpointing_and_dropout_off(tmp_path):
    """Rollouts are sampled in eval mode (checkpointing in training mode would also turn the KV cache off), and
    generation does not re-enable checkpointing model-wide as TRL's generation context would: the frozen vision
    tower stays unchecked, the LLM checked, the training mode restored; dropout is off for the trainer's forward."""
    from finetune.model.trainable import base_model, enable_activation_checkpointing

    trainer, config = _trainer(tmp_path, "trainer.max_steps=1", "peft.dropout=0.1")
    enable_activation_checkpointing(trainer.model, config)
    inner = base_model(trainer.model)
    checked = {n for n, m in inner.named_modules() if getattr(m, "gradient_checkpointing", False)}
    assert checked and not any(".visual." in n for n in checked)
    trainer.train()
    assert {n for n, m in inner.named_modules() if getattr(m, "gradient_checkpointing", False)} == checked
    assert trainer.model.training
    assert all(m.p == 0 for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout))
    [log] = [h for h in trainer.state.log_history if "loss" in h]
    assert log["sampling/sampling_logp_difference/max"] < 1e-4


def test_a_resumed_run_repeats_the_uninterrupted_steps(tmp_path):
    """Resuming from a checkpoint: the same prompts at the same steps, and (rollouts drawn from the run's seed, the
    step and the prompt) the same completions, so the steps after the checkpoint log what the uninterrupted run did."""
    items, _ = read_preference_file(DEMO / "prompts_train.json", "prompts")
    keys = ("reward", "kl", "loss", "grad_norm")

    def run(out, *extra):
        trainer, _ = _trainer(
            out, "trainer.max_steps=4", "trainer.save_steps=2", "trainer.save_total_limit=3", *extra, prompts=items[:8]
        )
        return trainer

    whole = run(tmp_path / "whole")
    whole.train()
    expected = {h["step"]: [h[k] for k in keys] for h in whole.state.log_history if "loss" in h}
    again = run(tmp_path / "again")  # a fresh trainer (its own LoRA initialisation, overwritten by the checkpoint's)
    again.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    got = {h["step"]: [h[k] for k in keys] for h in again.state.log_history if "loss" in h and h["step"] > 2}
    assert sorted(got) == [3, 4]
    for step, values in got.items():
        assert values == pytest.approx(expected[step], rel=1e-4, abs=1e-7), step


def test_box_rewards_get_the_image_frame_facts(tmp_path):
    """box_iou reads a solution in the image file's pixels with the family, the file's size and the size the model saw
    (Qwen2.5-VL answers in the resized image's pixels): the trainer hands them over."""
    from finetune.evaluation.rewards import build_rewards
    from tests.helpers.media_factory import write_image

    image = write_image(tmp_path / "wide.png", 224, 112, seed=3)  # resized to the recipe's 3136-pixel budget
    content = [{"type": "image", "image": str(image)}, {"type": "text", "text": "Where is it?"}]
    prompt = RewardPrompt("box-1", Sample("box-1", [{"role": "user", "content": content}], "test"), "[0, 0, 112, 56]")
    trainer, _ = _trainer(tmp_path)
    facts = trainer.frame_facts(prompt)
    assert facts["family"] == "qwen2_5_vl" and facts["image_size"] == (224, 112)
    resized_w, resized_h = facts["resized_size"]
    assert resized_w * resized_h <= 3136 and resized_w > resized_h  # the budget's size, the aspect kept
    table = build_rewards(["box_iou"])
    answer = f"[0, 0, {resized_w / 2:g}, {resized_h / 2:g}]"  # the same box, in the pixels the model saw
    assert table.score_group([answer], prompt.solution, prompt.id, facts).totals == [pytest.approx(1.0, rel=1e-6)]
    assert trainer.frame_facts(demo_prompts()[1]) == {"family": "qwen2_5_vl"}  # a video prompt: no image facts
