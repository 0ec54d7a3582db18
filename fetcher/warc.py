"""``--warc FILE.warc.gz``: every http exchange as WARC/1.1 records, written with warcio.

warcio (the reference WARC library) builds the records, their digests and the per-record gzip
members; this module decides what goes in them and where they go:

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

One thread writes, record after record, so the loop never waits on gzip or the disk and the
records of one exchange are never interleaved with another's. A result line is written only
after its records: the ``warc`` field always points to a complete record.

After SIGKILL the last gzip member may be cut short: ``--resume`` truncates the last file of the
series at the end of its last complete record (``repair``) and appends after it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import queue
import re
import tempfile
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .errors import ConfigError

#  Payload digests remembered for revisit records: about 150 bytes each.
MAX_DIGESTS = 100_000
SECRET_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
SPOOL_BYTES = 1 << 20


@dataclass
class Hop:
    """One request and its response, as they went over the wire."""

    uri: str
    request_line: str  # "GET /path?q HTTP/1.1"
    request_headers: list[tuple[str, str]]
    status_line: str  # "200 OK"
    protocol: str  # "HTTP/1.1"
    response_headers: list[tuple[str, str]]
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
        self._buffer = bytearray()
        self._file: IO[bytes] | None = None

    async def write(self, chunk: bytes) -> None:
        if self._chunked:
            self._buffer += b"%x\r\n" % len(chunk)
            self._buffer += chunk
            self._buffer += b"\r\n"
        else:
            self._buffer += chunk
        if len(self._buffer) >= SPOOL_BYTES:
            data = bytes(self._buffer)
            self._buffer.clear()
            await asyncio.to_thread(self._spill, data)

    def _spill(self, data: bytes) -> None:
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self._folder)  # noqa: SIM115 - closed by close()
        self._file.write(data)

    def stream(self) -> tuple[IO[bytes], int]:
        """The whole payload, framed, and its length (in the writer thread, at the end)."""
        tail = bytes(self._buffer) + (b"0\r\n\r\n" if self._chunked else b"")
        self._buffer.clear()
        if self._file is None:
            return io.BytesIO(tail), len(tail)
        self._file.write(tail)
        length = self._file.tell()
        self._file.seek(0)
        return self._file, length

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def series(path: Path) -> Iterator[Path]:
    """``crawl.warc.gz``, then ``crawl-00001.warc.gz``, ``crawl-00002.warc.gz``, ..."""
    yield path
    name = path.name
    stem, dot, ext = name.partition(".")
    n = 1
    while True:
        yield path.with_name(f"{stem}-{n:05d}{dot}{ext}")
        n += 1


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


def existing_series(path: Path) -> list[Path]:
    files: list[Path] = []
    for candidate in series(path):
        if not candidate.exists():
            return files
        files.append(candidate)
    return files  # pragma: no cover - series() never ends


def repair(path: Path) -> int:
    """Cut a torn record off the end of ``path``; returns the bytes removed.

    Every record is one gzip member, finished (trailer and CRC) before the next begins, so the
    end of the last member zlib reads to its trailer is the end of the last complete record.
    """
    with open(path, "rb") as f:
        good = _complete_members(f)
        size = f.seek(0, os.SEEK_END)
    if good < size:
        os.truncate(path, good)
    return size - good


def _complete_members(f: IO[bytes]) -> int:
    """Bytes of ``f`` taken by complete gzip members, from its start."""
    good = pos = 0
    member = zlib.decompressobj(zlib.MAX_WBITS | 16)
    while block := f.read(1 << 20):
        data = block
        while data:
            try:
                member.decompress(data)
            except zlib.error:  # not gzip past the last good member: cut there
                return good
            if not member.eof:
                pos += len(data)
                break
            pos += len(data) - len(member.unused_data)
            good = pos
            data = member.unused_data
            member = zlib.decompressobj(zlib.MAX_WBITS | 16)
    return good


class _GzipMembers:
    """What warcio writes a record to: each record one gzip member (warcio's ``flush`` at the
    record's end closes it), at level 6 rather than warcio's 9, which costs twice the CPU for
    a file a few percent smaller."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._member = zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS | 16)

    def write(self, data: bytes) -> None:
        self._out.write(self._member.compress(data))

    def flush(self) -> None:
        self._out.write(self._member.flush())
        self._member = zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS | 16)


