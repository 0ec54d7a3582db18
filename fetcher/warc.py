"""``--warc FILE.warc.gz``: every http exchange as WARC/1.1 records, written with warcio.

warcio (the reference WARC library) builds the records and their digests in a writer process
of their own (warcrecords.py); this module decides what goes in them and hands them over:

- a ``warcinfo`` record opens every file; past ``warc.max_size`` bytes a new numbered file
  starts (``crawl.warc.gz``, ``crawl-00001.warc.gz``, ...), with its own ``warcinfo``;
- each exchange is a ``response`` record (or a ``revisit`` when a payload with the same digest
  was already recorded in this run) and a ``request`` record pointing to it with
  ``WARC-Concurrent-To``, for the redirect hops too;
- the response bytes are the ones that came off the wire: content-encoding kept (the session
  does not decompress when a WARC is written; http.py decodes for ``bytes`` and ``sha256``).
  aiohttp's parser has already removed the chunked framing; a chunked body is framed again,
  one chunk per read, so that the record stays the HTTP message its headers describe;
- a redirect hop's body is never read (aiohttp drops it): its response record holds the status
  line and headers, with ``WARC-Truncated: unspecified`` when the hop announced a body;
- the values of ``Authorization``, ``Cookie`` and ``Proxy-Authorization`` request headers are
  written as ``***``, as everywhere else fetcher writes.

Building a record is a fraction of a millisecond of Python: in a thread of this process it
was taken from the event loop under the GIL (a small-page run took 2.5 times as long), so the
records are built in their own process, on the other core. The exchanges finished in one turn
of the loop go to it as one batch through a pipe, and it answers the batch at once when its
records are written: a result line is written only after its records, so the ``warc`` field
always points to a complete record. One writer, in order: the records of one exchange are
never interleaved with another's.

After SIGKILL the last gzip member may be cut short: ``--resume`` truncates the last file of the
series at the end of its last complete record (``repair``) and appends after it.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .errors import ConfigError
from .warcrecords import FRAME, existing_series, lock, repair

__all__ = ["Hop", "RawSpool", "WarcWriter", "check_target", "discard", "repair", "target_uri"]

SPOOL_BYTES = 1 << 20
#  A batch is sent before the turn of the loop ends once it holds this much.
BATCH_BYTES = 8 << 20
#  How long a new run waits for the writer of a killed one to be gone (the kernel kills it).
LOCK_WAIT = 10.0
#  The package's folder, first on the writer's path: it runs this very fetcher.
ROOT = str(Path(__file__).resolve().parent.parent)
BOOT = f"import sys; sys.path.insert(0, {ROOT!r}); from fetcher.warcrecords import main; main()"


@dataclass
class Hop:
    """One request and its response, as they went over the wire."""

    uri: str
    request_line: str  # "GET /path?q HTTP/1.1"
    request_headers: list[tuple[str, str]]
    status_line: str  # "200 OK"
    protocol: str  # "HTTP/1.1"
    #  As they came, names and values in bytes (aiohttp's raw_headers): the writer joins them.
    response_headers: tuple[tuple[bytes, bytes], ...]
    ip: str | None = None
    request_body: bytes = b""
    payload: RawSpool | None = None  # None: a redirect hop, body not read
    announced_body: bool = False


class RawSpool:
    """The raw body of one response: in memory up to ``SPOOL_BYTES``, then in an unnamed
    temporary file (gone with the process, whatever kills it), written from a thread."""

    def __init__(self, folder: Path, chunked: bool) -> None:
        self._folder = folder
        self._chunked = chunked
        #  The chunks as they came, joined once: a small body, one chunk, is never copied.
        self._chunks: list[bytes] = []
        self._held = 0
        self._file: IO[bytes] | None = None

    async def write(self, chunk: bytes) -> None:
        if self._chunked:
            self._chunks += (b"%x\r\n" % len(chunk), chunk, b"\r\n")
        else:
            self._chunks.append(chunk)
        self._held += len(chunk)
        if self._held >= SPOOL_BYTES:
            data = b"".join(self._chunks)
            self._chunks.clear()
            self._held = 0
            await asyncio.to_thread(self._spill, data)

    def _spill(self, data: bytes) -> None:
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self._folder)  # noqa: SIM115 - closed by close()
        self._file.write(data)

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def _tail(self) -> bytes:
        if self._chunked:
            self._chunks.append(b"0\r\n\r\n")
        tail = b"".join(self._chunks)
        self._chunks.clear()
        self._held = 0
        return tail

    def payload(self) -> bytes:
        """The whole payload, framed, of a body that stayed in memory."""
        assert self._file is None
        return self._tail()

    def finish_file(self) -> tuple[IO[bytes], int]:
        """The file of a spilled body, its tail written and at its start, and its length
        (blocking: from a thread)."""
        assert self._file is not None
        self._file.write(self._tail())
        length = self._file.tell()
        self._file.flush()
        self._file.seek(0)
        return self._file, length

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def check_target(path: Path, *, resume: bool, overwrite: bool) -> None:
    """Before a run: a WARC series is never clobbered by accident, as OUT is not (exit 2).
    With ``overwrite`` the old series is removed."""
    old = existing_series(path)
    if not old or resume:
        if not path.parent.is_dir():
            raise ConfigError(f"--warc {path}: no such folder {path.parent}")
        return
    if not overwrite:
        if old == [path] and path.stat().st_size == 0:
            return
        raise ConfigError(
            f"--warc {path} exists: add --resume to append to it or --overwrite to replace it"
        )
    for file in old:
        file.unlink()


def wire_hop(hop: Hop, payload: bytes | tuple[int, int] | None) -> tuple[Any, ...]:
    """A hop as it crosses the pipe to the writer: plain values, which pickle fast."""
    return (
        hop.uri,
        hop.request_line,
        hop.request_headers,
        hop.status_line,
        hop.protocol,
        hop.response_headers,
        hop.ip,
        hop.request_body,
        payload,
        hop.announced_body,
    )


class WarcWriter:
    """The WARC files of one run (one process). ``record`` returns the result's ``warc``."""

    def __init__(self, path: Path, max_size: int, *, append: bool, software: str) -> None:
        """``append``: add to the series at ``path`` (``--resume``, workers), else start it anew.

        The file is opened (and repaired) here, so that one that cannot be written stops the
        run before it starts; the writer process starts with it open and takes it from there.
        """
        self.folder = path.parent
        try:
            out, index = _open(path, append)
        except OSError as exc:
            raise ConfigError(f"--warc {path}: {exc.strerror}") from None
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        setup = {
            "path": str(path),
            "index": index,
            "max_size": max_size,
            "software": software,
            "parent": os.getpid(),
            "out": out.fileno(),
            "fds": theirs.fileno(),
        }
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c", BOOT, json.dumps(setup)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=(out.fileno(), theirs.fileno()),
                # Out of the terminal's process group: Ctrl-C is the run's to handle (drain),
                # and the writer ends when the run closes the pipe.
                start_new_session=True,
            )
        except OSError as exc:
            mine.close()
            raise ConfigError(f"--warc {path}: cannot start the writer: {exc}") from None
        finally:
            out.close()  # the writer holds the file, and its lock, from here on
            theirs.close()
        self._fds = mine
        self._pipe: asyncio.WriteTransport | None = None
        self._answers: _Answers | None = None
        self._connecting: asyncio.Task[None] | None = None
        #  Exchanges for the next batch, and the jobs waiting for the answers, in order.
        self._batch: list[list[tuple[Any, ...]]] = []
        self._batch_bytes = 0
        self._scheduled = False
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._tags = 0
        self._stopped: BaseException | None = None

    async def record(self, hops: list[Hop]) -> dict[str, Any]:
        """The result's ``warc`` field, once the records of ``hops`` are written."""
        if self._pipe is None:
            try:
                await self._connect()
            except BaseException:
                discard(hops)
                raise
        if self._stopped is not None:
            discard(hops)
            raise OSError(str(self._stopped))  # a new one each time: tracebacks do not pile up
        exchange = []
        size = 0
        try:
            for hop in hops:
                payload: bytes | tuple[int, int] | None = None
                spool = hop.payload
                if spool is not None and spool.spilled:
                    hop.payload = None  # the thread that passes it on closes it
                    payload = await self._pass_file(spool)
                elif spool is not None:
                    payload = spool.payload()
                    size += len(payload)
                exchange.append(wire_hop(hop, payload))
        finally:
            discard(hops)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._batch.append(exchange)
        self._waiting.append(done)
        self._batch_bytes += size
        if self._batch_bytes >= BATCH_BYTES:
            self._send()
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._send)
        return await done

    async def _connect(self) -> None:
        """The pipes to and from the writer, on the loop (once, on the first record)."""
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect_pipes())
        await asyncio.shield(self._connecting)

    async def _connect_pipes(self) -> None:
        loop = asyncio.get_running_loop()
        process = self._process
        assert process.stdin is not None and process.stdout is not None
        answers = _Answers(self)
        await loop.connect_read_pipe(lambda: answers, process.stdout)
        pipe, _ = await loop.connect_write_pipe(asyncio.BaseProtocol, process.stdin)
        self._answers, self._pipe = answers, pipe

    async def _pass_file(self, spool: RawSpool) -> tuple[int, int]:
        """A spilled body goes as its file: the descriptor over the socket, with a tag."""
        self._tags += 1
        tag = self._tags

        def send() -> int:
            try:
                file, length = spool.finish_file()
                socket.send_fds(self._fds, [tag.to_bytes(8, "big")], [file.fileno()])
            finally:
                spool.close()  # the writer has its own descriptor of the file now
            return length

        return tag, await asyncio.to_thread(send)

    def _send(self) -> None:
        """The batch, as one frame (the writer answers it as one)."""
        self._scheduled = False
        if not self._batch:
            return
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        if self._pipe is None or self._pipe.is_closing():
            self._stop(OSError("the WARC writer process is not running"))
            return
        data = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
        self._pipe.write(FRAME.pack(len(data)) + data)

    def _answered(self, replies: list[Any]) -> None:
        """On the loop: a written batch's answers to the jobs still waiting for them."""
        waiting = self._waiting
        for reply in replies:
            done = waiting.popleft()
            if done.cancelled():
                continue
            if isinstance(reply, BaseException):
                done.set_exception(reply)
            else:
                done.set_result(reply)

    def _stop(self, exc: BaseException) -> None:
        """The writer is gone: every job still waiting, and every later one, fails."""
        if self._stopped is None:
            self._stopped = exc
        while self._waiting:
            done = self._waiting.popleft()
            if not done.cancelled():
                done.set_exception(exc)

    async def close(self) -> None:
        """Closes the pipe (the writer writes what it has and ends) and waits for the writer."""
        if self._scheduled:
            self._send()
        if self._pipe is not None:
            self._pipe.close()
            assert self._answers is not None
            await self._answers.ended
        else:
            if self._connecting is not None:
                self._connecting.cancel()
            assert self._process.stdin is not None and self._process.stdout is not None
            self._process.stdin.close()
            self._process.stdout.close()
        await asyncio.to_thread(self._process.wait)
        self._fds.close()


