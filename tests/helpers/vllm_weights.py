"""What vLLM 0.33.0's Qwen3-VL, Qwen3-VL-MoE, Qwen3.5 and Qwen3.5-MoE loaders do with a checkpoint's keys, read from
their source (the sdist files pinned in tests/helpers/qwen_reference.py VLLM_MEMBERS; vLLM is never imported or built).

A checkpoint key goes through, in vLLM, the `hf_to_vllm_mapper` of each model class that loads it, outermost first,
each on the name below that class's module (LOADERS lists them per family):
1. the outer class's (`Qwen3VLForConditionalGeneration`'s `orig_to_new_prefix`: `model.visual.` -> `visual.`,
   `model.language_model.` -> `language_model.model.`, `lm_head.` -> `language_model.lm_head.`); a key under no prefix
   has no module to load into (the Qwen3-VL-MoE class inherits this mapper; the Qwen3.5 classes add `mtp.` -> dropped,
   the multi-token-prediction head, which the export does not have);
2. the children's own as `AutoWeightsLoader` descends: the vision tower's (`attn.q.`/`k.`/`v.` stacked into
   `attn.qkv.`), the language model's (Qwen3-VL: `Qwen2Model`'s for the dense LLM, `Qwen3MoeModel`'s for the MoE one:
   `.q_proj`/`.k_proj`/`.v_proj` stacked into `.qkv_proj`, dense MLPs' `gate_proj`/`up_proj` into `gate_up_proj`;
   Qwen3.5: `Qwen3_5ForCausalLMBase`'s, then `Qwen3_5Model`'s = `Qwen3NextModel`'s (the same stacking, the shared
   expert's `gate_proj`/`up_proj` too) | the Gated DeltaNet's `in_proj_qkv`/`in_proj_z` into `in_proj_qkvz` and
   `in_proj_b`/`in_proj_a` into `in_proj_ba`). A mapper written `A.hf_to_vllm_mapper | WeightsMapper(...)` is merged
   as `WeightsMapper.__or__` does (each kind's dict updated by the right one);
3. the experts, `RoutedExperts.load_weights`: fused `experts.gate_up_proj` -> `w13_weight` (split in two along
   dimension 1 into gate and up, after `_orient_fused_weight`, which transposes the last two dimensions when the decoder
   layer says `is_fused_checkpoint_transposed=True`, as Qwen3-VL-MoE's does) and `experts.down_proj` -> `w2_weight`;
   per-expert `experts.<e>.gate_proj.` / `up_proj.` -> `experts.w13_` (shards w1 and w3 of expert e) and
   `experts.<e>.down_proj.` -> `experts.w2_` (Qwen3.5-MoE's checkpoints).

`vllm_name` follows the three steps with the mappers' literal values taken from the source; `module_names` lists every
attribute vLLM's model classes assign (`self.<name> = ...`), so a mapped name whose modules vLLM does not create is
caught; `expert_layout` returns what step 3 needs, read from the source too.
"""

from __future__ import annotations
import __future__

import ast
import re
import textwrap
from functools import lru_cache

import torch

from tests.helpers.qwen_reference import vllm_source

