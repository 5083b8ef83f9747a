"""Every rank of a 2-process gloo launch (`python -m torch.distributed.run --nproc_per_node 2 <this> OUT_DIR`): for each
family of tests/helpers/sequence_parallel_case.py, the fixed packed row trained one step under sequence parallelism
(N = 2), and rank 0 writes OUT_DIR/<family>.pt:
  loss, grads         the global loss (token sum over the global labelled count) and every LoRA gradient (summed
                      over the ranks: each rank's backward holds a share of every rank's loss)
  logits, logits_b    the whole row's logits (both slices gathered) for the row and for the row with its text sample
                      changed
  one_rank_loss       the loss of the row with labels only in rank 0's slice (rank 1 has none)
  attention_calls     all-to-all attention calls per forward; wrapped_vision_modules: vision modules carrying it
  sharded_*           with each rank encoding only its share of the frames (encode_media_sharded): the loss, the
                      LoRA gradients, the largest difference of the gathered features from one unsharded tower call
                      (relative), and the patches each rank's tower call encoded; one_image_*: the same for the
                      row's text and image samples only (one image: rank 1 encodes no frame)
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from finetune.model.media_features import encode_media_once, vision_tower
from finetune.model.sequence_parallel import SequenceParallel, encode_media_sharded, install, slice_token_losses
from tests.helpers.sequence_parallel_case import (
    SP_FAMILIES,
    build_batch,
    build_model,
    labels_on_first_part,
    model_inputs,
    packed_rows,
)


def global_loss(model, batch, sp, inputs=None) -> torch.Tensor:
    token_sum, count = slice_token_losses(model, inputs or model_inputs(batch), sp)
    total = torch.tensor(float(count))
    dist.all_reduce(total)
    return token_sum / total.clamp_min(1)


def whole_logits(model, batch, sp) -> torch.Tensor:
    from finetune.model.sequence_parallel import LanguageModelSlice, pad_row

    inputs = pad_row(model_inputs(batch), sp.size)
    inputs.pop("labels")
    with torch.no_grad(), LanguageModelSlice(model, sp):
        logits = model(**inputs, use_cache=False).logits.float().contiguous()
    parts = [torch.empty_like(logits) for _ in range(sp.size)]
    dist.all_gather(parts, logits)
    return torch.cat(parts, dim=1)


def run_family(family: str, sp: SequenceParallel, out_dir: Path) -> None:
    model, _ = build_model(family)
    install(model, sp)
    encoded = packed_rows(family, out_dir / f"rank{sp.rank}")
    batch = build_batch(family, model, encoded)
    calls = sp.calls
    loss = global_loss(model, batch, sp)
    loss.backward()
    attention_calls = sp.calls - calls
    dist.all_reduce(loss.detach())
    grads = lora_grads(model)
    logits = whole_logits(model, batch, sp)
    logits_b = whole_logits(model, build_batch(family, model, packed_rows(family, out_dir / f"rank{sp.rank}", 1)), sp)
    half = -(-batch["input_ids"].shape[1] // 2)  # the padded row's first slice ends here (within one token)
    with torch.no_grad():
        one_rank = global_loss(model, labels_on_first_part(batch, half - 1), sp)
        dist.all_reduce(one_rank)
    sharded = run_sharded(model, batch, sp)
    # A row with one image: rank 1 has no frame to encode (its tower runs on the dummy input, 0 x its features).
    one_image = {
        f"one_image_{k}": v for k, v in run_sharded(model, build_batch(family, model, encoded[:2]), sp).items()
    }
    wrapped = sum(hasattr(m, "sequence_parallel") for m in vision_tower(model).modules())
    if sp.rank == 0:
        result = {
            "loss": float(loss),
            "grads": grads,
            "logits": logits,
            "logits_b": logits_b,
            "one_rank_loss": float(one_rank),
            "attention_calls": attention_calls,
            "wrapped_vision_modules": wrapped,
            **sharded,
            **one_image,
        }
        torch.save(result, out_dir / f"{family}.pt")


def lora_grads(model) -> dict:
    grads = {}
    for name, param in model.named_parameters():
        if param.requires_grad and "lora" in name:
            grad = param.grad.detach().clone() if param.grad is not None else torch.zeros_like(param)
            dist.all_reduce(grad)
            grads[name] = grad
    return grads


def run_sharded(model, batch, sp) -> dict:
    """One step with the frames shared out (encode_media_sharded), the features handed in as mm_encoder_outputs."""
    visual, vision_config = vision_tower(model), model.get_base_model().config.vision_config
    encoded = []
    handle = visual.register_forward_pre_hook(
        lambda m, a, kw: encoded.append(int(kw["grid_thw"].prod(-1).sum())), with_kwargs=True
    )
    model.zero_grad(set_to_none=True)
    inputs = model_inputs(batch)
    features, padding = encode_media_sharded(visual, vision_config, inputs, sp)
    handle.remove()
    with torch.no_grad():
        whole, _ = encode_media_once(visual, vision_config, inputs)
    error = 0.0
    for kind, out in whole.items():
        got, want = torch.cat(features[kind].pooler_output), torch.cat(out.pooler_output)
        error = max(error, float((got - want).abs().max() / want.abs().max()))
        for layer_got, layer_want in zip(
            getattr(features[kind], "deepstack_features", None) or [], getattr(out, "deepstack_features", None) or []
        ):
            got, want = torch.cat(layer_got), torch.cat(layer_want)
            error = max(error, float((got - want).abs().max() / want.abs().max()))
    for key in ("pixel_values", "pixel_values_videos"):
        inputs.pop(key, None)
    loss = global_loss(model, batch, sp, {**inputs, "mm_encoder_outputs": features})
    if padding is not None:
        loss = loss + padding
    loss.backward()
    dist.all_reduce(loss.detach())
    counts = [None] * sp.size
    dist.all_gather_object(counts, encoded)
    return {
        "sharded_loss": float(loss),
        "sharded_grads": lora_grads(model),
        "sharded_feature_error": error,
        "encoded_patches": counts,
    }


def main(out_dir: Path, families) -> None:
    dist.init_process_group("gloo")
    sp = SequenceParallel.from_world(dist.get_world_size())
    for family in families:
        (out_dir / f"rank{sp.rank}").mkdir(parents=True, exist_ok=True)
        run_family(family, sp, out_dir)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or SP_FAMILIES)
