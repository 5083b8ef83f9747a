"""The training DataLoader, as a function of the world size: packed rows (or one sample per row) of the counted
samples, or the stream of data.streaming=true."""

from __future__ import annotations

import logging

from accelerate import PartialState
from torch.utils.data import DataLoader

from finetune.base.errors import ConfigError, DataError
from finetune.base.paths import resolve_data_file
from finetune.data.packing import training_rows
from finetune.data.sources import parse_sources
from finetune.data.streaming import StreamingBatches, checkpoint_step
from finetune.model.batching import RowCollator, training_loader
from finetune.recipe.schema import Config

logger = logging.getLogger("finetune.train")


def loader_factory(config: Config, encoder, samples, lengths: list[int], rule, boundaries: bool):
    """A function of the world size returning the training DataLoader: packed rows, or one sample per row."""
    budget = config.trainer.max_tokens_per_row or config.data.max_length
    rows = training_rows(lengths, config.trainer.packing, budget, config.trainer.seed)
    if config.trainer.packing:
        logger.info(
            "packing %d samples into %d rows of <= %d tokens (%.1f%% filled)",
            len(samples),
            len(rows),
            budget,
            100 * sum(lengths) / (len(rows) * budget),
        )
    collator = RowCollator(encoder, samples, rule, boundaries)

    def build(world_size: int):
        return training_loader(
            rows,
            collator,
            config.trainer.per_device_train_batch_size,
            config.trainer.seed,
            world_size,
            config.trainer.dataloader_num_workers,
            config.trainer.sequence_parallel,
        )

    return build, collator


def streaming_loader(config: Config, encoder, rule, boundaries: bool, checkpoint: str | None):
    """The training DataLoader of data.streaming=true (finetune/data/streaming.py)."""
    sources = parse_sources(config.data.train, config.data.media_root, resolve_data_file)
    if any(s.weight != 1.0 for s in sources):
        raise ConfigError(
            "data.streaming=true reads each dataset once per pass: dataset weights are not supported "
            "there. Drop the weights, or repeat/subsample the files, or use data.streaming=false."
        )
    for source in sources:
        if not source.path.exists():
            raise DataError(f"Dataset {source.path} does not exist.")
    t = config.trainer
    skip = checkpoint_step(checkpoint) * t.gradient_accumulation_steps

    def build(world_size: int):
        stream = StreamingBatches(
            sources,
            encoder,
            RowCollator(encoder, None, rule, boundaries),
            budget=t.max_tokens_per_row or config.data.max_length,
            packing=t.packing,
            rows_per_batch=t.per_device_train_batch_size,
            seed=t.seed,
            rank=PartialState().process_index,
            world_size=world_size,
            buffer_size=config.data.stream_buffer,
            over_length=config.data.over_length,
            skip_batches=skip,
        )
        return DataLoader(stream, batch_size=None, num_workers=t.dataloader_num_workers)

    return build
