"""The launcher's error output, made clean: when a training process exits non-zero, `accelerate launch` (and
torchrun under it) add their own traceback (`subprocess.CalledProcessError`, `ChildFailedError` and its
report) after whatever the process said. A refusal would read as a crash. `run_quietly` copies the output
through unchanged except those launcher tracebacks, and returns a one-line summary of the failure instead.
Tracebacks of the training processes themselves (real crashes) pass through untouched.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading

HEADER = b"Traceback (most recent call last):"
LAUNCHER_ERRORS = (b"subprocess.CalledProcessError", b"ChildFailedError")


class LauncherTracebackFilter:
    def __init__(self, write):
        self.write = write
        self.partial = b""  # the current line while it may still turn out to be a traceback header
        self.at_line_start = True
        self.block: list[bytes] | None = None  # lines of a traceback being read
        self.report = False  # inside torchrun's failure report (after ChildFailedError), which is dropped too
        self.rules = 0
        self.root_cause = False
        self.failure: dict[str, str] = {}

    def feed(self, data: bytes) -> None:
        for piece in re.split(rb"(?<=\n)", data):
            if piece:
                self._piece(piece)

    def _piece(self, piece: bytes) -> None:
        complete = piece.endswith(b"\n")
        if self.block is None and not self.report:
            line = self.partial + piece
            if self.at_line_start and (line.rstrip(b"\r\n") == HEADER or (not complete and HEADER.startswith(line))):
                if complete:
                    self.block, self.partial = [line], b""
                else:
                    self.partial = line
                return
            self.write(line)
            self.partial, self.at_line_start = b"", complete
            return
        self.partial += piece
        if complete:
            line, self.partial = self.partial, b""
            self._line(line)

    def _line(self, line: bytes) -> None:
        if self.report:  # torchrun's "=====" framed report: keep the root cause's facts, drop the text
            self.root_cause = self.root_cause or b"Root Cause" in line
            for key in (b"rank", b"exitcode"):
                match = re.match(rb"\s*" + key + rb"\s*:\s*(\S+)", line)
                if match and self.root_cause:
                    self.failure[key.decode()] = match.group(1).decode()
            self.rules += line.startswith(b"=====")
            self.report = self.rules < 2
            return
        self.block.append(line)
        if line.startswith((b" ", b"\t")) or len(self.block) < 3 or line.strip() == b"":
            return  # still inside the traceback (its frames)
        block, self.block = self.block, None
        text = b"".join(block)
        if any(name in text for name in LAUNCHER_ERRORS):
            status = re.search(rb"non-zero exit status (-?\d+)", text)
            if status:
                self.failure.setdefault("exitcode", status.group(1).decode())
            self.report = b"ChildFailedError" in text
            return
        self.write(text)

    def close(self) -> None:
        if self.block:
            self.write(b"".join(self.block))
        if self.partial:
            self.write(self.partial)


def summary(failure: dict[str, str], returncode: int) -> str:
    code = failure.get("exitcode", str(returncode))
    where = f"training process (rank {failure['rank']})" if "rank" in failure else "training"
    if code.lstrip("-").isdigit() and int(code) < 0:
        import signal

        name = signal.Signals(-int(code)).name if -int(code) in signal.valid_signals() else f"signal {-int(code)}"
        return f"{where} was killed by {name}; the other processes were stopped."
    return f"{where} stopped with exit status {code} (the reason is above)."


def run_quietly(cmd: list[str], env: dict | None = None) -> int:
    """Run `cmd` (in `env`, default this process's) with its stderr filtered as above; print the summary line on
    failure."""
    process = subprocess.Popen(cmd, stderr=subprocess.PIPE, env=env)
    out = sys.stderr.buffer

    def write(data: bytes) -> None:
        out.write(data)
        out.flush()

    filtered = LauncherTracebackFilter(write)

    def pump() -> None:
        while chunk := os.read(process.stderr.fileno(), 1 << 16):
            filtered.feed(chunk)
        filtered.close()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    returncode = process.wait()
    reader.join()
    if returncode != 0:
        print(f"error: {summary(filtered.failure, returncode)}", file=sys.stderr, flush=True)
        code = filtered.failure.get("exitcode", "")
        if code.isdigit() and int(code) > 0:
            return int(code)  # the training process's own status (2: a refusal), not the launcher's 1
    return returncode
