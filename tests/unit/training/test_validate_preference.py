"""`validate` on preference and RL data: every record read as its kind, its conversations counted as SFT counts
samples, and each problem class counted and named with its fix; the token table as for SFT data."""

import pytest

from finetune.data.encode import ConversationEncoder
from finetune.data.modes import LabelMode
from finetune.data.vision import VisionSettings
from finetune.training.validate import validate_preference_file, validate_preference_split
from tests.helpers.broken_media import cut_jpeg
from tests.helpers.media_factory import write_dataset, write_image, write_video

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
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref")
    write_image(root / "a.png", 64, 48)
    write_video(root / "v.mp4", frames=8, fps=4, width=64, height=48)
    return root


@pytest.fixture(scope="module")
def encoder(processors):
    return ConversationEncoder(processors["qwen2_5_vl"], SETTINGS, LabelMode.ASSISTANT, max_length=200)


def test_pairs_report_every_problem_class_with_the_record(root, encoder):
    records = [
        {"id": "img", "prompt": "<image>Q", "chosen": "A", "rejected": "B", "images": ["a.png"]},
        {"id": "vid", "conversations": [{"from": "human", "value": "<video>Q"}], "chosen": "A", "rejected": "B",
         "videos": ["v.mp4"]},
        {"id": "same", "prompt": "Q", "chosen": "A", "rejected": "A"},
        {"id": "one-side", "prompt": "Q", "chosen": "A"},
        {"id": "gone", "prompt": "<image>Q", "chosen": "A", "rejected": "B", "images": ["gone.png"]},
        {"id": "long", "prompt": "Q", "chosen": "A", "rejected": "word " * 300},
    ]  # fmt: skip
    check = validate_preference_file(write_dataset(root / "pairs.json", records), "pairs", encoder)
    assert (check.read, check.usable, check.num_problems) == (6, 2, 4)
    assert {k: len(v) for k, v in check.problems.items()} == {
        "same_reply": 1,
        "missing_side": 1,
        "missing_media": 1,
        "too_long": 1,
    }
    text = check.text
    assert "6 records, 2 usable pairs, 4 with problems" in text
    assert "chosen and rejected are the same reply: 1" in text and "pairs.json[2] (id same)" in text
    assert "pairs.json[5] (id long), rejected reply:" in text and "over data.max_length=200" in text
    assert "tokens per pair (longer)" in text and "  video " in text


def test_prompts_and_completions(root, encoder, capsys):
    prompts = [
        {"id": "g1", "prompt": "<video>Which way?", "solution": "left", "videos": ["v.mp4"]},
        {"id": "g2", "prompt": "How many?"},
    ]
    completions = [
        {"id": "k1", "prompt": "<image>Q", "completion": "A", "label": True, "images": ["a.png"]},
        {"id": "k2", "prompt": "Q", "completion": "A", "label": "yes"},
    ]
    files = {
        "prompts": write_dataset(root / "prompts.jsonl", prompts),
        "unpaired": write_dataset(root / "kto.jsonl", completions),
    }
    for kind, noun, problem in (("prompts", "prompts", "RL prompt without a solution"),
                                ("unpaired", "completions", "KTO record without a true/false label")):  # fmt: skip
        capsys.readouterr()
        assert validate_preference_split("train", str(files[kind]), kind, encoder, str(root)) == 1
        out = capsys.readouterr().out
        assert f"2 records, 1 usable {noun}, 1 with problems" in out and f"{problem}: 1" in out
        assert "min   median      p95" in out


def test_decode_finds_what_headers_cannot(root, encoder):
    cut_jpeg(root / "cut.jpg")  # the header reads fine, the pixels do not
    records = [{"id": "cut", "prompt": "<image>Q", "chosen": "A", "rejected": "B", "images": ["cut.jpg"]}]
    path = write_dataset(root / "cut.json", records)
    assert validate_preference_file(path, "pairs", encoder).num_problems == 0
    check = validate_preference_file(path, "pairs", encoder, decode=True)
    assert check.num_problems == 1 and "(id cut), chosen reply" in check.text


def test_the_validate_command_checks_a_preference_recipe(root, capsys):
    from finetune.recipe.load import load_config
    from finetune.training.validate import validate

    records = [
        {"id": "ok", "prompt": "<image>Q", "chosen": "A", "rejected": "B", "images": ["a.png"]},
        {"id": "same", "prompt": "<image>Q", "chosen": "A", "rejected": "A", "images": ["a.png"]},
    ]
    path = write_dataset(root / "cmd.json", records)
    config = load_config([f"data.train={path}", "data.eval=null"])
    assert validate(config, ["train"], False, None, kind="pairs") == 1
    out = capsys.readouterr().out
    assert "2 records, 1 usable pairs, 1 with problems" in out and "(id same)" in out
    assert "FAILED: 1 problems would stop training." in out


def test_the_validate_command_reads_the_data_of_the_recipes_method(root, capsys):
    """`./launch.sh validate method=dpo ...` checks pairs (the recipe's method decides the data kind), not
    conversations: a pair whose sides are equal is named, and the command fails."""
    from finetune.training.validate import main

    records = [
        {"id": "ok", "prompt": "<image>Q", "chosen": "A", "rejected": "B", "images": ["a.png"]},
        {"id": "same", "prompt": "Q", "chosen": "A", "rejected": "A"},
    ]
    pairs = write_dataset(root / "cli_pairs.json", records)
    assert (
        main(["--split", "train", "method=dpo", f"data.train={pairs}", "data.eval=null", "model=tiny_qwen2_5_vl"]) != 0
    )
    out = capsys.readouterr().out
    assert "2 records, 1 usable pairs, 1 with problems" in out and "cli_pairs.json[1] (id same)" in out
