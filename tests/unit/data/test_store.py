"""The sample store: read once beside the dataset, counted per record (an edit, an appended sample or a changed
media file recounts only what changed), the same counts on 1 and N processes as the encoder's own, and the
same samples and mixture as reading the files directly."""

import json
import os
import pickle
import random
import shutil
from pathlib import Path

import pytest

from finetune.base.errors import DataError
from finetune.data.encode import ConversationEncoder
from finetune.data.packing import pack_rows
from finetune.data.prepare import SplitSettings, prepare_split
from finetune.data.sources import DatasetSource, mix, parse_sources, read_source
from finetune.data.store import load_source, store_dir
from finetune.data.vision import VisionSettings
from tests.helpers.media_factory import write_dataset, write_image, write_video
from tests.helpers.random_data import build_media_pool, random_record

SETTINGS = VisionSettings(4 * 784, 64 * 784, 2.0, 4, 64, 16 * 784, 64 * 784, 2048 * 784)


def _qa(media: str, kind: str = "image", answer: str = "A") -> dict:
    return {
        "messages": [{"role": "user", "content": f"<{kind}>Q"}, {"role": "assistant", "content": answer}],
        f"{kind}s": [media],
    }


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root, images, videos = build_media_pool(tmp_path_factory.mktemp("pool"))
    rng = random.Random(5)
    return root, [random_record(rng, images, videos, i) for i in range(120)]


def test_store_is_read_once_and_recounts_only_what_changed(tmp_path, processors):
    write_image(tmp_path / "a.png", 300, 200)
    write_image(tmp_path / "b.png", 120, 90)
    write_video(tmp_path / "v.mp4", frames=40, fps=10, width=96, height=64)
    records = [_qa("a.png"), _qa("v.mp4", "video"), _qa("gone.png"), _qa("b.png", answer="B"), _qa("b.png", answer="C")]
    path = _jsonl(tmp_path / "d.jsonl", records)
    encoder = ConversationEncoder(processors["qwen2_5_vl"], SETTINGS)
    source = DatasetSource(path)

    first = load_source(source, encoder)
    assert first.counted == 5 and store_dir(source) == tmp_path / ".finetune-store" / "d.jsonl"
    samples = read_source(source)[0]
    for row in (0, 1, 3, 4):
        sample = samples[row]
        assert first.text[row] + first.image[row] + first.video[row] == len(encoder.encode(sample).input_ids)
    assert first.errors[2].kind == "missing_media" and "gone.png" in str(first.errors[2])

    assert load_source(source, encoder).counted == 0  # nothing changed: nothing counted

    with open(path, "a") as f:  # one sample appended: only it is counted
        f.write(json.dumps(_qa("a.png", answer="appended")) + "\n")
    appended = load_source(source, encoder)
    assert appended.counted == 1 and len(appended) == 6 and appended.image[5] == first.image[0]
    assert len(list(store_dir(source).glob("records-*.arrow"))) == 1  # the old records file is gone

    records[1] = _qa("v.mp4", "video", answer="an edited answer, longer")  # one edited sample: only it
    _jsonl(path, records + [_qa("a.png", answer="appended")])
    edited = load_source(source, encoder)
    assert edited.counted == 1 and edited.text[1] > appended.text[1]

    write_image(tmp_path / "b.png", 300, 280)  # a media file changed: the two samples that show it
    os.utime(tmp_path / "b.png", ns=(1, 1))
    changed = load_source(source, encoder)
    assert changed.counted == 2 and changed.image[3] > edited.image[3] and changed.image[0] == edited.image[0]

    write_image(tmp_path / "gone.png", 64, 64)  # the missing file appears
    assert load_source(source, encoder).counted == 1

    other = ConversationEncoder(
        processors["qwen2_5_vl"], VisionSettings(4 * 784, 16 * 784, 2.0, 4, 64, 16 * 784, 64 * 784, 2048 * 784)
    )
    assert load_source(source, other).counted == 6  # other budgets: counted afresh, in a file of their own
    assert load_source(source, encoder).counted == 0  # ... and switching back costs nothing
    # The same budgets, tokenizer and chat template (the tiny checkpoints share them, but for tiny Qwen3-VL's whitespace
    # merges), another family: Qwen3-VL-MoE sizes at factor 32 and writes timestamps, so its counts are its own.
    qwen3 = ConversationEncoder(processors["qwen3_vl_moe"], SETTINGS)
    assert qwen3.tokenizer.backend_tokenizer.to_str() == encoder.tokenizer.backend_tokenizer.to_str()
    counted, now = load_source(source, qwen3), read_source(source)[0]
    assert counted.counted == 6 and counted.text[1] > changed.text[1]  # the video's timestamps are text
    assert [counted.text[i] + counted.image[i] + counted.video[i] for i in (0, 1)] == [
        len(qwen3.encode(now[i]).input_ids) for i in (0, 1)
    ]
    assert load_source(source, encoder).counted == 0


