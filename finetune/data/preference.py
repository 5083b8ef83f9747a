"""Preference pairs, unpaired (KTO) completions and RL prompts, read from the formats users already have.

Every prompt becomes the same canonical `Sample` SFT reads (conversation.py's readers, media root and placeholder
rules), ending with the user's turn the reply answers; the replies are plain text. Accepted records, per method kind:

- `pairs` (DPO, ORPO, SimPO, IPO, ...):
  TRL: `prompt` (a string or messages) with `chosen` / `rejected` (strings, or one assistant message each);
  TRL's implicit prompt: `chosen` / `rejected` as whole conversations sharing their first turns (the prompt);
  LLaMA-Factory ShareGPT (`"ranking": true`): `conversations` / `messages` ending with the user's turn, and `chosen` /
  `rejected` as `{"from": "gpt", "value": ...}` (or `{"role", "content"}`, or plain strings); LLaMA-Factory alpaca:
  `instruction` (+ `input`, `history`) with `chosen` / `rejected` strings; ms-swift: `messages` ending with the
  chosen reply, and `rejected_response`.
- `unpaired` (KTO): TRL: `prompt`, `completion`, `label` (true: desirable); LLaMA-Factory: `messages` /
  `conversations` ending with the assistant's reply (or alpaca's `instruction` + `output`), and `kto_tag` (true /
  false).
- `prompts` (GRPO, DAPO, Dr.GRPO, GSPO, RLOO): `prompt` (a string or messages), or `messages` / `conversations` ending
  with the user's turn; `solution` (or `answer`); every other top-level column goes to the rewards as `extras`.

Media: `images` / `videos` (or `image` / `video`) lists with one `<image>` / `<video>` placeholder per file, or typed
content blocks (`{"type": "image"}` blocks without a path take the listed files in order, as TRL fills them). In
TRL's formats a prompt whose texts hold no placeholder and no media block has its files put before the first user
text, which is where TRL puts them; ShareGPT records need their placeholders, as in SFT.

A record that cannot be read is a DataError whose `kind` is its problem class (prepare.py lists them), naming the
record (`file[index] (id x)`) and the fix; `read_preference_source` collects them so that they are counted and
reported, or stop the run, exactly as SFT's problems do.
"""

from __future__ import annotations

import copy
import json
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from finetune.base.errors import ConfigError, DataError
from finetune.data.conversation import PLACEHOLDER, ROLE_ALIASES, Sample, record_to_sample
from finetune.data.encode import ConversationEncoder, EncodedSample, TokenCount
from finetune.data.modes import LabelMode
from finetune.data.sources import DatasetSource, duplicate_id, iter_records, mix, parse_sources, read_record
from finetune.data.vision import IMAGE_KEYS, VIDEO_KEYS

KINDS = ("pairs", "unpaired", "prompts")
MEDIA_KEYS = ("images", "image", "videos", "video")
# Columns that make the prompt (and so are not extras of an RL prompt).
PROMPT_KEYS = {"id", "prompt", "messages", "conversations", "system", *MEDIA_KEYS, *IMAGE_KEYS, *VIDEO_KEYS}
# The replies, labels and answers of every format (and alpaca's prompt columns): not a prompt's extra columns.
REPLY_KEYS = {
    *("chosen", "rejected", "rejected_response", "completion", "label", "kto_tag", "solution", "answer"),
    *("instruction", "input", "history", "output"),
}


