"""Rollouts (finetune/evaluation/rollouts.py) on the tiny models of every family, for image and video prompts: the
log-probs `generate` reports for its sampled tokens equal the trainer's teacher-forced log-probs of the same tokens
(fp32, 1e-5 of their scale), which holds only if decoding put every token at the position training gives it; the G
completions of a prompt cost one vision-tower call, and the trainer's forward none more; a seed repeats the draws.

The clip is long next to its frame size (20 s of 56 x 56 px: grid (8, 4, 4)), so for Qwen2-VL and Qwen2.5-VL the `qwen`
rule and transformers' own rule place the text after it differently (finetune/model/rope.py): there the trainer's
log-probs under transformers' rule must miss generation's, or the agreement above would prove nothing about positions.
"""

import pytest
import torch
from trl.trainer.utils import selective_log_softmax

from finetune.base.errors import ConfigError
from finetune.base.families import FAMILIES
from finetune.data.conversation import Sample
from finetune.evaluation.rollouts import (
    Rollout,
    _rollout,
    completion_logprobs,
    generate_rollouts,
    logprob_gap,
    token_logprobs,
)
from finetune.model.batching import sample_positions
from finetune.model.load import load_model, load_processor
from finetune.model.media_features import vision_tower
from finetune.model.rope import PositionRule, inner_model
from finetune.recipe.data_settings import conversation_encoder
from finetune.recipe.load import load_config
from tests.helpers.media_factory import write_image, write_video
from tests.helpers.recipe_runs import EXPERIMENT
from tests.helpers.tolerance import assert_close_to_scale, scaled_difference

G, NEW_TOKENS, TEMPERATURE = 3, 6, 0.7
RULES_DIFFER = {f for f in FAMILIES if FAMILIES[f].video_layout != "timestamped_frames"}  # Qwen2-VL, Qwen2.5-VL


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    image = write_image(root / "i.png", 56, 56, seed=1)
    video = write_video(root / "v.mp4", frames=80, fps=4, width=56, height=56, seed=2)

    def ask(sid, kind, path, question):
        content = [{"type": kind, kind: str(path)}, {"type": "text", "text": question}]
        return Sample(sid, [{"role": "user", "content": content}], f"test ({sid})")

    both = Sample(
        "image_and_video",
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": str(image)},
                    {"type": "video", "video": str(video)},
                    {"type": "text", "text": "Same colour?"},
                ],
            }
        ],
        "test (image_and_video)",
    )
    text = Sample(
        "text", [{"role": "user", "content": [{"type": "text", "text": "Name a colour, then a direction."}]}], "test"
    )
    return [
        ask("image", "image", image, "What colour is it?"),
        ask("video", "video", video, "Which way does it move?"),
        both,
        text,
    ]


@pytest.fixture(scope="module")
def tiny(tiny_paths):
    """family -> (model in fp32, eval mode, `qwen` rule installed; its inference encoder), loaded once per module."""
    loaded = {}

    def get(family):
        if family not in loaded:
            config = load_config([f"experiment={EXPERIMENT[family]}"])
            model = load_model(config.model, "fp32", path=str(tiny_paths[family])).eval()
            vision_tower(model).requires_grad_(False)  # parts.vision=frozen: generation's features serve training
            processor = load_processor(config.model, path=str(tiny_paths[family]))
            loaded[family] = model, conversation_encoder(processor, config, for_training=False)
        return loaded[family]

    return get


