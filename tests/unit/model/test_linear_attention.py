"""finetune/model/linear_attention.py: the linear-attention layers of hybrid models (Qwen3.5) restart at every packed
sample's boundary, against transformers' own functions run on each sample alone (the chunked rule, and the token by
token recurrence as an independent second reference). Whole-model packing per family: tests/unit/model/test_packing.py."""

import importlib

import pytest
import torch
from transformers import AutoModelForImageTextToText

from finetune.model import linear_attention
from finetune.model.attention import boundaries_from_positions
from tests.helpers.tolerance import assert_close_to_scale

MODELING = importlib.import_module(linear_attention.HYBRID_MODULES[0])


def original(name):
    function = getattr(MODELING, name)
    return getattr(function, linear_attention._ORIGINAL, function)


# Two rows of 80 flattened: sequences of 1, 70 (crosses the 64-token chunk), 9; then 33, 2, 45 (the last: padding).
LENGTHS = [1, 70, 9, 33, 2, 45]
ROWS, LENGTH = 2, 80


def cu_seqlens():
    return torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)


def per_sequence(fn, tensors):
    """fn on each sequence alone (tensors flattened to (1, ROWS x LENGTH, ...)), concatenated back."""
    flat = [t.reshape(1, ROWS * LENGTH, *t.shape[2:]) for t in tensors]
    bounds = cu_seqlens().tolist()
    outs = [fn(*(t[:, a:b] for t in flat)) for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=1).reshape(ROWS, LENGTH, *outs[0].shape[2:])


def test_the_convolution_restarts_at_every_boundary():
    generator = torch.Generator().manual_seed(0)
    channels, kernel = 6, 4
    x = torch.randn(ROWS, channels, LENGTH, generator=generator)
    weight, bias = torch.randn(channels, kernel, generator=generator), torch.randn(channels, generator=generator)
    conv = original("causal_conv1d_fn")
    got = linear_attention.boundary_causal_conv1d(x, weight, bias, "silu", cu_seqlens())
    # transformers' convolution on each sequence alone ((B, C, L) layout: move channels out of the way and back)
    alone = per_sequence(
        lambda t: conv(t.transpose(1, 2), weight, bias, activation="silu").transpose(1, 2), [x.transpose(1, 2)]
    ).transpose(1, 2)
    assert_close_to_scale(got, alone, rel=1e-6)
    across = conv(x, weight, bias, activation="silu")  # one row through transformers' own: taps cross samples
    assert (across - alone).abs().max() > 1e-2
    unbiased = linear_attention.boundary_causal_conv1d(x, weight, None, None, cu_seqlens())
    assert_close_to_scale(unbiased[:, :, :1], (weight[:, -1:] * x[:, :, :1]), rel=1e-6)  # a 1-token sequence


def _delta_rule_inputs(seed=0, k_heads=2, v_heads=4, dim=8):
    generator = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(ROWS, LENGTH, k_heads, dim, generator=generator) for _ in range(2))
    v = torch.randn(ROWS, LENGTH, v_heads, dim, generator=generator)
    g = -torch.rand(ROWS, LENGTH, v_heads, generator=generator)  # log decays, <= 0
    beta = torch.rand(ROWS, LENGTH, v_heads, generator=generator)
    return q, k, v, g, beta


@pytest.mark.parametrize("reference", ["torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule"])
def test_the_gated_delta_rule_restarts_at_every_boundary(reference):
    q, k, v, g, beta = _delta_rule_inputs()
    rule = original("torch_chunk_gated_delta_rule")
    got, state = linear_attention.boundary_gated_delta_rule(
        rule, q, k, v, g, beta, cu_seqlens(), use_qk_l2norm_in_kernel=True
    )
    assert state is None
    alone_fn = original(reference)
    alone = per_sequence(
        lambda *t: alone_fn(*t[:3], g=t[3], beta=t[4], use_qk_l2norm_in_kernel=True)[0], (q, k, v, g, beta)
    )
    assert_close_to_scale(got, alone, rel=1e-5)
    whole, _ = rule(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)  # each row as one sequence: state leaks
    assert (whole - alone).abs().max() > 1e-2
    with pytest.raises(ValueError, match="without a cache"):
        linear_attention.boundary_gated_delta_rule(rule, q, k, v, g, beta, cu_seqlens(), output_final_state=True)


