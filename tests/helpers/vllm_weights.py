"""What vLLM 0.33.0's Qwen3-VL and Qwen3-VL-MoE loaders do with a checkpoint's keys, read from their source (the
sdist files pinned in tests/helpers/qwen_reference.py VLLM_MEMBERS; vLLM is never imported or built).

A checkpoint key goes through, in vLLM:
1. `Qwen3VLForConditionalGeneration.hf_to_vllm_mapper` (`orig_to_new_prefix`: `model.visual.` -> `visual.`,
   `model.language_model.` -> `language_model.model.`, `lm_head.` -> `language_model.lm_head.`); a key under no prefix
   has no module to load into (the Qwen3-VL-MoE class inherits this mapper);
2. the child's own mapper as `AutoWeightsLoader` descends: the vision tower's (`attn.q.`/`k.`/`v.` stacked into
   `attn.qkv.`), the language model's (`Qwen2Model`'s for the dense LLM, `Qwen3MoeModel`'s for the MoE one:
   `.q_proj`/`.k_proj`/`.v_proj` stacked into `.qkv_proj`, dense MLPs' `gate_proj`/`up_proj` into `gate_up_proj`);
3. for fused experts, `RoutedExperts.load_weights`: `experts.gate_up_proj` -> `w13_weight` (split in two along
   dimension 1 into gate and up, after `_orient_fused_weight`, which transposes the last two dimensions when the decoder
   layer says `is_fused_checkpoint_transposed=True`, as Qwen3-VL-MoE's does) and `experts.down_proj` -> `w2_weight`.

`vllm_name` follows the three steps with the mappers' literal values taken from the source; `module_names` lists every
attribute vLLM's Qwen3-VL module classes assign (`self.<name> = ...`), so a mapped name whose modules vLLM does not
create is caught; `expert_layout` returns what step 3 needs, read from the source too.
"""

from __future__ import annotations
import __future__

import ast
import textwrap
from functools import lru_cache

import torch

from tests.helpers.qwen_reference import vllm_source

# The modules of vLLM's Qwen3-VL model classes (vision attention: Qwen2_5_VisionAttention; LLMs: Qwen3/Qwen2/Qwen3Moe).
MODEL_FILES = (
    "models/qwen3_vl.py",
    "models/qwen3_vl_moe.py",
    "models/qwen3_moe.py",
    "models/qwen3.py",
    "models/qwen2.py",
    "models/qwen2_5_vl.py",
)
# The one mapper kinds the loaders involved use (others would need following here).
MAPPER_KINDS = {"orig_to_new_prefix", "orig_to_new_stacked"}
FUTURE = __future__.annotations.compiler_flag  # vLLM's annotations are never evaluated


def _class(member: str, name: str) -> ast.ClassDef:
    tree = ast.parse(vllm_source(member))
    found = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == name]
    assert len(found) == 1, f"vLLM's {member} has {len(found)} classes {name}"
    return found[0]


def _mapper(member: str, class_name: str) -> dict | None:
    """The literal keyword arguments of `class_name.hf_to_vllm_mapper = WeightsMapper(...)` (None: the class sets
    none of its own)."""
    for node in _class(member, class_name).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "hf_to_vllm_mapper" for t in node.targets):
            call = node.value
            assert isinstance(call, ast.Call) and getattr(call.func, "id", None) == "WeightsMapper", class_name
            kinds = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
            assert set(kinds) <= MAPPER_KINDS, f"{class_name}'s mapper uses {set(kinds) - MAPPER_KINDS}"
            return kinds
    return None


@lru_cache(maxsize=None)
def mappers(family: str) -> dict[str, dict]:
    """{"outer", "visual", "language_model"}: the mappers a `family` checkpoint's keys go through, from the source.
    The classes that would override one are checked not to."""
    moe = family == "qwen3_vl_moe"
    assert _mapper("models/qwen3_vl_moe.py", "Qwen3VLMoeForConditionalGeneration") is None
    assert _mapper("models/qwen3.py", "Qwen3Model") is None and _mapper("models/qwen3_vl.py", "Qwen3LLMModel") is None
    assert _mapper("models/qwen3_vl_moe.py", "Qwen3MoeLLMModel") is None
    return {
        "outer": _mapper("models/qwen3_vl.py", "Qwen3VLForConditionalGeneration"),
        "visual": _mapper("models/qwen3_vl.py", "Qwen3_VisionTransformer"),
        "language_model": _mapper("models/qwen3_moe.py", "Qwen3MoeModel")
        if moe
        else _mapper("models/qwen2.py", "Qwen2Model"),
    }


def _apply(mapper: dict, key: str) -> str:
    """WeightsMapper._map_name_with_shard for the stacked and prefix kinds (in that order, first match each)."""
    for substr, (new, _shard) in mapper.get("orig_to_new_stacked", {}).items():
        if substr in key:
            key = key.replace(substr, new, 1)
    for prefix, new in mapper.get("orig_to_new_prefix", {}).items():
        if key.startswith(prefix):
            assert new is not None
            key = key.replace(prefix, new, 1)
    return key


