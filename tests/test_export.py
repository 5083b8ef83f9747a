"""Export round trip: merged weights + every processor file, reloaded by plain transformers, same logits."""

import json

import av
import numpy as np
import pytest
import torch
from conftest import DEMO
from recipe_runs import mini_dataset, run_module, tiny_run_overrides
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.video_utils import VideoMetadata


def decode_all_frames(path):
    """Plain PyAV, no project code: what a user of the exported model would write."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, float(stream.average_rate)


def held_out_video_inputs(processor):
    record = next(r for r in json.loads((DEMO / "test.json").read_text()) if r["task"] == "direction")
    frames, fps = decode_all_frames(DEMO / record["videos"][0])
    question = record["messages"][0]["content"].replace("<video>", "")
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    metadata = VideoMetadata(total_num_frames=len(frames), fps=fps, frames_indices=list(range(len(frames))))
    size = {"shortest_edge": 56 * 56, "longest_edge": 56 * 56}
    return processor(text=[text], videos=[frames], video_metadata=[metadata], return_tensors="pt",
                     videos_kwargs={"size": size, "do_sample_frames": False, "cap_pixels_per_frame": False})


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_export_round_trip(tmp_path, family):
    from peft import PeftModel

    train_file = mini_dataset(tmp_path / "train.json")
    run_dir = tmp_path / "run"
    overrides = tiny_run_overrides(family, run_dir, train_file, steps=5)
    run_module("finetune.train", overrides)
    run_module("finetune.export", overrides)

    merged = run_dir / "merged"
    report = json.loads((merged / "export_report.json").read_text())
    assert report["passed"] and report["max_abs_logit_diff"] <= 1e-4
    assert report["batch"]["images"] > 0 and report["batch"]["videos"] > 0
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", "processor_config.json"):  # fmt: skip
        assert (merged / name).exists(), name
    assert not list(merged.glob("*.bin")) and not (merged / "adapter_config.json").exists()

    # A user with only transformers: load, ask a held-out video question, get the adapter model's answer.
    processor = AutoProcessor.from_pretrained(merged)
    model = AutoModelForImageTextToText.from_pretrained(merged).eval()
    inputs = held_out_video_inputs(processor)
    base = AutoModelForImageTextToText.from_pretrained(report_base_path(run_dir))
    adapter_model = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    with torch.no_grad():
        merged_logits, adapter_logits = model(**inputs).logits, adapter_model(**inputs).logits
        merged_answer = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        adapter_answer = adapter_model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert (merged_logits - adapter_logits).abs().max().item() <= 1e-4
    assert merged_answer.shape[1] > inputs["input_ids"].shape[1]
    assert torch.equal(merged_answer, adapter_answer)


def report_base_path(run_dir):
    from finetune.tiny import resolve_model_path

    config = (run_dir / "config.yaml").read_text()
    name = next(line.split(": ", 1)[1] for line in config.splitlines() if line.strip().startswith("name_or_path:"))
    return resolve_model_path(name)


def test_export_keeps_what_the_vision_side_learned(tmp_path):
    """ViT LoRA and a fully trained merger (PEFT modules_to_save) end up in the merged weights; the frozen
    patch embed and the base LLM weights outside LoRA's reach stay the base model's."""
    from safetensors.torch import load_file

    train_file = mini_dataset(tmp_path / "train.json")
    run_dir = tmp_path / "run"
    overrides = tiny_run_overrides("qwen2_5_vl", run_dir, train_file, steps=3) + [
        "peft.lora_vision_tower=true", "model.freeze_merger=false", "trainer.merger_lr=1e-2"]  # fmt: skip
    run_module("finetune.train", overrides)
    run_module("finetune.export", overrides)
    report = json.loads((run_dir / "merged" / "export_report.json").read_text())
    assert report["passed"] and report["max_abs_logit_diff"] <= 1e-4

    merged = load_file(str(run_dir / "merged" / "model.safetensors"))
    base = load_file(f"{report_base_path(run_dir)}/model.safetensors")
    assert merged.keys() == base.keys()
    from finetune.trainable import model_part

    moved = {k for k in base if not torch.equal(merged[k], base[k])}
    merger = {k for k in base if model_part(k) == "merger"}
    assert merger and merger <= moved  # every merger weight trained and exported
    assert any(model_part(k) == "vision_tower" and k.endswith("qkv.weight") for k in moved)  # ViT LoRA merged in
    assert not any("patch_embed" in k or "norm" in k or "embed_tokens" in k for k in moved - merger)
