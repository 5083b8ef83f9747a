"""Streaming mode (data.streaming=true): on a set that fits one look-ahead buffer it trains on the very rows, in the
very order, of the indexed mode (same per-step losses, across an epoch boundary, packed and unpacked); resuming
continues from the right record (with two DataLoader workers sharing the batches); bad records are skipped and
reported once; the ranks' shards split the records."""

import json
import shutil

import pytest

from finetune.data.sources import DatasetSource
from finetune.data.streaming import shard_records
from finetune.recipe.data_settings import conversation_encoder
from tests.helpers import DEMO
from tests.helpers.recipe_runs import mini_dataset, tiny_run_overrides


def losses(run_dir):
    history = json.loads((run_dir / "log_history.json").read_text())
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def seen_tokens(run_dir):
    history = json.loads((run_dir / "log_history.json").read_text())
    return [h["tokens_seen"] for h in history if "loss" in h]


def _train(run_dir, train_file, steps, *extra):
    """The training command in this process (its command line is tested elsewhere)."""
    from finetune.cli.main import run_command

    overrides = tiny_run_overrides("qwen2_5_vl", run_dir, train_file, steps)
    overrides = [o for o in overrides if not o.startswith(("data.eval", "trainer.per_device"))]
    assert run_command("train", overrides + ["trainer.per_device_train_batch_size=1", *extra]) == 0
    return losses(run_dir)


@pytest.mark.parametrize("packing,steps", [("false", 10), ("true", 4)])
def test_streaming_equals_indexed_on_a_set_that_fits_one_buffer(tmp_path, packing, steps):
    train_file = mini_dataset(tmp_path / "mini.json", per_task=4)  # 8 samples: 8 rows unpacked, 2 packed
    extra = [f"trainer.packing={packing}", "trainer.max_tokens_per_row=256"]
    indexed = _train(tmp_path / "indexed", train_file, steps, *extra)
    streamed = _train(tmp_path / "streamed", train_file, steps, *extra, "data.streaming=true")
    assert len(indexed) == steps and streamed.keys() == indexed.keys()
    for step in indexed:
        assert streamed[step] == pytest.approx(indexed[step], abs=1e-6), step
    # Our own token count (all ranks' real tokens so far) grows every step, alike in both modes.
    seen = [seen_tokens(tmp_path / mode) for mode in ("indexed", "streamed")]
    assert seen[0] == seen[1] and all(b > a > 0 for a, b in zip(seen[0], seen[0][1:]))


def test_streaming_resume_continues_from_the_right_record(tmp_path):
    train_file = mini_dataset(tmp_path / "mini.json", per_task=4)
    stream = [
        "data.streaming=true",
        "trainer.dataloader_num_workers=2",
        "trainer.save_steps=3",
        "trainer.save_total_limit=2",
    ]
    whole = _train(tmp_path / "whole", train_file, 6, *stream)
    shutil.copytree(tmp_path / "whole" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed = _train(tmp_path / "resumed", train_file, 6, *stream, "trainer.resume_from_checkpoint=latest")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # 1-3 from the checkpoint's state, 4-6 trained now
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(whole[step], abs=1e-6), step


def test_bad_records_in_a_stream_are_skipped_and_reported(tmp_path):
    records = json.loads(mini_dataset(tmp_path / "mini.json", per_task=4).read_text())
    broken = [dict(records[0], id="no-such-file", images=["missing.png"]), {"id": "not-a-sample"}]
    lines = [json.dumps(r) for r in records[:3] + broken + records[3:]] + ["{not json"]
    train_file = tmp_path / "stream.jsonl"
    train_file.write_text("\n".join(lines) + "\n")
    _train(tmp_path / "run", train_file, 4, "data.streaming=true", "data.max_bad_samples=5")
    reported = [json.loads(line) for line in (tmp_path / "run" / "bad_samples.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in reported} >= {"missing_media", "format"} and len(reported) == 3


def test_shards_split_the_records_between_ranks(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"id": i}) + "\n" + ("\n" if i % 3 == 0 else "") for i in range(20)))
    sources = [DatasetSource(path, 1.0, DEMO)]
    shards = [[record["id"] for _, _, record, _ in shard_records(sources, s, 3)] for s in range(3)]
    assert sorted(sum(shards, [])) == list(range(20)) and shards[1] == [1, 4, 7, 10, 13, 16, 19]


def test_ranks_stream_disjoint_records_that_together_are_every_sample(tmp_path, processors, demo_config):
    """Two ranks (and, within a rank, any number of workers) split the records: every usable record is trained by
    exactly one rank in a pass; the bad record is reported once, by the rank that read it."""
    from finetune.data.streaming import StreamingBatches
    from finetune.model.batching import RowCollator
    from finetune.model.rope import PositionRule

    records = json.loads(mini_dataset(tmp_path / "mini.json", per_task=4).read_text())
    records = [dict(r, id=f"r{i}") for i, r in enumerate(records)] + [dict(records[0], id="bad", images=["no.png"])]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    encoder = conversation_encoder(processors["qwen2_5_vl"], demo_config)
    rule = PositionRule("qwen", 2, 2)
    seen, bad = {}, []
    for rank in (0, 1):
        stream = StreamingBatches(
            [DatasetSource(path, 1.0, DEMO)],
            encoder,
            RowCollator(encoder, None, rule),
            budget=256,
            packing=False,
            rows_per_batch=1,
            seed=0,
            rank=rank,
            world_size=2,
            buffer_size=3,
            over_length="error",
        )
        batches = iter(stream)
        ids = []
        for _ in range(4):  # one pass: rank 0 reads r0 r2 r4 r6 and the bad one, rank 1 reads r1 r3 r5 r7
            batch = next(batches)
            ids += [i for row in batch["sample_ids"] for i in row]
            bad += [b["id"] for b in batch["bad_samples"]]
        seen[rank] = ids
    assert sorted(seen[0] + seen[1]) == sorted(f"r{i}" for i in range(8)) and not set(seen[0]) & set(seen[1])
    assert set(seen[0]) == {f"r{i}" for i in range(0, 8, 2)} and bad == ["bad"]
