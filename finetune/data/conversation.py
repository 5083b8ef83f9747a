"""One canonical conversation, read from the LLaMA-Factory / ShareGPT format users already have.

A `Sample` holds HF-style messages whose content is a list of blocks:
`{"type": "text", "text": ...}`, `{"type": "image", "image": <absolute path>}`,
`{"type": "video", "video": <absolute path>}`. Every media path is resolved inside the media root; a path
that escapes it is refused (a dataset must not make training read arbitrary files).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

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


class DataError(ValueError):
    """A sample that cannot be trained on; the message names the file, the sample and the fix."""


@dataclass
class Sample:
    id: str
    messages: list[dict]
    source: str  # "file.json[12]" for error messages
    extra: dict = field(default_factory=dict)  # other top-level keys (e.g. "task") kept for reports

    def media(self, kind: str) -> list[dict]:
        """The image or video blocks, in the order they appear."""
        return [b for m in self.messages for b in m["content"] if b["type"] == kind]


def read_records(path: Path) -> list[dict]:
    """A JSON list or JSONL file of dict records. Never unpickles anything."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg}).") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}).") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of samples (or a .jsonl file), got {type(records).__name__}.")
    return records


def resolve_media(path: str, media_root: Path, where: str) -> str:
    """Absolute, symlink-free path of `path` (relative to `media_root`); refuses paths outside the root."""
    root = media_root.resolve()
    resolved = (root / path).resolve()
    if resolved != root and root not in resolved.parents:
        raise DataError(
            f"{where}: media path {path!r} resolves to {resolved}, outside the media root {root}. "
            "Move the file under the media root or set data.media_root to a folder that contains it."
        )
    return str(resolved)


def _turns(record: dict, where: str) -> list[tuple[str, str]]:
    turns = record.get("messages", record.get("conversations"))
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: no 'messages' or 'conversations' list.")
    out = []
    if isinstance(record.get("system"), str) and record["system"]:
        out.append(("system", record["system"]))
    for i, turn in enumerate(turns):
        role = turn.get("role", turn.get("from"))
        text = turn.get("content", turn.get("value"))
        if role not in ROLE_ALIASES:
            raise DataError(
                f"{where}: turn {i} has unknown role {role!r}; expected one of {', '.join(sorted(ROLE_ALIASES))}."
            )
        if not isinstance(text, str):
            raise DataError(f"{where}: turn {i} content must be a string in this format, got {type(text).__name__}.")
        out.append((ROLE_ALIASES[role], text))
    return out


def _as_list(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _split_blocks(text: str, media: dict[str, list[str]], used: dict[str, int]) -> list[dict]:
    """Text with <image>/<video> placeholders -> content blocks, consuming the media lists in order."""
    blocks = []
    pos = 0
    for match in PLACEHOLDER.finditer(text):
        if match.start() > pos:
            blocks.append({"type": "text", "text": text[pos : match.start()]})
        kind = match.group(1)
        index = used[kind]
        used[kind] += 1
        if index < len(media[kind]):
            blocks.append({"type": kind, kind: media[kind][index]})
        pos = match.end()
    if pos < len(text):
        blocks.append({"type": "text", "text": text[pos:]})
    return blocks


def sharegpt_to_sample(record: dict, index: int, file: Path, media_root: Path) -> Sample:
    """LLaMA-Factory/ShareGPT: `messages`|`conversations` + `images`/`videos` lists with placeholders."""
    where = f"{file}[{index}]"
    sample_id = str(record.get("id", index))
    where = f"{where} (id {sample_id})" if "id" in record else where
    media = {
        "image": [resolve_media(p, media_root, where) for p in _as_list(record.get("images", record.get("image")))],
        "video": [resolve_media(p, media_root, where) for p in _as_list(record.get("videos", record.get("video")))],
    }
    used = {"image": 0, "video": 0}
    messages = [{"role": role, "content": _split_blocks(text, media, used)} for role, text in _turns(record, where)]
    for kind in ("image", "video"):
        if used[kind] != len(media[kind]):
            raise DataError(
                f"{where}: {used[kind]} <{kind}> placeholder(s) in the text but {len(media[kind])} {kind} file(s) "
                f"listed. Put exactly one <{kind}> where each {kind} belongs."
            )
    known = {"id", "messages", "conversations", "images", "image", "videos", "video", "system"}
    return Sample(sample_id, messages, where, {k: v for k, v in record.items() if k not in known})


def load_samples(path: str | os.PathLike, media_root: str | os.PathLike | None = None) -> list[Sample]:
    """Read a dataset file; media paths are relative to `media_root` (default: the file's folder)."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"Dataset file {file} does not exist.")
    root = Path(media_root) if media_root else file.parent
    return [sharegpt_to_sample(rec, i, file, root) for i, rec in enumerate(read_records(file))]
