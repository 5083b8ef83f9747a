"""The training command on the 2-layer models (in this process: its command line is tested elsewhere): a few steps on
images and videos, first losses pinned.

The losses are pinned for the tested pins (constraints.txt) on CPU in fp32; a change in them means the
tokenisation, labels, vision inputs, initialisation or optimisation changed: find out which before re-pinning.
"""

import json

import pytest
from safetensors import safe_open

from finetune.base.families import FAMILIES
from finetune.recipe.data_settings import vision_settings
from tests.helpers.recipe_runs import EXPERIMENT, mini_dataset, tiny_run_overrides


def base_model_loss(family, train_file):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from finetune.data.encode import ConversationEncoder
    from finetune.data.sources import load_samples
    from finetune.model.batching import inference_batch
    from finetune.model.rope import PositionRule
    from finetune.model.tiny import tiny_checkpoint
    from finetune.recipe.load import load_config
    from tests.helpers import DEMO

    config = load_config([f"experiment={EXPERIMENT[family]}"])
    path = tiny_checkpoint(family)
    encoder = ConversationEncoder(AutoProcessor.from_pretrained(path), vision_settings(config))
    model = AutoModelForImageTextToText.from_pretrained(path)
    # Plain transformers given the qwen rule's position ids explicitly (it would compute its own otherwise).
    rule = PositionRule.for_model(model.config, "qwen")
    batch = inference_batch(
        [encoder.encode(s) for s in load_samples(train_file, DEMO)],
        encoder.tokenizer.pad_token_id,
        rule,
        padding_side="right",
    )
    with torch.no_grad():
        return model(**batch).loss.item()


PINNED_LOSSES = {  # model.rope_rule=qwen (the default)
    "qwen2_vl": [7.217561, 6.551856, 6.003342],
    "qwen2_5_vl": [6.224277, 5.674113, 5.214046],
    "qwen3_vl": [6.671459, 6.039811, 5.558943],  # a tokenizer with whitespace merges (tiny build 6)
    "qwen3_vl_moe": [6.341320, 5.815294, 5.380457],
    "qwen3_5": [6.937286, 6.354898, 5.915173],
    "qwen3_5_moe": [6.273433, 5.675084, 5.245707],
}
# model.rope_rule=transformers: the losses pinned before the qwen rule existed, when positions were the installed
# transformers' own. The demo videos (grid (4, 4, 4)) are where the two rules part. Where videos are timestamped
# frame pairs (Qwen3-VL, Qwen3.5) both rules give the same positions (one temporal id per pair block;
# tests/unit/model/test_rope.py and test_positions_paths.py, per family), so the same losses as PINNED_LOSSES: no
# run of its own there.
PINNED_LOSSES_TRANSFORMERS_RULE = {
    "qwen2_vl": [7.172182, 6.518811, 5.981348],
    "qwen2_5_vl": [6.257012, 5.700313, 5.237171],
}
RULES_PART = [name for name, family in FAMILIES.items() if family.video_layout == "one_block"]


def test_every_family_has_pinned_losses():
    assert PINNED_LOSSES.keys() == FAMILIES.keys() and PINNED_LOSSES_TRANSFORMERS_RULE.keys() == set(RULES_PART)


CASES = [(f, packing, "qwen") for f in FAMILIES for packing in (False, True)] + [
    (f, False, "transformers") for f in RULES_PART
]


@pytest.mark.parametrize("family, packing, rope_rule", CASES)
def test_few_steps_on_images_and_videos_pin_the_first_losses(tmp_path, family, packing, rope_rule, caplog):
    from finetune.cli.main import run_command

    train_file = mini_dataset(tmp_path / "train.json")
    run_dir = tmp_path / "run"
    overrides = tiny_run_overrides(family, run_dir, train_file) + [f"model.rope_rule={rope_rule}"]
    if packing:  # all 8 samples (~340 tokens) in one row: the same batch, so the same losses as unpacked
        overrides += ["trainer.packing=true", "trainer.max_tokens_per_row=512", "trainer.per_device_train_batch_size=1"]
    with caplog.at_level("INFO", logger="finetune.train"):
        assert run_command("train", overrides) == 0
    assert ("packing 8 samples into 1 rows" in caplog.text) == packing
    assert f"M-RoPE positions: model.rope_rule={rope_rule}" in caplog.text
    if rope_rule == "transformers":
        history = json.loads((run_dir / "log_history.json").read_text())
        losses = [entry["loss"] for entry in history if "loss" in entry]
        assert losses == pytest.approx(PINNED_LOSSES_TRANSFORMERS_RULE[family], rel=1e-4)
        return

    history = json.loads((run_dir / "log_history.json").read_text())
    losses = [entry["loss"] for entry in history if "loss" in entry]
    print(family, "losses", losses)
    # Independent of the pin: LoRA starts as a no-op and the batch holds all 8 samples, so the first loss is the
    # base model's own token-mean loss on them (TRL's fused LM head must agree with the model's forward).
    assert losses[0] == pytest.approx(base_model_loss(family, train_file), rel=1e-5)
    assert losses == pytest.approx(PINNED_LOSSES[family], rel=1e-4)
    assert all(entry["tokens_per_second_per_device"] > 0 for entry in history if "loss" in entry)

    # The run directory documents itself.
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["packages"]["transformers"] and info["git"]["sha"] is not None and info["precision"] == "fp32"
    assert "name: " + EXPERIMENT[family] in (run_dir / "config.yaml").read_text()

    # LoRA only on the language model: nothing in the vision tower, merger or embeddings.
    adapter = run_dir / "adapter"
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(".language_model." in k and "lora_" in k for k in keys), keys[:5]
    assert not any(".visual." in k for k in keys)
    assert (adapter / "processor_config.json").exists() and (adapter / "chat_template.jinja").exists()


