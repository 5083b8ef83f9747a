"""The families an end-to-end test runs when the families share its code path: the fewest registry entries that
between them take every path the registry's fields choose (how a video enters the LLM, whether its positions carry
seconds, DeepStack mergers, a mixture of experts and how its checkpoints store the experts, linear attention).

Multi-process runs (2-rank ZeRO-3) and whole train -> evaluate -> export -> predict chains cost 30-60 s per family on
the CPU; what differs between families inside them is covered per family by the fast tests under tests/unit (packing,
positions, one vision call per forward, trainable parts, export layout). A new family whose fields open a new path
joins the list by itself; one that shares every path with a listed family adds no end-to-end run.
"""

from __future__ import annotations

from itertools import combinations

from finetune.base.families import FAMILIES, Family


def path_features(family: Family) -> set[tuple[str, object]]:
    """The (field, value) pairs that pick a different code path in training, evaluation or export."""
    layer_types = (family.tiny_text or {}).get("layer_types") or ()
    if family.per_expert_in_checkpoint:
        experts = "per_expert"
    elif family.transposed_in_checkpoint:
        experts = "transposed"
    else:
        experts = "fused" if family.router else "dense"
    return {
        ("video_layout", family.video_layout),
        ("video_seconds", family.video_seconds_scale is not None),
        ("deepstack", len(family.mergers) > 1),
        ("experts", experts),
        ("linear_attention", "linear_attention" in layer_types),
    }


def one_family_per_path(families: dict[str, Family] = FAMILIES) -> list[str]:
    """The smallest set of families that takes every path feature any family has; of sets of that size, the first in
    registry order (deterministic; a registry of a few dozen entries is still a quick search)."""
    features = {name: path_features(family) for name, family in families.items()}
    wanted = set().union(*features.values())
    for size in range(1, len(families) + 1):
        for names in combinations(families, size):
            if set().union(*(features[n] for n in names)) == wanted:
                return list(names)
    raise AssertionError("unreachable: all families together take every feature")


FAMILY_PER_PATH = one_family_per_path()
