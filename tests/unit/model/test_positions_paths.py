"""The position ids that actually reach the model's rotary embedding, captured in every path that runs it:
unpacked training, packed training and evaluation's `generate` (prefill and decode). For the same sample they
are the same ids, those of the recipe's rope rule; decoding after a long video continues at max + 1 + k.

The clips are long next to their frame size (20 s, 56 x 56 px: grid (8, 4, 4), 2.5 s per temporal patch), so
for Qwen2-VL and Qwen2.5-VL the qwen rule and the installed transformers' rule disagree on them: a test that passed
under either rule could not tell them apart. (Qwen3-VL's frame-pair blocks have one temporal index each: there the
rules agree, and the test checks that they do.)
"""

import json

import pytest
import torch
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
from transformers.models.qwen2_vl import modeling_qwen2_vl
from transformers.models.qwen3_5 import modeling_qwen3_5
from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe
from transformers.models.qwen3_vl import modeling_qwen3_vl
from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe

from finetune.base.families import FAMILIES
from finetune.data.sources import load_samples
from finetune.evaluation.evaluate import generate_answers, split_prompt
from finetune.model.load import load_trained_model
from finetune.model.rope import PositionRule
from finetune.recipe.data_settings import conversation_encoder
from finetune.recipe.load import load_config
from finetune.training.workflow import build_trainer
from tests.helpers.media_factory import write_image, write_video
from tests.helpers.recipe_runs import EXPERIMENT

# Per family: the transformers module, and the class names of its inner model and text rotary embedding.
MODELING = {
    "qwen2_vl": (modeling_qwen2_vl, "Qwen2VLModel", "Qwen2VLRotaryEmbedding"),
    "qwen2_5_vl": (modeling_qwen2_5_vl, "Qwen2_5_VLModel", "Qwen2_5_VLRotaryEmbedding"),
    "qwen3_vl": (modeling_qwen3_vl, "Qwen3VLModel", "Qwen3VLTextRotaryEmbedding"),
    "qwen3_vl_moe": (modeling_qwen3_vl_moe, "Qwen3VLMoeModel", "Qwen3VLMoeTextRotaryEmbedding"),
    "qwen3_5": (modeling_qwen3_5, "Qwen3_5Model", "Qwen3_5TextRotaryEmbedding"),
    "qwen3_5_moe": (modeling_qwen3_5_moe, "Qwen3_5MoeModel", "Qwen3_5MoeTextRotaryEmbedding"),
}
RULES_AGREE = {f for f in FAMILIES if FAMILIES[f].video_layout == "timestamped_frames"}
QUESTIONS = ["Which way does it move?", "What happens first?", "Where does it end?", "What colour is it?"]


def long_video_dataset(root):
    videos = [write_video(root / f"v{i}.mp4", frames=80, fps=4, width=56, height=56, seed=i).name for i in range(3)]
    image = write_image(root / "i.png", 56, 56, seed=9).name
    records = [
        {
            "id": f"video{i}",
            "messages": [
                {"role": "user", "content": f"<video>{QUESTIONS[i]}"},
                {"role": "assistant", "content": f"answer {i}"},
            ],
            "videos": [v],
        }
        for i, v in enumerate(videos)
    ]
    records.append(
        {
            "id": "image_then_video",
            "messages": [
                {"role": "user", "content": f"<image>{QUESTIONS[3]}"},
                {"role": "assistant", "content": "red"},
                {"role": "user", "content": "<video>And now?"},
                {"role": "assistant", "content": "left"},
            ],
            "images": [image],
            "videos": [videos[0]],
        }
    )
    path = root / "long.json"
    path.write_text(json.dumps(records))
    return path


class Capture:
    """Wraps the inner model's forward (input ids, attention mask, the position ids it was given) and the text
    rotary embedding's forward (the ids it turns into angles), for every call in this process."""

    def __init__(self, monkeypatch, family):
        module, model_name, rotary_name = MODELING[family]
        self.calls = []
        model_cls, rotary_cls = getattr(module, model_name), getattr(module, rotary_name)
        model_forward, rotary_forward = model_cls.forward, rotary_cls.forward

        def inner_forward(model_self, *args, **kwargs):
            self.calls.append(
                {
                    "input_ids": kwargs.get("input_ids"),
                    "attention_mask": kwargs.get("attention_mask"),
                    "given": kwargs.get("position_ids"),
                }
            )
            return model_forward(model_self, *args, **kwargs)

        def rotary(rotary_self, x, position_ids):
            self.calls[-1]["rotary"] = position_ids.detach().clone()
            return rotary_forward(rotary_self, x, position_ids)

        monkeypatch.setattr(model_cls, "forward", inner_forward)
        monkeypatch.setattr(rotary_cls, "forward", rotary)

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def _overrides(family, tmp_path, data, packing):
    rows = (
        ["trainer.packing=true", "trainer.max_tokens_per_row=512", "trainer.per_device_train_batch_size=2"]
        if packing
        else ["trainer.per_device_train_batch_size=4"]
    )
    return [
        f"experiment={EXPERIMENT[family]}",
        "logger=none",
        f"trainer.output_dir={tmp_path / str(packing)}",
        "trainer.max_steps=1",
        "trainer.warmup_steps=0",
        "trainer.save_steps=1000",
        f"data.train={data}",
        "data.max_length=512",
        "evaluation.after_training=false",
        "export.after_training=false",
    ] + rows