def _reply_turn(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def _with_reply(prompt: Sample, reply: str, what: str) -> Sample:
    return Sample(prompt.id, [*prompt.messages, _reply_turn(reply)], f"{prompt.source}, {what}", prompt.extra)


@dataclass
class PreferencePair:
    """A prompt (ending with the user's turn) and two replies to it: DPO, ORPO, SimPO."""

    id: str
    prompt: Sample
    chosen: str
    rejected: str

    def conversation(self, side: str) -> Sample:
        """The SFT sample of the prompt followed by the `side` ("chosen" | "rejected") reply."""
        if side not in ("chosen", "rejected"):
            raise ValueError(f"side must be 'chosen' or 'rejected', got {side!r}")
        return _with_reply(self.prompt, getattr(self, side), f"{side} reply")


@dataclass
class UnpairedCompletion:
    """A prompt and one reply marked desirable or not: KTO."""

    id: str
    prompt: Sample
    completion: str
    desirable: bool

    def conversation(self) -> Sample:
        return _with_reply(self.prompt, self.completion, "completion")


@dataclass
class RewardPrompt:
    """A prompt to sample completions for, the reference answer the rewards score them against, and every other
    column of the record (`extras`, handed to the reward functions)."""

    id: str
    prompt: Sample
    solution: str
    extras: dict = field(default_factory=dict)


# ----- reading one record -----
def _named(record: dict, where: str) -> str:
    return f"{where} (id {record['id']})" if "id" in record else where


def _text_of(content, where: str, what: str) -> str | None:
    """A reply's text: a string, or a list of text blocks (None where there is no content)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(b, dict) for b in content):
        kinds = {b.get("type") for b in content}
        if kinds <= {"text"}:
            return "".join(b.get("text") or "" for b in content)
        raise DataError(
            f"{where}: the {what} holds a {sorted(kinds - {'text'})[0]} block; a reply is text only. Put images and "
            "videos in the prompt's user turn.",
            "placeholders",
        )
    raise DataError(f"{where}: the {what} must be text, got {type(content).__name__}.", "format")


def _reply(record: dict, key: str, where: str) -> str:
    """The reply under `key`: a string, one message ({from, value} / {role, content}), or a list of one assistant
    message (TRL's conversational form). Missing or blank: `missing_side`."""
    value = record.get(key)
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict):
            raise DataError(
                f"{where}: '{key}' holds {len(value)} items; it must be one assistant reply (a string, or a list "
                "of one assistant message). Put earlier turns in the prompt.",
                "format",
            )
        value = value[0]
    if isinstance(value, dict):
        role = value.get("role", value.get("from"))
        if ROLE_ALIASES.get(role) != "assistant":
            raise DataError(
                f"{where}: '{key}' is a {role!r} turn; it must be the assistant's reply (from gpt / role assistant).",
                "unknown_role",
            )
        value = value.get("content", value.get("value"))
    text = _text_of(value, where, f"'{key}' reply")
    if text is None or not text.strip():
        raise DataError(
            f"{where}: no '{key}' reply (missing, null or empty). Fill it in or drop the record.", "missing_side"
        )
    return text


def _clean_blocks(content: list) -> list:
    """Content blocks without their null keys: Arrow (parquet, `save_to_disk`) gives every block every column."""
    return [{k: v for k, v in b.items() if v is not None} if isinstance(b, dict) else b for b in content]


def _fill_blocks(record: dict, turns: list, where: str) -> tuple[list, dict]:
    """Typed content blocks: `{"type": "image"}` / `{"type": "video"}` blocks with no path take the record's listed
    files in order (TRL's `prepare_multimodal_messages`). Returns the turns and the record without the lists."""
    files = {
        "image": _listed(record, "images", "image", where),
        "video": _listed(record, "videos", "video", where),
    }
    used = {"image": 0, "video": 0}
    filled = []
    for turn in turns:
        content = turn.get("content", turn.get("value")) if isinstance(turn, dict) else None
        if isinstance(content, list):
            blocks = []
            for block in _clean_blocks(content):
                kind = block.get("type") if isinstance(block, dict) else None
                if kind in files and not {kind, "path", "url"} & block.keys():
                    if used[kind] < len(files[kind]):
                        block = {**block, kind: files[kind][used[kind]]}
                    used[kind] += 1
                blocks.append(block)
            turn = {k: v for k, v in turn.items() if k not in ("content", "value")} | {"content": blocks}
        filled.append(turn)
    for kind in ("image", "video"):
        if used[kind] != len(files[kind]):
            raise DataError(
                f"{where}: {used[kind]} {kind} block(s) without a path but {len(files[kind])} {kind} file(s) listed. "
                f'Give each listed {kind} one {{"type": "{kind}"}} block where it belongs.',
                "placeholders",
            )
    return filled, {k: v for k, v in record.items() if k not in MEDIA_KEYS}


def _listed(record: dict, plural: str, single: str, where: str) -> list:
    value = record.get(plural, record.get(single))
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: '{plural}' must be a path or a list of paths, got {type(value).__name__}.")
    return list(value)


def _leading_media(record: dict, turns: list, where: str) -> list:
    """TRL's rule for string turns with listed files and no placeholder: the files go before the first user text."""
    counts = {
        "image": len(_listed(record, "images", "image", where)),
        "video": len(_listed(record, "videos", "video", where)),
    }
    texts = [t.get("content", t.get("value")) for t in turns if isinstance(t, dict)]
    if not any(counts.values()) or not all(isinstance(t, str) for t in texts):
        return turns
    if any(PLACEHOLDER.search(t) for t in texts):
        return turns  # placeholders where the user put them; a count mismatch is the SFT reader's error
    out, done = [], False
    for turn in turns:
        if not done and isinstance(turn, dict) and ROLE_ALIASES.get(turn.get("role", turn.get("from"))) == "user":
            key = "content" if "content" in turn else "value"
            turn = {**turn, key: "<image>" * counts["image"] + "<video>" * counts["video"] + turn[key]}
            done = True
        out.append(turn)
    return out


def _prompt(record: dict, turns, index: int, where: str, root: Path, trl: bool, ends: str) -> Sample:
    """The prompt as the SFT reader reads it (media root, placeholders, roles), ending with a user turn."""
    named = _named(record, where)
    if isinstance(turns, str):
        turns = [{"role": "user", "content": turns}]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{named}: the prompt must be a string or a non-empty list of messages.", "format")
    synthetic = {k: v for k, v in record.items() if k in PROMPT_KEYS and k not in ("prompt", "conversations")}
    if any(isinstance(t, dict) and isinstance(t.get("content", t.get("value")), list) for t in turns):
        turns, synthetic = _fill_blocks(synthetic, turns, named)
    elif trl:
        turns = _leading_media(synthetic, turns, named)
    synthetic["messages"] = turns
    sample = record_to_sample(synthetic, index, where, root, require_answer=False)
    last = sample.messages[-1]["role"]
    if last != "user":
        raise DataError(
            f"{named}: the prompt ends with a{'n' if last == 'assistant' else ''} {last} turn; {ends}", "prompt_end"
        )
    # The record's other columns (a task name, ...) ride along for reports, as SFT keeps them.
    extra = {k: v for k, v in record.items() if k not in PROMPT_KEYS and k not in REPLY_KEYS}
    return Sample(sample.id, sample.messages, sample.source, extra)


def _turns(record: dict) -> list | None:
    return record.get("conversations", record.get("messages"))


def _alpaca_turns(record: dict, where: str) -> list[dict]:
    """LLaMA-Factory's alpaca format: `history` ([question, answer] pairs), then `instruction` and `input` joined by a
    newline as the user's turn (its AlpacaDatasetConverter)."""
    turns = []
    for pair in record.get("history") or []:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise DataError(f"{where}: each 'history' entry must be a [question, answer] pair, got {pair!r}.")
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    query = [record[k] for k in ("instruction", "input") if record.get(k)]
    return [*turns, {"role": "user", "content": "\n".join(query)}]


def _implicit_prompt(record: dict, where: str) -> tuple[list, dict]:
    """TRL's implicit prompt: `chosen` and `rejected` are whole conversations; their shared first turns are the
    prompt, and what follows must be one assistant reply on each side."""
    chosen, rejected = record["chosen"], record["rejected"]
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) == len(rejected):
        raise DataError(
            f"{where}: chosen and rejected are the same conversation; a pair must differ in its reply. Fix or drop it.",
            "same_reply",
        )
    if shared == 0:
        raise DataError(
            f"{where}: 'chosen' and 'rejected' share no first turn and there is no 'prompt'. Add the prompt (TRL: "
            "'prompt' with one reply in each side) or start both conversations with the same user turn.",
            "format",
        )
    return chosen[:shared], {**record, "chosen": chosen[shared:], "rejected": rejected[shared:]}


