"""The token pre-pass: every sample's exact token count from media metadata, cached beside the dataset.

The cache key covers the dataset file's bytes, the vision settings, the tokenizer and chat template, and the
size and modification time of every media file, so a re-run with nothing changed reads the counts back at
once and any change recomputes them. Samples that cannot be counted keep their DataError (kind + message).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from finetune.data.conversation import DataError, Sample
from finetune.data.encode import ConversationEncoder, TokenCount
from finetune.data.sources import DatasetSource

CACHE_VERSION = 2  # 2: MKV/WebM frame rates from the timestamp span (finetune/data/media.py)


def _hash_path(h, path: Path) -> None:
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)


def _media_stamp(sample: Sample) -> str:
    stamps = []
    for block in sample.media("image") + sample.media("video"):
        paths = block.get("image", block.get("video"))
        for path in paths if isinstance(paths, list) else [paths]:
            try:
                st = os.stat(path)
                stamps.append(f"{st.st_size}:{st.st_mtime_ns}")
            except OSError:
                stamps.append("missing")
    return ",".join(stamps)


def _tokenizer_fingerprint(encoder: ConversationEncoder) -> str:
    tokenizer = encoder.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    template = encoder.processor.chat_template or ""
    return hashlib.sha256((vocab + template).encode()).hexdigest()


def cache_key(source: DatasetSource, samples: list[Sample], encoder: ConversationEncoder) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    _hash_path(h, source.path)
    h.update(json.dumps(asdict(encoder.vision), sort_keys=True).encode())
    h.update(str(source.root.resolve()).encode())
    h.update(_tokenizer_fingerprint(encoder).encode())
    for sample in samples:
        h.update(_media_stamp(sample).encode())
    return h.hexdigest()[:20]


def cache_file(source: DatasetSource, key: str) -> Path:
    """Beside the dataset when its folder is writable, else in the user cache."""
    path = source.path
    beside = (path / f".tokens-{key}.json") if path.is_dir() else path.parent / f".{path.name}.tokens-{key}.json"
    if os.access(beside.parent, os.W_OK):
        return beside
    from finetune.tiny import cache_root

    return cache_root() / "tokens" / f"{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]}-{key}.json"


def _count(encoder: ConversationEncoder, sample: Sample):
    try:
        return encoder.count_tokens(sample)
    except DataError as err:
        return err


def count_all(samples: list[Sample], encoder: ConversationEncoder, desc: str = "token pre-pass", workers: int = 4):
    """TokenCount or DataError per sample, in order, with a progress bar (threads: probing is mostly I/O)."""
    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(lambda s: _count(encoder, s), samples), total=len(samples), desc=desc,
                         unit="sample", mininterval=1.0))  # fmt: skip


def token_counts(source: DatasetSource, samples: list[Sample], encoder: ConversationEncoder):
    """Cached `count_all` for one dataset: (results, cache path, whether the cache was used)."""
    path = cache_file(source, cache_key(source, samples, encoder))
    if path.exists():
        entries = json.loads(path.read_text())
        results = [TokenCount(*e) if isinstance(e, list) else DataError(e["message"], e["kind"]) for e in entries]
        if len(results) == len(samples):
            return results, path, True
    results = count_all(samples, encoder, desc=f"token pre-pass {source.path.name}")
    entries = [[r.text, r.image, r.video] if isinstance(r, TokenCount) else {"kind": r.kind, "message": str(r)}
               for r in results]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(entries))
    tmp.replace(path)  # atomic: concurrent ranks may write the same file
    return results, path, False
