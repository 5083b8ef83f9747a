"""Every kind of bad input gets a DataError that names the sample, says what is wrong and how to fix it, in the
problem class `validate` groups by; nothing a decoder or reader raises escapes as a traceback.

Broken files are made here (tests/broken_media.py): cut, overwritten indexes, decompression bombs, one-frame
videos, an image listed as a video, non-UTF-8 lines; both video back-ends are tried.
"""

import json

import numpy as np
import pytest
from PIL import Image

import finetune.data.media as media
from finetune.base.errors import DataError
from finetune.data.encode import ConversationEncoder
from finetune.data.sources import DatasetSource, read_source
from finetune.data.vision import VisionSettings
from tests.helpers.broken_media import bomb_png, cut_faststart_mp4, cut_jpeg, garbage_ctts_mp4
from tests.helpers.media_factory import write_image, write_video
from tests.helpers.recipe_runs import run_module

SETTINGS = VisionSettings(3136, 3136 * 4, 2.0, 4, 16, 3136, 3136 * 4, 3136 * 400)


@pytest.fixture(scope="module")
def encoder(processors):
    return ConversationEncoder(processors["qwen2_5_vl"], SETTINGS)


def _sample(tmp_path, records):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    samples, errors = read_source(DatasetSource(path))
    return samples, errors


def _one(tmp_path, kind, name):
    record = {
        "id": "s1",
        "messages": [{"role": "user", "content": f"<{kind}>What is it?"}, {"role": "assistant", "content": "A thing."}],
        kind + "s": [name],
    }
    samples, errors = _sample(tmp_path, [record])
    assert not errors, errors
    return samples[0]


def _refusal(encoder, sample, decode: bool) -> DataError:
    with pytest.raises(DataError) as info:
        encoder.encode(sample) if decode else encoder.count_tokens(sample)
    message = str(info.value)
    assert "(id s1)" in message and "Traceback" not in message
    return info.value


@pytest.mark.parametrize("backend", ["torchcodec", "pyav"])
@pytest.mark.parametrize(
    "make, problem, fix",
    [(cut_faststart_mp4, "bad_video", "re-encode it"), (garbage_ctts_mp4, "bad_video", "re-encode it")],
)
def test_videos_corrupt_past_the_header_fail_at_decode_with_the_fix(
    tmp_path, monkeypatch, encoder, backend, make, problem, fix
):
    monkeypatch.setattr(media, "_backend", backend)
    sample = _one(tmp_path, "video", make(tmp_path / "v.mp4").name)
    encoder.count_tokens(sample)  # the header is fine: only decoding finds it
    err = _refusal(encoder, sample, decode=True)
    assert err.kind == problem and fix in str(err)
    assert "Invalid frame index" not in str(err).split("(")[0]  # the decoder's words come second, in brackets


@pytest.mark.parametrize(
    "make, kind, decode, problem, words",
    [
        (lambda p: cut_jpeg(p / "cut.jpg"), "image", True, "bad_image", "re-save it"),
        (lambda p: bomb_png(p / "bomb.png"), "image", False, "unreadable_media", "900,000,000 pixels. Downscale it"),
        (lambda p: write_image(p / "thin.png", 2000, 8), "image", False, "aspect_ratio", "Crop or pad it"),
        (lambda p: p / "nowhere.jpg", "image", False, "missing_media", "Check the path"),
        (
            lambda p: write_video(p / "one.mp4", frames=1, fps=24, width=64, height=64),
            "video",
            False,
            "too_few_frames",
            "1 frame: too few frames. A video needs at least 2 frames",
        ),
        (lambda p: write_image(p / "still.jpg", 64, 64), "video", False, "too_few_frames", "list it as an image"),
    ],
)
def test_each_media_problem_names_the_sample_and_the_fix(tmp_path, encoder, make, kind, decode, problem, words):
    sample = _one(tmp_path, kind, make(tmp_path).name)
    err = _refusal(encoder, sample, decode)
    assert err.kind == problem and words in str(err), str(err)


