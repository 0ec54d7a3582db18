"""The one writer of result lines: whole lines only, flushed in batches.

Lines are encoded by an encoder (shaping.py: full JSON lines by default, a ``--fields``
projection, or CSV records); a file that starts empty first gets the encoder's header (CSV's
header row).

Results are appended to a buffer and written with one ``os.write`` per batch: when the buffer
passes ``BUFFER_BYTES`` or ``FLUSH_SECONDS`` after the first unflushed line, whichever is first,
so a ``tail -f`` sees results within a fraction of a second without a syscall per line.

Every write hands the kernel whole lines. If a write fails half way (a full disk), the file is
cut back to its last whole line before the error is raised, so a reader never sees a torn line.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import time
from collections.abc import Callable
from typing import Any

import orjson

from .errors import OutputClosed, OutputError

BUFFER_BYTES = 64 * 1024
FLUSH_SECONDS = 0.1
_dumps = orjson.dumps
_OPTS = orjson.OPT_APPEND_NEWLINE


class JsonlWriter:
    """Writes result dicts as JSON lines to a file descriptor it owns (or borrows for stdout)."""

    def __init__(
        self,
        fd: int,
        *,
        name: str,
        close_fd: bool = True,
        fsync_interval: float | None = None,
        encode: Callable[[dict[str, Any]], bytes] | None = None,
        header: bytes = b"",
    ) -> None:
        self.name = name
        self._fd = fd
        self._close_fd = close_fd
        self._buf = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._failed: OutputError | None = None
        self._regular = stat.S_ISREG(os.fstat(fd).st_mode)
        self._size = os.lseek(fd, 0, os.SEEK_END) if self._regular else 0
        self._fsync_interval = fsync_interval
        self._last_fsync = time.monotonic()
        self._closed = False
        #  None: the plain full line, encoded inline (the common case pays no extra call).
        self._encode = encode
        self.shaped = encode is not None
        if header and self._size == 0:
            self._buf += header

    @classmethod
    def open(
        cls,
        path: str,
        *,
        append: bool,
        fsync_interval: float | None = None,
        encode: Callable[[dict[str, Any]], bytes] | None = None,
        header: bytes = b"",
    ) -> JsonlWriter:
        """Open ``path`` (``-`` is stdout) for results; raises OutputError."""
        if path == "-":
            return cls(1, name="<stdout>", close_fd=False, encode=encode, header=header)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        try:
            fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise OutputError(f"cannot open output {path}: {exc.strerror}") from None
        return cls(fd, name=path, fsync_interval=fsync_interval, encode=encode, header=header)

    @property
    def fd(self) -> int:
        return self._fd

    def write(self, result: dict[str, Any]) -> None:
        """Queue one result line; raises OutputError once output has failed."""
        encode = self._encode
        self.write_raw(_dumps(result, option=_OPTS) if encode is None else encode(result))

    def write_raw(self, lines: bytes) -> None:
        """Queue result lines already encoded (whole lines, each ending in a newline)."""
        if self._failed is not None:
            raise self._failed
        self._buf += lines
        if len(self._buf) >= BUFFER_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self._timed_flush)

    def _timed_flush(self) -> None:
        self._timer = None
        # A failure is kept in self._failed; the next write() raises it in the pool's path.
        with contextlib.suppress(OutputError):
            self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._failed is not None:
            raise self._failed
        if not self._buf:
            return
        written = 0
        error: OSError | None = None
        with memoryview(self._buf) as data:
            try:
                while written < len(data):
                    written += os.write(self._fd, data[written:])
            except OSError as exc:
                error = exc
        if error is not None:
            self._failed = self._fail(error, written)
            raise self._failed
        self._size += written
        self._buf.clear()
        if self._fsync_interval and time.monotonic() - self._last_fsync >= self._fsync_interval:
            self.fsync()

    def _fail(self, exc: OSError, written: int) -> OutputError:
        self._buf.clear()
        if exc.errno in (errno.EPIPE, errno.ECONNRESET):
            return OutputClosed(f"{self.name} was closed by its reader")
        if self._regular and written:
            # Cut the half-written batch off so the file ends with a whole line.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
        return OutputError(f"cannot write results to {self.name}: {exc.strerror}")

    def fsync(self) -> None:
        self._last_fsync = time.monotonic()
        if self._regular:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise OutputError(f"cannot sync results to {self.name}: {exc.strerror}") from None

    def close(self) -> None:
        """Flush, fsync (files) and close. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()  # raises a failure kept from an earlier timed flush
            self.fsync()
        finally:
            if self._close_fd:
                os.close(self._fd)
