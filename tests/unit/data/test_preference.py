"""Preference pairs, KTO completions and RL prompts: every accepted format reads into the prompt the SFT reader gives
the same conversation; each bad input is its problem class with a message naming the record and the fix; a pair's
sides encode exactly as SFT encodes their conversations, for every family, with the prompt's media identical on both
sides."""

import json
import logging
from pathlib import Path

import pytest
import torch

from finetune.base.errors import ConfigError, DataError
from finetune.base.families import FAMILIES
from finetune.data.conversation import record_to_sample
from finetune.data.encode import ConversationEncoder
from finetune.data.modes import LabelMode
from finetune.data.preference import (
    PreferencePair,
    RewardPrompt,
    UnpairedCompletion,
    data_kind,
    encode_pair,
    encode_unpaired,
    read_preference_file,
    read_preference_split,
)
from finetune.data.prepare import PROBLEM_CLASSES, require_clean
from finetune.data.sources import load_samples
from finetune.data.vision import VisionSettings
from tests.helpers.media_factory import write_dataset, write_image, write_video

# Small budgets: one image of a few tokens, a video of a few frames; encoding stays fast on every family.
SETTINGS = VisionSettings(
    min_pixels=4 * 1024,
    max_pixels=16 * 1024,
    video_fps=2.0,
    video_min_frames=2,
    video_max_frames=4,
    video_min_pixels=4 * 1024,
    video_max_pixels=8 * 1024,
    video_total_pixels=32 * 1024,
)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    write_image(root / "a.png", 64, 48)
    write_video(root / "v.mp4", frames=8, fps=4, width=64, height=48)
    return root


def _read(root, records, kind, name="data.json"):
    return read_preference_file(write_dataset(root / name, records), kind, root)


def _one(root, record, kind):
    items, problems = _read(root, [record], kind)
    assert not problems, problems
    return items[0]


def _sft(root, record):
    """The SFT reader's sample of a record (the reference every format must equal)."""
    return record_to_sample(record, 0, "ref", root, require_answer=False).messages


