"""Over-long samples: refused by default, or cut back by whole trailing turns when the recipe allows it."""

from pathlib import Path

from finetune.data.encode import ConversationEncoder
from finetune.data.prepare import SplitSettings, prepare_split
from finetune.data.vision import VisionSettings
from tests.helpers.media_factory import write_dataset, write_image

SETTINGS = VisionSettings(4 * 784, 16 * 784, 2.0, 4, 16, 16 * 784, 64 * 784, 1024 * 784)


def test_trailing_turns_are_dropped_only_when_allowed(tmp_path, processors):
    write_image(tmp_path / "a.png", 100, 80)
    write_image(tmp_path / "b.png", 100, 80, seed=1)
    long_tail = {
        "id": "multi",
        "images": ["a.png", "b.png"],
        "messages": [
            {"role": "user", "content": "<image>Short question?"},
            {"role": "assistant", "content": "Short answer."},
            {"role": "user", "content": "<image>" + "word " * 200},
            {"role": "assistant", "content": "Long answer."},
        ],
    }
    too_long_anyway = {
        "id": "single",
        "messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "A."}],
    }
    path = write_dataset(tmp_path / "d.json", [long_tail, too_long_anyway])
    encoder = ConversationEncoder(processors["qwen2_5_vl"], SETTINGS, max_length=100)

    split = prepare_split(str(path), SplitSettings(max_length=100), encoder, Path)
    assert not split.samples and len(split.problems["too_long"]) == 2 and split.shortened == 0

    split = prepare_split(str(path), SplitSettings(max_length=100, over_length="drop_trailing_turns"), encoder, Path)
    assert [s.id for s in split.samples] == ["multi"] and split.shortened == 1
    assert len(split.problems["too_long"]) == 1 and "(id single)" in str(split.problems["too_long"][0])
    (sample,) = split.samples
    assert [m["role"] for m in sample.messages] == ["user", "assistant"] and len(sample.media("image")) == 1
    encoded = encoder.encode(sample)
    assert len(encoded.input_ids) == split.counts[0].total <= 100
    assert (
        processors["qwen2_5_vl"].tokenizer.decode([t for t in encoded.labels if t != -100]) == "Short answer.<|im_end|>"
    )
