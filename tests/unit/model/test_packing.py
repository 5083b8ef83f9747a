"""Packing: whole samples per row, each sample's M-RoPE equal to an independent reference on that sample alone
(Qwen's transformers 4.49 `get_rope_index` for rope_rule=qwen, the installed one for rope_rule=transformers),
attention isolated between samples, and the packed loss (and gradients) equal to the unpadded baseline."""

import random

import pytest
import torch
from transformers import AutoModelForImageTextToText
from transformers.masking_utils import find_packed_sequence_indices

from finetune.base.errors import DataError
from finetune.base.families import FAMILIES
from finetune.data.encode import ConversationEncoder, EncodedSample
from finetune.data.packing import RowBatchSampler, pack_rows, training_rows
from finetune.data.sources import load_samples
from finetune.data.vision import VisionSettings
from finetune.model import attention, linear_attention
from finetune.model.batching import inference_batch, training_batch
from finetune.model.rope import PositionRule
from tests.helpers.media_factory import write_dataset
from tests.helpers.qwen_reference import reference_qwen_rule
from tests.helpers.random_data import build_media_pool, random_record
from tests.helpers.tolerance import assert_close_to_scale, scaled_difference

ROWS_PER_FAMILY = 600
SETTINGS = VisionSettings(4 * 784, 64 * 784, 2.0, 4, 16, 16 * 784, 64 * 784, 1024 * 784)


# ---------------------------------------------------------------- bin packing and the sampler
def test_rows_hold_every_sample_once_within_budget_and_fill_well():
    rng = random.Random(0)
    lengths = [int(min(4076, rng.lognormvariate(6, 0.9))) + 20 for _ in range(5000)]
    rows = pack_rows(lengths, 4096, seed=1)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(5000))
    assert all(sum(lengths[i] for i in row) <= 4096 for row in rows)
    fill = sum(lengths) / (len(rows) * 4096)
    assert fill >= 0.98, fill
    assert rows == pack_rows(lengths, 4096, seed=1) and rows != pack_rows(lengths, 4096, seed=2)
    with pytest.raises(ValueError, match="longer than the 4096-token row budget"):
        pack_rows([5000], 4096, seed=0)


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_every_rank_gets_the_same_number_of_full_steps(world_size):
    lengths = [random.Random(i).randint(30, 900) for i in range(997)]
    sampler = RowBatchSampler(pack_rows(lengths, 1024, seed=0), rows_per_batch=2, seed=0, world_size=world_size)
    batches = list(sampler)
    assert len(batches) == len(sampler) and len(batches) % world_size == 0
    assert all(len(b) == 2 for b in batches)
    per_rank = [batches[r::world_size] for r in range(world_size)]  # how accelerate shards batches
    assert len({len(b) for b in per_rank}) == 1
    assert {r for b in batches for r in b} == set(sampler.rows)  # nothing lost; the tail wraps around
    sampler.set_epoch(1)
    assert list(sampler) != batches  # reshuffled every epoch
    sampler.set_epoch(0)
    assert list(sampler) == batches  # deterministic for a seed


def test_without_packing_every_row_is_one_sample():
    rows = training_rows([5, 900, 30], packing=False, budget=64, seed=0)  # no budget: max_length is checked earlier
    assert rows == [(0,), (1,), (2,)]
    served = [r for batch in RowBatchSampler(rows, 2, seed=0) for r in batch]
    assert len(served) == 4 and set(served) == set(rows)  # two full steps; the tail wraps around


# ---------------------------------------------------------------- position ids, loss, isolation
@pytest.fixture(scope="module")
def pool(tmp_path_factory, processors):
    root, images, videos = build_media_pool(tmp_path_factory.mktemp("pool"))
    rng = random.Random(3)
    records = [random_record(rng, images, videos, i) for i in range(200)]
    samples = load_samples(write_dataset(root / "random.json", records))
    encoded = {}
    for family in FAMILIES:
        encoder = ConversationEncoder(processors[family], SETTINGS)
        encoded[family] = []
        for sample in samples:
            try:
                encoded[family].append(encoder.encode(sample))
            except DataError:
                pass  # refused samples (too few frames, ...) are covered by the encoder tests
    return encoded