def test_counts_on_two_processes_equal_one_process_and_the_encoder(tmp_path, processors, pool):
    root, records = pool
    encoder = ConversationEncoder(processors["qwen2_vl"], SETTINGS)
    results = []
    path = write_dataset(root / "twice" / "d.json", records)
    for num_proc in (1, 2):
        shutil.rmtree(store_dir(DatasetSource(path)), ignore_errors=True)  # count afresh
        stored = load_source(DatasetSource(path, 1.0, root), encoder, num_proc=num_proc)
        assert stored.counted == len(records)
        results.append(
            (
                stored.text.tolist(),
                stored.image.tolist(),
                stored.video.tolist(),
                {r: str(e) for r, e in stored.errors.items()},
            )
        )
    assert results[0] == results[1]
    samples, errors = read_source(DatasetSource(path, 1.0, root))
    assert not errors
    for row, sample in enumerate(samples):
        try:
            count = encoder.count_tokens(sample)
        except Exception as err:
            assert str(err) == results[0][3][row]
            continue
        assert (count.text, count.image, count.video) == tuple(r[row] for r in results[0][:3])


def test_split_equals_reading_the_files_and_mixing_them(tmp_path, processors, pool):
    """Samples, order (weights 2 and 0.5) and counts are what reading every file and mixing the samples gives."""
    root, records = pool
    first = write_dataset(root / "mix" / "a.json", records[:70])
    second = _jsonl(root / "mix" / "b.jsonl", [{**r, "id": f"b{i}"} for i, r in enumerate(records[70:])])
    value = [
        {"path": str(first), "weight": 2.0, "media_root": str(root)},
        {"path": str(second), "weight": 0.5, "media_root": str(root)},
    ]
    settings = SplitSettings(max_length=100000, num_proc=2, seed=7)
    encoder = ConversationEncoder(processors["qwen2_5_vl"], SETTINGS)
    split = prepare_split(value, settings, encoder, lambda p: Path(p))

    def counts(sample):
        try:
            return encoder.count_tokens(sample)
        except DataError:
            return None

    per_source = [[s for s in read_source(source)[0] if counts(s)] for source in parse_sources(value, None, Path)]
    expected = mix(per_source, [2.0, 0.5], 7)
    assert len(split.samples) == len(expected) == 2 * len(per_source[0]) + round(0.5 * len(per_source[1]))
    assert split.num_problems == 120 - sum(map(len, per_source)) > 0
    for got, want, count in zip(split.samples, expected, split.counts):
        assert (got.id, got.messages, got.source, got.extra) == (want.id, want.messages, want.source, want.extra)
        assert count == encoder.count_tokens(want)
    lengths = [encoder.count_tokens(s).total for s in expected]
    assert pack_rows(split.totals.tolist(), 2048, 7) == pack_rows(lengths, 2048, 7)  # hence the same rows
    # A DataLoader worker started with `spawn` receives the file names, not the data.
    clone = pickle.loads(pickle.dumps(split.samples))
    assert len(pickle.dumps(split.samples)) < 10_000 and clone[5].messages == split.samples[5].messages


