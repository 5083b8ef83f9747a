"""Every record format and file type becomes the same canonical conversation; errors name the sample."""

import json

import pytest

from finetune.base.errors import DataError
from finetune.data.sources import DatasetSource, load_samples, mix, parse_sources, read_source
from tests.helpers.media_factory import write_dataset, write_image, write_video

CANONICAL = [
    ("user", [("image", "a.png"), ("text", "What is this?")]),
    ("assistant", [("text", "A gradient.")]),
]


def _shape(sample, root):
    """(role, [(type, text or media path relative to root)]) for comparing formats."""
    out = []
    for m in sample.messages:
        blocks = []
        for b in m["content"]:
            value = (
                b["text"] if b["type"] == "text" else str(__import__("pathlib").Path(b[b["type"]]).relative_to(root))
            )
            blocks.append((b["type"], value))
        out.append((m["role"], blocks))
    return out


@pytest.fixture
def media(tmp_path):
    write_image(tmp_path / "a.png", 64, 48)
    write_image(tmp_path / "b.png", 32, 32, seed=1)
    write_video(tmp_path / "v.mp4", frames=8, fps=4, width=64, height=48)
    return tmp_path


RECORDS = {
    "sharegpt_messages": {
        "messages": [
            {"role": "user", "content": "<image>What is this?"},
            {"role": "assistant", "content": "A gradient."},
        ],
        "images": ["a.png"],
    },
    "sharegpt_from_value": {
        "conversations": [{"from": "human", "value": "<image>What is this?"}, {"from": "gpt", "value": "A gradient."}],
        "images": ["a.png"],
    },
    "llava_string": {
        "id": "1",
        "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>What is this?"}, {"from": "gpt", "value": "A gradient."}],
    },
    "qwen_images": {
        "images": ["a.png"],
        "conversations": [
            {"from": "user", "value": "<image>What is this?"},
            {"from": "assistant", "value": "A gradient."},
        ],
    },
    "hf_blocks": {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "What is this?"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "A gradient."}]},
        ]
    },
    "openai_image_url": {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "file://a.png"}},
                    {"type": "text", "text": "What is this?"},
                ],
            },
            {"role": "assistant", "content": "A gradient."},
        ]
    },
    "hf_path_key": {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image", "path": "a.png"}, {"type": "text", "text": "What is this?"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "A gradient."}]},
        ]
    },
}


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_every_format_gives_the_same_conversation(media, name):
    (sample,) = load_samples(write_dataset(media / "d.json", [RECORDS[name]]))
    assert _shape(sample, media) == CANONICAL


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet", "hf_dir"])
def test_file_types(media, kind):
    records = [RECORDS["sharegpt_messages"], RECORDS["hf_blocks"]]
    if kind in ("json", "jsonl"):
        path = write_dataset(media / f"d.{kind}", records)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = media / "d.parquet"
        pq.write_table(pa.Table.from_pylist([RECORDS["sharegpt_messages"]] * 2), path)
        records = [RECORDS["sharegpt_messages"]] * 2
    else:
        import datasets

        path = media / "hf"
        datasets.Dataset.from_list([RECORDS["sharegpt_messages"]] * 2).save_to_disk(str(path))
        records = [RECORDS["sharegpt_messages"]] * 2
    samples, errors = read_source(DatasetSource(path, 1.0, media))
    assert not errors and len(samples) == len(records)
    assert all(_shape(s, media) == CANONICAL for s in samples)


def test_multi_turn_system_mixed_media_and_options(media):
    record = {
        "id": "s1",
        "task": "demo",
        "system": "Be brief.",
        "fps": 1.0,
        "max_pixels": 3136,
        "messages": [
            {"role": "user", "content": "<image>Compare with <video>"},
            {"role": "assistant", "content": "Alike."},
            {"role": "user", "content": "And <image>?"},
            {"role": "assistant", "content": "Noise."},
        ],
        "images": ["a.png", "b.png"],
        "videos": ["v.mp4"],
    }
    (sample,) = load_samples(write_dataset(media / "d.json", [record]))
    assert sample.id == "s1" and sample.extra == {"task": "demo"}
    assert [m["role"] for m in sample.messages] == ["system", "user", "assistant", "user", "assistant"]
    video = sample.media("video")[0]
    assert video["fps"] == 1.0 and video["max_pixels"] == 3136 and "fps" not in sample.media("image")[0]
    assert sample.media("image")[0]["max_pixels"] == 3136