def load(path, **kwargs):
    """The tiny model as load_model leaves it: hybrid models' linear attention restarts at sample boundaries."""
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    linear_attention.install(model)
    return model


@pytest.fixture(scope="module")
def models(tiny_paths):
    return {f: load(p).eval() for f, p in tiny_paths.items()}


def _rule(model, name="qwen"):
    return PositionRule.for_model(model.config, name)


def _reference_positions(model, sample, family, rule_name):
    """One sample alone through the reference: Qwen's own code (qwen: transformers 4.49's method, Qwen3-VL's 4.57)
    or the installed model's (transformers)."""
    ids = torch.tensor([sample.input_ids])
    kwargs = {"image_grid_thw": sample.image_grid_thw, "video_grid_thw": sample.video_grid_thw}
    if FAMILIES[family].video_seconds_scale and sample.second_per_grid_ts:
        kwargs["second_per_grid_ts"] = torch.tensor(sample.second_per_grid_ts, dtype=torch.float32)
    if rule_name == "qwen":
        positions, _ = reference_qwen_rule(family, model.config, ids, **kwargs)
    else:
        positions, _ = model.model.get_rope_index(ids, torch.tensor([sample.mm_token_type_ids]), **kwargs)
    return positions[:, 0]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("rule_name", ["qwen", "transformers"])
