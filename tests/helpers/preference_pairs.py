"""Preference pairs for the tests, built from the demo samples: the chosen answer is the sample's own reply, the
rejected one another answer to the same prompt and media, both encoded by the SFT encoder (last assistant reply
trained), as finetune/data/preference.py builds them."""

from __future__ import annotations

import copy

from finetune.data.conversation import Sample
from finetune.data.encode import ConversationEncoder
from finetune.data.sources import load_samples
from finetune.data.vision import VisionSettings
from tests.helpers import DEMO

# Small budgets: a demo image is a handful of tokens, a demo video a few frame pairs.
SETTINGS = VisionSettings(4 * 784, 16 * 784, 2.0, 4, 8, 4 * 784, 16 * 784, 128 * 784)
OTHER_ANSWER = {"colour": "a shape of no colour at all", "direction": "it does not move"}


def with_reply(sample: Sample, reply: str) -> Sample:
    messages = copy.deepcopy(sample.messages)
    messages[-1]["content"] = [{"type": "text", "text": reply}]
    return Sample(id=f"{sample.id}/{reply}", messages=messages, source=sample.source, extra=sample.extra)


def demo_pairs(kind: str, count: int) -> list[tuple[Sample, Sample]]:
    """`count` (chosen, rejected) Samples whose prompt holds an image (`kind="img"`) or a video (`"vid"`)."""
    samples = [s for s in load_samples(DEMO / "test.json") if s.id.startswith(kind)][:count]
    return [(s, with_reply(s, OTHER_ANSWER[s.extra["task"]])) for s in samples]


def encoder(processor) -> ConversationEncoder:
    return ConversationEncoder(processor, SETTINGS, label_mode="last_assistant")


def encoded_pairs(processor, kind: str, count: int):
    enc = encoder(processor)
    return [(enc.encode(c), enc.encode(r)) for c, r in demo_pairs(kind, count)]


def strip_media(sample: Sample) -> Sample:
    """The sample with its images and videos left out (a text-only prompt)."""
    messages = [{**m, "content": [b for b in m["content"] if b["type"] == "text"]} for m in sample.messages]
    return Sample(id=sample.id, messages=messages, source=sample.source, extra=sample.extra)


def text_only(processor, count: int):
    """`count` encoded pairs whose prompt has no media (the demo image prompts with the image left out)."""
    enc = encoder(processor)
    return [(enc.encode(strip_media(c)), enc.encode(strip_media(r))) for c, r in demo_pairs("img", count)]


def demo_completions(kind: str, count: int) -> list:
    """KTO's unpaired completions from `count` demo pairs: each prompt with its own reply (desirable) and with the
    other answer (undesirable), interleaved, as finetune/data/preference.py reads them."""
    from finetune.data.preference import UnpairedCompletion

    items = []
    for chosen, rejected in demo_pairs(kind, count):
        prompt = Sample(id=chosen.id, messages=chosen.messages[:-1], source=chosen.source, extra=chosen.extra)
        for side, desirable in ((chosen, True), (rejected, False)):
            reply = side.messages[-1]["content"][0]["text"]
            items.append(UnpairedCompletion(f"{chosen.id}/{desirable}", prompt, reply, desirable))
    return items


def with_completion(item, text: str) -> Sample:
    """The item's prompt followed by another reply (KTO's mismatched KL sequence)."""
    from finetune.data.preference import UnpairedCompletion

    return UnpairedCompletion(item.id, item.prompt, text, item.desirable).conversation()
