"""The WARC writer process: one series of WARC/1.1 files, its records built with warcio.

warc.py (on the event loop) starts ``python -m fetcher.warcrecords`` and hands it the raw
exchanges in batches through a pipe; this process builds the records (their digests and
header blocks from the bytes at hand, warcio's writer for the records) and writes them, then
answers each batch with every exchange's ``{file, offset, length}``. Building a record costs
a fraction of a millisecond of Python, and in a thread of the loop's own process that time was
taken from the loop under the GIL: here it runs on the other core.

The stream, both ways, is frames: a 4-byte big-endian length, then a pickle. To the writer, a
frame is a list of exchanges, each a list of hops (the tuple ``warc.wire_hop`` builds); from
it, a list with one answer per exchange, the ``warc`` field or the exception that stopped it.
A body larger than what warc.py keeps in memory stays in its unnamed temporary file: its
descriptor comes over a Unix socket (``SCM_RIGHTS``) tagged with a number the hop names.

The writer lives and dies with the run: it ignores the terminal's signals (its own session),
ends when the pipe closes (a batch cut short by the end of the pipe is not written), and on
Linux the kernel kills it when its parent dies. It holds an exclusive ``flock`` on the file it
writes, which the next run takes before it repairs and appends: a writer still finishing
never writes beside a ``--resume``.

This module imports nothing of the package's own: a few milliseconds to start, beside warcio.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import pickle
import signal
import socket
import struct
import sys
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

#  Payload digests remembered for revisit records: about 150 bytes each.
MAX_DIGESTS = 100_000
SECRET_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
FRAME = struct.Struct(">I")
#  A record's Content-Type, as warcio gives it (RecordBuilder.WARC_RECORDS).
CONTENT_TYPES = {
    "response": "application/http; msgtype=response",
    "revisit": "application/http; msgtype=response",
    "request": "application/http; msgtype=request",
}
MEMBER_HOLD = 1 << 16
#  gzip: magic, deflate, no flags, no mtime, no extra flags, "unknown" OS (as zlib writes it).
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
#  An empty final block with fixed codes: what ends a deflate stream after a full flush.
DEFLATE_END = b"\x03\x00"


def series(path: Path) -> Iterator[Path]:
    """``crawl.warc.gz``, then ``crawl-00001.warc.gz``, ``crawl-00002.warc.gz``, ..."""
    yield path
    name = path.name
    stem, dot, ext = name.partition(".")
    n = 1
    while True:
        yield path.with_name(f"{stem}-{n:05d}{dot}{ext}")
        n += 1


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


def lock(f: IO[bytes], *, wait: bool) -> bool:
    """An exclusive lock on the WARC file ``f`` is open on: False if another holds it."""
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError:  # a file system without locks: no worse than before there were any
        pass
    return True


class GzipMembers:
    """What warcio writes a record to: each record one gzip member, closed by warcio's
    ``flush`` at the record's end, at level 6 rather than warcio's 9 (twice the CPU for a
    file a few percent smaller).

    One deflate stream serves every member: a full flush ends each member's data and resets
    the compressor, so no member refers to another's bytes, and an empty final block, the
    CRC and the length close it as gzip. A new ``zlib.compressobj`` per member, as warcio's
    own wrapper makes, allocates and clears a quarter of a megabyte each time, and the C
    allocator hands it back to the system in between: that was most of a small record's cost.
    """

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._deflate = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        self._crc = 0
        self._size = 0
        self._started = False
        #  warcio writes a record in four or five pieces: a small one is compressed in one go.
        self._parts: list[bytes] = []
        self._held = 0

    def write(self, data: bytes) -> None:
        self._parts.append(data)
        self._held += len(data)
        if self._held >= MEMBER_HOLD:
            self._compress()

    def _compress(self) -> None:
        data = b"".join(self._parts)
        self._parts.clear()
        self._held = 0
        self._crc = zlib.crc32(data, self._crc)
        self._size += len(data)
        deflated = self._deflate.compress(data)
        if not self._started:
            deflated = GZIP_HEADER + deflated
            self._started = True
        self._out.write(deflated)

    def flush(self) -> None:
        if self._parts:
            self._compress()
        if not self._started:
            return
        tail = self._deflate.flush(zlib.Z_FULL_FLUSH) + DEFLATE_END
        self._out.write(tail + struct.pack("<II", self._crc, self._size & 0xFFFFFFFF))
        self._crc = self._size = 0
        self._started = False


#  Base32, ten bits (two letters) at a time: base64.b32encode is a Python loop, three times
#  slower on a 20-byte digest, and a small record takes three digests.
_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_B32_PAIRS = [a + b for a in _B32 for b in _B32]
_B32_SHIFTS = range(150, -1, -10)


def sha1_digest(*parts: bytes) -> str:
    """A WARC digest, as warcio writes them: ``sha1:`` and base32."""
    h = hashlib.sha1()
    for part in parts:
        h.update(part)
    n = int.from_bytes(h.digest(), "big")
    return "sha1:" + "".join([_B32_PAIRS[(n >> s) & 0x3FF] for s in _B32_SHIFTS])


EMPTY_DIGEST = sha1_digest(b"")


class RecordIds:
    """``WARC-Record-ID`` values: random (version 4) UUIDs, as warcio makes them, but from one
    ``os.urandom`` call per 256 of them and formatted from the hex digits: a ``uuid.UUID``
    object per record cost 12 us, two records an exchange."""

    def __init__(self) -> None:
        self._ids: list[str] = []

    def next(self) -> str:
        if not self._ids:
            self._ids = self._more(256)
        return self._ids.pop()

    @staticmethod
    def _more(n: int) -> list[str]:
        digits = os.urandom(16 * n).hex()
        ids = []
        for i in range(0, 32 * n, 32):
            h = digits[i : i + 32]
            # The version (4) and the variant (10xx) bits, as RFC 4122 sets them.
            variant = "89ab"[int(h[16], 16) & 3]
            ids.append(f"<urn:uuid:{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:]}>")
        return ids


_second = -1
_second_text = ""


def warc_date() -> str:
    """Now, as ``WARC-Date`` holds it under WARC/1.1: UTC, to the microsecond. The seconds
    are formatted once a second; warcio's datetime and isoformat cost 9 us a record."""
    global _second, _second_text
    now = time.time_ns() // 1000
    second, micros = divmod(now, 1_000_000)
    if second != _second:
        _second = second
        _second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_second_text}.{micros:06d}Z"