class _Answers(asyncio.Protocol):
    """The writer's answers, frame by frame, as they come through the pipe."""

    def __init__(self, writer: WarcWriter) -> None:
        self._writer = writer
        self._buffer = bytearray()
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while len(buffer) - start >= FRAME.size:
            (size,) = FRAME.unpack_from(buffer, start)
            end = start + FRAME.size + size
            if len(buffer) < end:
                break
            self._writer._answered(pickle.loads(memoryview(buffer)[start + FRAME.size : end]))
            start = end
        del buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        self._writer._stop(OSError("the WARC writer process stopped"))
        if not self.ended.done():
            self.ended.set_result(None)


def _open(path: Path, append: bool) -> tuple[IO[bytes], int]:
    """The file the writer starts in, open and locked, and its place in the series."""
    existing = existing_series(path) if append else []
    file = existing[-1] if existing else path
    out = open(file, "ab" if existing else "wb")  # noqa: SIM115 - handed to the writer process
    # The writer of a run killed a moment ago may still be on its way out (the kernel kills
    # it): it holds the lock until it is gone, and nothing is repaired or appended before.
    deadline = time.monotonic() + LOCK_WAIT
    while not lock(out, wait=False):
        if time.monotonic() > deadline:
            out.close()
            raise ConfigError(f"--warc {file} is being written by another run")
        time.sleep(0.01)
    if existing:
        repair(file)
    return out, max(len(existing) - 1, 0)


_CREDENTIALS = re.compile(r"//[^/@]*@")


def target_uri(url: str) -> str:
    """The URI a record names: never with a password in it."""
    if "@" not in url:  # the common case, without the regular expression
        return url
    return _CREDENTIALS.sub("//", url, count=1)


def discard(hops: list[Hop]) -> None:
    for hop in hops:
        if hop.payload is not None:
            hop.payload.close()