class TowerCalls:
    """Counts the vision tower's forward calls."""

    def __init__(self, model):
        self.count = 0
        self.handle = inner_model(model).visual.register_forward_hook(self._count)

    def _count(self, *_):
        self.count += 1

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generation_reports_the_trainers_logprobs_with_one_tower_call_per_prompt(tiny, prompts, family):
    model, encoder = tiny(family)
    calls = TowerCalls(model)
    try:
        rollouts = []
        for prompt in prompts[:3]:  # one prompt at a time, to count its own tower calls
            rollouts += generate_rollouts(model, encoder, [prompt], G, NEW_TOKENS, TEMPERATURE, seed=0)
            assert calls.take() == 1, prompt.id  # G completions, images and videos together: one call
        trainer = [completion_logprobs(model, r, TEMPERATURE) for r in rollouts]
        assert calls.take() == 0  # the features generation computed serve the trainer's G rows
        own = [completion_logprobs(model, r, TEMPERATURE, reuse_features=False) for r in rollouts]
        assert calls.take() == len(rollouts)  # a tower that trains: one call per prompt for its G rows
    finally:
        calls.handle.remove()

    for rollout, theirs, recomputed in zip(rollouts, trainer, own):
        assert len(rollout.completion_ids) == len(rollout.logprobs) == len(rollout.texts) == G
        assert all(0 < len(ids) <= NEW_TOKENS for ids in rollout.completion_ids)
        for k, (reported, teacher_forced) in enumerate(zip(rollout.logprobs, theirs)):
            assert torch.all(reported <= 0)
            assert_close_to_scale(teacher_forced, reported, rel=1e-5, name=f"{family} {rollout.prompt_id} {k}")
            assert torch.equal(recomputed[k], teacher_forced)  # the same features, whoever computed them
        gap = logprob_gap([rollout], [theirs])
        assert gap["max"] <= 1e-5 * max(float(r.abs().max()) for r in rollout.logprobs)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prompts_generated_together_keep_their_own_media_and_positions(tiny, prompts, family):
    """All prompts in one `generate` call, left-padded (a text-only one among them): one tower call for the lot, each
    prompt's rollout holds its own features, and generation's log-probs still equal the trainer's (which sees no
    padding: a prompt's completions are a batch of their own there)."""
    model, encoder = tiny(family)
    calls = TowerCalls(model)
    try:
        rollouts = generate_rollouts(
            model, encoder, prompts, G, NEW_TOKENS, TEMPERATURE, seed=1, prompts_per_call=len(prompts)
        )
        assert calls.take() == 1
        trainer = [completion_logprobs(model, r, TEMPERATURE) for r in rollouts]
        assert calls.take() == 0
    finally:
        calls.handle.remove()
    assert [r.prompt_id for r in rollouts] == [p.id for p in prompts]
    assert [sorted(r.features) for r in rollouts] == [["image"], ["video"], ["image", "video"], []]
    for rollout, theirs in zip(rollouts, trainer):
        for k, (reported, teacher_forced) in enumerate(zip(rollout.logprobs, theirs)):
            assert_close_to_scale(teacher_forced, reported, rel=1e-5, name=f"{family} {rollout.prompt_id} {k}")


@pytest.mark.parametrize("family", sorted(RULES_DIFFER))
def test_under_transformers_rule_the_trainer_would_miss_what_generation_saw(tiny, prompts, family):
    """A video prompt followed by text: the rules place the text after the clip differently, and the trainer's
    log-probs under transformers' rule then differ from generation's (under ours they agree, test above)."""
    model, encoder = tiny(family)
    [rollout] = generate_rollouts(model, encoder, prompts[1:2], G, NEW_TOKENS, TEMPERATURE, seed=0)
    theirs = PositionRule.for_model(model.config, "transformers")
    ours = PositionRule.for_model(model.config, "qwen")
    assert not torch.equal(sample_positions(rollout.prompt, theirs), sample_positions(rollout.prompt, ours))
    wrong = completion_logprobs(model, rollout, TEMPERATURE, rule=theirs)
    assert max(scaled_difference(w, r) for w, r in zip(wrong, rollout.logprobs)) > 1e-3


def test_transformers_own_path_would_call_the_tower_once_per_modality(tiny, prompts):
    """What the one call above saves: `generate` given the pixels with num_return_sequences=G encodes each modality
    separately (transformers 5.23), two calls for a prompt with an image and a video."""
    from finetune.evaluation.evaluate import generation_inputs
    from finetune.model.rope import model_position_rule

    model, encoder = tiny("qwen2_5_vl")
    batch = generation_inputs(
        [encoder.encode(prompts[2], generation_prompt=True)], 0, model_position_rule(model), torch.device("cpu")
    )
    calls = TowerCalls(model)
    try:
        model.generate(**batch, do_sample=True, num_return_sequences=G, max_new_tokens=1, pad_token_id=0)
        assert calls.take() == 2
    finally:
        calls.handle.remove()


