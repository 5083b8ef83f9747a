"""The sample store: each dataset file read once into Arrow files that every rank and DataLoader worker
memory-maps (one copy in the page cache, nothing per process), with every record's exact token count.

For a dataset `d.jsonl` the store is the folder `.finetune-store/d.jsonl/` beside it (or, when that folder
cannot be written, under the user cache):
  - `records-<stamp>.arrow`: one row per record, in file order: id, location, the canonical conversation as JSON
    (media paths resolved inside the media root), the record's other keys, a key (hash of the conversation), the
    media files it reads, and the reading problem if it has one. The stamp covers the file's size and
    modification time, the media root and this module's version: an edited file is read again (reading is cheap).
  - `counts-<settings>.arrow`: per record (aligned with the records file), text/image/video tokens or the
    counting problem. `settings` covers the vision budgets, tokenizer and chat template. Counts are reused per
    record key, so appending or editing samples counts only those; `media-<settings>.arrow` holds the size and
    modification time of every media file at counting time, and a changed file recounts the records using it.

Counting (the token pre-pass) runs on `num_proc` processes through `datasets.Dataset.map`; in a multi-process
run every rank counts its share of the records and the ranks exchange the results, so none waits on another's.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from finetune.base.errors import DataError
from finetune.data.conversation import Sample
from finetune.data.sources import DatasetSource, duplicate_id, iter_records, to_sample

logger = logging.getLogger(__name__)
STORE_VERSION = 1  # of the records file layout and of reading (finetune/data/conversation.py)
COUNT_VERSION = 4  # of counting: 2 = MKV/WebM rates from the timestamp span; 4 = container rates, text tokenized whole
_BATCH = 8192  # records per Arrow record batch

RECORD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("where", pa.string()),
        ("messages", pa.large_string()),
        ("extra", pa.string()),
        ("key", pa.string()),
        ("media", pa.list_(pa.string())),
        ("n_images", pa.int32()),
        ("n_videos", pa.int32()),
        ("error_kind", pa.string()),
        ("error", pa.string()),
    ]
)
COUNT_SCHEMA = pa.schema(
    [
        ("text", pa.int32()),
        ("image", pa.int32()),
        ("video", pa.int32()),
        ("error_kind", pa.string()),
        ("error", pa.string()),
    ]
)
MEDIA_SCHEMA = pa.schema([("path", pa.string()), ("stamp", pa.string())])


# ------------------------------------------------------------------ files
def store_dir(source: DatasetSource) -> Path:
    """Beside the dataset when its folder is writable, else in the user cache."""
    path = source.path
    beside = path.parent / ".finetune-store" / path.name
    if os.access(path.parent, os.W_OK):
        return beside
    from finetune.base.paths import cache_root

    return cache_root() / "store" / hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]


def _file_stamp(path: Path) -> str:
    files = (
        sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    )
    stamps = []
    for file in files:
        st = file.stat()
        stamps.append(f"{file}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}")
    return "\n".join(stamps)


def records_name(source: DatasetSource) -> str:
    h = hashlib.sha256(f"store v{STORE_VERSION}\n{source.root.resolve()}\n{_file_stamp(source.path)}".encode())
    return f"records-{h.hexdigest()[:16]}.arrow"


def settings_name(encoder) -> str:
    """What token counts depend on besides the record: the vision budgets, the checkpoint's geometry (patch and merge
    sizes) and video layout, the tokenizer and the chat template."""
    tokenizer = encoder.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    vision = dict(asdict(encoder.vision), patch=encoder.patch, merge=encoder.merge, video_layout=encoder.video_layout)
    text = f"counts v{COUNT_VERSION}\n{json.dumps(vision, sort_keys=True)}\n{vocab}\n"
    return hashlib.sha256((text + (encoder.processor.chat_template or "")).encode()).hexdigest()[:16]


def write_table(path: Path, batches, schema: pa.Schema, metadata: dict | None = None) -> None:
    """An Arrow stream file (the format `datasets` maps) written atomically (ranks on several nodes may write the
    same file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    schema = schema.with_metadata(metadata) if metadata else schema
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in batches:
            writer.write_table(pa.Table.from_pydict(batch, schema=schema))
    os.chmod(tmp, 0o644)
    tmp.replace(path)


def open_table(path: Path) -> pa.Table:
    """The whole file as a table backed by the memory map: nothing is copied into this process."""
    return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()


# ------------------------------------------------------------------ reading records
def _empty_batch() -> dict:
    return {name: [] for name in RECORD_SCHEMA.names} | {"location": []}  # location: not stored, for messages


def _add(batch: dict, sample_id, where, messages=None, extra=None, error: DataError | None = None) -> None:
    media, n_images, n_videos = [], 0, 0
    for message in messages or []:
        for block in message["content"]:
            kind = block["type"]
            if kind in ("image", "video"):
                value = block[kind]
                media += value if isinstance(value, list) else [value]
                n_images += kind == "image"
                n_videos += kind == "video"
    text = json.dumps(messages, ensure_ascii=False, separators=(",", ":")) if messages else None
    values = (
        sample_id,
        where,
        text,
        json.dumps(extra or {}, ensure_ascii=False),
        hashlib.sha1(text.encode()).hexdigest()[:16] if text else None,
        media,
        n_images,
        n_videos,
        error.kind if error else None,
        str(error) if error else None,
    )
    for name, value in zip(RECORD_SCHEMA.names, values):
        batch[name].append(value)
    batch["location"].append(None)  # set for samples (duplicate ids are named by it)


def _convert(chunk: list, root: Path) -> dict:
    """Records (index, location, record or DataError) as a batch of store columns; duplicates are found later."""
    batch = _empty_batch()
    for index, where, record in chunk:
        try:
            sample = to_sample(record, index, where, root)
        except DataError as err:
            _add(batch, None, where, error=err)
        else:
            _add(batch, sample.id, sample.source, sample.messages, sample.extra)
            batch["location"][-1] = where
    return batch


def _chunks(source: DatasetSource, size: int):
    chunk = []
    for index, (where, record) in enumerate(iter_records(source.path)):
        chunk.append((index, where, record))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _convert_in_worker(chunk: list) -> dict:
    return _convert(chunk, _worker_root)


def _set_worker_root(root: Path) -> None:
    global _worker_root
    _worker_root = root


def read_records(source: DatasetSource, num_proc: int = 1):
    """Batches (dicts of columns) of every record of one dataset, each a sample or the problem that stops it.
    Records are converted on `num_proc` forked processes; ids are checked for duplicates here, in file order."""
    from contextlib import nullcontext

    first_of: dict[str, str] = {}
    pool = None
    if num_proc > 1 and hasattr(os, "fork"):
        import multiprocessing

        pool = multiprocessing.get_context("fork").Pool(num_proc, _set_worker_root, (source.root,))
    with pool if pool is not None else nullcontext():
        chunks = _chunks(source, _BATCH)
        batches = (
            pool.imap(_convert_in_worker, chunks) if pool is not None else (_convert(c, source.root) for c in chunks)
        )
        for batch in batches:
            locations = batch.pop("location")
            for row, sample_id in enumerate(batch["id"]):
                if sample_id is None:
                    continue
                if sample_id in first_of:
                    error = duplicate_id(locations[row], sample_id, first_of[sample_id])
                    batch["messages"][row] = batch["key"][row] = None
                    batch["media"][row], batch["n_images"][row], batch["n_videos"][row] = [], 0, 0
                    batch["error_kind"][row], batch["error"][row] = error.kind, str(error)
                else:
                    first_of[sample_id] = locations[row]
            yield batch


# ------------------------------------------------------------------ counting
def _media_stamp(path: str) -> str:
    try:
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return "missing"


def _count_batch(batch: dict, encoder) -> dict:
    out = {name: [] for name in COUNT_SCHEMA.names}
    for messages, where, sample_id in zip(batch["messages"], batch["where"], batch["id"]):
        try:
            count = encoder.count_tokens(Sample(sample_id, json.loads(messages), where))
            values = (count.text, count.image, count.video, None, None)
        except DataError as err:
            values = (0, 0, 0, err.kind, str(err))
        for name, value in zip(COUNT_SCHEMA.names, values):
            out[name].append(value)
    return out


def count_rows(records_path: Path, rows: list[int], encoder, num_proc: int, desc: str) -> dict:
    """Counts of the given record rows (columns of COUNT_SCHEMA), on `num_proc` processes."""
    import datasets

    if not rows:
        return {name: [] for name in COUNT_SCHEMA.names}
    table = datasets.Dataset.from_file(str(records_path), in_memory=False).select(rows)
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.enable_progress_bars()
    try:
        counted = table.map(
            _count_batch,
            fn_kwargs={"encoder": encoder},
            batched=True,
            batch_size=64,
            input_columns=None,
            remove_columns=table.column_names,
            features=datasets.Features.from_arrow_schema(COUNT_SCHEMA),
            num_proc=num_proc if num_proc > 1 and len(rows) >= 2 * num_proc else None,
            keep_in_memory=True,
            load_from_cache_file=False,
            new_fingerprint=hashlib.sha1(f"{records_path}{len(rows)}{os.getpid()}".encode()).hexdigest()[:16],
            desc=desc,
        )
    finally:
        if not was_enabled:
            datasets.disable_progress_bars()
    return counted.data.table.to_pydict()


# ------------------------------------------------------------------ ranks
def _ranks() -> tuple[int, int, bool]:
    """(rank, world size, whether this process writes this node's files)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0
    return 0, 1, True


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _all_gather(obj) -> list:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def default_num_proc(local_world_size: int | None = None) -> int:
    """The CPUs this process may use, shared among the ranks of this node."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cpus // max(1, local))


# ------------------------------------------------------------------ one dataset
@dataclass
class StoredSource:
    """One dataset's records (memory-mapped) and their counts, row for row."""

    source: DatasetSource
    records: pa.Table
    text: np.ndarray
    image: np.ndarray
    video: np.ndarray
    error_kind: list  # per row: None or the problem class (reading or counting)
    errors: dict[int, DataError]  # row -> problem
    records_file: Path
    counted: int  # records counted now (0 when every count came from the store)

    def __len__(self) -> int:
        return self.records.num_rows


def _aligned_counts(
    records: pa.Table, old_counts: pa.Table | None, old_records: pa.Table | None, changed_media: set[str]
) -> tuple[dict, list[int]]:
    """Counts reused from the previous store by record key (unless a media file changed), and the rows to count."""
    n = records.num_rows
    counts = {
        "text": np.zeros(n, np.int32),
        "image": np.zeros(n, np.int32),
        "video": np.zeros(n, np.int32),
        "error_kind": [None] * n,
        "error": [None] * n,
    }
    keys = records.column("key").to_pylist()
    read_errors = records.column("error_kind").to_pylist()
    known: dict[str, int] = {}
    if old_counts is not None and old_records is not None and old_counts.num_rows == old_records.num_rows:
        for row, key in enumerate(old_records.column("key").to_pylist()):
            if key is not None:
                known.setdefault(key, row)
        old = {name: old_counts.column(name).to_pylist() for name in COUNT_SCHEMA.names}
    media = records.column("media").to_pylist() if changed_media else None
    to_count = []
    for row, key in enumerate(keys):
        if read_errors[row] is not None:
            continue
        old_row = known.get(key)
        if old_row is None or (media is not None and changed_media.intersection(media[row])):
            to_count.append(row)
            continue
        for name in COUNT_SCHEMA.names:
            counts[name][row] = old[name][old_row]
    return counts, to_count


def _changed_media(media_file: Path, records: pa.Table) -> tuple[set[str], dict[str, str], bool]:
    """(paths whose size/mtime differ from counting time, the current stamps, whether any stamp was stored)."""
    paths = set(pa.compute.list_flatten(records.column("media")).unique().to_pylist())
    now = {p: _media_stamp(p) for p in paths}
    if not media_file.exists():
        return set(paths), now, False
    stored = dict(zip(*open_table(media_file).to_pydict().values()))
    return {p for p, s in now.items() if stored.get(p) != s}, now, True


def load_source(source: DatasetSource, encoder, num_proc: int | None = None) -> StoredSource:
    """Read (or reuse) the store of one dataset and count what is not counted yet; every rank calls this."""
    import pyarrow.compute  # noqa: F401  (pa.compute)

    if not source.path.exists():
        raise DataError(f"Dataset {source.path} does not exist.")
    rank, world, writes = _ranks()
    folder = store_dir(source)
    records_file = folder / records_name(source)
    if writes and not records_file.exists():  # one reader per node: it may use the CPUs of every local rank
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        write_table(records_file, read_records(source, (num_proc or default_num_proc()) * local), RECORD_SCHEMA)
    _barrier()  # the node's reader has written the records (a reading problem is in the file, not raised)
    records = open_table(records_file)

    settings = settings_name(encoder)
    counts_file, media_file = folder / f"counts-{settings}.arrow", folder / f"media-{settings}.arrow"
    old_counts = open_table(counts_file) if counts_file.exists() else None
    # `is not None`, never truthiness: a pyarrow table of zero rows (an empty dataset's counts) is falsy.
    old_records_name = (
        (old_counts.schema.metadata or {}).get(b"records", b"").decode() if old_counts is not None else ""
    )
    changed, stamps, stored = _changed_media(media_file, records)
    if old_records_name == records_file.name and not changed:
        counts = {name: old_counts.column(name) for name in COUNT_SCHEMA.names}
        counts = {
            k: (v.to_numpy(zero_copy_only=False).astype(np.int32) if k in ("text", "image", "video") else v.to_pylist())
            for k, v in counts.items()
        }
        to_count = []
    else:
        old_records = None
        # An empty name would be the store folder itself: only a records file named by the counts is reused.
        if old_counts is not None and old_records_name and (folder / old_records_name).is_file():
            old_records = open_table(folder / old_records_name)
        counts, to_count = _aligned_counts(records, old_counts, old_records, changed if stored else set())
        share = np.array_split(np.array(to_count, dtype=np.int64), world)[rank].tolist()
        procs = num_proc or default_num_proc()
        mine = count_rows(
            records_file,
            share,
            encoder,
            procs,
            f"token pre-pass {source.path.name}"
            + (f" (rank {rank}: {len(share)} of {len(to_count)})" if world > 1 else ""),
        )
        for part_rows, part in _all_gather((share, mine)):
            for name in COUNT_SCHEMA.names:
                values = part[name]
                for row, value in zip(part_rows, values):
                    counts[name][row] = value
        if writes:
            write_table(
                counts_file,
                [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in counts.items()}],
                COUNT_SCHEMA,
                {"records": records_file.name},
            )
            write_table(media_file, [{"path": list(stamps), "stamp": list(stamps.values())}], MEDIA_SCHEMA)
            _remove_stale(folder, keep={records_file.name, counts_file.name, media_file.name})
    read_kind = records.column("error_kind").to_pylist()
    read_message = records.column("error")
    error_kind, errors = [], {}
    for row, kind in enumerate(read_kind):
        if kind is not None:
            errors[row] = DataError(read_message[row].as_py(), kind)
        elif counts["error_kind"][row] is not None:
            kind = counts["error_kind"][row]
            errors[row] = DataError(counts["error"][row], kind)
        error_kind.append(kind)
    return StoredSource(
        source,
        records,
        np.asarray(counts["text"], np.int32),
        np.asarray(counts["image"], np.int32),
        np.asarray(counts["video"], np.int32),
        error_kind,
        errors,
        records_file,
        len(to_count),
    )