def training_positions(calls, encoded) -> dict:
    """sample id -> the (3, n) ids its tokens got at the rotary embedding, from packed or unpacked rows."""
    by_tokens = {tuple(e.input_ids): sid for sid, e in encoded.items()}
    found = {}
    for call in calls:
        text_row = call["given"][0]  # the 4-row ids: row 0 restarts at every sample
        for r in range(call["input_ids"].shape[0]):
            starts = (text_row[r] == 0).nonzero().flatten().tolist() + [text_row.shape[1]]
            for a, b in zip(starts[:-1], starts[1:]):
                sid = by_tokens.get(tuple(call["input_ids"][r, a:b].tolist()))
                if sid is not None:  # the rest is the row's padding block
                    found[sid] = call["rotary"][:, r, a:b]
    return found


def test_every_family_has_its_modeling_module():
    assert MODELING.keys() == FAMILIES.keys()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_and_evaluation_feed_the_same_positions(tmp_path, monkeypatch, family):
    data = long_video_dataset(tmp_path / "media")
    capture = Capture(monkeypatch, family)
    samples = load_samples(data)
    positions = {}
    for packing in (False, True):
        config = load_config(_overrides(family, tmp_path, data, packing))
        trainer, processor, *_ = build_trainer(config, [])
        encoder = conversation_encoder(processor, config)
        encoded = {s.id: encoder.encode(s) for s in samples}
        capture.take()
        trainer.train()
        positions[packing] = training_positions(capture.take(), encoded)
        assert set(positions[packing]) == set(encoded), (packing, set(positions[packing]))
        rule = trainer.model.get_base_model().model.position_rule
    trainer.save_model(f"{config.trainer.output_dir}/adapter")  # what evaluation loads
    processor.save_pretrained(f"{config.trainer.output_dir}/adapter")

    # Every sample got the rule's own ids, unpacked and packed alike ...
    assert rule == PositionRule.for_model(trainer.model.config, "qwen")
    for sid, e in encoded.items():
        expected = rule.sample(
            e.mm_token_type_ids,
            e.image_grid_thw.tolist() if e.image_grid_thw is not None else [],
            e.video_grid_thw.tolist(),
            e.second_per_grid_ts,
        )
        assert torch.equal(positions[False][sid], expected) and torch.equal(positions[True][sid], expected), sid
    # ... and these clips are where the rules part: the installed transformers would have given other ids (not so
    # for Qwen3-VL, where they agree).
    other = PositionRule.for_model(trainer.model.config, "transformers")
    e = encoded["video0"]
    theirs = other.sample(e.mm_token_type_ids, [], e.video_grid_thw.tolist(), e.second_per_grid_ts)
    assert torch.equal(theirs, positions[False]["video0"]) == (family in RULES_AGREE)

    # Evaluation: the prompt (the sample without its last reply) gets the training ids of the same tokens, and
    # each decoded token k sits at max + 1 + k in all three rows.
    model, processor = load_trained_model(config)  # base model (rule installed at loading) + the adapter
    model.eval()
    monkeypatch.setattr(model.generation_config, "eos_token_id", None)  # every row decodes all its tokens
    prompts = [split_prompt(s)[0] for s in samples]
    eval_encoder = conversation_encoder(processor, config, for_training=False)
    new_tokens = 3
    capture.take()
    generate_answers(model, eval_encoder, prompts, batch_size=4, max_new_tokens=new_tokens)
    calls = capture.take()
    prefill, decode = calls[0], calls[1:]
    assert len(decode) == new_tokens - 1 and all(c["rotary"].shape[-1] == 1 for c in decode)
    for row, sample in enumerate(samples):
        real = prefill["attention_mask"][row].bool()
        prompt_ids = prefill["input_ids"][row, real]
        n = len(prompt_ids)
        assert prompt_ids.tolist() == encoded[sample.id].input_ids[:n]  # the prompt is a prefix of the sample
        got = prefill["rotary"][:, row, real]
        assert torch.equal(got, positions[False][sample.id][:, :n]), sample.id
        top = int(got.max())
        for k, call in enumerate(decode, start=1):
            assert call["rotary"][:, row, 0].tolist() == [top + k] * 3, (sample.id, k)
        # The installed transformers' generate would have decoded elsewhere: from its own last prompt position + 1.
        if sample.id.startswith("video"):
            e = eval_encoder.encode(prompts[row], generation_prompt=True)
            theirs = other.sample(e.mm_token_type_ids, [], e.video_grid_thw.tolist(), e.second_per_grid_ts)
            assert (int(theirs[0, -1]) < top) == (family not in RULES_AGREE), sample.id