def test_read_only_dataset_folder_keeps_its_store_in_the_cache(tmp_path, processors, monkeypatch):
    import finetune.data.store as store

    write_image(tmp_path / "data" / "a.png", 64, 64)
    path = _jsonl(tmp_path / "data" / "d.jsonl", [_qa("a.png")])
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    # A folder this user cannot write (chmod does not stop root, who runs CI containers).
    monkeypatch.setattr(store.os, "access", lambda p, mode: Path(p) != tmp_path / "data")
    stored = load_source(DatasetSource(path), ConversationEncoder(processors["qwen2_vl"], SETTINGS))
    assert str(stored.records_file).startswith(str(tmp_path / "cache" / "store"))
    assert not (tmp_path / "data" / ".finetune-store").exists() and stored.counted == 1


@pytest.mark.parametrize("num_proc", [1, 2])
def test_store_problems_equal_reading_the_file(tmp_path, processors, num_proc, monkeypatch):
    """Duplicate ids (across conversion chunks), malformed records and non-UTF-8 lines read through the store give the
    messages reading the file directly gives, on one process and on several."""
    import finetune.data.store as store

    monkeypatch.setattr(store, "_BATCH", 4)  # records converted 4 at a time: duplicates span chunks and processes
    write_image(tmp_path / "a.png", 64, 64)
    lines = [json.dumps(dict(_qa("a.png"), id=f"s{i % 7}")) for i in range(20)] + ['{"id": 3, "messages": 5}']
    path = tmp_path / "d.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"id": "\xff"}\n')
    stored = load_source(DatasetSource(path), ConversationEncoder(processors["qwen2_vl"], SETTINGS), num_proc=num_proc)
    _, errors = read_source(DatasetSource(path))
    assert [str(e) for _, e in sorted(stored.errors.items())] == [str(e) for e in errors]
    assert sum(e.kind == "duplicate_id" for e in errors) == 13 and len(errors) == 15


def _empty_sources(root: Path) -> list[Path]:
    """Every way a dataset can hold no records: an empty or blank JSONL, an empty JSON list, a zero-row parquet and a
    zero-row `save_to_disk` folder."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "empty.jsonl").write_text("")
    (root / "blank.jsonl").write_text("\n  \n")
    (root / "empty.json").write_text("[]")
    pq.write_table(pa.table({"messages": pa.array([], pa.string())}), root / "empty.parquet")
    datasets.Dataset.from_dict({"messages": []}).save_to_disk(str(root / "empty_hf"))
    return [root / name for name in ("empty.jsonl", "blank.jsonl", "empty.json", "empty.parquet", "empty_hf")]


def test_empty_datasets_are_a_named_problem_on_every_read_not_a_store_error(tmp_path, processors):
    """A store written for zero records is reused as such (a zero-row counts table is falsy in pyarrow: the second
    read once took the store folder itself for the records file and failed in `memory_map`)."""
    encoder = ConversationEncoder(processors["qwen2_vl"], SETTINGS)
    settings = SplitSettings(max_length=4096)
    for path in _empty_sources(tmp_path):
        for attempt in ("first read", "from the store"):
            split = prepare_split(str(path), settings, encoder, Path)
            assert len(split.samples) == 0 and split.read == 0, (path, attempt)
            (problem,) = split.problems["empty_dataset"]
            assert f"{path}: no records at all" in str(problem), (path, attempt)

    path = tmp_path / "empty.jsonl"  # records added to a dataset that was empty: read and counted
    write_image(tmp_path / "a.png", 64, 64)
    _jsonl(path, [_qa("a.png")])
    filled = load_source(DatasetSource(path), encoder)
    assert len(filled) == 1 and filled.counted == 1 and not filled.errors
    path.write_text("")  # and emptied again
    assert len(load_source(DatasetSource(path), encoder)) == 0
    assert len(load_source(DatasetSource(path), encoder)) == 0

    (tmp_path / "not_a_dataset").mkdir()  # a folder that is not a saved dataset: named, not a datasets traceback
    (tmp_path / "not_a_dataset" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="not_a_dataset: cannot be read as a `Dataset.save_to_disk` folder"):
        load_source(DatasetSource(tmp_path / "not_a_dataset"), encoder)
