"""The one-vision-call path (finetune/training/vision_sync.py) carries Qwen3-VL's DeepStack features: the same logits
and gradients as the model's own two calls, and a rank without media still runs every DeepStack merger."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from finetune.training.vision_sync import encode_media_once
from tests.helpers.tolerance import assert_close_to_scale

IMAGE, VIDEO, START, END = 290, 291, 292, 293


@pytest.fixture(scope="module")
def qwen3_vl():
    """A small random Qwen3-VL (patch 16, merge 2, DeepStack after ViT layers 0 and 1)."""
    config = AutoConfig.for_model(
        "qwen3_vl",
        vision_config=dict(
            depth=3,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            deepstack_visual_indexes=[0, 1],
            num_position_embeddings=64,
        ),
        text_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=300,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        ),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=START,
        vision_end_token_id=END,
    )
    torch.manual_seed(0)
    # float64: one tower call instead of two changes how the ViT's matmuls are blocked, which moves fp32 gradients
    # of this random model by ~1e-4 of their scale (the same in fp64 to 1e-15): fp64 shows the paths are the same sum.
    return AutoModelForImageTextToText.from_config(config, dtype=torch.float64).train()


def _batch(with_media: bool):
    torch.manual_seed(1)
    patch = 3 * 2 * 16 * 16
    if not with_media:
        ids = torch.randint(0, 280, (1, 12))
        return {"input_ids": ids}
    # an image of 1 x 4 x 4 patches (4 LLM tokens), a video of 2 x 4 x 4 (8 tokens)
    ids = [5, 6, START, *[IMAGE] * 4, END, 7, START, *[VIDEO] * 8, END, 8, 9]
    return {
        "input_ids": torch.tensor([ids]),
        "pixel_values": torch.randn(16, patch, dtype=torch.float64),
        "image_grid_thw": torch.tensor([[1, 4, 4]]),
        "pixel_values_videos": torch.randn(32, patch, dtype=torch.float64),
        "video_grid_thw": torch.tensor([[2, 4, 4]]),
    }


def _run(model, batch, one_call: bool):
    model.zero_grad(set_to_none=True)
    length = batch["input_ids"].shape[1]
    positions = torch.arange(length).view(1, 1, -1).expand(3, 1, -1)  # the same explicit ids on both paths
    kwargs = dict(batch, position_ids=positions, use_cache=False)
    if one_call:
        inner = model.model
        features, padding = encode_media_once(inner.visual, inner.config.vision_config, batch)
        embeds = inner.get_input_embeddings()(batch["input_ids"])
        if padding is not None:
            embeds = embeds + padding
        kwargs.update(
            input_ids=None,
            inputs_embeds=embeds,
            pixel_values=None,
            pixel_values_videos=None,
            mm_encoder_outputs=features,
        )
    logits = model.model(**kwargs).last_hidden_state
    logits.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def test_one_call_gives_the_deepstack_features_and_their_gradients(qwen3_vl):
    batch = _batch(with_media=True)
    own, own_grads = _run(qwen3_vl, batch, one_call=False)
    ours, our_grads = _run(qwen3_vl, batch, one_call=True)
    assert_close_to_scale(ours, own, rel=1e-12)
    deepstack = [n for n in own_grads if "deepstack_merger_list" in n]
    assert deepstack and all(own_grads[n].abs().sum() > 0 for n in deepstack)
    assert set(our_grads) == set(own_grads)
    for name, grad in own_grads.items():
        assert_close_to_scale(our_grads[name], grad, rel=1e-12, name=name)


def test_without_media_every_deepstack_merger_still_takes_part(qwen3_vl):
    """A rank whose rows hold only text runs the tower on a dummy input and adds 0 x every feature: under ZeRO-3 the
    DeepStack mergers' parameters are gathered and reduced on every rank as on the others (no hang)."""
    batch = _batch(with_media=False)
    own, _ = _run(qwen3_vl, batch, one_call=False)
    ours, grads = _run(qwen3_vl, batch, one_call=True)
    assert torch.equal(ours, own)  # + 0 changes nothing
    vision = [n for n, p in qwen3_vl.named_parameters() if n.startswith("model.visual.") and p.requires_grad]
    deepstack = [n for n in vision if "deepstack_merger_list" in n]
    assert deepstack and all(n in grads for n in vision)
    assert all(float(grads[n].abs().sum()) == 0.0 for n in vision)


def test_the_hook_calls_every_module_alike_whatever_a_rank_holds(qwen3_vl):
    """Under ZeRO-3 every module call gathers its weights: with the hook installed, a forward calls the embedding
    layer once, the vision tower once and each DeepStack merger once, whether the batch holds text only, images,
    videos or both (transformers alone would call the embedding layer again per modality to find the placeholders
    among inputs_embeds), and the logits equal the model's own (placeholders found by id)."""
    from finetune.training.vision_sync import OneVisionCall

    inner = qwen3_vl.model
    calls = []
    watched = {
        "embeddings": inner.get_input_embeddings(),
        "visual": inner.visual,
        **{f"deepstack.{i}": m for i, m in enumerate(inner.visual.deepstack_merger_list)},
    }
    handles = [m.register_forward_hook(lambda *a, n=n: calls.append(n)) for n, m in watched.items()]
    full = _batch(with_media=True)
    batches = {
        "text": _batch(with_media=False),
        "both": full,
        "image": {k: v for k, v in full.items() if "video" not in k},
        "video": {k: v for k, v in full.items() if "image" not in k and k != "pixel_values"},
    }
    try:
        for kind, batch in batches.items():
            if kind in ("image", "video"):  # the other modality's placeholders become text
                other = VIDEO if kind == "image" else IMAGE
                batch = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["input_ids"] == other, 8))
            length = batch["input_ids"].shape[1]
            positions = torch.arange(length).view(1, 1, -1).expand(3, 1, -1)
            with torch.no_grad():
                own = inner(**batch, position_ids=positions, use_cache=False).last_hidden_state
            hook = OneVisionCall(inner)
            calls.clear()
            try:
                with torch.no_grad():
                    ours = inner(**batch, position_ids=positions, use_cache=False).last_hidden_state
            finally:
                hook.remove()
            assert sorted(calls) == sorted(watched), (kind, calls)
            assert_close_to_scale(ours, own, rel=1e-12)
            assert "get_placeholder_mask" not in inner.__dict__  # removed with the hook
    finally:
        for handle in handles:
            handle.remove()