# ----- the formats -----
IMAGE_PROMPT = [{"role": "user", "content": "<image>What is this?"}]
PAIRS = {
    "trl_string": {"prompt": "<image>What is this?", "chosen": "A gradient.", "rejected": "A cat."},
    "trl_string_no_placeholder": {"prompt": "What is this?", "chosen": "A gradient.", "rejected": "A cat."},
    "trl_messages": {
        "prompt": [{"role": "user", "content": "What is this?"}],
        "chosen": [{"role": "assistant", "content": "A gradient."}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
    },
    "trl_blocks_with_nulls": {  # as Arrow gives TRL's vision datasets back (RLAIF-V): every key, null where unset
        "prompt": [
            {
                "role": "user",
                "content": [{"type": "image", "text": None}, {"type": "text", "text": "What is this?", "image": None}],
            }
        ],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A gradient."}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
    },
    "trl_implicit_prompt": {
        "chosen": [*IMAGE_PROMPT, {"role": "assistant", "content": "A gradient."}],
        "rejected": [*IMAGE_PROMPT, {"role": "assistant", "content": "A cat."}],
    },
    "llamafactory_sharegpt": {
        "conversations": [{"from": "human", "value": "<image>What is this?"}],
        "chosen": {"from": "gpt", "value": "A gradient."},
        "rejected": {"from": "gpt", "value": "A cat."},
    },
    "llamafactory_alpaca": {"instruction": "<image>What is this?", "chosen": "A gradient.", "rejected": "A cat."},
    "ms_swift": {  # ms-swift's standard format: the chosen reply ends `messages`; the other is `rejected_response`
        "messages": [*IMAGE_PROMPT, {"role": "assistant", "content": "A gradient."}],
        "rejected_response": "A cat.",
    },
    "llamafactory_openai_strings": {
        "messages": IMAGE_PROMPT,
        "chosen": "A gradient.",
        "rejected": {"role": "assistant", "content": "A cat."},
    },
}


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("kind", ["image", "video"])
def test_every_pair_format_reads_as_the_sft_conversation(media, name, kind):
    files = {"images": ["a.png"]} if kind == "image" else {"videos": ["v.mp4"]}
    record = json.loads(json.dumps(PAIRS[name]).replace("<image>", f"<{kind}>").replace('"image"', f'"{kind}"'))
    pair = _one(media, {"id": "p1", **record, **files}, "pairs")
    assert isinstance(pair, PreferencePair) and pair.id == "p1"
    assert (pair.chosen, pair.rejected) == ("A gradient.", "A cat.")
    question = {"role": "user", "content": f"<{kind}>What is this?"}
    assert pair.prompt.messages == _sft(media, {"messages": [question], **files})
    for side, reply in (("chosen", "A gradient."), ("rejected", "A cat.")):
        full = _sft(media, {"messages": [question, {"role": "assistant", "content": reply}], **files})
        assert pair.conversation(side).messages == full
    assert pair.prompt.media(kind)[0][kind] == str(media / ("a.png" if kind == "image" else "v.mp4"))


def test_a_multi_turn_prompt_keeps_its_turns_and_system(media):
    turns = [
        {"from": "human", "value": "<image>What is this?"},
        {"from": "gpt", "value": "A picture."},
        {"from": "human", "value": "Which colours?"},
    ]
    record = {"conversations": turns, "system": "Be brief.", "images": ["a.png"], "max_pixels": 8192}
    pair = _one(
        media, {**record, "chosen": {"from": "gpt", "value": "Red."}, "rejected": "Blue.", "task": "colour"}, "pairs"
    )
    assert pair.prompt.messages == _sft(media, record)
    assert pair.prompt.extra == {"task": "colour"}  # other columns ride along for reports, as in SFT
    assert [m["role"] for m in pair.prompt.messages] == ["system", "user", "assistant", "user"]
    assert pair.prompt.media("image")[0]["max_pixels"] == 8192  # record-level media options, as in SFT


def test_alpaca_history_and_input_join_as_llamafactory_joins_them(media):
    record = {"instruction": "Translate:", "input": "chat", "history": [["Hi", "Hello"]], "system": "Be brief."}
    pair = _one(media, {**record, "chosen": "cat", "rejected": "dog"}, "pairs")
    assert [(m["role"], m["content"][0]["text"]) for m in pair.prompt.messages] == [
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", "Hello"),
        ("user", "Translate:\nchat"),
    ]
    item = _one(media, {**record, "output": "chat", "kto_tag": False}, "unpaired")
    assert item.prompt.messages == pair.prompt.messages and (item.completion, item.desirable) == ("chat", False)


def test_kto_formats(media):
    trl = {"id": "k1", "prompt": "<image>Is it red?", "completion": "Yes.", "label": False, "images": ["a.png"]}
    factory = {
        "id": "k2",
        "messages": [{"role": "user", "content": "<image>Is it red?"}, {"role": "assistant", "content": "Yes."}],
        "kto_tag": True,
        "images": ["a.png"],
    }
    items, problems = _read(media, [trl, factory], "unpaired")
    assert not problems
    assert all(isinstance(i, UnpairedCompletion) for i in items)
    assert [(i.id, i.completion, i.desirable) for i in items] == [("k1", "Yes.", False), ("k2", "Yes.", True)]
    assert items[0].prompt.messages == items[1].prompt.messages
    assert items[0].conversation().messages == _sft(media, factory)


def test_rl_prompt_formats_and_extras(media):
    records = [
        {"id": "g1", "prompt": "<video>Which way?", "solution": "left", "videos": ["v.mp4"], "task": "direction"},
        {"id": "g2", "prompt": [{"role": "user", "content": "How many?"}], "answer": 3},
        {"id": "g3", "conversations": [{"from": "human", "value": "<image>Box?"}], "solution": [1, 2, 30, 40]},
    ]
    records[2]["images"] = ["a.png"]
    items, problems = _read(media, records, "prompts")
    assert not problems
    assert all(isinstance(i, RewardPrompt) for i in items)
    assert [i.solution for i in items] == ["left", "3", "[1, 2, 30, 40]"]  # non-strings as JSON, for the rewards
    assert [i.extras for i in items] == [{"task": "direction"}, {}, {}]
    assert items[0].prompt.messages == _sft(
        media, {"messages": [{"role": "user", "content": "<video>Which way?"}], "videos": ["v.mp4"]}
    )
    assert [m["role"] for i in items for m in i.prompt.messages] == ["user"] * 3


def test_a_split_counted_by_the_encoder_stops_or_skips_as_sft_data(processors, media):
    records = [
        {"id": "ok", "prompt": "<image>Q", "chosen": "A", "rejected": "B", "images": ["a.png"]},
        {"id": "gone", "prompt": "<image>Q", "chosen": "A", "rejected": "B", "images": ["gone.png"]},
    ]
    path = write_dataset(media / "split.json", records)
    encoder = ConversationEncoder(processors["qwen2_vl"], SETTINGS)
    data = read_preference_split(str(path), "pairs", None, Path, encoder=encoder)
    assert [i.id for i in data.items] == ["ok"] and list(data.problems) == ["missing_media"] and data.read == 2
    [count] = data.counts
    assert count == encoder.count_tokens(data.items[0].conversation("chosen"))  # "A" and "B": one token each
    with pytest.raises(DataError, match="1 of 2 train samples cannot be trained on"):
        require_clean(data, "train", False, logging.getLogger("test"))
    require_clean(data, "train", True, logging.getLogger("test"))  # data.skip_invalid: reported, not raised


def test_jsonl_files_and_weighted_sources(media):
    path = write_dataset(
        media / "pairs.jsonl", [{"id": str(i), "prompt": f"Q{i}", "chosen": "a", "rejected": "b"} for i in range(4)]
    )
    data = read_preference_split([{"path": str(path), "weight": 2.0}], "pairs", str(media), Path)
    assert data.read == 4 and not data.problems
    assert sorted(i.id for i in data.items) == sorted([str(i) for i in range(4)] * 2)


# ----- bad inputs: one class each, the record named, the fix said -----
BAD = [
    ("same_reply", "pairs", {"prompt": "Q", "chosen": "Same.", "rejected": " Same.\n"}, "must differ"),
    ("same_reply", "pairs", {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]} | {
        "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}, "must differ"),
    ("missing_side", "pairs", {"prompt": "Q", "rejected": "B"}, "no 'chosen' reply"),
    ("missing_side", "pairs", {"prompt": "Q", "chosen": "A"}, "no 'rejected' reply"),
    ("missing_side", "pairs", {"prompt": "Q", "chosen": "A", "rejected": "  "}, "no 'rejected' reply"),
    ("missing_side", "pairs", {"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "gpt", "value": ""},
                               "rejected": {"from": "gpt", "value": "B"}}, "no 'chosen' reply"),
    ("missing_side", "unpaired", {"prompt": "Q", "completion": "", "label": True}, "no 'completion' reply"),
    ("prompt_end", "pairs", {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
                             "chosen": {"from": "gpt", "value": "B"}, "rejected": {"from": "gpt", "value": "C"}},
     "must end with the user's turn"),
    ("prompt_end", "prompts", {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "4"}],
                               "solution": "4"}, "Put the reference answer in 'solution'"),
    ("prompt_end", "unpaired", {"messages": [{"role": "user", "content": "Q"}], "kto_tag": True}, "ends with the assistant reply"),
    ("no_solution", "prompts", {"prompt": "Q"}, "no 'solution'"),
    ("no_solution", "prompts", {"prompt": "Q", "solution": " "}, "Add the reference answer"),
    ("bad_label", "unpaired", {"prompt": "Q", "completion": "A"}, "no 'label' (TRL) or 'kto_tag'"),
    ("bad_label", "unpaired", {"prompt": "Q", "completion": "A", "label": "true"}, "JSON boolean"),
    ("bad_label", "unpaired", {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
                               "kto_tag": 1}, "'kto_tag' is 1"),
    ("outside_root", "pairs", {"prompt": "<image>Q", "chosen": "A", "rejected": "B", "images": ["../a.png"]},
     "outside the media root"),
    ("outside_root", "prompts", {"prompt": "Q", "solution": "4", "videos": ["/etc/v.mp4"]}, "set data.media_root"),
    ("placeholders", "pairs", {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}],
                               "chosen": "A", "rejected": "B"}, "Give each listed image"),
    ("placeholders", "pairs", {"prompt": "Q", "chosen": [{"role": "assistant", "content": [{"type": "image", "image": "a.png"}]}],
                               "rejected": "B"}, "a reply is text only"),
]  # fmt: skip