def warcio_headers() -> tuple[Any, Any]:
    """warcio's ``StatusAndHeaders``, two ways. ``Headers``, a record's own WARC headers,
    built from the pairs of strings we already have (warcio's constructor converts every
    pair again). ``Block``, the HTTP headers, given as the bytes that went over the wire
    (warcio would build them from pairs, for the digest and again for the record)."""
    from warcio.statusandheaders import StatusAndHeaders

    class Headers(StatusAndHeaders):  # type: ignore[misc]
        def __init__(self, statusline: str, headers: list[tuple[str, str]], protocol: str) -> None:
            self.statusline = statusline
            self.headers = headers
            self.protocol = protocol
            self.total_len = 0
            self.headers_buff = None

        # warcio's writer looks a record's headers up five or six times, each a scan that
        # lowers every name: the names it asks for are spelt as we wrote them, so an exact
        # match comes first, and the case-blind scan only when that finds nothing.
        def get_header(self, name: str, default_value: Any = None) -> Any:
            for key, value in self.headers:
                if key == name:
                    return value
            return super().get_header(name, default_value)

        def replace_header(self, name: str, value: str) -> Any:
            headers = self.headers
            for i in range(len(headers) - 1, -1, -1):
                key, old = headers[i]
                if key == name:
                    headers[i] = (key, value)
                    return old
            return super().replace_header(name, value)

        def to_str(self, filter_func: Any = None) -> str:
            """warcio's text of the headers, joined in one call rather than a string added
            to per header."""
            if filter_func is not None:
                return str(super().to_str(filter_func))
            lines = "".join([f"{name}: {value}\r\n" for name, value in self.headers])
            first = " ".join(part for part in (self.protocol, self.statusline) if part)
            return f"{first}\r\n{lines}" if first else lines

    class Block(StatusAndHeaders):  # type: ignore[misc]
        """An HTTP message's header block, its bytes given whole: what warcio's writer
        writes of HTTP headers is the block alone (``headers_buff``)."""

        def __init__(self, statusline: str, protocol: str, block: bytes) -> None:
            self.statusline = statusline
            self.headers: list[tuple[str, str]] = []
            self.protocol = protocol
            self.total_len = 0
            self.headers_buff = block

        def compute_headers_buffer(self, header_filter: Any = None) -> None:
            pass

    return Headers, Block