def test_with_an_external_kernel_the_rows_go_as_one_sequence_with_cu_seqlens(monkeypatch):
    """flash-linear-attention's convention (one flattened row, `cu_seqlens`), checked with a stand-in kernel that
    computes each sequence alone with transformers' recurrence."""
    q, k, v, g, beta = _delta_rule_inputs(seed=1)
    recurrent, seen = original("torch_recurrent_gated_delta_rule"), []

    def kernel(q, k, v, g, beta, cu_seqlens, **kwargs):
        seen.append((q.shape[:2], cu_seqlens.tolist()))
        bounds = cu_seqlens.tolist()
        outs = [
            recurrent(q[:, a:b], k[:, a:b], v[:, a:b], g=g[:, a:b], beta=beta[:, a:b], **kwargs)[0]
            for a, b in zip(bounds[:-1], bounds[1:])
        ]
        return torch.cat(outs, dim=1), None

    monkeypatch.setattr(linear_attention, "_external_kernel", lambda: True)
    got, _ = linear_attention.boundary_gated_delta_rule(
        kernel, q, k, v, g, beta, cu_seqlens(), use_qk_l2norm_in_kernel=True
    )
    assert seen == [((1, ROWS * LENGTH), cu_seqlens().tolist())]
    monkeypatch.setattr(linear_attention, "_external_kernel", lambda: False)
    expected, _ = linear_attention.boundary_gated_delta_rule(
        original("torch_chunk_gated_delta_rule"), q, k, v, g, beta, cu_seqlens(), use_qk_l2norm_in_kernel=True
    )
    assert_close_to_scale(got, expected, rel=1e-5)


# ---------------------------------------------------------------- a whole (text-only) packed row through a model
def _tiny_hybrid(tiny_paths, family="qwen3_5"):
    """The family's tiny checkpoint (finetune/model/tiny.py), loaded as plain transformers does (nothing installed)."""
    return AutoModelForImageTextToText.from_pretrained(tiny_paths[family])


def _packed_row(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 600, (1, sum(lengths)), generator=generator)
    positions = torch.cat([torch.arange(n) for n in lengths])[None].expand(4, 1, -1).clone()  # batching.py's layout
    return ids, positions


@pytest.mark.parametrize("model_type", ["qwen3_5", "qwen3_5_moe"])
def test_a_packed_row_equals_its_samples_alone_only_once_installed(tiny_paths, model_type):
    model = _tiny_hybrid(tiny_paths, model_type).eval()
    lengths = [7, 70, 13]
    ids, positions = _packed_row(lengths)
    with torch.no_grad():
        alone, start = [], 0
        for n in lengths:
            span = slice(start, start + n)
            alone.append(model(input_ids=ids[:, span], position_ids=positions[:, :, span], use_cache=False).logits)
            start += n
        alone = torch.cat(alone, dim=1)
        plain = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        linear_attention.install(model)
        installed = model(input_ids=ids, position_ids=positions, use_cache=False).logits  # boundaries from positions
        cu, longest = boundaries_from_positions(positions[0], 1, sum(lengths), "cpu")
        sent = model(
            input_ids=ids,
            position_ids=positions,
            use_cache=False,
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=longest,
            max_length_k=longest,
        ).logits
    assert (plain - alone).abs().max() > 1e-2 * alone.abs().max()  # the fallback alone mixes samples
    assert_close_to_scale(installed, alone, rel=1e-5)
    assert_close_to_scale(sent, installed, rel=1e-6)


def test_install_is_a_no_op_without_linear_attention_and_packing_problems_are_named(tiny_paths):
    dense = AutoModelForImageTextToText.from_pretrained(tiny_paths["qwen2_5_vl"])
    linear_attention.install(dense)
    assert not linear_attention.is_hybrid(dense.config) and not dense._forward_pre_hooks
    assert linear_attention.packing_problem(dense) is None
    hybrid = _tiny_hybrid(tiny_paths)
    assert linear_attention.is_hybrid(hybrid.config) and linear_attention.packing_problem(hybrid) is None
    layer = linear_attention.linear_attention_layers(hybrid)[0]
    layer.forward = lambda *args, **kwargs: None  # what a hub kernel's replacement looks like from outside
    assert "was replaced" in linear_attention.packing_problem(hybrid)


def test_training_refuses_packing_where_a_layer_is_not_transformers_own(tmp_path, monkeypatch, caplog):
    from finetune.base.errors import ConfigError
    from finetune.recipe.load import load_config
    from finetune.training.workflow import build_trainer
    from tests.helpers.recipe_runs import mini_dataset, tiny_run_overrides

    train_file = mini_dataset(tmp_path / "train.json", per_task=2)
    overrides = tiny_run_overrides("qwen3_5", tmp_path / "run", train_file) + [
        "trainer.packing=true",
        "trainer.max_tokens_per_row=512",
    ]
    with caplog.at_level("INFO"):
        trainer, *_ = build_trainer(load_config(overrides), overrides)
    assert "linear attention restarted at every sample boundary" in caplog.text
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["cu_seq_lens_q"] is not None  # the collator sends the boundaries whatever the attention
    monkeypatch.setattr(linear_attention, "packing_problem", lambda model: "a stand-in reason")
    with pytest.raises(ConfigError, match="a stand-in reason.*Set trainer.packing=false"):
        build_trainer(load_config(overrides), overrides)
