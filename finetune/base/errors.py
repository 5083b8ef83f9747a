"""The error types every layer raises and the command line turns into one line and exit status 2.

`ConfigError`: a recipe or command line that cannot run. `DataError`: a sample that cannot be trained on; every
message names the sample (file, line or index, id) and the fix, and `kind` is the problem class that `validate`, the
start-up check and bad-sample reports group by (finetune/data/prepare.py lists them). `RunStopped`: a run that
cannot go on (out of disk, too many bad samples, out of GPU memory)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A recipe that cannot run; the message says how to fix it."""


class DataError(ValueError):
    """A sample that cannot be trained on; the message names the file, the sample and the fix. `kind` is the
    problem class `validate` groups by."""

    def __init__(self, message: str, kind: str = "format"):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # keep `kind` when a DataLoader worker sends the error back
        return (DataError, (str(self), self.kind))


class RunStopped(RuntimeError):
    """The run cannot go on (e.g. out of disk); the message says what is kept and what to do."""