def header_block(first_line: bytes, lines: list[bytes]) -> bytes:
    """An HTTP message's start line and header lines, and the empty line that ends them."""
    if not lines:
        return first_line + b"\r\n\r\n"
    return first_line + b"\r\n" + b"\r\n".join(lines) + b"\r\n\r\n"


class Records:
    """The WARC series being written: the current file, rotation, warcinfo, revisits."""

    def __init__(
        self, path: Path, index: int, out: IO[bytes], *, max_size: int, software: str
    ) -> None:
        """``out``: the file at position ``index`` of the series of ``path``, open to append
        and locked (warc.py opened it: a file that cannot be opened stops the run at once)."""
        from warcio.warcwriter import WARCWriter

        self._headers, self._block = warcio_headers()
        self._record_id = RecordIds().next
        self._writer_class = WARCWriter
        self._max_size = max_size
        self._software = software
        self._digests: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._names = series(path)
        for _ in range(index):
            next(self._names)
        self._file = next(self._names)
        self._use(out)
        if out.tell() == 0:
            self._warcinfo()

    def _use(self, out: IO[bytes]) -> None:
        self._out = out
        self._writer = self._writer_class(GzipMembers(out), gzip=False, warc_version="1.1")
        self._date = warc_date

    def _next_file(self) -> None:
        self._out.close()
        self._file = next(self._names)
        out = open(self._file, "wb")  # noqa: SIM115 - closed by close() or the next file
        lock(out, wait=True)
        self._use(out)
        self._warcinfo()

    def _warcinfo(self) -> None:
        info = {"software": self._software, "format": "WARC File Format 1.1"}
        self._writer.write_record(self._writer.create_warcinfo_record(self._file.name, info))
        self._out.flush()

    def write(self, hops: list[tuple[Any, ...]], fds: FdInbox) -> dict[str, Any]:
        """One exchange (its redirect hops, then the final one): the result's ``warc``."""
        if self._out.tell() >= self._max_size:
            self._next_file()
        ref: dict[str, Any] = {}
        for hop in hops:
            # One date for both records, as warcio's write_request_response_pair gives them.
            date = self._date()
            offset = self._out.tell()
            response_id = self._write_response(hop, fds, date)
            length = self._out.tell() - offset
            self._write_request(hop, response_id, date)
            ref = {"file": str(self._file), "offset": offset, "length": length}
        return ref

    def flush(self) -> None:
        self._out.flush()

    def _warc_headers(self, kind: str, uri: str, date: str, fields: list[tuple[str, str]]) -> Any:
        """The record's own headers, built whole: warcio's record builder would otherwise
        look each one up and replace it in a list, a few microseconds each. Content-Type and
        Content-Length come last, where warcio's writer, which sets them, finds them first."""
        head = [
            ("WARC-Type", kind),
            ("WARC-Record-ID", self._record_id()),
            ("WARC-Date", date),
            ("WARC-Target-URI", uri),
            *fields,
            ("Content-Type", CONTENT_TYPES[kind]),
            ("Content-Length", "0"),  # warcio writes the record's length here
        ]
        return self._headers("", head, protocol="WARC/1.1")

    def _write_response(self, hop: tuple[Any, ...], fds: FdInbox, date: str) -> str:
        uri, _, _, status_line, protocol, raw_headers, ip, _, payload, announced = hop
        w = self._writer
        # As received: the status line, then each header's name and value as aiohttp kept
        # their bytes (raw_headers).
        first = f"{protocol} {status_line}".encode("utf-8", "surrogateescape")
        http = self._block(
            status_line, protocol, header_block(first, list(map(b": ".join, raw_headers)))
        )
        extra: list[tuple[str, str]] = [("WARC-IP-Address", ip)] if ip else []
        if payload is None:  # a redirect hop: its body was never read
            if announced:
                extra.append(("WARC-Truncated", "unspecified"))
            head = self._warc_headers("response", uri, date, extra)
            w.write_record(
                w.create_warc_record(uri, "response", warc_headers=head, http_headers=http)
            )
            return str(head.get_header("WARC-Record-ID"))
        if isinstance(payload, bytes):
            # Digests from the bytes at hand: warcio would read the payload twice for them,
            # and a revisit is known before any record is built.
            digest = sha1_digest(payload)
            if payload and (seen := self._seen(digest)) is not None:
                return self._write_revisit(uri, date, http, extra, digest, seen)
            extra.append(("WARC-Payload-Digest", digest))
            extra.append(("WARC-Block-Digest", sha1_digest(http.headers_buff, payload)))
            head = self._warc_headers("response", uri, date, extra)
            self._write_bytes(uri, "response", payload, http, head)
            if payload:
                self._remember(digest, uri, date)
            return str(head.get_header("WARC-Record-ID"))
        tag, length = payload  # a spilled body: its file came over the socket
        with fds.take(tag) as stream:
            head = self._warc_headers("response", uri, date, extra)
            record = w.create_warc_record(
                uri,
                "response",
                payload=stream,
                length=length,
                http_headers=http,
                warc_headers=head,
            )
            digest = record.rec_headers.get_header("WARC-Payload-Digest")
            if (seen := self._seen(digest)) is not None:
                return self._write_revisit(uri, date, http, extra, digest, seen)
            w.write_record(record)
        self._remember(digest, uri, date)
        return str(head.get_header("WARC-Record-ID"))

    def _seen(self, digest: str) -> tuple[str, str] | None:
        """The URI and date of the record that already holds this payload, if any."""
        seen = self._digests.get(digest)
        if seen is not None:
            self._digests.move_to_end(digest)
        return seen

    def _remember(self, digest: str, uri: str, date: str) -> None:
        self._digests[digest] = (uri, date)
        if len(self._digests) > MAX_DIGESTS:
            self._digests.popitem(last=False)

    def _write_revisit(
        self,
        uri: str,
        date: str,
        http: Any,
        extra: list[tuple[str, str]],
        digest: str,
        seen: tuple[str, str],
    ) -> str:
        """A payload already recorded: the HTTP headers, and where the payload is. Its block
        is the headers alone."""
        w = self._writer
        head = self._warc_headers(
            "revisit",
            uri,
            date,
            [
                *extra,
                ("WARC-Profile", w.REVISIT_PROFILE_1_1),
                ("WARC-Refers-To-Target-URI", seen[0]),
                ("WARC-Refers-To-Date", seen[1]),
                ("WARC-Payload-Digest", digest),
                ("WARC-Block-Digest", sha1_digest(http.headers_buff)),
            ],
        )
        w.write_record(w.create_warc_record(uri, "revisit", http_headers=http, warc_headers=head))
        return str(head.get_header("WARC-Record-ID"))

    def _write_request(self, hop: tuple[Any, ...], response_id: str, date: str) -> None:
        uri, request_line, request_headers, *_ = hop
        body: bytes = hop[7]
        lines = "".join(
            [
                f"{name}: ***\r\n" if name.lower() in SECRET_HEADERS else f"{name}: {value}\r\n"
                for name, value in request_headers
            ]
        )
        # As aiohttp sends them, in UTF-8. warcio keeps a request's method where a response
        # has its protocol.
        block = f"{request_line}\r\n{lines}\r\n".encode()
        method, _, target = request_line.partition(" ")
        http = self._block(target, method, block)
        head = self._warc_headers(
            "request",
            uri,
            date,
            [
                ("WARC-Concurrent-To", response_id),
                ("WARC-Payload-Digest", sha1_digest(body) if body else EMPTY_DIGEST),
                ("WARC-Block-Digest", sha1_digest(http.headers_buff, body)),
            ],
        )
        self._write_bytes(uri, "request", body, http, head)

    def _write_bytes(self, uri: str, kind: str, payload: bytes, http: Any, head: Any) -> None:
        """One record whose payload is ``payload``, its headers and digests already made."""
        w = self._writer
        w.write_record(
            w.create_warc_record(
                uri,
                kind,
                payload=io.BytesIO(payload),
                length=len(payload),
                http_headers=http,
                warc_headers=head,
            )
        )

    def close(self) -> None:
        self._out.close()


