"""The published checkpoints' layout (finetune/model/checkpoint_layout.py): which tensors it transposes, that
transformers loads it back as its own, that shapes it could not tell apart are refused, and that every key of the
tiny checkpoints (written in that layout) maps onto vLLM 0.33.0's Qwen3-VL modules (tests/helpers/vllm_weights.py,
its source pinned by sha256) while keys in another layout do not."""

import dataclasses

import pytest
import torch

from finetune.base.families import FAMILIES
from finetune.model.checkpoint_layout import published_layout, published_names, transposed_names, weight_fingerprint

MOE = FAMILIES["qwen3_vl_moe"]
MOES = [name for name, family in FAMILIES.items() if family.router]
QWEN3 = [name for name in FAMILIES if name.startswith("qwen3")]  # the families vLLM's qwen3_vl*.py / qwen3_5.py load


def test_only_the_named_parameters_are_transposed():
    state = {
        "model.language_model.layers.0.mlp.experts.gate_up_proj": torch.randn(4, 96, 64),
        "model.language_model.layers.0.mlp.experts.down_proj": torch.randn(4, 64, 48),
        "model.language_model.layers.0.mlp.gate.weight": torch.randn(4, 64),
        "model.language_model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64),
    }
    out = published_layout(state, MOE)
    assert sorted(transposed_names(state, MOE)) == sorted(k for k in state if ".experts." in k)
    assert out["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 64, 96)
    assert out["model.language_model.layers.0.mlp.experts.down_proj"].shape == (4, 48, 64)
    for key in state:
        expected = state[key].transpose(-1, -2) if ".experts." in key else state[key]
        assert torch.equal(out[key], expected) and out[key].is_contiguous()
    dense = FAMILIES["qwen3_vl"]
    assert transposed_names(state, dense) == [] and published_layout(state, dense) == state


def test_experts_split_per_expert_as_the_published_checkpoints_store_them():
    """A family whose checkpoints store the experts unfused: gate_up_proj's two halves (gate first) and down_proj, one
    2-D tensor per expert, under `experts.<e>.<projection>.weight`; nothing else changes, nothing is transposed."""
    split = dataclasses.replace(MOE, transposed_in_checkpoint=None, per_expert_in_checkpoint=MOE.expert_lora_targets)
    prefix = "model.language_model.layers.0.mlp"
    state = {
        f"{prefix}.experts.gate_up_proj": torch.randn(4, 96, 64),
        f"{prefix}.experts.down_proj": torch.randn(4, 64, 48),
        f"{prefix}.gate.weight": torch.randn(4, 64),
    }
    assert sorted(published_names(state, split)) == sorted(k for k in state if ".experts." in k)
    assert transposed_names(state, split) == [] and published_names(state, MOE) == transposed_names(state, MOE)
    out = published_layout(state, split)
    gate_up, down = state[f"{prefix}.experts.gate_up_proj"], state[f"{prefix}.experts.down_proj"]
    expected = {f"{prefix}.gate.weight": state[f"{prefix}.gate.weight"]}
    for e in range(4):
        expected[f"{prefix}.experts.{e}.gate_proj.weight"] = gate_up[e, :48]
        expected[f"{prefix}.experts.{e}.up_proj.weight"] = gate_up[e, 48:]
        expected[f"{prefix}.experts.{e}.down_proj.weight"] = down[e]
    assert out.keys() == expected.keys()
    assert all(torch.equal(out[k], v) and out[k].is_contiguous() for k, v in expected.items())


def test_shapes_transformers_cannot_tell_apart_are_refused():
    """2I == H: transformers' loader (Transpose(check_dims=True)) would keep such a tensor as stored."""
    with pytest.raises(ValueError, match="equal last two dimensions"):
        published_layout({"layers.0.mlp.experts.gate_up_proj": torch.zeros(4, 64, 64)}, MOE)


def test_the_fingerprint_tells_a_transposed_tensor_apart():
    weight = torch.randn(4, 6, 8)
    same = weight_fingerprint(weight.clone())
    assert weight_fingerprint(weight) == same
    moved = weight_fingerprint(weight.transpose(-1, -2).contiguous().reshape(4, 6, 8))
    assert moved[0] == same[0] and moved[1] != pytest.approx(same[1], rel=1e-6)
    swapped = weight_fingerprint(weight.flip(0))
    assert swapped[1] != pytest.approx(same[1], rel=1e-6)


@pytest.mark.parametrize("name", MOES)
def test_the_tiny_moe_checkpoint_loads_as_built(tiny_paths, name):
    """Written in the published layout (transposed, or split per expert), read back by transformers' own conversion:
    the model it was built from."""
    from transformers import AutoModelForImageTextToText

    from finetune.model.tiny import _model_config, build_tokenizer

    loaded = AutoModelForImageTextToText.from_pretrained(tiny_paths[name]).state_dict()
    torch.manual_seed(0)  # the tiny build's seed
    built = AutoModelForImageTextToText.from_config(_model_config(name, build_tokenizer()))
    assert all(torch.equal(loaded[k], v) for k, v in built.state_dict().items())


def test_the_per_expert_split_is_what_transformers_saves_for_qwen3_5_moe(tmp_path):
    """transformers 5.23 saves Qwen3.5-MoE's experts unfused too (its conversion_mapping reversed): our split gives
    the same keys and tensors, so the published layout does not hang on that reverse conversion staying."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from finetune.model.tiny import _model_config, build_tokenizer

    family = FAMILIES["qwen3_5_moe"]
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(_model_config("qwen3_5_moe", build_tokenizer()))
    model.save_pretrained(tmp_path)  # transformers' own layout choice
    saved = load_file(str(tmp_path / "model.safetensors"))
    ours = published_layout(model.state_dict(), family)
    assert any(".experts.0.gate_proj.weight" in k for k in saved) and not any(k.endswith("gate_up_proj") for k in saved)
    assert saved.keys() == ours.keys()
    assert all(torch.equal(saved[k], ours[k]) for k in saved)


@pytest.mark.parametrize("name", QWEN3)
def test_every_tiny_checkpoint_key_maps_onto_vllm_modules(tiny_paths, name):
    from safetensors import safe_open

    from tests.helpers.vllm_weights import unknown_modules, vllm_name

    with safe_open(str(tiny_paths[name] / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    for key in keys:
        mapped = vllm_name(key, name)
        assert mapped is not None and unknown_modules(mapped) == [], (key, mapped)
    if FAMILIES[name].router:
        assert vllm_name("model.language_model.layers.1.mlp.experts.gate_up_proj", name) == (
            "language_model.model.layers.1.mlp.experts.w13_weight"
        )
    if FAMILIES[name].per_expert_in_checkpoint:  # the tiny checkpoint holds the per-expert keys, none fused
        assert "model.language_model.layers.1.mlp.experts.3.up_proj.weight" in keys
        assert not [key for key in keys if key.endswith(("experts.gate_up_proj", "experts.down_proj"))]
        assert vllm_name("model.language_model.layers.1.mlp.experts.3.up_proj.weight", name) == (
            "language_model.model.layers.1.mlp.experts.w13_weight"
        )


@pytest.mark.parametrize(
    "key",
    [
        "visual.blocks.0.attn.qkv.weight",  # transformers 4's Qwen2-VL layout
        "model.layers.0.self_attn.q_proj.weight",
        "language_model.layers.0.self_attn.q_proj.weight",
    ],
)
def test_keys_in_another_layout_find_no_vllm_module(key):
    from tests.helpers.vllm_weights import vllm_name

    assert vllm_name(key, "qwen3_vl") is None


def test_names_vllm_does_not_create_are_caught():
    from tests.helpers.vllm_weights import unknown_modules, vllm_name

    mapped = vllm_name("model.language_model.layers.0.self_attn.q_proj.weight", "qwen3_vl")
    assert mapped == "language_model.model.layers.0.self_attn.qkv_proj.weight" and unknown_modules(mapped) == []
    assert unknown_modules("language_model.model.layers.0.self_attention.qkv_proj.weight") == ["self_attention"]
    assert unknown_modules("language_model.model.layers.0.mlp.experts.gate_up_proj") == ["leaf gate_up_proj"]
    assert unknown_modules("language_model.model.layers.0.mlp.gate.w2_weight") == ["leaf w2_weight"]
    # Qwen3.5: the Gated DeltaNet's projections fused as vLLM creates them, its own parameters, the MTP head dropped
    mapped = vllm_name("model.language_model.layers.0.linear_attn.in_proj_z.weight", "qwen3_5")
    assert mapped == "language_model.model.layers.0.linear_attn.in_proj_qkvz.weight" and unknown_modules(mapped) == []
    assert unknown_modules("language_model.model.layers.0.linear_attn.A_log") == []
    assert unknown_modules("language_model.model.layers.0.linear_attn.B_log") == ["leaf B_log"]
    assert unknown_modules("language_model.model.layers.0.linear_attention.out_proj.weight") == ["linear_attention"]
    assert vllm_name("mtp.layers.0.self_attn.q_proj.weight", "qwen3_5") is None


def _fused_experts_and_expert_2_output():
    """Random fused experts in transformers' layout (4 experts, H 64, I 48: gate_up [E, 2I, H] gate rows first, down
    [E, H, I]), 5 tokens, and what expert 2 computes on them as transformers' fused experts do."""
    torch.manual_seed(0)
    experts, hidden, inter = 4, 64, 48
    gate_up, down = torch.randn(experts, 2 * inter, hidden), torch.randn(experts, hidden, inter)
    x = torch.randn(5, hidden)
    gate, up = torch.nn.functional.linear(x, gate_up[2]).chunk(2, dim=-1)
    return gate_up, down, x, torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, down[2])


