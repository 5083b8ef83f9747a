"""The pre-pass cache: written beside the dataset, read back when nothing changed, recomputed otherwise."""

import os

from finetune.data.encode import ConversationEncoder
from finetune.data.lengths import token_counts
from finetune.data.sources import DatasetSource, read_source
from finetune.data.vision import VisionSettings
from media_factory import write_dataset, write_image, write_video

SETTINGS = VisionSettings(4 * 784, 64 * 784, 2.0, 4, 64, 16 * 784, 64 * 784, 2048 * 784)


def test_counts_are_cached_beside_the_dataset_and_follow_changes(tmp_path, processors):
    write_image(tmp_path / "a.png", 300, 200)
    write_video(tmp_path / "v.mp4", frames=40, fps=10, width=96, height=64)
    records = [{"messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}], "images": ["a.png"]},
               {"messages": [{"role": "user", "content": "<video>Q"}, {"role": "assistant", "content": "A"}], "videos": ["v.mp4"]},
               {"messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}], "images": ["gone.png"]}]  # fmt: skip
    source = DatasetSource(write_dataset(tmp_path / "d.json", records))
    encoder = ConversationEncoder(processors["qwen2_5_vl"], SETTINGS)
    samples = read_source(source)[0]

    first, path, cached = token_counts(source, samples, encoder)
    assert not cached and path.parent == tmp_path and path.name.startswith(".d.json.tokens-")
    assert [len(encoder.encode(s).input_ids) for s in samples[:2]] == [c.total for c in first[:2]]
    assert first[2].kind == "missing_media"

    again, path2, cached = token_counts(source, samples, encoder)
    assert cached and path2 == path and [str(r) for r in again] == [str(r) for r in first]

    write_image(tmp_path / "a.png", 60, 40)  # the same name, another size
    os.utime(tmp_path / "a.png", ns=(1, 1))
    changed, path3, cached = token_counts(source, samples, encoder)
    assert not cached and path3 != path and changed[0].image < first[0].image

    other_settings = ConversationEncoder(processors["qwen2_5_vl"], VisionSettings(4 * 784, 16 * 784, 2.0, 4, 64, 16 * 784, 64 * 784, 2048 * 784))
    assert not token_counts(source, samples, other_settings)[2]