class FdInbox:
    """The spilled bodies' files, as their descriptors come over the socket, by tag."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._early: dict[int, int] = {}

    def take(self, tag: int) -> IO[bytes]:
        while tag not in self._early:
            data, fds, _, _ = socket.recv_fds(self._sock, 8, 1)
            if not data:
                raise OSError("the file of a large body never came")
            self._early[int.from_bytes(data, "big")] = fds[0]
        return os.fdopen(self._early.pop(tag), "rb")


def read_frame(f: IO[bytes]) -> Any | None:
    """The next frame's object; None at the end of the pipe, or of a frame cut short."""
    head = f.read(FRAME.size)
    if len(head) < FRAME.size:
        return None
    (size,) = FRAME.unpack(head)
    body = f.read(size)
    if len(body) < size:
        return None
    return pickle.loads(body)


def frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME.pack(len(data)) + data


def answer_of(exc: BaseException) -> BaseException:
    """An exception that will cross the pipe: the original if it pickles."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - whatever the exception holds
        return OSError(f"cannot write the WARC record: {exc!r}")
    return exc


def _die_with(parent: int) -> None:
    """On Linux, the kernel kills this process when its parent dies (SIGKILL included)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # died before the request was made
        os._exit(0)


def main() -> None:
    """``python -m fetcher.warcrecords SETUP``: SETUP is warc.py's arguments, as JSON."""
    setup = json.loads(sys.argv[1])
    _die_with(setup["parent"])
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):  # the run drains, then closes the pipe
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    out = os.fdopen(setup["out"], "ab")
    fds = FdInbox(socket.socket(fileno=setup["fds"]))
    records = Records(
        Path(setup["path"]),
        setup["index"],
        out,
        max_size=setup["max_size"],
        software=setup["software"],
    )
    inbox, answers = sys.stdin.buffer, sys.stdout.buffer
    try:
        while (batch := read_frame(inbox)) is not None:
            replies: list[Any] = []
            for hops in batch:
                try:
                    replies.append(records.write(hops, fds))
                except Exception as exc:  # noqa: BLE001 - handed to the waiting job
                    replies.append(answer_of(exc))
            records.flush()  # in the file before any result line points to it
            answers.write(frame(replies))
            answers.flush()
    except BrokenPipeError:  # the run is gone: nobody to answer
        pass
    finally:
        records.close()


if __name__ == "__main__":
    main()
