"""Bytes autograd saves for backward in one training step, per model part, before and after this project stopped
the frozen vision tower from building a graph, side by side on one fixed mixed image/video batch.

    .venv/bin/python benchmarks/saved_activations.py [--family qwen2_5_vl] [--reentrant] [--vision-tower frozen]

- before: transformers 5's `enable_input_require_grads` (called by `activation_checkpointing_enable` and by PEFT)
  hooks the input embeddings of every nested model, the vision patch embed included, so a frozen ViT's output
  requires a gradient and autograd keeps every ViT activation (ms-swift #10214);
- after: `finetune.trainable` (a frozen tower runs without autograd; input gradients only where a trainable
  part needs them).
Counts each saved storage once (parameters excluded), attributed to the part whose module saved it; the LLM's
decoder layers are checkpointed in both (what is saved inside them is recomputed, so little shows there).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.data.encode import ConversationEncoder  # noqa: E402
from finetune.data.sources import load_samples  # noqa: E402
from finetune.model.batching import training_batch  # noqa: E402
from finetune.model.load import load_model, load_processor  # noqa: E402
from finetune.model.rope import model_position_rule  # noqa: E402
from finetune.model.trainable import (  # noqa: E402
    PARTS,
    apply_freezing,
    apply_lora,
    base_model,
    enable_activation_checkpointing,
    make_trainable,
    model_family,
    model_part,
    vision_tower,
)
from finetune.recipe.data_settings import vision_settings  # noqa: E402
from finetune.recipe.load import load_config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EXPERIMENT = {"qwen2_vl": "demo_qwen2_vl", "qwen2_5_vl": "demo"}


def recipe(family: str, vision_tower: str = "frozen"):
    return load_config(
        [
            f"experiment={EXPERIMENT[family]}",
            f"parts.vision_tower={vision_tower}",
            "trainer.gradient_checkpointing=true",
        ]
    )


def mixed_batch(config, samples_per_kind: int = 2) -> dict:
    """The first `samples_per_kind` image and video samples of the demo training split, one sample per row."""
    encoder = ConversationEncoder(load_processor(config.model), vision_settings(config))
    samples = load_samples(REPO / "data" / "demo" / "train.json", REPO / "data" / "demo")
    images = [s for s in samples if s.extra.get("task") == "colour"][:samples_per_kind]
    videos = [s for s in samples if s.extra.get("task") == "direction"][:samples_per_kind]
    return [encoder.encode(s) for s in images + videos], encoder.tokenizer.pad_token_id


def training_model(config, mode: str, reentrant: bool):
    """The model as training builds it ('after'), or as it was built before ('before')."""
    torch.manual_seed(0)
    model = load_model(config.model, "fp32")
    if mode == "after":
        model = make_trainable(model, config)
        enable_activation_checkpointing(model, config, reentrant=reentrant)
    else:
        apply_freezing(model, config)
        model = apply_lora(model, config)
        base_model(model).activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        if not config.trainer.gradient_checkpointing_vision_tower:
            for module in vision_tower(model).modules():
                if hasattr(module, "gradient_checkpointing"):
                    module.gradient_checkpointing = False
        base_model(model).config.use_cache = False
        model.enable_input_require_grads()
    return model.train()


def saved_bytes_by_part(model, batch: dict) -> dict[str, int]:
    """One forward + backward; bytes of the tensors autograd saved for backward, per part (storages counted once)."""
    names, family = {module: name for name, module in model.named_modules()}, model_family(model)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stack: list[str] = []
    saved: dict[int, tuple[str, int]] = {}

    def enter(module, args):
        stack.append(model_part(names.get(module, ""), family))

    def leave(module, args, output):
        stack.pop()

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters and stack:
            saved.setdefault(storage.data_ptr(), (stack[-1], storage.nbytes()))
        return tensor

    hooks = [m.register_forward_pre_hook(enter) for m in names] + [m.register_forward_hook(leave) for m in names]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    totals = dict.fromkeys(PARTS, 0)
    for part, size in saved.values():
        totals[part] += size
    return totals


def measure(family: str, reentrant: bool, vision_tower: str = "frozen") -> dict[str, dict[str, int]]:
    config = recipe(family, vision_tower)
    encoded, pad_id = mixed_batch(config)
    results = {}
    for mode in ("before", "after"):
        model = training_model(config, mode, reentrant)
        batch = training_batch([[e] for e in encoded], pad_id, model_position_rule(model))
        batch.pop("num_real_tokens")
        results[mode] = saved_bytes_by_part(model, batch)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="qwen2_5_vl", choices=sorted(EXPERIMENT))
    parser.add_argument("--reentrant", action="store_true", help="reentrant checkpointing (as under ZeRO-3)")
    parser.add_argument("--vision-tower", default="frozen", choices=["frozen", "lora", "full"])
    args = parser.parse_args()
    results = measure(args.family, args.reentrant, args.vision_tower)
    print(
        f"{args.family}, vision tower {args.vision_tower}, "
        f"{'reentrant' if args.reentrant else 'non-reentrant'} checkpointing of the LLM, 2 image + 2 video rows"
    )
    print("| part | before (bytes saved) | after (bytes saved) |\n|---|---|---|")
    for part in PARTS:
        print(f"| {part} | {results['before'][part]:,} | {results['after'][part]:,} |")


if __name__ == "__main__":
    main()