def _swift_pair(record: dict, where: str) -> tuple[list, dict]:
    """ms-swift's format: `messages` end with the chosen assistant reply; `rejected_response` is the other reply."""
    turns = _turns(record)
    if not isinstance(turns, list) or not turns or not isinstance(turns[-1], dict):
        raise DataError(f"{where}: 'rejected_response' without a 'messages' list (ms-swift's format).", "format")
    last = turns[-1]
    if last.get("role", last.get("from")) not in ("assistant", "gpt"):
        raise DataError(
            f"{where}: ms-swift's format: 'messages' must end with the chosen assistant reply that "
            "'rejected_response' is the alternative to. Add the chosen reply as the last turn.",
            "prompt_end",
        )
    chosen = last.get("content", last.get("value"))
    return turns[:-1], {**record, "chosen": chosen, "rejected": record["rejected_response"]}


def record_to_pair(record, index: int, where: str, root: Path) -> PreferencePair:
    record = _record(record, where)
    named = _named(record, where)
    ends = (
        "it must end with the user's turn that chosen and rejected answer. Move the last reply into chosen/rejected "
        "or remove it."
    )
    if "rejected_response" in record and "rejected" not in record:
        turns, record = _swift_pair(record, named)
        trl = False
    elif "prompt" in record:
        turns, trl = record["prompt"], True
    elif _turns(record) is not None:
        turns, trl = _turns(record), False
    elif "instruction" in record:
        turns, trl = _alpaca_turns(record, named), False
    elif isinstance(record.get("chosen"), list) and isinstance(record.get("rejected"), list):
        turns, record = _implicit_prompt(record, named)
        trl = True
    else:
        missing = [k for k in ("chosen", "rejected") if record.get(k) in (None, "", [])]
        if missing:
            raise DataError(
                f"{named}: no '{missing[0]}' reply (missing, null or empty). Fill it in or drop the record.",
                "missing_side",
            )
        raise DataError(
            f"{named}: no prompt: expected 'prompt' + 'chosen' + 'rejected' (TRL), or 'conversations' (or "
            "'instruction') + 'chosen' + 'rejected' (LLaMA-Factory).",
            "format",
        )
    chosen, rejected = _reply(record, "chosen", named), _reply(record, "rejected", named)
    if chosen.strip() == rejected.strip():
        raise DataError(
            f"{named}: chosen and rejected are the same reply ({chosen.strip()[:40]!r}); a pair must differ to teach a "
            "preference. Fix or drop the record.",
            "same_reply",
        )
    prompt = _prompt(record, turns, index, where, root, trl, ends)
    return PreferencePair(prompt.id, prompt, chosen, rejected)