def vllm_name(key: str, family: str) -> str | None:
    """The name a checkpoint key gets in vLLM's model (steps 1-2 above); None: no prefix of the outer mapper
    matches, so vLLM has no module for it."""
    maps = mappers(family)
    prefixes = maps["outer"]["orig_to_new_prefix"]
    if not key.startswith(tuple(prefixes)):
        return None
    name = _apply(maps["outer"], key)
    for child, inner in (("visual.", "visual"), ("language_model.model.", "language_model")):
        if name.startswith(child):
            name = child + _apply(maps[inner], name[len(child) :])
    for checkpoint_name, param in expert_layout()["names"].items():  # step 3: RoutedExperts' fused mapping
        if name.endswith(f".{checkpoint_name}"):
            name = name[: -len(checkpoint_name)] + param
    return name


@lru_cache(maxsize=None)
def module_names() -> frozenset[str]:
    """Every attribute vLLM's Qwen3-VL model classes assign to `self` (modules among them)."""
    names = set()
    for member in MODEL_FILES:
        for node in ast.walk(ast.parse(vllm_source(member))):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for target in targets:
                for t in target.elts if isinstance(target, ast.Tuple) else [target]:
                    if isinstance(t, ast.Attribute) and getattr(t.value, "id", None) == "self":
                        names.add(t.attr)
    return frozenset(names)


def unknown_modules(name: str) -> list[str]:
    """The parts of a vLLM parameter name that name no module vLLM's Qwen3-VL classes create (layer indices aside);
    the last part must be a linear/norm/embedding `weight` or `bias`, or under `experts` one of RoutedExperts'
    fused parameters."""
    *path, leaf = name.split(".")
    missing = [part for part in path if not part.isdigit() and part not in module_names()]
    leaves = ("w13_weight", "w2_weight") if path[-1:] == ["experts"] else ("weight", "bias")
    return missing + ([] if leaf in leaves else [f"leaf {leaf}"])


@lru_cache(maxsize=None)
def expert_layout() -> dict:
    """What vLLM does with fused expert tensors, from its source: the checkpoint names it maps
    ({checkpoint name: vLLM parameter}), whether Qwen3-VL-MoE's decoder layers declare them transposed, and
    `_orient_fused_weight` itself (run from the source)."""
    experts = vllm_source("layers/fused_moe/routed_experts.py")
    layer = vllm_source("layers/fused_moe/layer.py")
    # FusedMoE's default checkpoint names, and the fused mapping built from them (build_expert_params_mapping)
    assert 'ckpt_names: tuple[str, str, str | None] = ("gate_proj", "down_proj", "up_proj")' in layer
    assert (
        'elif ckpt_gate_proj_name == "gate_proj" and ckpt_up_proj_name == "up_proj":\n                gate_up = "gate_up_proj"'
        in experts
    )
    assert '(f"{w13}weight", f"experts.{gate_up}", chunk, shard_id)' in experts
    assert '(f"{w2}weight", f"experts.{ckpt_down_proj_name}", 0, "w2")' in experts
    # gate (w1) and up (w3) are the two halves of dimension 1 of the oriented tensor
    assert "experts_shard = fused_weight.chunk(2, dim=1)[expert_id]" in experts
    assert 'w13_shards: tuple[str, ...] = ("w1", "w3")' in experts
    decoder = _class("models/qwen3_vl_moe.py", "Qwen3VLMoeDecoderLayer")
    transposed = any(
        k.arg == "is_fused_checkpoint_transposed" and getattr(k.value, "value", None) is True
        for call in ast.walk(decoder)
        if isinstance(call, ast.Call)
        for k in call.keywords
    )
    method = next(
        n
        for n in _class("layers/fused_moe/routed_experts.py", "RoutedExperts").body
        if isinstance(n, ast.FunctionDef) and n.name == "_orient_fused_weight"
    )
    code = textwrap.dedent(ast.get_source_segment(experts, method, padded=True))  # the def, without @staticmethod
    namespace = {"torch": torch}
    exec(compile(code, "vllm-0.33.0 routed_experts.py", "exec", flags=FUTURE, dont_inherit=True), namespace)
    return {
        "names": {"experts.gate_up_proj": "experts.w13_weight", "experts.down_proj": "experts.w2_weight"},
        "transposed": transposed,
        "orient": namespace["_orient_fused_weight"],
    }


def vllm_expert_output(gate_up: torch.Tensor, down: torch.Tensor, expert: int, x: torch.Tensor) -> torch.Tensor:
    """One expert's output for tokens `x` [N, H] computed from the checkpoint tensors as vLLM loads them: oriented,
    w13 split into gate (w1) and up (w3) along dimension 1, SiLU-and-multiply, then w2."""
    layout = expert_layout()
    w13 = layout["orient"](gate_up, layout["transposed"])[expert]  # [2I, H]
    w2 = layout["orient"](down, layout["transposed"])[expert]  # [H, I]
    w1, w3 = w13.chunk(2, dim=0)
    return (torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def tied_in_vllm() -> bool:
    """Both Qwen3-VL LLM classes tie lm_head to the embeddings when the text config says tie_word_embeddings."""
    dense = ast.unparse(_class("models/qwen3_vl.py", "Qwen3LLMForCausalLM"))
    moe = ast.unparse(_class("models/qwen3_vl_moe.py", "Qwen3MoeLLMForCausalLM"))
    return "if config.tie_word_embeddings:" in dense and "if self.config.tie_word_embeddings:" in moe