def test_a_vision_side_that_trains_gets_its_own_call_and_its_gradients(tiny, prompts):
    """Generation's features carry no gradient: reusing them while the tower trains is refused. Without reuse the
    tower runs once per prompt inside the trainer's forward and gets gradients; with `synced_gpus` a text-only prompt
    still calls it (a dummy input, 0 x its features): the same log-probs, and every tower parameter in the graph."""
    model, encoder = tiny("qwen2_5_vl")
    tower = vision_tower(model)
    image, text = generate_rollouts(model, encoder, [prompts[0], prompts[3]], G, NEW_TOKENS, TEMPERATURE, seed=0)
    calls = TowerCalls(model)
    tower.requires_grad_(True)
    try:
        with pytest.raises(ConfigError, match="reuse_features=False"):
            completion_logprobs(model, image, TEMPERATURE)
        model.zero_grad(set_to_none=True)
        sum(lp.sum() for lp in completion_logprobs(model, image, TEMPERATURE, reuse_features=False)).backward()
        assert calls.take() == 1
        assert all(p.grad is not None for p in tower.parameters()) and any(
            p.grad.abs().sum() > 0 for p in tower.parameters()
        )

        model.zero_grad(set_to_none=True)
        plain = completion_logprobs(model, text, TEMPERATURE, reuse_features=False)
        assert calls.take() == 0
        synced = completion_logprobs(model, text, TEMPERATURE, reuse_features=False, synced_gpus=True)
        assert calls.take() == 1
        assert all(torch.equal(a, b) for a, b in zip(plain, synced))
        sum(lp.sum() for lp in synced).backward()
        assert all(p.grad is not None and float(p.grad.abs().sum()) == 0.0 for p in tower.parameters())
    finally:
        tower.requires_grad_(False)
        model.zero_grad(set_to_none=True)
        calls.handle.remove()


def test_a_lora_model_in_training_mode_gets_generations_logprobs_and_its_gradients(tiny_paths, prompts):
    """What the trainer holds: the base under a PEFT adapter, in training mode, gradients on."""
    from peft import LoraConfig, get_peft_model

    config = load_config([f"experiment={EXPERIMENT['qwen2_5_vl']}"])
    base = load_model(config.model, "fp32", path=str(tiny_paths["qwen2_5_vl"]))
    adapter = LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False)
    model = get_peft_model(base, adapter)
    encoder = conversation_encoder(load_processor(config.model, path=str(tiny_paths["qwen2_5_vl"])), config, False)
    [rollout] = generate_rollouts(model.eval(), encoder, prompts[1:2], G, NEW_TOKENS, TEMPERATURE, seed=0)
    trainer = completion_logprobs(model.train(), rollout, TEMPERATURE)
    for reported, teacher_forced in zip(rollout.logprobs, trainer):
        assert_close_to_scale(teacher_forced, reported, rel=1e-5)
    sum(lp.sum() for lp in trainer).backward()
    lora = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(g is not None for g in lora) and any(float(g.abs().sum()) > 0 for g in lora)


