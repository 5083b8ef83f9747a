"""The preference forward (finetune/training/preference_forward.py): per-token completion log-probs equal log_softmax of
a plain per-sample forward (fp32, the same position ids), padded and packed, for every family; one vision-tower call
per step for B pairs (images and videos), and a text-only batch still calls the tower once."""

import pytest
import torch
from transformers import AutoModelForImageTextToText

from finetune.base.families import FAMILIES
from finetune.model import linear_attention
from finetune.model.batching import inference_batch
from finetune.model.preference_batching import preference_batch
from finetune.model.rope import PositionRule
from finetune.training.preference_forward import completion_log_probs, vision_parts
from tests.helpers.preference_pairs import encoded_pairs, text_only
from tests.helpers.tolerance import assert_close_to_scale


def _load(path):
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    linear_attention.install(model)  # as load_model leaves it: packed samples stay apart in linear attention
    return model.eval()


def _pairs(processor):
    """Two image pairs and one video pair: both media kinds, and several items of one kind, in one batch."""
    return encoded_pairs(processor, "img", 2) + encoded_pairs(processor, "vid", 1)


def _reference(model, sequence, pad_id, rule) -> torch.Tensor:
    """log_softmax of the model's own forward on the sequence alone, at its completion tokens."""
    with torch.no_grad():
        logits = model(**inference_batch([sequence], pad_id, rule), use_cache=False).logits[0].float()
    labels = torch.tensor(sequence.labels)
    targets = labels[1:]
    trained = targets != -100
    return logits[:-1][trained].log_softmax(-1).gather(-1, targets[trained].unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_log_probs_equal_the_per_sample_forward_padded_and_packed(processors, tiny_paths, family):
    model = _load(tiny_paths[family])
    processor = processors[family]
    rule = PositionRule.for_model(model.config, "qwen")
    pad_id = processor.tokenizer.pad_token_id
    pairs = _pairs(processor)
    sequences = [c for c, _ in pairs] + [r for _, r in pairs]
    expected = [_reference(model, s, pad_id, rule) for s in sequences]
    hybrid = linear_attention.is_hybrid(model.config)
    longest = max(len(s.input_ids) for s in sequences)
    for budget in (None, 2 * longest):
        batch = preference_batch(pairs, pad_id, rule, budget=budget, boundaries=budget is not None or hybrid)
        if budget is not None:
            assert batch["input_ids"].shape[0] < len(sequences)  # packed: several sequences per row
        with torch.no_grad():
            out = completion_log_probs(model, batch)
        assert out.log_probs.shape == (6, max(len(e) for e in expected))
        for s, reference in enumerate(expected):
            n = len(reference)
            assert n > 0 and int(out.mask[s].sum()) == n
            assert_close_to_scale(out.log_probs[s, :n], reference, rel=1e-5, name=f"{family} seq {s} {budget}")
            assert not out.log_probs[s, n:].any()


@pytest.fixture(scope="module")
def qwen2_5_vl(tiny_paths):
    return _load(tiny_paths["qwen2_5_vl"]).train()


def _count_tower_calls(model):
    visual, _ = vision_parts(model)
    calls = []
    handle = visual.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("kinds", [("img",), ("vid",), ("img", "vid")])
def test_one_tower_call_per_step_for_b_pairs(processors, qwen2_5_vl, kinds):
    """B pairs (2B sequences) -> one tower call in the policy forward; the reference forward of a frozen tower reuses
    its features (0 calls) and gives the same log-probs as its own call would."""
    processor = processors["qwen2_5_vl"]
    pairs = [p for kind in kinds for p in encoded_pairs(processor, kind, 2)]
    rule = PositionRule.for_model(qwen2_5_vl.config, "qwen")
    batch = preference_batch(pairs, processor.tokenizer.pad_token_id, rule)
    calls, handle = _count_tower_calls(qwen2_5_vl)
    try:
        policy = completion_log_probs(qwen2_5_vl, batch)
        assert len(calls) == 1
        policy.log_probs[policy.mask.bool()].sum().backward()  # gradients flow through both uses of a feature
        with torch.no_grad():
            reused = completion_log_probs(qwen2_5_vl, batch, features=policy.features)
        assert len(calls) == 1
    finally:
        handle.remove()
    assert_close_to_scale(reused.log_probs, policy.log_probs.detach(), rel=1e-6)
    visual, _ = vision_parts(qwen2_5_vl)
    merger = [p for n, p in visual.named_parameters() if "merger" in n]
    assert merger and all(p.grad is not None and p.grad.abs().sum() > 0 for p in merger)
    qwen2_5_vl.zero_grad(set_to_none=True)


def test_features_of_a_prompt_feed_both_sides_with_summed_gradients(processors, qwen2_5_vl):
    """The tower's gradient through the shared features equals the sum over the two sides computed apart."""
    processor = processors["qwen2_5_vl"]
    pairs = encoded_pairs(processor, "img", 1)
    rule = PositionRule.for_model(qwen2_5_vl.config, "qwen")
    pad = processor.tokenizer.pad_token_id
    visual, _ = vision_parts(qwen2_5_vl)
    merger = [p for n, p in visual.named_parameters() if "merger" in n]

    def grads(batch, rows):
        qwen2_5_vl.zero_grad(set_to_none=True)
        out = completion_log_probs(qwen2_5_vl, batch)
        out.log_probs[rows].sum().backward()
        return [p.grad.clone() for p in merger]

    batch = preference_batch(pairs, pad, rule)
    both = grads(batch, [0, 1])
    apart = [a + b for a, b in zip(grads(batch, [0]), grads(batch, [1]))]
    for g, h in zip(both, apart):
        assert_close_to_scale(g, h, rel=1e-5)
    qwen2_5_vl.zero_grad(set_to_none=True)


def test_a_text_only_batch_still_calls_the_tower_once(processors, qwen2_5_vl):
    """No media on this rank: the dummy tower call (0 x its features in the embeddings), so under ZeRO-3 every rank
    gathers the tower's weights; the log-probs equal the plain forward's."""
    processor = processors["qwen2_5_vl"]
    pairs = text_only(processor, 2)
    rule = PositionRule.for_model(qwen2_5_vl.config, "qwen")
    pad = processor.tokenizer.pad_token_id
    batch = preference_batch(pairs, pad, rule)
    assert "pixel_values" not in batch and "image_index" not in batch
    calls, handle = _count_tower_calls(qwen2_5_vl)
    try:
        out = completion_log_probs(qwen2_5_vl, batch)
    finally:
        handle.remove()
    assert len(calls) == 1
    out.log_probs.sum().backward()
    visual, _ = vision_parts(qwen2_5_vl)
    assert all(p.grad is not None for p in visual.parameters() if p.requires_grad)
    qwen2_5_vl.zero_grad(set_to_none=True)
    sequences = [c for c, _ in pairs] + [r for _, r in pairs]
    qwen2_5_vl.eval()
    try:
        for s, sequence in enumerate(sequences):
            reference = _reference(qwen2_5_vl, sequence, pad, rule)
            assert_close_to_scale(out.log_probs[s, : len(reference)].detach(), reference, rel=1e-5)
    finally:
        qwen2_5_vl.train()