def test_one_bad_jsonl_line_costs_only_that_line(tmp_path):
    good = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    path = tmp_path / "data.jsonl"
    path.write_bytes(
        json.dumps(good).encode() + b"\n" + b'{"messages": "caf\xe9"}\n' + json.dumps(good).encode() + b"\n{not json\n"
    )
    samples, errors = read_source(DatasetSource(path))
    assert len(samples) == 2 and len(errors) == 2
    assert f"{path}:2: not UTF-8 text (byte 0xe9 at column 18). Re-save the file as UTF-8." == str(errors[0])
    assert str(errors[1]).startswith(f"{path}:4: not valid JSON")
    whole = tmp_path / "data.json"
    whole.write_bytes(b'[{"messages": "caf\xe9"}]')
    with pytest.raises(DataError, match="not UTF-8 text .* Re-save the file as UTF-8"):
        read_source(DatasetSource(whole))


def test_conversation_shapes_the_template_cannot_train_on(tmp_path, encoder):
    assistant_first = {
        "id": "s1",
        "messages": [
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Yes."},
        ],
    }
    samples, _ = _sample(tmp_path, [assistant_first])
    err = _refusal(encoder, samples[0], decode=False)
    assert err.kind == "structure" and "the first turn must be the user's" in str(err)

    image = write_image(tmp_path / "i.png", 56, 56).name
    in_reply = {
        "id": "s2",
        "messages": [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "<image> this."}],
        "images": [image],
    }
    block_in_reply = {
        "id": "s3",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "And?"}]},
            {"role": "assistant", "content": [{"type": "image", "image": image}]},
        ],
    }
    _, errors = _sample(tmp_path, [in_reply, block_in_reply])
    assert [e.kind for e in errors] == ["placeholders", "placeholders"]
    assert all("images and videos belong in user turns" in str(e) for e in errors)


def test_duplicate_ids_are_refused_after_the_first(tmp_path):
    record = {"id": "same", "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yo."}]}
    samples, errors = _sample(tmp_path, [record, record, {**record, "id": "other"}])
    assert [s.id for s in samples] == ["same", "other"]
    assert [e.kind for e in errors] == ["duplicate_id"] and "is used again (first at" in str(errors[0])


@pytest.mark.parametrize("mode", ["P", "LA", "RGBA"])
def test_transparency_becomes_white(tmp_path, mode):
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    path = tmp_path / f"t-{mode}.png"
    (image.convert("LA") if mode == "LA" else image.convert("P") if mode == "P" else image).save(path)
    if mode == "P":  # a palette image whose index 0 is the transparent one
        palette = Image.new("P", (8, 8), 0)
        palette.putpalette([255, 0, 0] + [0, 0, 0] * 255)
        palette.save(path, transparency=0)
    assert Image.open(path).mode == mode
    assert (np.asarray(media.load_image(str(path))) == 255).all()