@pytest.mark.parametrize(("problem", "kind", "record", "fix"), BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_each_bad_input_is_its_class_named_with_the_fix(media, tmp_path, problem, kind, record, fix):
    root = tmp_path / "root"
    write_image(root / "a.png", 32, 32)
    good = {"pairs": {"prompt": "Q", "chosen": "A", "rejected": "B"}, "unpaired": {"prompt": "Q", "completion": "A", "label": True},
            "prompts": {"prompt": "Q", "solution": "4"}}[kind]  # fmt: skip
    items, problems = _read(root, [{"id": "ok", **good}, {"id": "bad", **record}], kind)
    assert [i.id for i in items] == ["ok"]  # the good record is kept; the bad one counted, not dropped silently
    assert list(problems) == [problem] and len(problems[problem]) == 1
    message = str(problems[problem][0])
    assert "data.json[1] (id bad)" in message and fix in message, message
    assert "\n" not in message and problem in PROBLEM_CLASSES


def test_images_stored_inside_a_parquet_dataset_are_named_not_dumped(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    png = write_image(tmp_path / "a.png", 32, 32).read_bytes()
    row = {"prompt": "Q", "chosen": "A", "rejected": "B", "images": [{"bytes": png, "path": None}]}
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "rlaif.parquet")
    items, problems = read_preference_file(tmp_path / "rlaif.parquet", "pairs")
    [error] = problems["format"]
    assert not items and "rlaif.parquet[0]: an image stored inside the dataset" in str(error)
    assert "list its path" in str(error) and len(str(error)) < 300


def test_duplicate_ids_and_empty_files_are_problems(media, tmp_path):
    items, problems = _read(tmp_path, [{"id": "x", "prompt": "Q", "solution": "1"}] * 2, "prompts")
    assert len(items) == 1 and "id 'x' is used again" in str(problems["duplicate_id"][0])
    items, problems = _read(tmp_path, [], "pairs", "empty.json")
    assert not items and list(problems) == ["empty_dataset"]


def test_method_names_map_to_their_data():
    assert [data_kind(m) for m in ("sft", "dpo", "kto", "grpo")] == [None, "pairs", "unpaired", "prompts"]
    with pytest.raises(ConfigError, match="has no data format"):
        data_kind("ppo")


# ----- encoding: a pair's sides are SFT samples, sharing the prompt's media -----
def _assert_same_encoding(got, want):
    assert got.input_ids == want.input_ids and got.labels == want.labels
    assert got.mm_token_type_ids == want.mm_token_type_ids
    for name in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b), name
    assert got.second_per_grid_ts == want.second_per_grid_ts