def record_to_unpaired(record, index: int, where: str, root: Path) -> UnpairedCompletion:
    record = _record(record, where)
    named = _named(record, where)
    key = "label" if "label" in record else "kto_tag"
    if key not in record:
        raise DataError(
            f"{named}: no 'label' (TRL) or 'kto_tag' (LLaMA-Factory); KTO needs each completion marked desirable "
            "(true) or undesirable (false). Add it as a JSON boolean.",
            "bad_label",
        )
    label = record[key]
    if not isinstance(label, bool):
        raise DataError(
            f"{named}: '{key}' is {label!r}, not true or false; KTO needs each completion marked desirable (true) or "
            "undesirable (false) as a JSON boolean.",
            "bad_label",
        )
    ends = "it must end with the user's turn that the completion answers. Move the last reply into 'completion'."
    if "prompt" in record:
        completion = _reply(record, "completion", named)
        prompt = _prompt(record, record["prompt"], index, where, root, True, ends)
    elif "instruction" in record:
        completion = _reply(record, "output", named)
        prompt = _prompt(record, _alpaca_turns(record, named), index, where, root, False, ends)
    elif isinstance(_turns(record), list) and _turns(record):
        turns = _turns(record)
        last = turns[-1] if isinstance(turns[-1], dict) else {}
        if ROLE_ALIASES.get(last.get("role", last.get("from"))) != "assistant":
            raise DataError(
                f"{named}: the conversation ends with a {last.get('role', last.get('from'))!r} turn; in LLaMA-Factory's "
                "KTO format it ends with the assistant reply that 'kto_tag' marks. Add the reply or drop the record.",
                "prompt_end",
            )
        completion = _reply({"completion": last}, "completion", named)
        prompt = _prompt(record, turns[:-1], index, where, root, False, ends)
    else:
        raise DataError(
            f"{named}: no prompt: expected 'prompt' + 'completion' + 'label' (TRL), or 'messages' (or "
            "'instruction' + 'output') + 'kto_tag' (LLaMA-Factory).",
            "format",
        )
    return UnpairedCompletion(prompt.id, prompt, completion, label)


def _solution_text(value) -> str:
    """The reference answer as text: numbers and lists (a box, a time span) as JSON, which the rewards parse."""
    return value if isinstance(value, str) else json.dumps(value)