# The modules of vLLM's model classes (vision attention: Qwen2_5_VisionAttention; LLMs: Qwen3/Qwen2/Qwen3Moe for
# Qwen3-VL; Qwen3.5's on Qwen3-Next's attention and MoE block, Qwen2-MoE's MLP, the Qwen Gated DeltaNet layer).
MODEL_FILES = (
    "models/qwen3_vl.py",
    "models/qwen3_vl_moe.py",
    "models/qwen3_moe.py",
    "models/qwen3.py",
    "models/qwen2.py",
    "models/qwen2_5_vl.py",
    "models/qwen3_5.py",
    "models/qwen3_next.py",
    "models/qwen2_moe.py",
    "layers/mamba/gdn/qwen_gdn_linear_attn.py",
)
# Per family: the classes whose `hf_to_vllm_mapper` a key meets, outermost first, each with the prefix (of the name in
# vLLM's model) its module sits under; and the classes on the way that must set none of their own (or the one listed
# would not be the one that applies).
LOADERS = {
    "qwen3_vl": {
        "levels": [
            ("", "Qwen3VLForConditionalGeneration"),
            ("visual.", "Qwen3_VisionTransformer"),
            ("language_model.model.", "Qwen2Model"),
        ],
        "none": ["Qwen3Model", "Qwen3LLMModel", "Qwen3LLMForCausalLM"],
    },
    "qwen3_vl_moe": {
        "levels": [
            ("", "Qwen3VLForConditionalGeneration"),
            ("visual.", "Qwen3_VisionTransformer"),
            ("language_model.model.", "Qwen3MoeModel"),
        ],
        "none": ["Qwen3VLMoeForConditionalGeneration", "Qwen3MoeLLMModel", "Qwen3MoeLLMForCausalLM"],
    },
    "qwen3_5": {
        "levels": [
            ("", "Qwen3_5ForConditionalGeneration"),
            ("visual.", "Qwen3_VisionTransformer"),
            ("language_model.", "Qwen3_5ForCausalLMBase"),
            ("language_model.model.", "Qwen3_5Model"),
        ],
        "none": ["Qwen3_5ForCausalLM"],
    },
    "qwen3_5_moe": {
        "levels": [
            ("", "Qwen3_5ForConditionalGeneration"),
            ("visual.", "Qwen3_VisionTransformer"),
            ("language_model.", "Qwen3_5ForCausalLMBase"),
            ("language_model.model.", "Qwen3_5Model"),
        ],
        "none": ["Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeForCausalLM"],
    },
}
# The mapper kinds the loaders involved use (others would need following here).
MAPPER_KINDS = {"orig_to_new_prefix", "orig_to_new_stacked"}
FUTURE = __future__.annotations.compiler_flag  # vLLM's annotations are never evaluated
# Per-expert checkpoint names -> vLLM's fused parameter (RoutedExperts.build_expert_params_mapping, checked below).
PER_EXPERT = re.compile(r"\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.")


@lru_cache(maxsize=None)
def _classes() -> dict[str, tuple[str, ast.ClassDef]]:
    """{class name: (member, its definition)} over MODEL_FILES; a name defined twice is refused."""
    found = {}
    for member in MODEL_FILES:
        for node in ast.walk(ast.parse(vllm_source(member))):
            if isinstance(node, ast.ClassDef):
                assert node.name not in found, f"vLLM class {node.name} in {found[node.name][0]} and {member}"
                found[node.name] = (member, node)
    return found


def _class(member: str, name: str) -> ast.ClassDef:
    tree = ast.parse(vllm_source(member))
    found = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == name]
    assert len(found) == 1, f"vLLM's {member} has {len(found)} classes {name}"
    return found[0]


