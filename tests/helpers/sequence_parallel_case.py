"""One fixed case for sequence parallelism, built alike in the test process (the 1-process reference) and in every
rank of tests/helpers/sequence_parallel_harness.py: a tiny model of a family with LoRA (its B matrices drawn, so
that every LoRA matrix has a gradient), fp32, our varlen attention (CPU kernel), and one packed row holding a text,
an image and a video sample (varlen boundaries included)."""

from __future__ import annotations

import json

import torch

from finetune.data.encode import IGNORE_INDEX, ConversationEncoder
from finetune.data.sources import load_samples
from finetune.model import attention
from finetune.model.batching import training_batch
from finetune.model.load import load_model, load_processor, position_rule
from finetune.model.trainable import make_trainable
from finetune.recipe.data_settings import vision_settings
from finetune.recipe.load import load_config
from tests.helpers import DEMO

SP_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


def case_config(family: str):
    return load_config(
        [
            f"model.name_or_path=tiny://{family}",
            f"model.family={family}",
            "trainer.packing=true",
            "peft.dropout=0",
            "parts.vision_tower=lora",
        ]
    )


def build_model(family: str):
    """The tiny model with LoRA (vision LoRA too where the recipe trains it), every LoRA B drawn from a seeded
    generator (PEFT starts them at 0, which leaves the A matrices without a gradient), on the varlen CPU kernel."""
    config = case_config(family)
    torch.manual_seed(0)
    model = make_trainable(load_model(config.model, "fp32"), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    attention.set_implementation(model, attention.REGISTERED["per_sample"])
    model.train()
    return model, config


def packed_rows(family: str, tmp_dir, variant: int = 0) -> list:
    """Encoded samples of one row: text, image, video (`variant` 1 changes the text sample's question and answer)."""
    records = json.loads((DEMO / "test.json").read_text())
    image = next(r for r in records if r.get("images"))
    video = next(r for r in records if r.get("videos"))
    question = "Name three primary colours." if variant == 0 else "Which planet is the largest one?"
    answer = "red, yellow and blue" if variant == 0 else "jupiter"
    text = {
        "id": "text-0",
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
    }
    path = tmp_dir / f"sp-{family}-{variant}.json"
    path.write_text(json.dumps([text, image, video]))
    config = case_config(family)
    encoder = ConversationEncoder(load_processor(config.model), vision_settings(config))
    return [encoder.encode(s) for s in load_samples(path, media_root=DEMO)]


def build_batch(family: str, model, encoded: list) -> dict:
    rule = position_rule(model, case_config(family).model)
    return training_batch([encoded], pad_token_id=0, rule=rule, boundaries=True)


def sample_spans(encoded: list) -> list[slice]:
    spans, start = [], 0
    for e in encoded:
        spans.append(slice(start, start + len(e.input_ids)))
        start += len(e.input_ids)
    return spans


def labels_on_first_part(batch: dict, keep: int) -> dict:
    """The batch with labels only before token `keep` (the rest ignored)."""
    labels = batch["labels"].clone()
    labels[:, keep:] = IGNORE_INDEX
    return {**batch, "labels": labels}


MODEL_KEYS = ("input_ids", "mm_token_type_ids", "position_ids", "pixel_values", "image_grid_thw")
MODEL_KEYS += ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
MODEL_KEYS += attention.BOUNDARY_KEYS


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in MODEL_KEYS or k == "labels"}


def reference_loss_and_grads(model, batch: dict) -> tuple[float, dict, torch.Tensor]:
    """One process: the whole row's token-loss sum / its labelled count, LoRA gradients, and the logits."""
    from finetune.model.sequence_parallel import shifted_labels

    inputs = model_inputs(batch)
    targets = shifted_labels(inputs.pop("labels"))
    model.zero_grad(set_to_none=True)
    out = model(**inputs, use_cache=False)
    logits = out.logits.float()
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    ) / max(int((targets != IGNORE_INDEX).sum()), 1)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "lora" in n}
    return float(loss.detach()), grads, logits.detach()
