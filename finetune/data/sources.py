"""Dataset files and mixtures: JSON, JSONL, parquet or a local HF `datasets` directory, one or several
mixed with weights. Nothing is ever unpickled; remote datasets are not fetched."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.base.errors import DataError
from finetune.data.conversation import Sample, record_to_sample


@dataclass(frozen=True)
class DatasetSource:
    path: Path
    weight: float = 1.0  # 2.0 = every sample twice per epoch; 0.5 = a seeded random half
    media_root: Path | None = None  # default: the dataset file's folder (or the HF directory itself)

    @property
    def root(self) -> Path:
        if self.media_root is not None:
            return self.media_root
        return self.path if self.path.is_dir() else self.path.parent


def parse_sources(value, media_root: str | None, resolve) -> list[DatasetSource]:
    """`data.train` as written in a recipe: a path, a list of paths, or a list of {path, weight, media_root}."""
    items = value if isinstance(value, (list, tuple)) else [value]
    sources = []
    for item in items:
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict) or "path" not in item or set(item) - {"path", "weight", "media_root"}:
            raise DataError(f"dataset entry {item!r}: expected a path or {{path, weight, media_root}}.")
        weight = float(item.get("weight", 1.0))
        if weight <= 0:
            raise DataError(f"dataset {item['path']}: weight must be positive, got {weight}.")
        root = item.get("media_root", media_root)
        sources.append(DatasetSource(resolve(item["path"]), weight, Path(root) if root else None))
    return sources


def iter_records(path: Path):
    """(location, record) pairs; the location names the line (JSONL) or index (JSON, parquet, HF dir)."""
    if path.is_dir():
        yield from _saved_dataset_records(path)
        return
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises its own types for a truncated or foreign file
            raise DataError(f"{path}: cannot be read as parquet ({str(err).splitlines()[0]}). Re-export it.") from None
        for i, record in enumerate(table.to_pylist()):
            yield f"{path}[{i}]", record
    elif suffix == ".jsonl":
        with open(path, "rb") as f:  # line by line as bytes: one bad line never costs the good ones
            for line_no, raw in enumerate(f, 1):
                where = f"{path}:{line_no}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    yield (
                        where,
                        DataError(
                            f"{where}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                            f"{err.start + 1}). Re-save the file as UTF-8."
                        ),
                    )
                    continue
                if line.strip():
                    try:
                        yield where, json.loads(line)
                    except json.JSONDecodeError as err:
                        yield where, DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno}).")
    elif suffix == ".json":
        try:
            records = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as err:
            raise DataError(
                f"{path}: not UTF-8 text (byte offset {err.start}). Re-save the file as UTF-8, or as "
                "JSONL so that one bad line costs only that line."
            ) from None
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}).") from None
        if not isinstance(records, list):
            raise DataError(
                f"{path}: expected a JSON list of samples (or a .jsonl file), got {type(records).__name__}."
            )
        for i, record in enumerate(records):
            yield f"{path}[{i}]", record
    else:
        raise DataError(f"{path}: unsupported dataset file; use .json, .jsonl, .parquet or a `save_to_disk` folder.")


def _saved_dataset_records(path: Path):
    """The records of a `Dataset.save_to_disk` folder. A zero-row dataset is saved with no data file at all, which
    `load_from_disk` (datasets 5.2) cannot open (IndexError): it is read as the empty dataset it is."""
    import datasets

    state = path / "state.json"
    try:
        if json.loads(state.read_text()).get("_data_files") == []:
            return
    except (OSError, ValueError):
        pass  # not a plain `save_to_disk` folder: load_from_disk says what it is
    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as err:  # a folder of something else, a cut shard: name the folder
        raise DataError(
            f"{path}: cannot be read as a `Dataset.save_to_disk` folder ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Point data.train/data.eval at a dataset file or at the "
            "folder of one split."
        ) from None
    for i, record in enumerate(dataset):
        yield f"{path}[{i}]", record


def read_record(reader, record, index: int, where: str, root: Path, formats: str = "docs/data.md for the formats read"):
    """`reader(record, index, where, root)` on a record (or the DataError reading it gave); every problem is a
    DataError naming the record, a shape no reader expects included (`formats`: where the formats are described)."""
    if isinstance(record, DataError):
        raise record
    try:
        return reader(record, index, where, root)
    except DataError:
        raise
    except Exception as err:  # a shape no reader expects (a number where a list belongs, ...): name the record
        raise DataError(f"{where}: malformed record ({type(err).__name__}: {err}). See {formats}.", "format") from None


def to_sample(record, index: int, where: str, root: Path) -> Sample:
    """A record (or the DataError reading it gave) as a Sample; every problem is a DataError naming the record."""
    return read_record(record_to_sample, record, index, where, root)


def duplicate_id(where: str, sample_id: str, first: str) -> DataError:
    """Reports, skips and predictions name samples by id: it must be unique."""
    return DataError(
        f"{where}: id {sample_id!r} is used again (first at {first}). Give every sample its own id.", "duplicate_id"
    )


def read_source(source: DatasetSource) -> tuple[list[Sample], list[DataError]]:
    """Every record of one dataset as a Sample, or the DataError that says why it cannot be one."""
    if not source.path.exists():
        raise DataError(f"Dataset {source.path} does not exist.")
    samples, errors, first_of = [], [], {}
    for index, (where, record) in enumerate(iter_records(source.path)):
        try:
            sample = to_sample(record, index, where, source.root)
        except DataError as err:
            errors.append(err)
            continue
        if sample.id in first_of:
            errors.append(duplicate_id(where, sample.id, first_of[sample.id]))
            continue
        first_of[sample.id] = where
        samples.append(sample)
    return samples, errors


def mix_order(sizes: list[int], weights: list[float], seed: int) -> np.ndarray:
    """(dataset, position) pairs of the mixture: each dataset repeated or subsampled by its weight, in dataset
    order (deterministic for a seed). Arrays, not objects, so that millions of samples cost megabytes."""
    rng = random.Random(seed)
    parts = []
    for part, (size, weight) in enumerate(zip(sizes, weights)):
        whole, fraction = int(weight), weight - int(weight)
        positions = [np.tile(np.arange(size, dtype=np.int64), whole)]
        positions.append(np.array(rng.sample(range(size), round(fraction * size)), dtype=np.int64))
        positions = np.concatenate(positions)
        parts.append(np.stack([np.full(len(positions), part, dtype=np.int64), positions], axis=1))
    return np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64)


def mix(per_source: list[list], weights: list[float], seed: int) -> list:
    """Concatenate the datasets, repeating or subsampling each by its weight (deterministic for a seed)."""
    order = mix_order([len(items) for items in per_source], weights, seed)
    return [per_source[part][position] for part, position in order.tolist()]


def load_samples(path, media_root=None) -> list[Sample]:
    """One dataset file, failing on the first bad sample (tests and small tools)."""
    samples, errors = read_source(DatasetSource(Path(path), 1.0, Path(media_root) if media_root else None))
    if errors:
        raise errors[0]
    return samples