def _sha1(*parts: bytes) -> str:
    """A WARC digest, as warcio writes them: ``sha1:`` and base32."""
    h = hashlib.sha1()
    for part in parts:
        h.update(part)
    return "sha1:" + base64.b32encode(h.digest()).decode("ascii")


class WarcWriter:
    """The WARC files of one run (one process). ``record`` returns the result's ``warc``."""

    def __init__(self, path: Path, max_size: int, *, append: bool, software: str) -> None:
        """``append``: add to the series at ``path`` (``--resume``, workers), else start it anew."""
        from warcio.warcwriter import WARCWriter

        self._writer_class = WARCWriter
        self._path = path
        self._max_size = max_size
        self._software = software
        #  Exchanges to write, in order, for the one writer thread (started by the first).
        self._queue: queue.SimpleQueue[tuple[list[Hop], asyncio.Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._digests: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._names = series(path)
        self._out: IO[bytes] | None = None
        self._file = path
        self.folder = path.parent
        try:
            self._open(append)
        except OSError as exc:
            raise ConfigError(f"--warc {path}: {exc.strerror}") from None

    def _open(self, append: bool) -> None:
        existing = existing_series(self._path) if append else []
        if existing:
            for _ in existing[1:]:
                next(self._names)
            self._file = existing[-1]
            next(self._names)
            repair(self._file)
            self._out = open(self._file, "ab")  # noqa: SIM115 - closed by close()
            self._writer = self._writer_class(
                _GzipMembers(self._out), gzip=False, warc_version="1.1"
            )
            if self._out.tell() == 0:
                self._warcinfo()
            return
        self._next_file()

    def _next_file(self) -> None:
        if self._out is not None:
            self._out.close()
        self._file = next(self._names)
        self._out = open(self._file, "wb")  # noqa: SIM115 - closed by close()
        self._writer = self._writer_class(_GzipMembers(self._out), gzip=False, warc_version="1.1")
        self._warcinfo()

    def _warcinfo(self) -> None:
        info = {"software": self._software, "format": "WARC File Format 1.1"}
        self._writer.write_record(self._writer.create_warcinfo_record(self._file.name, info))
        assert self._out is not None
        self._out.flush()

    async def record(self, hops: list[Hop]) -> dict[str, Any]:
        """Write ``hops`` (in the writer thread); the result's ``warc`` field once written.

        A hand-off per exchange to an executor cost a third of a small-page run in thread
        wake-ups; the writer instead drains whatever is queued and answers a whole batch with
        one call into the loop.
        """
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._drain, name="warc", daemon=True)
            self._thread.start()
        assert self._loop is not None
        done: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._queue.put((hops, done))
        return await done

    def _drain(self) -> None:
        get, loop = self._queue.get, self._loop
        assert loop is not None
        while (item := get()) is not None:
            batch = [item]
            while len(batch) < 512:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # seen again by the outer loop, after this batch
                    break
                batch.append(more)
            answers: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
            for hops, done in batch:
                try:
                    answers.append((done, self._write(hops), None))
                except BaseException as exc:  # noqa: BLE001 - handed to the waiting job
                    discard(hops)
                    answers.append((done, None, exc))
            loop.call_soon_threadsafe(_answer, answers)

    def _write(self, hops: list[Hop]) -> dict[str, Any]:
        assert self._out is not None
        if self._out.tell() >= self._max_size:
            self._next_file()
        ref: dict[str, Any] = {}
        for hop in hops:
            offset = self._out.tell()
            response_id = self._write_response(hop)
            length = self._out.tell() - offset
            self._write_request(hop, response_id)
            ref = {"file": str(self._file), "offset": offset, "length": length}
        self._out.flush()
        return ref

    def _write_response(self, hop: Hop) -> str:
        from warcio.statusandheaders import StatusAndHeaders

        w = self._writer
        http = StatusAndHeaders(hop.status_line, hop.response_headers, protocol=hop.protocol)
        extra: dict[str, str] = {}
        if hop.ip:
            extra["WARC-IP-Address"] = hop.ip
        if hop.payload is None:
            if hop.announced_body:
                extra["WARC-Truncated"] = "unspecified"
            record = w.create_warc_record(
                hop.uri, "response", http_headers=http, warc_headers_dict=extra
            )
        else:
            stream, length = hop.payload.stream()
            if isinstance(stream, io.BytesIO):
                # Digests from the bytes at hand: warcio would read the payload twice for them.
                payload = stream.getvalue()
                http.compute_headers_buffer(None)
                extra["WARC-Payload-Digest"] = _sha1(payload)
                extra["WARC-Block-Digest"] = _sha1(http.headers_buff, payload)
            try:
                record = w.create_warc_record(
                    hop.uri,
                    "response",
                    payload=stream,
                    length=length,
                    http_headers=http,
                    warc_headers_dict=extra,
                )
                digest = record.rec_headers.get_header("WARC-Payload-Digest")
                seen = self._digests.get(digest) if length else None
                if seen is not None:
                    self._digests.move_to_end(digest)
                    record = w.create_revisit_record(
                        hop.uri,
                        digest,
                        seen[0],
                        seen[1],
                        http_headers=http,
                        warc_headers_dict=extra,
                    )
                elif length:
                    date = record.rec_headers.get_header("WARC-Date")
                    self._digests[digest] = (hop.uri, date)
                    if len(self._digests) > MAX_DIGESTS:
                        self._digests.popitem(last=False)
                w.write_record(record)
            finally:
                hop.payload.close()
            return str(record.rec_headers.get_header("WARC-Record-ID"))
        w.write_record(record)
        return str(record.rec_headers.get_header("WARC-Record-ID"))

    def _write_request(self, hop: Hop, response_id: str) -> None:
        from warcio.statusandheaders import StatusAndHeaders

        headers = [
            (name, "***" if name.lower() in SECRET_HEADERS else value)
            for name, value in hop.request_headers
        ]
        method, _, target = hop.request_line.partition(" ")
        http = StatusAndHeaders(
            f"{method} {target.rsplit(' ', 1)[0]}",
            headers,
            protocol="HTTP/1.1",
            is_http_request=True,
        )
        body = hop.request_body
        http.compute_headers_buffer(None)
        record = self._writer.create_warc_record(
            hop.uri,
            "request",
            payload=io.BytesIO(body),
            length=len(body),
            http_headers=http,
            warc_headers_dict={
                "WARC-Concurrent-To": response_id,
                "WARC-Payload-Digest": _sha1(body),
                "WARC-Block-Digest": _sha1(http.headers_buff, body),
            },
        )
        self._writer.write_record(record)

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
        if self._out is not None:
            self._out.close()
            self._out = None


_CREDENTIALS = re.compile(r"//[^/@]*@")


def target_uri(url: str) -> str:
    """The URI a record names: never with a password in it."""
    return _CREDENTIALS.sub("//", url, count=1)


def _answer(answers: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    """On the loop: the results of a written batch to the jobs still waiting for them."""
    for done, ref, exc in answers:
        if done.cancelled():
            continue
        if exc is None:
            done.set_result(ref)
        else:
            done.set_exception(exc)


def discard(hops: list[Hop]) -> None:
    for hop in hops:
        if hop.payload is not None:
            hop.payload.close()
