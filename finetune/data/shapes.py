"""One chat-template render per conversation shape, for templates that write every text verbatim.

A dataset's conversations come in few shapes (roles, block types, media options, number of rounds) while their texts
differ. Rendering the shape once, with numbered markers standing in for the texts and a placeholder for every media
path, and then putting each conversation's texts in place of the markers gives the very string the template renders
for it, provided the template writes texts as given and decides nothing on them. `keeps_texts` probes that once per
template (texts that Qwen's templates could trim, escape or branch on); the first conversation of each shape is also
checked against its own render, and a shape that fails keeps rendering each conversation. Jinja was half the token
pre-pass's time; this makes it a dictionary look-up and a join.
"""

from __future__ import annotations

import json

TEXT_MARK = "\x00text {} here\x00"
_MARK_START = "\x00text "
MEDIA_MARK = "\x00media\x00"
MAX_SHAPES = 4096  # distinct shapes remembered (per-item media options can make many); beyond: rendered each time

# Texts a template might trim, escape, drop or branch on (Qwen3's templates test user texts for tool responses).
PROBE_TEXTS = (
    "",
    "  spaced text  ",
    "line one\nline two\n\n",
    "<tool_response>\nresult\n</tool_response>",
    "<think>\nreasoning\n</think>\n\nanswer",
    "quotes \" ' & < > {{ x }} {% if %}",
    "é 日本 🙂",
    "<image> <video> /think /no_think",
)


def shape_of(messages: list[dict]) -> tuple[list[dict], list[str]]:
    """The conversation with each text outside assistant turns replaced by a numbered marker and each media value by
    a placeholder of the same type (a path or a list of frame paths), and those texts in order. Assistant turns stay
    as they are (the encoder has replaced their replies by markers already)."""
    texts: list[str] = []
    shape = []
    for message in messages:
        if message["role"] == "assistant":
            shape.append(message)
            continue
        content = []
        for block in message["content"]:
            kind = block["type"]
            if kind == "text":
                content.append({**block, "text": TEXT_MARK.format(len(texts))})
                texts.append(block["text"])
            elif kind in ("image", "video"):
                value = block[kind]
                content.append({**block, kind: [MEDIA_MARK] * len(value) if isinstance(value, list) else MEDIA_MARK})
            else:
                content.append(block)
        shape.append({**message, "content": content})
    return shape, texts


def split_marks(rendered: str, n: int) -> list[str] | None:
    """The rendered shape cut at its n text markers (n + 1 pieces), or None unless each stands there once, in
    order."""
    if rendered.count(_MARK_START) != n:
        return None
    pieces, pos = [], 0
    for k in range(n):
        mark = TEXT_MARK.format(k)
        at = rendered.find(mark, pos)
        if at < 0:
            return None
        pieces.append(rendered[pos:at])
        pos = at + len(mark)
    pieces.append(rendered[pos:])
    return pieces


def fill(pieces: list[str], texts: list[str]) -> str:
    out = [pieces[0]]
    for text, piece in zip(texts, pieces[1:]):
        out += [text, piece]
    return "".join(out)


def render_by_shape(cache: dict, render, messages: list[dict], generation_prompt: bool, sample) -> str:
    """`render(messages, generation_prompt, sample)`'s result, from the shape's render in `cache` (filled here)."""
    shape, texts = shape_of(messages)
    key = (json.dumps(shape, ensure_ascii=False, sort_keys=True), generation_prompt)
    pieces = cache.get(key, False)
    if pieces is False:  # a new shape: rendered once, and checked against this conversation's own render
        direct = render(messages, generation_prompt, sample)
        try:
            pieces = split_marks(render(shape, generation_prompt, sample), len(texts))
        except Exception:  # the template refuses the shape (the conversation rendered): render each of them
            pieces = None
        if pieces is not None and fill(pieces, texts) != direct:
            pieces = None
        if len(cache) < MAX_SHAPES:
            cache[key] = pieces
        return direct
    if pieces is None:
        return render(messages, generation_prompt, sample)
    return fill(pieces, texts)


def keeps_texts(render, reply_mark: str) -> bool:
    """Whether the template writes system and user texts verbatim and decides nothing on them (nor on media paths):
    probe conversations of every PROBE_TEXTS entry (system, user turns around an image and a video, replies as
    `reply_mark` markers), rendered from one shape, equal their own renders, with and without a prompt."""
    from finetune.data.conversation import Sample

    probe = Sample("probe", [], "the chat template probe")
    for generation_prompt in (False, True):
        for k, text in enumerate(PROBE_TEXTS):
            other = PROBE_TEXTS[(k + 1) % len(PROBE_TEXTS)]
            messages = [
                {"role": "system", "content": [{"type": "text", "text": text}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": f"/probe/{k}.jpg"},
                        {"type": "video", "video": f"/probe/{k}.mp4"},
                        {"type": "text", "text": other},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": reply_mark.format(0)}]},
                {"role": "user", "content": [{"type": "text", "text": text}]},
                {"role": "assistant", "content": [{"type": "text", "text": reply_mark.format(1)}]},
                {"role": "user", "content": [{"type": "text", "text": other}, {"type": "text", "text": text}]},
            ]
            for cut in (len(messages), len(messages) - 1):  # ending with a question, and with a reply
                shape, texts = shape_of(messages[:cut])
                pieces = split_marks(render(shape, generation_prompt, probe), len(texts))
                if pieces is None or fill(pieces, texts) != render(messages[:cut], generation_prompt, probe):
                    return False
    return True
