"""The one error type of the data layer. Every message names the sample (file, line or index, id) and the fix;
`kind` is the problem class that `validate`, the start-up check and bad-sample reports group by
(finetune/data/prepare.py lists them)."""

from __future__ import annotations


class DataError(ValueError):
    """A sample that cannot be trained on; the message names the file, the sample and the fix. `kind` is the
    problem class `validate` groups by."""

    def __init__(self, message: str, kind: str = "format"):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # keep `kind` when a DataLoader worker sends the error back
        return (DataError, (str(self), self.kind))