# ---------------------------------------------------------------- validate: same table, documented exit codes
def test_validate_lists_every_class_and_exits_by_the_documented_codes(tmp_path, capsys):
    from finetune.cli.main import run_command

    def main(args):
        return run_command("validate", args)

    def _validate(args):  # in this process: main() returns the exit status the command exits with
        capsys.readouterr()
        rc = main(args)
        captured = capsys.readouterr()
        return rc, captured.out + captured.err

    image = write_image(tmp_path / "ok.png", 56, 56).name
    cut = cut_jpeg(tmp_path / "cut.jpg").name
    video = cut_faststart_mp4(tmp_path / "cut.mp4").name
    ok = {
        "messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "Red."}],
        "images": [image],
    }
    records = [
        {**ok, "id": "a"},
        {**ok, "id": "a"},
        {**ok, "id": "b", "images": [cut]},
        {
            "id": "c",
            "messages": [{"role": "user", "content": "<video>Way?"}, {"role": "assistant", "content": "Left."}],
            "videos": [video],
        },
        {
            "id": "d",
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<image>"}],
            "images": [image],
        },
    ]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    base = ["experiment=demo", f"data.train={data}", "data.eval=null", "evaluation.after_training=false"]

    rc, out = _validate(base + ["--split", "train"])
    assert rc == 1 and "the same id as an earlier sample: 1" in out and "placeholder / media count mismatch: 1" in out
    assert "(id b)" not in out and "(id c)" not in out  # their headers are fine: only decoding finds them
    rc, out = _validate(base + ["--split", "train", "--decode"])
    assert rc == 1 and "corrupt or truncated image: 1" in out and "(id b)" in out and "(id c)" in out
    assert "Traceback" not in out

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc, out = _validate(["experiment=demo", f"data.train={empty}", "--split", "train"])
    assert rc == 1 and "no records at all" in out and "OK" not in out
    rc, out = _validate(["experiment=demo", f"data.train={tmp_path / 'missing.json'}", "--split", "train"])
    assert rc == 1 and "not found" in out and "Traceback" not in out
    rc, out = _validate(["experiment=demo", "trainer.max_stpes=3"])
    assert rc == 2 and "did you mean 'trainer.max_steps'" in out
    command = run_module(
        "finetune.validate", ["experiment=demo", f"data.train={empty}", "--split", "train"], expect_failure=True
    )
    assert command.returncode == 1  # the same status from the command line
    ok_only = tmp_path / "ok.json"
    ok_only.write_text(json.dumps([{**ok, "id": "x"}]))
    rc, out = _validate(["experiment=demo", f"data.train={ok_only}", "--split", "train", "--decode"])
    assert rc == 0 and "OK: every sample can be trained on." in out


def test_no_malformed_record_escapes_as_anything_but_a_named_data_error(tmp_path, encoder):
    """Records of every wrong shape: each becomes a DataError that names its index (or trains, when it is fine)."""
    write_image(tmp_path / "i.png", 56, 56)

    def user(content):
        return {"role": "user", "content": content}

    def reply(content):
        return {"role": "assistant", "content": content}

    records = [
        5,
        "text",
        [],
        {},
        {"messages": 5},
        {"messages": []},
        {"messages": [5]},
        {"messages": [{"role": 5, "content": "x"}]},
        {"messages": [user(None), reply("x")]},
        {"messages": [user(5), reply("x")]},
        {"messages": [user([5]), reply("x")]},
        {"messages": [user([{"type": 5}]), reply("x")]},
        {"messages": [user([{"type": "image"}]), reply("x")]},
        {"messages": [user([{"type": "image", "image": 5}]), reply("x")]},
        {"messages": [user("<image>"), reply("x")], "images": 5},
        {"messages": [user("<image>"), reply("x")], "images": [5]},
        {"messages": [user("<image>"), reply("x")], "images": ["i.png"], "max_pixels": "big"},
        {"messages": [user("<video>"), reply("x")], "videos": ["i.png"], "fps": "fast"},
        {"messages": [user([{"type": "text", "text": 5}]), reply("x")]},
        {"messages": [user("hi"), reply([{"type": "text", "text": None}])]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}], "image": {"x": 1}},
        {"messages": [user([{"type": "image_url", "image_url": {"url": 5}}]), reply("x")]},
        {"messages": [user("hi"), reply("")]},
        {"messages": [user("<image>"), reply("x")], "images": ["../i.png"]},
        {"messages": [user("hi"), reply("fine")]},
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    samples, errors = read_source(DatasetSource(path))
    for sample in samples:
        try:
            encoder.count_tokens(sample)
        except DataError as err:
            errors.append(err)
        else:
            assert sample.messages[-1]["content"][0]["text"] == "fine"  # the one good record
    assert len(errors) == len(records) - 1
    named = sorted(int(str(e).split("[")[1].split("]")[0]) for e in errors)
    assert named == list(range(len(records) - 1))