def _largest_vocab_tensor(run, vocab: int) -> int:
    """The most elements of any tensor with a last dimension of `vocab` that an op took while `run()` ran (forward
    and backward), from the profiler's recorded input shapes."""
    import math

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    shapes = [
        s for event in prof.events() for s in event.input_shapes if s and isinstance(s, list) and s[-1:] == [vocab]
    ]
    return max((math.prod(s) for s in shapes), default=0)


def test_no_training_step_materialises_the_full_logits(tmp_path):
    """TRL's fused chunked LM head never builds the (rows, length, vocab) logits in a training step (forward and
    backward): on a GPU it projects only the labelled positions, on the CPU every position in tiles of 4,096 tokens.
    Checked on a packed row of more than 4,096 tokens, against a plain forward of the same batch, which does build
    them."""
    import torch

    from finetune.recipe.load import load_config
    from finetune.training.workflow import build_trainer

    words = "the dot moves left right up down red green blue circle square".split()
    records = [
        {
            "messages": [
                {"role": "user", "content": " ".join(words[(i + k) % len(words)] for k in range(60)) + "?"},
                {"role": "assistant", "content": " ".join(words[(i * 3 + k) % len(words)] for k in range(20))},
            ]
        }
        for i in range(60)
    ]
    train_file = tmp_path / "train.json"
    train_file.write_text(json.dumps(records))
    overrides = tiny_run_overrides("qwen2_5_vl", tmp_path / "run", train_file, steps=1) + [
        "trainer.packing=true",
        "data.max_length=8192",
        "trainer.per_device_train_batch_size=1",
        "model.attn_implementation=varlen",  # per-sample attention: the test is about the head, not a 5k x 5k mask
    ]
    trainer, *_ = build_trainer(load_config(overrides), overrides)
    vocab = trainer.model.config.get_text_config().vocab_size
    batches = []
    step = trainer.training_step
    trainer.training_step = lambda model, inputs, *args: batches.append(dict(inputs)) or step(model, inputs, *args)
    largest_in_step = _largest_vocab_tensor(trainer.train, vocab)
    (batch,) = batches
    rows, length = batch["input_ids"].shape
    assert rows == 1 and length > 4096
    assert 0 < largest_in_step <= 4096 * vocab < rows * length * vocab

    inputs = {k: v for k, v in batch.items() if k not in ("num_real_tokens", "sample_ids", "bad_samples", "labels")}
    with torch.no_grad():
        plain = _largest_vocab_tensor(lambda: trainer.model(**inputs, use_cache=False), vocab)
    assert plain >= rows * length * vocab  # the detector does see full logits where they exist


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradient_accumulation_normalises_by_all_trained_tokens(tmp_path, family, caplog):
    """Two packed rows in one step, or one row per micro-step with 2 accumulation steps: the same update.
    Rows hold different numbers of trained tokens, so a per-micro-batch mean would differ."""
    import json
    import math

    from transformers import AutoProcessor

    from finetune.cli.main import run_command
    from finetune.data.encode import ConversationEncoder
    from finetune.data.packing import pack_rows
    from finetune.data.sources import load_samples
    from finetune.model.tiny import tiny_checkpoint
    from finetune.recipe.load import load_config
    from tests.helpers import DEMO
    from tests.helpers.recipe_runs import EXPERIMENT, mini_dataset, tiny_run_overrides

    train_file = mini_dataset(tmp_path / "train.json")
    records = json.loads(train_file.read_text())
    for i, record in enumerate(records):  # answers of different lengths: rows carry different trained counts
        record["messages"][-1]["content"] += " indeed" * (3 * i)
    train_file.write_text(json.dumps(records))
    # The row budget that packs this family's samples (their lengths differ by patch size and video layout) into
    # exactly 2 rows holding different numbers of trained tokens.
    config = load_config([f"experiment={EXPERIMENT[family]}"])
    encoder = ConversationEncoder(AutoProcessor.from_pretrained(tiny_checkpoint(family)), vision_settings(config))
    encoded = [encoder.encode(s) for s in load_samples(train_file, DEMO)]
    lengths = [len(e.input_ids) for e in encoded]
    budget = max(max(lengths), math.ceil(sum(lengths) / 2))
    while True:  # the first budget giving 2 rows whose trained counts differ (equal ones can happen by chance)
        rows = pack_rows(lengths, budget, seed=42)
        trained = [sum(sum(label != -100 for label in encoded[i].labels) for i in row) for row in rows]
        if len(rows) == 2 and trained[0] != trained[1]:
            break
        assert len(rows) >= 2, (budget, trained)  # no budget left that splits the samples into two rows
        budget += 8
    losses = {}
    for name, rows_per_step, accumulation in [("one_step", 2, 1), ("accumulated", 1, 2)]:
        run_dir = tmp_path / name
        overrides = tiny_run_overrides(family, run_dir, train_file, steps=2) + [
            "trainer.packing=true",
            f"trainer.max_tokens_per_row={budget}",
            f"data.max_length={budget}",
            f"trainer.per_device_train_batch_size={rows_per_step}",
            f"trainer.gradient_accumulation_steps={accumulation}",
        ]
        with caplog.at_level("INFO", logger="finetune.train"):
            assert run_command("train", overrides) == 0  # in this process: the CLI's exit path is covered elsewhere
        assert "packing 8 samples into 2 rows" in caplog.text
        history = json.loads((run_dir / "log_history.json").read_text())
        losses[name] = [h["loss"] for h in history if "loss" in h]
    assert losses["one_step"] == pytest.approx(losses["accumulated"], rel=1e-5)