def _mapper_value(node: ast.expr) -> dict:
    """A mapper expression's kinds: `WeightsMapper(...)` (literal keyword arguments), `Class.hf_to_vllm_mapper`, or
    `a | b` (b's entries update a's, kind by kind, as WeightsMapper.__or__)."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        left, right = _mapper_value(node.left), _mapper_value(node.right)
        return {kind: {**left.get(kind, {}), **right.get(kind, {})} for kind in set(left) | set(right)}
    if isinstance(node, ast.Attribute) and node.attr == "hf_to_vllm_mapper":
        found = _mapper(node.value.id)
        assert found is not None, f"{node.value.id} has no hf_to_vllm_mapper of its own"
        return found
    assert isinstance(node, ast.Call) and getattr(node.func, "id", None) == "WeightsMapper", ast.unparse(node)
    kinds = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    assert set(kinds) <= MAPPER_KINDS, f"a mapper uses {set(kinds) - MAPPER_KINDS}"
    return kinds


def _mapper(class_name: str) -> dict | None:
    """The kinds of `class_name.hf_to_vllm_mapper = ...` as written in the class (None: the class sets none)."""
    for node in _classes()[class_name][1].body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "hf_to_vllm_mapper" for t in node.targets):
            return _mapper_value(node.value)
    return None


@lru_cache(maxsize=None)
def mappers(family: str) -> list[tuple[str, dict]]:
    """[(prefix, mapper kinds)] a `family` checkpoint's keys go through, outermost first, from the source. The
    classes that would override one are checked not to."""
    loaders = LOADERS[family]
    assert all(_mapper(name) is None for name in loaders["none"]), loaders["none"]
    levels = [(prefix, _mapper(name)) for prefix, name in loaders["levels"]]
    assert all(mapper is not None for _, mapper in levels), loaders["levels"]
    return levels


def _apply(mapper: dict, key: str) -> str | None:
    """WeightsMapper._map_name_with_shard for the stacked and prefix kinds (every stacked match in order, then the
    prefixes); None: a prefix mapped to None drops the key."""
    for substr, (new, _shard) in mapper.get("orig_to_new_stacked", {}).items():
        if substr in key:
            key = key.replace(substr, new, 1)
    for prefix, new in mapper.get("orig_to_new_prefix", {}).items():
        if key.startswith(prefix):
            if new is None:
                return None
            key = key.replace(prefix, new, 1)
    return key


def vllm_name(key: str, family: str) -> str | None:
    """The name a checkpoint key gets in vLLM's model (steps 1-3 above); None: no prefix of the outer mapper
    matches (vLLM has no module for it) or a mapper drops it."""
    levels = mappers(family)
    if not key.startswith(tuple(levels[0][1]["orig_to_new_prefix"])):
        return None
    name = key
    for prefix, mapper in levels:
        if name.startswith(prefix):
            mapped = _apply(mapper, name[len(prefix) :])
            if mapped is None:
                return None
            name = prefix + mapped
    for checkpoint_name, param in expert_layout()["names"].items():  # step 3: RoutedExperts' fused mapping
        if name.endswith(f".{checkpoint_name}"):
            name = name[: -len(checkpoint_name)] + param
    per_expert = PER_EXPERT.search(name)  # ... and its per-expert one
    if per_expert:
        fused = expert_layout()["per_expert"][per_expert.group(2)][0]
        name = name[: per_expert.start()] + f".experts.{fused}" + name[per_expert.end() :]
    return name


@lru_cache(maxsize=None)
def module_names() -> frozenset[str]:
    """Every attribute vLLM's model classes assign to `self` (modules among them)."""
    names = set()
    for member in MODEL_FILES:
        for node in ast.walk(ast.parse(vllm_source(member))):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for target in targets:
                for t in target.elts if isinstance(target, ast.Tuple) else [target]:
                    if isinstance(t, ast.Attribute) and getattr(t.value, "id", None) == "self":
                        names.add(t.attr)
    return frozenset(names)


@lru_cache(maxsize=None)
def parameter_names() -> frozenset[str]:
    """The attributes vLLM's model classes assign an `nn.Parameter(...)` directly (Gated DeltaNet's A_log, dt_bias)."""
    names = set()
    for member in MODEL_FILES:
        for node in ast.walk(ast.parse(vllm_source(member))):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                func = node.value.func
                if getattr(func, "attr", getattr(func, "id", None)) == "Parameter":
                    names |= {t.attr for t in node.targets if isinstance(t, ast.Attribute)}
    return frozenset(names)


def unknown_modules(name: str) -> list[str]:
    """The parts of a vLLM parameter name that name no module vLLM's classes create (layer indices aside); the last
    part must be a linear/norm/embedding `weight` or `bias`, a parameter a class assigns itself (A_log, dt_bias), or
    under `experts` one of RoutedExperts' fused parameters."""
    *path, leaf = name.split(".")
    missing = [part for part in path if not part.isdigit() and part not in module_names()]
    if path[-1:] == ["experts"]:
        known = leaf in ("w13_weight", "w2_weight")
    else:
        known = leaf in ("weight", "bias") or leaf in parameter_names()
    return missing + ([] if known else [f"leaf {leaf}"])