def test_vllm_loads_qwen3_vl_moe_experts_transposed():
    """vLLM's Qwen3-VL-MoE decoder layers declare the fused experts transposed, so a tensor in the published layout
    computes what transformers computes with its own layout (here: random weights, one expert)."""
    from tests.helpers.vllm_weights import expert_layout, vllm_expert_output

    assert expert_layout()["transposed"]
    gate_up, down, x, expected = _fused_experts_and_expert_2_output()
    published = published_layout({"l.mlp.experts.gate_up_proj": gate_up, "l.mlp.experts.down_proj": down}, MOE)
    got = vllm_expert_output(published["l.mlp.experts.gate_up_proj"], published["l.mlp.experts.down_proj"], 2, x)
    assert torch.allclose(got, expected, atol=1e-4)
    # transformers' own layout (what save_pretrained writes) does not fit vLLM's expert shapes
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        vllm_expert_output(gate_up, down, 2, x)


def test_vllm_loads_qwen3_5_moe_experts_per_expert():
    """vLLM's Qwen3.5-MoE block (Qwen3NextSparseMoeBlock) loads the per-expert tensors into each expert's w13 (gate as
    shard w1, up as w3) and w2: from the published split, it computes what transformers computes with its fused
    layout (random weights, one expert); with gate and up swapped it would not."""
    from tests.helpers.vllm_weights import expert_layout, vllm_per_expert_output

    family = FAMILIES["qwen3_5_moe"]
    assert expert_layout()["per_expert"]["gate_proj"][1] == "w1" and expert_layout()["per_expert"]["up_proj"][1] == "w3"
    gate_up, down, x, expected = _fused_experts_and_expert_2_output()
    published = published_layout({"l.mlp.experts.gate_up_proj": gate_up, "l.mlp.experts.down_proj": down}, family)
    own = {p: published[f"l.mlp.experts.2.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj")}
    assert torch.allclose(vllm_per_expert_output(own, x), expected, atol=1e-4)
    swapped = dict(own, gate_proj=own["up_proj"], up_proj=own["gate_proj"])
    assert not torch.allclose(vllm_per_expert_output(swapped, x), expected, atol=1e-2)