def record_to_prompt(record, index: int, where: str, root: Path) -> RewardPrompt:
    record = _record(record, where)
    named = _named(record, where)
    key = "solution" if "solution" in record else "answer"
    solution = record.get(key)
    if solution is None or (isinstance(solution, str) and not solution.strip()) or solution in ([], {}):
        raise DataError(
            f"{named}: no 'solution' (or 'answer'): the rewards score a completion against it. Add the reference "
            "answer or drop the record.",
            "no_solution",
        )
    ends = "an RL prompt ends with the user's question. Put the reference answer in 'solution' and remove the reply."
    if "prompt" in record:
        prompt = _prompt(record, record["prompt"], index, where, root, True, ends)
    elif _turns(record) is not None:
        prompt = _prompt(record, _turns(record), index, where, root, False, ends)
    else:
        raise DataError(f"{named}: no prompt: expected 'prompt' (or 'messages' / 'conversations') and 'solution'.")
    extras = {k: v for k, v in record.items() if k not in PROMPT_KEYS and k != key}
    return RewardPrompt(prompt.id, prompt, _solution_text(solution), extras)


def _record(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: a sample must be a JSON object, got {type(record).__name__}.")
    return {k: v for k, v in record.items() if v is not None}  # Arrow rows carry every column, null where unset


READERS = {"pairs": record_to_pair, "unpaired": record_to_unpaired, "prompts": record_to_prompt}
Item = PreferencePair | UnpairedCompletion | RewardPrompt


def _check_kind(kind: str) -> None:
    if kind not in READERS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def to_item(record, kind: str, index: int, where: str, root: Path) -> Item:
    """One record as the kind's item; every problem is a DataError naming the record (as sources.to_sample)."""
    return read_record(READERS[kind], record, index, where, root, "the README's preference data formats")


# ----- reading files -----
def read_preference_source(source: DatasetSource, kind: str) -> tuple[list[Item], dict[str, list[DataError]]]:
    """Every record of one dataset file as the kind's item, and the problems by class (duplicate ids included)."""
    _check_kind(kind)
    if not source.path.exists():
        raise DataError(f"Dataset {source.path} does not exist.")
    items, problems, first_of, read = [], defaultdict(list), {}, 0
    for index, (where, record) in enumerate(iter_records(source.path)):
        read += 1
        try:
            item = to_item(record, kind, index, where, source.root)
        except DataError as err:
            problems[err.kind].append(err)
            continue
        if item.id in first_of:
            problems["duplicate_id"].append(duplicate_id(item.prompt.source, item.id, first_of[item.id]))
            continue
        first_of[item.id] = item.prompt.source
        items.append(item)
    if not read:
        problems["empty_dataset"].append(
            DataError(
                f"{source.path}: no records at all (an empty list or file). Point data.train/data.eval at the right "
                "file.",
                "empty_dataset",
            )
        )
    return items, dict(problems)


def read_preference_file(path, kind: str, media_root=None) -> tuple[list[Item], dict[str, list[DataError]]]:
    """One dataset file (media under `media_root`, default the file's folder): (items, problems by class)."""
    return read_preference_source(DatasetSource(Path(path), 1.0, Path(media_root) if media_root else None), kind)


@dataclass
class PreferenceData:
    """The usable items of a split, their token counts (when counted: each item's longest conversation), and the
    problems by class; `prepare.require_clean` stops on them or reports the skip, as for SFT data."""

    items: list
    problems: dict[str, list[DataError]]
    read: int  # records read across sources
    counts: list[TokenCount] | None = None
    shortened: int = 0  # never: a pair is not cut back to an earlier turn (require_clean reads it)

    @property
    def num_problems(self) -> int:
        return sum(len(v) for v in self.problems.values())


def read_source_data(source: DatasetSource, kind: str) -> PreferenceData:
    """One dataset read as `kind`, with the number of records read (an empty file reads none)."""
    items, found = read_preference_source(source, kind)
    return PreferenceData(items, found, len(items) + sum(len(v) for k, v in found.items() if k != "empty_dataset"))


def read_preference_split(
    value,
    kind: str,
    media_root: str | None,
    resolve,
    seed: int = 0,
    encoder: ConversationEncoder | None = None,
    decode: bool = False,
) -> PreferenceData:
    """`data.train` / `data.eval` as a recipe writes it (a path, or a list of paths / {path, weight, media_root}):
    each source read, problems collected, and with an `encoder` every item counted as SFT counts its samples (those
    that cannot be trained on join the problems), before the sources are mixed by weight as SFT mixes them."""
    sources = parse_sources(value, media_root, resolve)
    per_source, problems, read = [], defaultdict(list), 0
    for source in sources:
        part = read_source_data(source, kind)
        counts = count_items(part, encoder, decode) if encoder is not None else [None] * len(part.items)
        per_source.append(list(zip(part.items, counts)))
        read += part.read
        for name, errors in part.problems.items():
            problems[name] += errors
    mixed = mix(per_source, [s.weight for s in sources], seed)
    counts = [count for _, count in mixed] if encoder is not None else None
    return PreferenceData([item for item, _ in mixed], dict(problems), read, counts)


# ----- encoding -----
_REPLY_ONLY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def reply_encoder(encoder: ConversationEncoder) -> ConversationEncoder:
    """The encoder with `last_assistant` labels: a pair, a completion or a rollout trains its reply only, never an
    earlier assistant turn of a multi-turn prompt. A shallow copy, so the template probes and render caches are
    shared."""
    if encoder.label_mode is LabelMode.LAST_ASSISTANT:
        return encoder
    if encoder not in _REPLY_ONLY:
        copied = copy.copy(encoder)
        copied.label_mode = LabelMode.LAST_ASSISTANT
        _REPLY_ONLY[encoder] = copied
    return _REPLY_ONLY[encoder]


def encode_pair(encoder: ConversationEncoder, pair: PreferencePair) -> tuple[EncodedSample, EncodedSample]:
    """Both sides as SFT encodes their conversations (only the reply trained). Their pixels and grids are the
    prompt's, the same on both sides: the trainer encodes them once."""
    encoder = reply_encoder(encoder)
    chosen = encoder.encode(pair.conversation("chosen"))
    return chosen, encoder.encode(pair.conversation("rejected"), vision=chosen.vision())  # the media decoded once


def encode_unpaired(encoder: ConversationEncoder, item: UnpairedCompletion) -> EncodedSample:
    return reply_encoder(encoder).encode(item.conversation())


def conversations(item: Item) -> list[Sample]:
    """What an item trains on, as SFT samples: both sides of a pair, a completion, or an RL prompt alone."""
    if isinstance(item, PreferencePair):
        return [item.conversation("chosen"), item.conversation("rejected")]
    if isinstance(item, UnpairedCompletion):
        return [item.conversation()]
    return [item.prompt]


def count_item(encoder: ConversationEncoder, item: Item, decode: bool = False) -> TokenCount:
    """The longest of the item's conversations in tokens, from media headers (or, with `decode`, encoded for real);
    raises the DataError SFT would (missing media, placeholders, a turn order the template cannot render, over
    data.max_length)."""
    encoder = reply_encoder(encoder)
    longest = None
    for sample in conversations(item):
        count = encoder.count_tokens(sample)
        if decode:
            encoder.encode(sample)  # decodes every frame: corrupt packets a header check cannot see
        if encoder.max_length is not None and count.total > encoder.max_length:
            raise DataError(
                f"{sample.source}: {count.total} tokens (text {count.text}, image {count.image}, video {count.video}), "
                f"{count.total - encoder.max_length} over data.max_length={encoder.max_length}. Nothing is truncated: "
                "raise data.max_length, lower the pixel budgets, or remove the sample.",
                "too_long",
            )
        if longest is None or count.total > longest.total:
            longest = count
    return longest


# ----- checking a whole split -----
METHOD_KINDS = {
    "sft": None,
    **dict.fromkeys(("dpo", "orpo", "simpo"), "pairs"),  # IPO is method=dpo with loss_type=ipo
    "kto": "unpaired",
    **dict.fromkeys(("grpo", "dapo", "dr_grpo", "gspo"), "prompts"),
}


def data_kind(method: str) -> str | None:
    """The data a training method reads: "pairs", "unpaired", "prompts", or None (SFT: conversations)."""
    if method not in METHOD_KINDS:
        raise ConfigError(f"method {method!r} has no data format; expected one of {', '.join(METHOD_KINDS)}.")
    return METHOD_KINDS[method]


def count_items(data: PreferenceData, encoder: ConversationEncoder, decode: bool = False) -> list[TokenCount]:
    """Count every item's conversations as SFT counts its samples (`count_item`); the items that cannot be trained on
    move into `data.problems`. Returns the kept items' counts (their longest conversation), in order."""
    kept, counts = [], []
    for item in data.items:
        try:
            counts.append(count_item(encoder, item, decode))
        except DataError as err:
            data.problems.setdefault(err.kind, []).append(err)
            continue
        kept.append(item)
    data.items = kept
    return counts