@lru_cache(maxsize=None)
def expert_layout() -> dict:
    """What vLLM does with expert tensors, from its source: the fused checkpoint names it maps ({checkpoint name: vLLM
    parameter}), the per-expert ones ({projection: (vLLM parameter prefix, shard)}), whether Qwen3-VL-MoE's decoder
    layers declare the fused ones transposed (Qwen3.5-MoE's MoE block declares nothing: not transposed), and
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
    # per expert: `experts.<e>.<name>.` -> w13_ (gate: shard w1, up: w3) or w2_, one expert's tensor at a time
    per_expert_mapping = """            w13 if weight_name in [ckpt_gate_proj_name, ckpt_up_proj_name] else w2,
                f"experts.{physical_to_logical_map[expert_id]}.{weight_name}.{lora_base_layer_prefix}","""
    assert per_expert_mapping in experts
    assert (
        '("w1", ckpt_gate_proj_name),\n                ("w2", ckpt_down_proj_name),\n                '
        '("w3", ckpt_up_proj_name),'
    ) in experts
    assert "experts_shard = loaded_weight.unsqueeze(0)" in experts
    assert 'w2 = f"experts.{lora_base_layer_prefix_on_param_name}{routed_experts_prefix}w2_"' in experts
    decoder = _class("models/qwen3_vl_moe.py", "Qwen3VLMoeDecoderLayer")
    transposed = any(
        k.arg == "is_fused_checkpoint_transposed" and getattr(k.value, "value", None) is True
        for call in ast.walk(decoder)
        if isinstance(call, ast.Call)
        for k in call.keywords
    )
    qwen3_5_block = ast.unparse(_class("models/qwen3_next.py", "Qwen3NextSparseMoeBlock"))
    assert "is_fused_checkpoint_transposed" not in qwen3_5_block and "ckpt_" not in qwen3_5_block  # the defaults
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
        # `experts.<e>.<projection>.` -> `experts.<this>` (the rest of the name, `weight`, follows), shard
        "per_expert": {"gate_proj": ("w13_", "w1"), "up_proj": ("w13_", "w3"), "down_proj": ("w2_", "w2")},
        "transposed": transposed,
        "orient": namespace["_orient_fused_weight"],
    }


def vllm_expert_output(gate_up: torch.Tensor, down: torch.Tensor, expert: int, x: torch.Tensor) -> torch.Tensor:
    """One expert's output for tokens `x` [N, H] computed from the fused checkpoint tensors as vLLM loads them:
    oriented, w13 split into gate (w1) and up (w3) along dimension 1, SiLU-and-multiply, then w2."""
    layout = expert_layout()
    w13 = layout["orient"](gate_up, layout["transposed"])[expert]  # [2I, H]
    w2 = layout["orient"](down, layout["transposed"])[expert]  # [H, I]
    w1, w3 = w13.chunk(2, dim=0)
    return (torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def vllm_per_expert_output(tensors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """One expert's output for tokens `x` [N, H] from its per-expert checkpoint tensors ({"gate_proj"/"up_proj"/
    "down_proj": [out, in]}) as vLLM loads them: each into its shard of the expert's w13 (w1 the first half, w3 the
    second) or w2, SiLU-and-multiply on w13's two halves, then w2."""
    shards = {expert_layout()["per_expert"][name][1]: tensor for name, tensor in tensors.items()}
    w13 = torch.cat([shards["w1"], shards["w3"]])  # [2I, H]
    w1, w3 = w13.chunk(2, dim=0)
    return (torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)) @ shards["w2"].T


def tied_in_vllm() -> bool:
    """vLLM's Qwen3-VL and Qwen3.5 LLM classes tie lm_head to the embeddings when the text config says
    tie_word_embeddings."""
    dense = ast.unparse(_class("models/qwen3_vl.py", "Qwen3LLMForCausalLM"))
    moe = ast.unparse(_class("models/qwen3_vl_moe.py", "Qwen3MoeLLMForCausalLM"))
    qwen3_5 = ast.unparse(_class("models/qwen3_5.py", "Qwen3_5ForCausalLMBase"))
    return (
        "if config.tie_word_embeddings:" in dense
        and "if self.config.tie_word_embeddings:" in moe
        and "if config.tie_word_embeddings:" in qwen3_5
    )
