"""LLaMA-Factory/ShareGPT records -> canonical conversations, with errors that name the sample and the fix."""

import pytest
from media_factory import write_dataset, write_image, write_video

from finetune.data.conversation import DataError, load_samples


@pytest.fixture
def media(tmp_path):
    write_image(tmp_path / "a.png", 64, 48)
    write_image(tmp_path / "b.png", 32, 32, seed=1)
    write_video(tmp_path / "v.mp4", frames=8, fps=4, width=64, height=48)
    return tmp_path


def test_sharegpt_multi_turn_with_system_images_and_video(media):
    record = {
        "id": "s1",
        "task": "demo",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "<image>What is this? Compare with <video>"},
            {"role": "assistant", "content": "A gradient."},
            {"role": "user", "content": "And <image>?"},
            {"role": "assistant", "content": "Noise."},
        ],
        "images": ["a.png", "b.png"],
        "videos": ["v.mp4"],
    }
    (sample,) = load_samples(write_dataset(media / "d.json", [record]))
    assert sample.id == "s1" and sample.extra == {"task": "demo"}
    assert [m["role"] for m in sample.messages] == ["system", "user", "assistant", "user", "assistant"]
    user = sample.messages[1]["content"]
    assert [b["type"] for b in user] == ["image", "text", "video"]
    assert user[0]["image"] == str((media / "a.png").resolve())
    assert sample.messages[3]["content"][1] == {"type": "image", "image": str((media / "b.png").resolve())}


def test_from_value_conversations_and_jsonl(media):
    record = {"conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}], "images": "a.png"}
    (sample,) = load_samples(write_dataset(media / "d.jsonl", [record]))
    assert [m["role"] for m in sample.messages] == ["user", "assistant"]
    assert sample.messages[0]["content"][1] == {"type": "text", "text": "\nQ"}


def test_placeholder_count_mismatch_names_file_index_and_counts(media):
    record = {"messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}],
              "images": ["a.png", "b.png"]}
    path = write_dataset(media / "bad.json", [record, record])
    with pytest.raises(DataError, match=r"bad.json\[0\].*1 <image> placeholder\(s\) in the text but 2 image file\(s\)"):
        load_samples(path)


def test_unknown_role_is_named(media):
    record = {"messages": [{"role": "narrator", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    with pytest.raises(DataError, match="unknown role 'narrator'"):
        load_samples(write_dataset(media / "d.json", [record]))


@pytest.mark.parametrize("path", ["../outside.png", "/etc/passwd", "sub/../../x.png"])
def test_media_paths_may_not_leave_the_media_root(media, path):
    record = {"messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}], "images": [path]}
    with pytest.raises(DataError, match="outside the media root"):
        load_samples(write_dataset(media / "d.json", [record]))


def test_symlink_escaping_the_root_is_refused(media, tmp_path_factory):
    outside = write_image(tmp_path_factory.mktemp("elsewhere") / "secret.png", 8, 8)
    (media / "link.png").symlink_to(outside)
    record = {"messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}], "images": ["link.png"]}
    with pytest.raises(DataError, match="outside the media root"):
        load_samples(write_dataset(media / "d.json", [record]))


def test_demo_data_loads(tmp_path):
    from conftest import DEMO

    train, test = load_samples(DEMO / "train.json"), load_samples(DEMO / "test.json")
    assert len(train) == 1200 and len(test) == 200
    assert {s.extra["task"] for s in train} == {"colour", "direction"}