def test_a_seed_repeats_the_draws_and_leaves_the_callers_random_state(tiny, prompts):
    model, encoder = tiny("qwen2_5_vl")
    state = torch.random.get_rng_state()
    first = generate_rollouts(model, encoder, prompts, G, NEW_TOKENS, TEMPERATURE, seed=3)
    again = generate_rollouts(model, encoder, prompts, G, NEW_TOKENS, TEMPERATURE, seed=3)
    other = generate_rollouts(model, encoder, prompts, G, NEW_TOKENS, TEMPERATURE, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert [r.completion_ids for r in first] == [r.completion_ids for r in again]
    assert all(torch.equal(a, b) for r, s in zip(first, again) for a, b in zip(r.logprobs, s.logprobs))
    assert [r.completion_ids for r in first] != [r.completion_ids for r in other]


def test_the_checkpoints_generation_settings_do_not_change_the_sampling(tiny, prompts, monkeypatch):
    """Qwen's generation_config.json asks for top_k 1 and a repetition penalty: were they applied, the G completions
    of a prompt would all be the greedy one, and the reported log-probs would not describe the sampling."""
    model, encoder = tiny("qwen2_5_vl")
    for key, value in {"top_k": 1, "top_p": 0.001, "temperature": 0.1, "repetition_penalty": 1.05}.items():
        monkeypatch.setattr(model.generation_config, key, value)
    [rollout] = generate_rollouts(model, encoder, prompts[:1], G, NEW_TOKENS, 1.0, seed=0)
    assert len({tuple(ids) for ids in rollout.completion_ids}) > 1


def test_logprobs_follow_trls_convention():
    """log_softmax(logits / temperature) in fp32 at the token: what TRL's GRPOTrainer computes for its per-token
    log-probs (`selective_log_softmax`)."""
    torch.manual_seed(0)
    logits, tokens = torch.randn(4, 5, 50) * 3, torch.randint(0, 50, (4, 5))
    assert_close_to_scale(token_logprobs(logits, tokens, 0.7), selective_log_softmax(logits, tokens, 0.7), rel=1e-6)


def test_a_completion_ends_at_its_first_end_token_or_is_truncated():
    sampled = torch.tensor([[5, 2, 6, 2], [5, 6, 5, 6], [9, 9, 9, 3]])
    logprobs = -torch.rand(3, 4)
    rollout = _rollout("p", None, sampled, logprobs, end_ids=[2, 3])
    assert rollout.completion_ids == [[5, 2], [5, 6, 5, 6], [9, 9, 9, 3]]  # the end token kept, as TRL keeps it
    assert rollout.finished == [True, False, True]
    assert [lp.tolist() for lp in rollout.logprobs] == [logprobs[0, :2].tolist(), *logprobs[1:].tolist()]


def test_the_gap_is_the_mean_and_max_absolute_difference_over_every_completion_token():
    rollouts = [Rollout("a", None, [[1, 2], [3]], [], [torch.tensor([-1.0, -2.0]), torch.tensor([-0.5])], [])]
    gap = logprob_gap(rollouts, [[torch.tensor([-1.5, -2.0]), torch.tensor([-0.25])]])
    assert gap == pytest.approx({"mean": 0.25, "max": 0.5})


@pytest.mark.parametrize(
    "settings, named",
    [
        ({"num_generations": 0}, "num_generations=0"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"top_p": 0.0}, "top_p=0.0"),
        ({"top_k": -1}, "top_k=-1"),
        ({"prompts_per_call": 0}, "prompts_per_call=0"),
    ],
)
def test_bad_sampling_settings_are_refused_by_name(settings, named):
    args = {"num_generations": 2, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "prompts_per_call": 1} | settings
    with pytest.raises(ConfigError, match=named):
        generate_rollouts(None, None, [], args.pop("num_generations"), 4, **args)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_groups_training_sequence_is_the_sft_encoding_and_a_plain_forwards_logprobs(
    tiny, prompts, tiny_paths, family
):
    """What GRPO trains on (`completion_sequences` laid out by `training_batch`) for a completion equal to a reply's
    tokens is the SFT encoding of that conversation: the same ids, the same trained positions, pixels, grids and 3-D
    positions; and the trainer's log-probs are log_softmax of a plain forward of that one SFT sample."""
    from finetune.data.encode import IGNORE_INDEX
    from finetune.evaluation.rollouts import completion_sequences
    from finetune.model.batching import training_batch
    from finetune.model.rope import model_position_rule

    model, encoder = tiny(family)
    config = load_config([f"experiment={EXPERIMENT[family]}", "trainer.label_mode=last_assistant"])
    sft = conversation_encoder(load_processor(config.model, path=str(tiny_paths[family])), config)
    rule = model_position_rule(model)
    for prompt in prompts[:2]:  # an image prompt, a video prompt
        reply = {"role": "assistant", "content": [{"type": "text", "text": "left"}]}
        reference = sft.encode(Sample(prompt.id, [*prompt.messages, reply], prompt.source))
        trained = [i for i, label in enumerate(reference.labels) if label != IGNORE_INDEX]
        encoded_prompt = encoder.encode(prompt, generation_prompt=True)
        assert encoded_prompt.input_ids == reference.input_ids[: trained[0]], prompt.id
        reply_ids = reference.input_ids[trained[0] : trained[-1] + 1]
        rollout = Rollout(prompt.id, encoded_prompt, [reply_ids], ["left"], [torch.zeros(len(reply_ids))], [True])
        (sequence,) = completion_sequences(rollout)
        n = len(sequence.input_ids)
        assert sequence.input_ids == reference.input_ids[:n]
        assert [i for i, label in enumerate(sequence.labels) if label != IGNORE_INDEX] == trained
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            ours, theirs = getattr(sequence, key), getattr(reference, key)
            assert (ours is None and theirs is None) or torch.equal(ours, theirs), (prompt.id, key)
        assert sequence.second_per_grid_ts == reference.second_per_grid_ts
        assert torch.equal(sample_positions(sequence, rule), sample_positions(reference, rule)[:, :n])

        (trainer,) = completion_logprobs(model, rollout, TEMPERATURE, reuse_features=False)
        batch = training_batch([[reference]], 0, rule)
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_real_tokens")}
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits[0]
        targets = torch.tensor(reply_ids)
        plain = torch.log_softmax(logits[trained[0] - 1 : trained[-1]].float() / TEMPERATURE, -1)
        plain = plain.gather(-1, targets[:, None])[:, 0]
        assert_close_to_scale(trainer.detach(), plain, rel=1e-5, name=f"{family} {prompt.id}")
