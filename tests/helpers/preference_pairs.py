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


def text_only(processor, count: int):
    """`count` encoded pairs whose prompt has no media (the demo image prompts with the image left out)."""
    enc = encoder(processor)
    pairs = []
    for chosen, rejected in demo_pairs("img", count):
        strip = lambda s: Sample(  # noqa: E731
            id=s.id,
            messages=[{**m, "content": [b for b in m["content"] if b["type"] == "text"]} for m in s.messages],
            source=s.source,
            extra=s.extra,
        )
        pairs.append((enc.encode(strip(chosen)), enc.encode(strip(rejected))))
    return pairs