@pytest.mark.parametrize("family", FAMILIES)
def test_a_pairs_sides_encode_as_sft_and_share_the_prompt_media(processors, media, family):
    processor = processors[family]
    sft = ConversationEncoder(processor, SETTINGS, LabelMode.LAST_ASSISTANT)
    encoder = ConversationEncoder(processor, SETTINGS)  # label_mode assistant: the pair still trains its reply only
    earlier = [{"from": "human", "value": "Hello."}, {"from": "gpt", "value": "Hi."}]
    for tag, files in (("image", {"images": ["a.png"]}), ("video", {"videos": ["v.mp4"]})):
        turns = [*earlier, {"from": "human", "value": f"<{tag}>Describe it."}]
        record = {"id": tag, "conversations": turns, **files}
        pair = _one(media, {**record, "chosen": {"from": "gpt", "value": "Noise."}, "rejected": "A cat."}, "pairs")
        chosen, rejected = encode_pair(encoder, pair)
        for side, encoded in (("Noise.", chosen), ("A cat.", rejected)):
            [reference] = load_samples(
                write_dataset(
                    media / f"sft-{tag}.json", [{**record, "conversations": [*turns, {"from": "gpt", "value": side}]}]
                )
            )
            _assert_same_encoding(encoded, sft.encode(reference))
            trained = processor.tokenizer.decode([t for t in encoded.labels if t != -100])
            assert trained.startswith(side) and "Hi." not in trained  # the reply only, never an earlier turn
        media_name = "pixel_values" if tag == "image" else "pixel_values_videos"
        grid_name = "image_grid_thw" if tag == "image" else "video_grid_thw"
        assert getattr(chosen, media_name).numel() > 0
        assert torch.equal(getattr(chosen, media_name), getattr(rejected, media_name))
        assert torch.equal(getattr(chosen, grid_name), getattr(rejected, grid_name))
        assert chosen.second_per_grid_ts == rejected.second_per_grid_ts
        n_prompt = len(encoder.encode(pair.prompt).input_ids)
        assert chosen.input_ids[:n_prompt] == rejected.input_ids[:n_prompt]  # the shared prompt, token for token
    completion = UnpairedCompletion("k", pair.prompt, "Noise.", True)
    _assert_same_encoding(encode_unpaired(encoder, completion), chosen)


def test_encode_errors_name_the_side(processors, media):
    pair = _one(media, {"id": "p", "prompt": "<image>Q", "chosen": "A", "rejected": "B", "images": ["a.png"]}, "pairs")
    pair.prompt.messages[0]["content"][0]["image"] = str(media / "gone.png")
    with pytest.raises(DataError) as err:
        encode_pair(ConversationEncoder(processors["qwen2_vl"], SETTINGS), pair)
    assert "(id p), chosen reply" in str(err.value) and err.value.kind == "missing_media"


def test_ms_swift_pairs_need_the_chosen_reply_last(media):
    record = {"id": "s", "messages": IMAGE_PROMPT, "rejected_response": "A cat.", "images": ["a.png"]}
    path = write_dataset(media / "swift.json", [record])
    items, problems = read_preference_file(path, "pairs")
    assert items == [] and [e.kind for e in problems["prompt_end"]] == ["prompt_end"]
    assert "must end with the chosen assistant reply" in str(problems["prompt_end"][0])
