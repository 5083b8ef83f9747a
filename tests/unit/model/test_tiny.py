"""Tiny checkpoints: deterministic, standard HF layout, loadable by the Auto classes alone."""

import hashlib

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from finetune.base.families import FAMILIES
from finetune.model.tiny import QWEN_SPECIAL_TOKENS, build_tiny_checkpoint, resolve_model_path

EXPECTED = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
    "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
}


def test_every_family_has_its_expected_class():
    assert EXPECTED.keys() == FAMILIES.keys()


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_build_is_deterministic(tmp_path, family):
    a = build_tiny_checkpoint(family, tmp_path / "a")
    b = build_tiny_checkpoint(family, tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert _digest(a / name) == _digest(b / name), name


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_with_auto_classes(tiny_paths, family):
    path = tiny_paths[family]
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert type(model).__name__ == EXPECTED[family]
    assert model.config.model_type == family
    tokenizer = processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS)
    assert len(set(ids)) == len(QWEN_SPECIAL_TOKENS) and tokenizer.unk_token_id not in ids[1:]
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    # Byte-level BPE round-trips arbitrary text.
    text = "Which direction does the dot move? Ünïcode ✓ 42"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Q?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A"}]},
    ]
    rendered = processor.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>Q?<|im_end|>\n"
        "<|im_start|>assistant\nA<|im_end|>\n"
    )
    batch = processor(
        text=[rendered],
        images=[torch.zeros(3, 56, 56, dtype=torch.uint8)],
        videos=[torch.zeros(4, 3, 56, 56, dtype=torch.uint8)],
        return_tensors="pt",
        videos_kwargs={"do_sample_frames": False, "cap_pixels_per_frame": False},
    )
    assert model(**batch).logits.shape[:2] == batch["input_ids"].shape


def test_resolve_model_path():
    assert resolve_model_path("Qwen/Qwen2.5-VL-7B-Instruct") == "Qwen/Qwen2.5-VL-7B-Instruct"
    with pytest.raises(ValueError, match="tiny://qwen2_vl"):
        resolve_model_path("tiny://llava")