def test_block_options_beat_sample_options_and_frame_lists_resolve(media):
    (media / "frames").mkdir()
    for i in range(4):
        write_image(media / "frames" / f"{i:05d}.png", 16, 16, seed=i)
    record = {
        "fps": 2,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "video", "video": [f"frames/{i:05d}.png" for i in range(4)], "fps": 4, "frames_fps": 8},
                    {"type": "text", "text": "Q"},
                ],
            },
            {"role": "assistant", "content": "A"},
        ],
    }
    (sample,) = load_samples(write_dataset(media / "d.jsonl", [record]))
    video = sample.media("video")[0]
    assert video["fps"] == 4 and video["frames_fps"] == 8 and len(video["video"]) == 4
    assert all(p.startswith(str(media.resolve())) for p in video["video"])


def test_mixing_repeats_and_subsamples_by_weight(media):
    base = RECORDS["sharegpt_messages"]
    a = write_dataset(media / "a.json", [{**base, "id": f"a{i}"} for i in range(10)])
    b = write_dataset(media / "b.jsonl", [{**base, "id": f"b{i}"} for i in range(10)])
    sources = parse_sources(
        [{"path": str(a), "weight": 2}, {"path": str(b), "weight": 0.5}], None, lambda p: __import__("pathlib").Path(p)
    )
    per_source = [read_source(s)[0] for s in sources]
    mixed = mix(per_source, [s.weight for s in sources], seed=0)
    assert sum(s.id.startswith("a") for s in mixed) == 20 and sum(s.id.startswith("b") for s in mixed) == 5
    assert [s.id for s in mix(per_source, [2, 0.5], seed=0)] == [s.id for s in mixed]  # deterministic
    with pytest.raises(DataError, match="weight must be positive"):
        parse_sources([{"path": str(a), "weight": 0}], None, lambda p: p)


@pytest.mark.parametrize(
    "record,kind,message",
    [
        (
            {
                "messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}],
                "images": ["a.png", "b.png"],
            },
            "placeholders",
            r"1 <image> placeholder\(s\) in the text but 2 image file\(s\)",
        ),
        (
            {"messages": [{"role": "narrator", "content": "Q"}, {"role": "assistant", "content": "A"}]},
            "unknown_role",
            "unknown role 'narrator'",
        ),
        ({"messages": [{"role": "user", "content": "Q"}]}, "empty_turn", "no assistant turn"),
        (
            {
                "messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}],
                "images": ["../x.png"],
            },
            "outside_root",
            "outside the media root",
        ),
        (
            {
                "messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}],
                "images": ["/etc/passwd"],
            },
            "outside_root",
            "outside the media root",
        ),
        (
            {
                "messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}],
                "images": ["https://x.org/a.png"],
            },
            "missing_media",
            "remote media",
        ),
        ({"conversations": "hello"}, "format", "no 'messages' or 'conversations' list"),
    ],
)
def test_bad_records_name_the_file_index_and_problem(media, record, kind, message):
    path = write_dataset(media / "bad.jsonl", [RECORDS["sharegpt_messages"], record])
    samples, errors = read_source(DatasetSource(path, 1.0, None))
    assert len(samples) == 1 and len(errors) == 1
    assert errors[0].kind == kind and "bad.jsonl:2" in str(errors[0])
    assert __import__("re").search(message, str(errors[0]))


def test_symlink_escaping_the_root_is_refused(media, tmp_path_factory):
    outside = write_image(tmp_path_factory.mktemp("elsewhere") / "secret.png", 8, 8)
    (media / "link.png").symlink_to(outside)
    record = {
        "messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}],
        "images": ["link.png"],
    }
    with pytest.raises(DataError, match="outside the media root"):
        load_samples(write_dataset(media / "d.json", [record]))


def test_invalid_json_lines_are_reported_per_line(media):
    path = media / "d.jsonl"
    path.write_text(json.dumps(RECORDS["sharegpt_messages"]) + "\n{broken\n")
    samples, errors = read_source(DatasetSource(path, 1.0, None))
    assert len(samples) == 1 and "d.jsonl:2: not valid JSON" in str(errors[0])


def test_demo_data_loads():
    from tests.helpers import DEMO

    train, test = load_samples(DEMO / "train.json"), load_samples(DEMO / "test.json")
    assert len(train) == 1200 and len(test) == 200
    assert {s.extra["task"] for s in train} == {"colour", "direction"}