def _remove_stale(folder: Path, keep: set[str]) -> None:
    """Records files of earlier versions of the dataset; counts of other settings stay (switching back is free)."""
    for path in folder.glob("records-*.arrow"):
        if path.name not in keep:
            path.unlink(missing_ok=True)


# ------------------------------------------------------------------ samples from rows
class SampleTable:
    """A sequence of Samples built on access from memory-mapped record rows (several datasets, mixed). It pickles
    as its file names and positions, so a spawned DataLoader worker maps the same files instead of copying them."""

    def __init__(self, files: list[Path], order, cuts: dict[int, int] | None = None, tables: list | None = None):
        self._files = [Path(f) for f in files]
        self._parts = tables if tables is not None else [open_table(f) for f in self._files]
        self._columns = []
        for table in self._parts:
            chunks = {name: table.column(name).chunks for name in ("id", "where", "messages", "extra")}
            starts = np.cumsum([0] + [len(c) for c in chunks["id"]])[:-1].tolist()
            self._columns.append((chunks, starts))
        self._order = np.asarray(order, dtype=np.int64).reshape(-1, 2)  # (part, row) per sample
        self._cuts = cuts or {}  # sample position -> messages kept (data.over_length=drop_trailing_turns)

    def __getstate__(self):
        return {"files": self._files, "order": self._order, "cuts": self._cuts}

    def __setstate__(self, state):
        self.__init__(state["files"], state["order"], state["cuts"])

    def __len__(self) -> int:
        return len(self._order)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        part, row = self._order[i]
        chunks, starts = self._columns[part]
        at = bisect.bisect_right(starts, row) - 1  # the record batch holding the row, found once per sample
        sample_id, where, messages, extra = (
            chunks[name][at][row - starts[at]].as_py() for name in ("id", "where", "messages", "extra")
        )
        messages = json.loads(messages)
        if i in self._cuts:
            messages = messages[: self._cuts[i]]
        return Sample(sample_id, messages, where, json.loads(extra))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def subset(self, positions) -> "SampleTable":
        """The samples at these positions, in this order (still built on access)."""
        positions = np.asarray(positions, dtype=np.int64)
        where = {int(p): k for k, p in enumerate(positions)}
        cuts = {where[i]: n for i, n in self._cuts.items() if i in where}
        order = self._order[positions] if len(positions) else np.zeros((0, 2), np.int64)
        return SampleTable(self._files, order, cuts, self._parts)

    def media_counts(self) -> tuple[int, int]:
        """The most images and the most videos in one sample."""
        most = [0, 0]
        for part, table in enumerate(self._parts):
            rows = self._order[self._order[:, 0] == part, 1]
            if len(rows):
                for k, name in enumerate(("n_images", "n_videos")):
                    most[k] = max(most[k], int(table.column(name).to_numpy()[rows].max()))
        return most[0], most[1]
