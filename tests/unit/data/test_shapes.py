"""One render per conversation shape (finetune/data/shapes.py) gives the very text each conversation's own render
gives, for every family's template; a template that decides on a text or prints a media path is rendered per
conversation instead."""

import copy
import random

import pytest

from finetune.base.families import FAMILIES
from finetune.data import shapes
from finetune.data.conversation import Sample
from finetune.data.encode import _REPLY_MARK, ConversationEncoder
from finetune.data.sources import load_samples
from finetune.data.vision import VisionSettings
from tests.helpers.media_factory import write_dataset
from tests.helpers.random_data import build_media_pool, random_record

SETTINGS = VisionSettings(3136, 3136, 2.0, 4, 16, 3136, 3136, 90316800)


@pytest.fixture(scope="module")
def random_samples(tmp_path_factory):
    root, images, videos = build_media_pool(tmp_path_factory.mktemp("pool"))
    rng = random.Random(7)
    records = [random_record(rng, images, videos, i) for i in range(200)]
    return load_samples(write_dataset(root / "random.json", records))


def _with_system(sample: Sample, k: int) -> Sample:
    """Every third sample gets a system turn, so shapes with and without one are both met."""
    if k % 3:
        return sample
    system = {"role": "system", "content": [{"type": "text", "text": f" system prompt {k}\n"}]}
    return Sample(sample.id, [system, *sample.messages], sample.source)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_shape_renders_equal_each_conversations_own_render(processors, random_samples, family):
    encoder = ConversationEncoder(processors[family], SETTINGS)
    direct = ConversationEncoder(processors[family], SETTINGS)
    direct._keeps_texts = False  # every conversation rendered: the reference
    for k, sample in enumerate(random_samples):
        sample = _with_system(sample, k)
        for generation_prompt in (False, True):
            if generation_prompt:  # a prompt ends before the last reply
                last = max(i for i, m in enumerate(sample.messages) if m["role"] == "assistant")
                sample = Sample(sample.id, sample.messages[:last], sample.source)
            assert encoder.segments(sample, generation_prompt) == direct.segments(sample, generation_prompt)
    assert encoder._template_keeps_texts()
    used = [pieces for pieces in encoder._shapes.values() if pieces is not None]
    # Every shape usable, and fewer shapes than renders (these records vary their per-item media options, which are
    # part of a shape, so many shapes are met once): renders were shared.
    assert 0 < len(used) == len(encoder._shapes) < 2 * len(random_samples)
    assert not direct._shapes


@pytest.mark.parametrize(
    "edit",
    [
        # decides on a user text, as Qwen3's templates do for tool responses
        (
            "{{ content['text'] }}",
            "{% if content['text'].startswith('<tool_response>') %}T{% endif %}{{ content['text'] }}",
        ),
        # writes the image path
        (
            "<|vision_start|><|image_pad|><|vision_end|>",
            "<|vision_start|><|image_pad|><|vision_end|>{{ content['image'] }}",
        ),
        # writes a text's length
        ("{{ content['text'] }}", "{{ content['text'] }}{{ content['text'] | length }}"),
    ],
    ids=["branches_on_text", "writes_media_path", "writes_text_length"],
)
def test_a_template_that_depends_on_texts_is_rendered_per_conversation(processors, random_samples, edit):
    processor = copy.deepcopy(processors["qwen2_5_vl"])
    assert edit[0] in processor.chat_template
    processor.chat_template = processor.chat_template.replace(*edit)
    encoder = ConversationEncoder(processor, SETTINGS)
    sample = random_samples[0]
    assert not encoder._template_keeps_texts()
    encoder.segments(sample)
    assert not encoder._shapes
    render = processor.apply_chat_template(sample.messages, tokenize=False)
    assert "".join(text for text, _ in encoder.segments(sample)) == render


def test_a_shape_whose_first_conversation_differs_is_not_shared():
    """The per-shape check: a render that does not keep texts (here JSON, which escapes the markers) makes the shape
    unusable, and every conversation of it is rendered."""
    calls = []

    def render(messages, generation_prompt, sample):
        calls.append(messages)
        return repr([b.get("text") for m in messages for b in m["content"]]).upper()

    cache = {}
    for text in ("one", "two"):
        messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
        assert shapes.render_by_shape(cache, render, messages, False, None) == render(messages, False, None)
    assert list(cache.values()) == [None]


def test_markers_must_stand_once_and_in_order():
    mark = shapes.TEXT_MARK.format
    assert shapes.split_marks(f"a{mark(0)}b{mark(1)}c", 2) == ["a", "b", "c"]
    assert shapes.split_marks(f"a{mark(1)}b{mark(0)}c", 2) is None
    assert shapes.split_marks(f"a{mark(0)}b{mark(0)}c", 1) is None
    assert shapes.split_marks("abc", 1) is None
    assert shapes.fill(["a", "b", "c"], ["X", "Y"]) == "aXbYc"


def test_the_probe_accepts_every_familys_template(processors):
    for family, processor in processors.items():

        def render(messages, generation_prompt, sample):
            return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

        assert shapes.keeps_texts(render, _REPLY_MARK), family