def test_packed_positions_equal_the_reference_per_sample(processors, models, pool, family, rule_name):
    model, encoded, pad_id = models[family], pool[family], processors[family].tokenizer.pad_token_id
    references = [_reference_positions(model, e, family, rule_name) for e in encoded]
    rule = _rule(model, rule_name)
    rng = random.Random(4)
    kinds = {"image": 0, "video": 0, "mixed": 0, "multi_turn": 0}
    for _ in range(ROWS_PER_FAMILY // 3):
        rows = [rng.sample(range(len(encoded)), rng.randint(1, 6)) for _ in range(3)]
        batch = training_batch([[encoded[i] for i in row] for row in rows], pad_id, rule)
        for r, row in enumerate(rows):
            offset = 0
            for i in row:
                n = len(encoded[i].input_ids)
                assert torch.equal(batch["position_ids"][1:, r, offset : offset + n], references[i])
                assert torch.equal(batch["position_ids"][0, r, offset : offset + n], torch.arange(n))
                offset += n
                kinds["image"] += encoded[i].image_grid_thw is not None
                kinds["video"] += encoded[i].video_grid_thw is not None
                kinds["mixed"] += encoded[i].image_grid_thw is not None and encoded[i].video_grid_thw is not None
                kinds["multi_turn"] += sum(label == -100 for label in encoded[i].labels[1:]) > 0
            # transformers reads the sample boundaries from row 0 (padding is a block of its own).
            blocks = find_packed_sequence_indices(batch["position_ids"][0, r : r + 1])
            assert blocks is None or blocks[0, offset - 1].item() == len(row) - 1
    assert min(kinds.values()) > 50, kinds


def _packed_loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**{k: v for k, v in batch.items() if k != "num_real_tokens"}, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _unpacked_loss_and_grads(model, rows, pad_id, rule, implementation):
    """Each sample alone (an attention mask, the same rule's ids), its loss weighted by its share of the tokens."""
    attention.set_implementation(model, implementation)
    model.zero_grad()
    total_tokens = sum(sum(label != -100 for label in s.labels[1:]) for row in rows for s in row)
    reference = 0.0
    for s in (s for row in rows for s in row):
        n = sum(label != -100 for label in s.labels[1:])
        loss = model(**inference_batch([s], pad_id, rule), use_cache=False).loss * n / total_tokens
        loss.backward()
        reference += loss.item()
    return reference, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("attn", ["sdpa", "eager", "varlen"])
def test_packed_loss_and_gradients_equal_the_token_weighted_unpacked_ones(processors, tiny_paths, pool, family, attn):
    """Every attention implementation that runs on the CPU (varlen: one sdpa call per sample, with the collator's
    boundaries): a packed row's loss and gradients equal the per-sample ones (each sample alone with a mask), 1e-5 of
    their scale in fp32.

    Hybrid models (linear attention) run as training runs them: installed, with the collator's boundaries. Plain
    packing through transformers' PyTorch fallback must fail this test. One exception to 1e-5: the gradients of the
    linear-attention decay parameters (A_log, dt_bias and in_proj_a: they enter every later token's decay, so their
    gradient sums terms that mostly cancel) cannot be reproduced to 1e-5 in fp32 by the reference itself: computed
    with eager instead of sdpa it moves by up to 6e-5 on the tiny Qwen3.5. Each gradient may differ by twice what the
    reference's two exact implementations differ by, where that is more than 1e-5."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_paths[family], attn_implementation=attn_loaded(attn))
    model.train()
    implementation, _ = attention.choose(attn, False, torch.device("cpu"), torch.float32)
    encoded, pad_id = pool[family], processors[family].tokenizer.pad_token_id
    rows = [encoded[0:4], encoded[4:7], encoded[7:12]]
    rule = _rule(model)
    attention.set_implementation(model, implementation)
    hybrid = linear_attention.is_hybrid(model.config)
    plain = None
    if hybrid and not attention.uses_boundaries(implementation):  # not installed, no boundaries: plain packing
        plain = _packed_loss_and_grads(model, training_batch(rows, pad_id, rule))
    linear_attention.install(model)
    boundaries = attention.uses_boundaries(implementation) or hybrid  # as finetune/training/workflow.py decides
    packed_loss, packed_grads = _packed_loss_and_grads(model, training_batch(rows, pad_id, rule, boundaries=boundaries))
    # the references are padded: a mask, not boundaries
    reference, reference_grads = _unpacked_loss_and_grads(model, rows, pad_id, rule, attn_loaded(attn))
    tolerance = {name: 1e-5 for name in reference_grads}
    if hybrid:
        other = "eager" if attn_loaded(attn) == "sdpa" else "sdpa"
        _, other_grads = _unpacked_loss_and_grads(model, rows, pad_id, rule, other)
        for name, grad in reference_grads.items():
            tolerance[name] = max(1e-5, 2 * scaled_difference(other_grads[name], grad))
        assert max(tolerance.values()) < 1e-3  # a loose bound only where fp32 itself is
    assert abs(packed_loss.item() - reference) / reference <= 1e-5
    for name, grad in packed_grads.items():
        assert_close_to_scale(grad, reference_grads[name], rel=tolerance[name], name=name)
    if plain is not None:
        plain_loss, plain_grads = plain
        assert abs(plain_loss.item() - reference) / reference > 1e-5  # measured: 2.7e-4 and 5.2e-5 (MoE)
        worst = max(
            scaled_difference(grad, reference_grads[name]) / tolerance[name] for name, grad in plain_grads.items()
        )
        assert worst > 100, worst  # measured: gradients off by 0.2 (0.5 MoE) of their scale


def attn_loaded(attn: str) -> str:
    return attention.loading_implementation(attn)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_varlen_attention_equals_sdpa_with_the_block_mask_in_one_call_per_layer(processors, tiny_paths, pool, family):
    """The varlen path (collator boundaries, transformers' AttentionInterface) gives sdpa's logits on packed rows of
    several samples and padding, with one attention call per layer in the LLM and in the ViT (no window loop)."""
    model = load(tiny_paths[family]).eval()
    tower_calls = []
    model.model.visual.register_forward_hook(lambda *args: tower_calls.append(1))
    encoded, pad_id = pool[family], processors[family].tokenizer.pad_token_id
    rows = [encoded[12:15], encoded[15:17]]  # different lengths: the second row ends in padding
    rule = _rule(model)
    with torch.no_grad():
        sdpa = model(**_forward_inputs(training_batch(rows, pad_id, rule)), use_cache=False).logits
        calls = []
        kernel = attention.KERNELS["per_sample"]
        attention.KERNELS["per_sample"] = lambda *args: calls.append(args[3].numel() - 1) or kernel(*args)
        try:
            attention.set_implementation(model, attention.REGISTERED["per_sample"])
            batch = training_batch(rows, pad_id, rule, boundaries=True)
            tower_calls.clear()
            varlen = model(**_forward_inputs(batch), use_cache=False).logits
        finally:
            attention.KERNELS["per_sample"] = kernel
    assert_close_to_scale(varlen, sdpa, rel=1e-5)
    text = model.config.text_config
    kinds = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    text_layers = sum(kind != "linear_attention" for kind in kinds)  # the layers that call attention
    vision_blocks = model.config.vision_config.depth
    samples = sum(len(row) for row in rows) + 1  # one padding block
    assert calls.count(samples) == text_layers  # the collator's boundaries reached every decoder layer
    # and each ViT block made one call for all its windows and frames (transformers calls the tower per modality)
    assert tower_calls and len(calls) == text_layers + vision_blocks * len(tower_calls)


def _forward_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("num_real_tokens", "labels")}


def test_the_collator_boundaries_are_the_samples_and_each_row_padding():
    sample = lambda n: EncodedSample(  # noqa: E731
        input_ids=[1] * n, labels=[-100] * n, mm_token_type_ids=[0] * n
    )
    rule = PositionRule("qwen", 2, 2.0)
    batch = training_batch([[sample(3), sample(4)], [sample(5)]], 0, rule, boundaries=True)
    assert batch["input_ids"].shape == (2, 7)
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 7, 12, 14] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 5
    derived, longest = attention.boundaries_from_positions(batch["position_ids"][0], 2, 7, "cpu")
    assert derived.tolist() == batch["cu_seq_lens_q"].tolist() and longest == 5
    assert "cu_seq_lens_q" not in training_batch([[sample(3)]], 0, rule)


def test_a_varlen_kernel_that_disagrees_with_sdpa_falls_back_to_sdpa(monkeypatch, caplog):
    """The start-up check a GPU kernel must pass, run here with a broken kernel standing in for a GPU one."""
    per_sample = attention.KERNELS["per_sample"]
    assert attention.disagreement_with_sdpa("per_sample", torch.device("cpu"), torch.float32) is None
    monkeypatch.setattr(attention, "gpu_kernel", lambda: "per_sample")
    assert attention.choose("auto", True, torch.device("cpu"), torch.float32)[0] == attention.REGISTERED["per_sample"]
    broken = lambda q, k, v, cu_q, cu_k, max_q, max_k, scale, causal: per_sample(  # noqa: E731
        q, k, v, cu_q, cu_k, max_q, max_k, scale, False
    )
    monkeypatch.setitem(attention.KERNELS, "per_sample", broken)
    with caplog.at_level("WARNING"):
        chosen, note = attention.choose("auto", True, torch.device("cpu"), torch.float32)
    assert chosen == "sdpa" and "failed its check" in note and "causal output differs" in caplog.text
    monkeypatch.setitem(attention.KERNELS, "per_sample", lambda *args: 1 / 0)
    assert attention.choose("varlen", True, torch.device("cpu"), torch.float32)[0] == "sdpa"
    assert attention.choose("auto", False, torch.device("cpu"), torch.float32)[0] == "sdpa"  # the CPU path


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_changing_one_packed_sample_leaves_the_others_untouched(processors, tiny_paths, pool, family, attn):
    model = load(tiny_paths[family], attn_implementation=attn).eval()
    encoded, pad_id = pool[family], processors[family].tokenizer.pad_token_id
    row = encoded[20:25]
    batch = training_batch([row], pad_id, _rule(model))
    inputs = {k: v for k, v in batch.items() if k not in ("num_real_tokens", "labels")}
    with torch.no_grad():
        before = model(**inputs, use_cache=False).logits
        start = len(row[0].input_ids) + len(row[1].input_ids)  # change the third sample's text tokens
        end = start + len(row[2].input_ids)
        ids = inputs["input_ids"].clone()
        text = (inputs["mm_token_type_ids"][0, start:end] == 0).nonzero().flatten()[2:-1] + start
        ids[0, text] = (ids[0, text] + 7) % 300
        after = model(**{**inputs, "input_ids": ids}, use_cache=False).logits
    assert (after[0, end:] - before[0, end:]).abs().max().item() == 0.0
    assert (after[0, :start] - before[0, :start]).abs().max().item() == 0.0
    assert (after[0, start:end] - before[0, start:end]).abs().max().item() > 1e-3
