"""One canonical conversation, read from the formats users already have.

A `Sample` holds HF-style messages whose content is a list of blocks: `{"type": "text", "text": ...}`,
`{"type": "image", "image": <absolute path>, ...options}`, `{"type": "video", "video": <path | [frame paths]>,
...options}`. Options are qwen-vl-utils' keys (min_pixels, max_pixels, fps, nframes, min_frames,
max_frames, total_pixels, video_start, video_end) plus `frames_fps` for frame folders/lists; set on a media
item, or at the top of a record for all of its media.

Accepted records (detected per record):
- LLaMA-Factory / ShareGPT: `messages` or `conversations` with role/content or from/value, `images`/`videos`
  lists, one `<image>`/`<video>` placeholder per file.
- LLaVA: `conversations` (from/value) with `image`/`video` as a string or a list.
- Qwen official: `image`/`images`/`video` with `conversations` (from/value or role/content).
- HF / OpenAI messages: `messages` whose content is a list of typed blocks (`image`/`path`/`url`/`image_url`).
Every media path is resolved inside the media root; a path that escapes it is refused.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from finetune.base.errors import DataError
from finetune.data.vision import IMAGE_KEYS, VIDEO_KEYS

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}
PLACEHOLDER = re.compile(r"<(image|video)>")
KNOWN_KEYS = {
    "id",
    "messages",
    "conversations",
    "images",
    "image",
    "videos",
    "video",
    "system",
    *IMAGE_KEYS,
    *VIDEO_KEYS,
}


@dataclass
class Sample:
    id: str
    messages: list[dict]
    source: str  # "file.json[12] (id x)" for error messages
    extra: dict = field(default_factory=dict)  # other top-level keys (e.g. "task") kept for reports

    def media(self, kind: str) -> list[dict]:
        """The image or video blocks, in the order they appear."""
        return [b for m in self.messages for b in m["content"] if b["type"] == kind]


def resolve_media(path, media_root: Path, where: str):
    """Absolute, symlink-free path (or list of paths for frame lists) inside `media_root`."""
    if isinstance(path, (list, tuple)):
        return [resolve_media(p, media_root, where) for p in path]
    if isinstance(path, dict) and "bytes" in path or hasattr(path, "getpixel"):
        # HF datasets' Image feature (parquet: {bytes, path}; save_to_disk: a decoded PIL image), as TRL's vision
        # datasets ship: named in one line, never the bytes' repr.
        raise DataError(
            f"{where}: an image stored inside the dataset (bytes or a decoded image), not a file path. Save each "
            "image as a file under the media root and list its path instead.",
            "format",
        )
    if not isinstance(path, str) or not path:
        raise DataError(f"{where}: media path must be a non-empty string, got {path!r}.")
    if re.match(r"^[a-z][a-z0-9+.-]*://", path) and not path.startswith("file://"):
        raise DataError(
            f"{where}: remote media {path!r} is not supported; download it under the media root.", "missing_media"
        )
    path = path.removeprefix("file://")
    root = _real_folder(str(media_root))
    resolved = _real_path(os.path.join(root, path))
    if resolved != root and not resolved.startswith(root.rstrip(os.sep) + os.sep):
        raise DataError(
            f"{where}: media path {path!r} resolves to {resolved}, outside the media root {root}. "
            "Move the file under the media root or set data.media_root to a folder that contains it.",
            "outside_root",
        )
    return resolved


@functools.lru_cache(maxsize=1 << 14)
def _real_folder(folder: str) -> str:
    """A folder with every symlink resolved; cached because a dataset has millions of files in few folders (the
    process lives for one run: a folder re-linked during it is not seen)."""
    return os.path.realpath(folder)


def _real_path(path: str) -> str:
    """os.path.realpath, resolving the (cached) folder once and then only the file name itself."""
    if "/../" in path or path.endswith("/..") or "/./" in path:
        return os.path.realpath(path)
    folder, name = os.path.split(path)
    if not name or name == ".":
        return os.path.realpath(path)
    joined = os.path.join(_real_folder(folder), name)
    return os.path.realpath(joined) if os.path.islink(joined) else joined


def _options(record: dict, kind: str) -> dict:
    keys = IMAGE_KEYS if kind == "image" else VIDEO_KEYS
    return {k: record[k] for k in keys if record.get(k) is not None}


def _role(turn: dict, index: int, where: str) -> str:
    role = turn.get("role", turn.get("from"))
    if role not in ROLE_ALIASES:
        raise DataError(
            f"{where}: turn {index} has unknown role {role!r}; expected one of {', '.join(sorted(ROLE_ALIASES))}.",
            "unknown_role",
        )
    return ROLE_ALIASES[role]


def _as_list(value, where: str = "", key: str = "") -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: '{key}' must be a path or a list of paths, got {type(value).__name__}.")
    return list(value)


def _placeholder_messages(record: dict, turns: list, where: str, media_root: Path) -> list[dict]:
    """String contents with <image>/<video> placeholders (ShareGPT, LLaVA, Qwen official)."""
    files = {
        "image": _as_list(record.get("images", record.get("image")), where, "images"),
        "video": _as_list(record.get("videos", record.get("video")), where, "videos"),
    }
    used = {"image": 0, "video": 0}
    messages = []
    for i, turn in enumerate(turns):
        role, text = _role(turn, i, where), turn.get("content", turn.get("value"))
        if not isinstance(text, str):
            raise DataError(f"{where}: turn {i} content must be a string, got {type(text).__name__}.")
        blocks, pos = [], 0
        for match in PLACEHOLDER.finditer(text):
            if match.start() > pos:
                blocks.append({"type": "text", "text": text[pos : match.start()]})
            kind = match.group(1)
            if used[kind] < len(files[kind]):
                path = resolve_media(files[kind][used[kind]], media_root, where)
                blocks.append({**_options(record, kind), "type": kind, kind: path})
            used[kind] += 1
            pos = match.end()
        if pos < len(text):
            blocks.append({"type": "text", "text": text[pos:]})
        messages.append({"role": role, "content": blocks})
    for kind in ("image", "video"):
        if used[kind] != len(files[kind]):
            raise DataError(
                f"{where}: {used[kind]} <{kind}> placeholder(s) in the text but {len(files[kind])} {kind} file(s) "
                f"listed. Put exactly one <{kind}> where each {kind} belongs.",
                "placeholders",
            )
    return messages


def _block_path(block: dict, kind: str, where: str):
    value = block.get(kind, block.get("path", block.get("url")))
    if kind == "image" and value is None and "image_url" in block:
        value = block["image_url"]["url"] if isinstance(block["image_url"], dict) else block["image_url"]
    if value is None:
        raise DataError(f"{where}: {'an' if kind == 'image' else 'a'} {kind} block has no {kind}/path/url.")
    return value


def _block_messages(record: dict, turns: list, where: str, media_root: Path) -> list[dict]:
    """HF / OpenAI messages: content as a list of typed blocks (or a plain string)."""
    messages = []
    for i, turn in enumerate(turns):
        role, content = _role(turn, i, where), turn.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        blocks = []
        for block in content or []:
            if not isinstance(block, dict):
                raise DataError(f"{where}: turn {i} has a content block that is not an object: {block!r}.")
            kind = block.get("type")
            kind = "image" if kind == "image_url" else kind
            if kind == "text":
                text = block.get("text", "")
                if not isinstance(text, str):
                    raise DataError(
                        f"{where}: turn {i} has a text block whose text is {type(text).__name__}, not a string."
                    )
                blocks.append({"type": "text", "text": text})
            elif kind in ("image", "video"):
                options = {k: v for k, v in block.items() if k in (IMAGE_KEYS if kind == "image" else VIDEO_KEYS)}
                path = resolve_media(_block_path(block, kind, where), media_root, where)
                blocks.append({**_options(record, kind), **options, "type": kind, kind: path})
            else:
                raise DataError(f"{where}: turn {i} has a content block of unknown type {block.get('type')!r}.")
        messages.append({"role": role, "content": blocks})
    return messages


def record_to_sample(record: dict, index: int, where: str, media_root: Path, require_answer: bool = True) -> Sample:
    if not isinstance(record, dict):
        raise DataError(f"{where}: a sample must be a JSON object, got {type(record).__name__}.")
    sample_id = str(record.get("id", index))
    where = f"{where} (id {sample_id})" if "id" in record else where
    turns = record.get("messages", record.get("conversations"))
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: no 'messages' or 'conversations' list.")
    if not all(isinstance(t, dict) for t in turns):
        raise DataError(f"{where}: every turn must be an object with role/content or from/value.")
    blocks = any(isinstance(t.get("content"), list) for t in turns)
    reader = _block_messages if blocks else _placeholder_messages
    messages = reader(record, turns, where, media_root)
    if isinstance(record.get("system"), str) and record["system"] and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": record["system"]}]})
    if require_answer and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn, so nothing to learn.", "empty_turn")
    for i, message in enumerate(messages):
        media = [b["type"] for b in message["content"] if b["type"] in ("image", "video")]
        if media and message["role"] != "user":
            # The target would become <|vision_start|><|vision_end|>: the model would learn to emit vision tokens.
            raise DataError(
                f"{where}: turn {i} ({message['role']}) holds an {media[0]}; images and videos belong in "
                "user turns. Move the placeholder or media block into the user's question.",
                "placeholders",
            )
    return Sample(sample_id, messages, where, {k: v for k, v in record.items() if k not in KNOWN_KEYS})
