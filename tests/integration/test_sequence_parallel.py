"""Sequence parallelism (finetune/model/sequence_parallel.py) on 2 gloo ranks against 1 process, fp32, for every family
it supports: one launch of tests/helpers/sequence_parallel_harness.py (all families in turn) writes each family's
loss, LoRA gradients and logits; the 1-process reference is computed here on the same packed row (a text, an image
and a video sample) with the same model."""

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO
from tests.helpers.sequence_parallel_case import (
    SP_FAMILIES,
    build_batch,
    build_model,
    labels_on_first_part,
    packed_rows,
    reference_loss_and_grads,
    sample_spans,
)

RELATIVE = 1e-5


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("sequence_parallel")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(REPO / "tests/helpers/sequence_parallel_harness.py"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out


@pytest.fixture(scope="module")
def reference(launched):
    """family -> (harness result, reference loss, gradients, logits, batch, encoded samples, one-rank loss)."""
    cases = {}
    for family in SP_FAMILIES:
        model, _ = build_model(family)
        encoded = packed_rows(family, launched)
        batch = build_batch(family, model, encoded)
        loss, grads, logits = reference_loss_and_grads(model, batch)
        half = -(-batch["input_ids"].shape[1] // 2)
        one_rank, _, _ = reference_loss_and_grads(model, labels_on_first_part(batch, half - 1))
        result = torch.load(launched / f"{family}.pt")
        one_image = reference_loss_and_grads(model, build_batch(family, model, encoded[:2]))
        cases[family] = dict(
            one_image=one_image,
            result=result,
            loss=loss,
            grads=grads,
            logits=logits,
            encoded=encoded,
            one=one_rank,
            batch=batch,
        )
    return cases


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("family", SP_FAMILIES)
def test_two_ranks_equal_one_process(reference, family):
    case = reference[family]
    result = case["result"]
    assert abs(result["loss"] - case["loss"]) <= RELATIVE * abs(case["loss"])
    assert set(result["grads"]) == set(case["grads"]) and len(case["grads"]) > 0
    assert any(".visual." in name for name in case["grads"])  # the vision tower's LoRA trains too
    for name, want in case["grads"].items():
        assert want.abs().max() > 0, name  # every LoRA matrix has a gradient to compare
        assert _relative(result["grads"][name], want) <= RELATIVE, name
    length = case["logits"].shape[1]
    assert _relative(result["logits"][:, :length], case["logits"]) <= RELATIVE


@pytest.mark.parametrize("family", SP_FAMILIES)
def test_changing_one_sample_leaves_the_others_logits(reference, family, tmp_path):
    case = reference[family]
    spans = sample_spans(case["encoded"])
    changed = sample_spans(packed_rows(family, tmp_path, variant=1))
    assert changed[0] != spans[0]  # the text sample (first in the row) differs in length and tokens
    logits, logits_b = case["result"]["logits"], case["result"]["logits_b"]
    n = min(spans[0].stop, changed[0].stop)
    assert not torch.allclose(logits[:, :n], logits_b[:, :n])  # the changed sample's own logits do change
    # the image and video samples now sit at other offsets and straddle the ranks differently: the same logits
    for span, moved in zip(spans[1:], changed[1:]):
        assert _relative(logits_b[:, moved], logits[:, span]) <= RELATIVE


@pytest.mark.parametrize("family", SP_FAMILIES)
def test_labels_on_one_rank_only(reference, family):
    case = reference[family]
    got = case["result"]["one_rank_loss"]
    assert torch.isfinite(torch.tensor(got)) and abs(got - case["one"]) <= RELATIVE * abs(case["one"])


@pytest.mark.parametrize("family", SP_FAMILIES)
def test_only_the_llm_attention_is_wrapped(reference, family):
    result = reference[family]["result"]
    model, _ = build_model(family)
    layers = model.get_base_model().config.get_text_config().num_hidden_layers
    assert result["attention_calls"] == layers  # one all-to-all attention per LLM layer and forward
    assert result["wrapped_vision_modules"] == 0


@pytest.mark.parametrize("family", SP_FAMILIES)
def test_each_rank_encodes_only_its_frames(reference, family):
    case = reference[family]
    result = case["result"]
    batch = case["batch"]
    total = sum(int(batch[g].prod(-1).sum()) for g in ("image_grid_thw", "video_grid_thw"))
    shares = [sum(calls) for calls in result["encoded_patches"]]  # patches each rank's one tower call encoded
    assert [len(calls) for calls in result["encoded_patches"]] == [1, 1]
    assert sum(shares) == total and all(0 < share < total for share in shares)
    assert result["sharded_feature_error"] <= RELATIVE  # the gathered features equal one unsharded tower call
    assert abs(result["sharded_loss"] - case["loss"]) <= RELATIVE * abs(case["loss"])
    for name, want in case["grads"].items():
        assert _relative(result["sharded_grads"][name], want) <= RELATIVE, name


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The demo recipe (vision LoRA too) for 2 steps as 4 processes, 2 x 2 (sequence parallel x data parallel) under
    ZeRO-3, each rank 1 row per step (its share of the row's frames encoded, then gathered within its group), and as
    1 process with the same 2 rows per step."""
    from tests.helpers.recipe_runs import mini_dataset, tiny_run_overrides
    from tests.integration.test_scale_out import harness, train_here

    root = tmp_path_factory.mktemp("sequence_parallel_training")
    data = mini_dataset(root / "train.json", per_task=4)

    def recipe(run_dir, processes, rows, *extra):
        return tiny_run_overrides("qwen2_5_vl", run_dir, data, steps=2) + [
            "trainer.packing=true",
            "trainer.max_tokens_per_row=256",
            "data.max_length=128",
            f"trainer.per_device_train_batch_size={rows}",
            f"accelerate.processes_per_node={processes}",
            "trainer.save_steps=100",
            "evaluation.after_training=false",
            "export.after_training=false",
            "peft.dropout=0",
            "model.attn_implementation=varlen",
            "data.eval=null",
            "parts.vision_tower=lora",  # the sharded frames' gathered features carry gradients back to each rank
            *extra,
        ]

    harness(recipe(root / "split", 4, 1, "trainer.sequence_parallel=2", "deepspeed=zero3"), {})
    train_here(recipe(root / "one", 1, 2))
    return root


def test_two_by_two_under_zero3_trains_as_one_process(trained):
    from tests.integration.test_scale_out import losses

    split, one = losses(trained / "split"), losses(trained / "one")
    assert sorted(split) == sorted(one) == [1, 2]
    for step, want in one.items():
        assert abs(split[step] - want) <= RELATIVE * abs(want), (step, split[step], want)
    # Step 2's loss is computed after an optimizer step on step 1's gradients. (The adapters are not compared
    # element-wise: Adam's first steps move an element whose gradient is ~0 by about the learning rate in either
    # direction on float noise.)


@pytest.mark.parametrize("family", SP_FAMILIES)
def test_a_rank_without_frames_still_trains_exactly(reference, family):
    case = reference[family]
    result = case["result"]
    loss, grads, _ = case["one_image"]
    from transformers import AutoConfig

    from finetune.model.tiny import tiny_checkpoint

    merge = AutoConfig.from_pretrained(tiny_checkpoint(family)).vision_config.spatial_merge_size
    image_patches = int(case["batch"]["image_grid_thw"].prod(-1).sum())
    # rank 0 encodes the image; rank 1 calls the tower once on the dummy input (merge x merge patches)
    assert result["one_image_encoded_patches"] == [[image_patches], [merge * merge]]
    assert abs(result["one_image_sharded_loss"] - loss) <= RELATIVE * abs(loss)
    for name, want in grads.items():
        assert _relative(result["one_image_sharded_grads"][name], want) <= RELATIVE, name
