"""The shared shape of our command-line entry points: user mistakes print one clear line, exit status 2."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Callable

from finetune.base.errors import ConfigError, DataError


def quiet_library_logs() -> None:
    """Before a command's module is imported: bitsandbytes (imported by peft whenever it is installed, so by every
    command that loads a model) warns at import on CPUs with AVX512-BF16 that an optional hub kernel is missing; it
    falls back to its own 4-bit kernel, and nothing is for our users to act on."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def run(entry: Callable[[], int | None]) -> int:
    # Raised inside peft/trl on every load with transformers 5.23; nothing for our users to act on.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # accelerate says at INFO, on every step, that TRL's metric gathers see a data loader without a length.
    logging.getLogger("accelerate.accelerator").setLevel(logging.WARNING)
    quiet_library_logs()
    from finetune.base.errors import RunStopped

    try:
        status = entry()
    except (ConfigError, DataError, RunStopped) as err:
        # Every rank refuses the same way for the same reason (same data, same counts): rank 0 says it once.
        if isinstance(err, RunStopped) or int(os.environ.get("RANK", "0")) == 0:
            from tqdm import tqdm

            tqdm.write(f"error: {err}", file=sys.stderr)  # on a line of its own, even under a progress bar
        return 2
    return status or 0
