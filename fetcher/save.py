"""Bodies on disk (``--save DIR``): stream a body to a temporary file, place it when verified.

A body is written to ``DIR/.fetcher-partial/`` as it arrives and only placed under its final
name once it is complete and verified (``max_bytes``, the job's ``sha256``), so no partial file
ever stands under a final name; after SIGKILL, ``--resume`` removes what that folder holds.

The event loop never waits on the disk. A body that fits in one flush (``FLUSH_BYTES``, most
pages and images) costs one trip to a thread at the end: open, write, hash, close, place. A larger
one is handed to a thread every ``FLUSH_BYTES`` as it arrives, so memory per body stays
bounded. ``benchmarks/bench_save.py`` (case ``io``) measured 200 MiB written from the loop with
plain ``os.write`` (a regular file cannot be made non-blocking) at 0.86 s against 0.20 s through a
thread per 256 KiB flush, and the loop is held for each write a slow or full disk takes;
aiofiles is a thread per call, the same as this with more trips.

Names are placed with ``os.link`` from the temporary file, which never replaces an existing
file, also when another process (``--processes``, workers sharing DIR) places the same name at
the same moment: a name that is taken by a different body gets a numbered suffix (``name.1``,
``name.2``, as wget does), one taken by the same body is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import mimetypes
import os
import posixpath
import queue
import re
import threading
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from yarl import URL

from .errors import ConfigError

PARTIAL_DIR = ".fetcher-partial"
#  What one download holds in memory is what aiohttp has buffered for it plus what it has read
#  and not yet written; with -n 100 that is a hundred times over. aiohttp's reader pauses the
#  socket only once it holds more than twice its read_bufsize, and then still holds every read
#  of the socket whole until its last byte is taken; uvloop reads up to 256 KiB at a time, so
#  ~300 KB a download sat in the reader whatever the read_bufsize (2,000 x 1 MiB at -n 100,
#  benchmarks/bench_save.py case files: 115 MB peak reading 32 KiB at a time, 97 MB reading
#  8 KiB at 1.5 x the wall time). Under --save a connection's socket is therefore read at most
#  READ_SIZE bytes at a time (BoundedReads), the reader pauses above 2 x READ_BUFSIZE (about
#  one such read), readany() takes each read as it is (no copy, no slice) and at most
#  FLUSH_BYTES of them wait for their trip to a writer thread: 78 MB peak for the same run, in
#  0.76 x the CPU of 32 KiB reads. A 256 KiB flush, or 128 KiB reads, gave 94-95 MB.
READ_SIZE = 64 * 1024
READ_BUFSIZE = 16 * 1024
FLUSH_BYTES = 128 * 1024
#  The threads that write and hash. On 2 shared CPUs (2,000 x 1 MiB at -n 100, alternating
#  rounds) 4 took 0.90 x the wall time of 2 at 1.11 x the CPU (more GIL hand-overs), 1 took
#  1.33 x: most of a write is the kernel's copy into the page cache, which threads share out.
WRITER_THREADS = 4
#  A part of a name longer than this many bytes is cut (most file systems' NAME_MAX).
MAX_PART_BYTES = 255

PLACEHOLDERS = frozenset({"id", "sha256", "host", "path", "ext", "status"})
_FIELD = re.compile(r"\{(\w+)(?::(\d*):(\d*))?\}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class BoundedReads(asyncio.BufferedProtocol):
    """Stands between a connection's transport and aiohttp's protocol under --save, so that
    one read of the socket is at most ``len(buffer)`` bytes.

    uvloop reads a socket into a 256 KiB buffer of its own and hands each read over whole;
    aiohttp's reader then holds that whole read until the last byte of it is taken, whatever
    its ``read_bufsize`` (it pauses the socket only after a read). A BufferedProtocol is
    given no more per read than the buffer it offers; what the socket holds beyond that stays
    in the kernel's buffer (no part of this process's memory) until the next read. The
    buffer is shared by every connection of the loop: each read is copied out at once.
    """

    __slots__ = ("_buffer", "_inner")

    def __init__(self, inner: asyncio.Protocol, buffer: memoryview) -> None:
        self._inner = inner
        self._buffer = buffer

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self._inner.data_received(self._buffer[:nbytes].tobytes())

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class SaveFailed(Exception):
    """A body could not be written or placed: error ``save`` for its job."""


class NameTemplate:
    """``--save-name``: ``{id}``, ``{sha256}`` (sliced as ``{sha256:0:2}``), ``{host}``,
    ``{path}``, ``{ext}``, ``{status}``; everything else is literal."""

    def __init__(self, text: str) -> None:
        for m in _FIELD.finditer(text):
            if m.group(1) not in PLACEHOLDERS:
                raise ConfigError(
                    f"--save-name {text!r}: unknown placeholder {{{m.group(1)}}} "
                    f"(known: {', '.join(sorted(PLACEHOLDERS))})"
                )
        if not _FIELD.search(text):
            raise ConfigError(f"--save-name {text!r}: needs at least one placeholder")
        self.text = text
        # A name holding the whole digest names one body only: a file found under it is that body.
        self.content_addressed = "{sha256}" in text

    def render(self, values: Mapping[str, str]) -> str:
        def field(m: re.Match[str]) -> str:
            value = values[m.group(1)]
            if m.group(2) is not None or m.group(3) is not None:
                start = int(m.group(2) or 0)
                end = int(m.group(3)) if m.group(3) else None
                value = value[start:end]
            return value

        return _FIELD.sub(field, self.text)


def safe_name(name: str) -> str:
    """``name`` as a relative path that stays inside DIR: no absolute path, no ``.`` or ``..``
    part, no control characters, each part at most ``MAX_PART_BYTES`` bytes.

    Raises SaveFailed when nothing is left.
    """
    parts = []
    for part in name.replace("\\", "/").split("/"):
        part = _CONTROL.sub("_", part).strip()
        if part in ("", "."):
            continue
        if part == "..":
            part = "_"
        parts.append(_cut(part))
    if not parts:
        raise SaveFailed(f"file name {name!r} is empty once made safe")
    return "/".join(parts)


def _cut(part: str) -> str:
    raw = part.encode("utf-8", "surrogateescape")
    if len(raw) <= MAX_PART_BYTES:
        return part
    return raw[:MAX_PART_BYTES].decode("utf-8", "ignore")


_EXT = re.compile(r"\.[A-Za-z0-9]{1,10}$")


def name_values(
    job_id: str, url: URL, status: int, content_type: str | None, digest: str
) -> dict[str, str]:
    """The placeholders' values for one body. ``{path}`` is the URL path, ``index.html`` where it
    names a directory (as wget); ``{ext}`` (with its dot) the path's extension, else the content
    type's, else empty; ``{id}`` and ``{host}`` never hold a ``/``."""
    path = url.path or "/"
    if path.endswith("/"):
        path += "index.html"
    m = _EXT.search(posixpath.basename(url.path))
    ext = m.group(0) if m else ""
    if not ext and content_type:
        ext = mimetypes.guess_extension(content_type.split(";", 1)[0].strip().lower()) or ""
    return {
        "id": job_id.replace("/", "_"),
        "sha256": digest,
        "host": (url.host or "").replace("/", "_"),
        "path": path,
        "ext": ext,
        "status": str(status),
    }


def prepare_dir(root: Path) -> None:
    """Create DIR and its temporary folder: at start, so that a DIR that cannot be made
    stops the run (ConfigError, exit 2) before any job."""
    try:
        (root / PARTIAL_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--save {root}: {exc.strerror}") from None


def remove_partials(root: Path) -> int:
    """Remove the temporary files a killed run left under ``root``; returns how many."""
    partial = root / PARTIAL_DIR
    removed = 0
    try:
        entries = list(os.scandir(partial))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
            removed += 1
    return removed


class BodyStore:
    """Where ``--save`` puts bodies: one per run (per process)."""

    def __init__(self, root: Path, template: NameTemplate, *, read_size: int = READ_SIZE) -> None:
        self.root = root
        self.template = template
        self._partial = root / PARTIAL_DIR
        self._real_root = ""
        self._read_buffer = memoryview(bytearray(read_size))
        self._writers = Writers(WRITER_THREADS)
        # Temporary names: one random part per run and a count, not a uuid4 per body (its
        # os.urandom lets go of the GIL, and the loop waits for a writer thread to give it back).
        self._tmp_prefix = uuid.uuid4().hex
        self._tmp_count = itertools.count()

    def temporary_path(self) -> str:
        return os.path.join(
            self._partial, f"{os.getpid()}-{self._tmp_prefix}-{next(self._tmp_count)}.part"
        )

    def close(self) -> None:
        self._writers.close()

    def prepare(self) -> None:
        prepare_dir(self.root)
        self._real_root = os.path.realpath(self.root)

    def open(self) -> BodyFile:
        return BodyFile(self)

    def bound_reads(self, transport: asyncio.BaseTransport | None) -> None:
        """From now on, read ``transport`` READ_SIZE bytes at a time at most (BoundedReads);
        None (a body that came whole with its headers, the connection already let go) is
        left alone. A connection keeps its BoundedReads for the jobs that reuse it."""
        if transport is None or transport.is_closing():
            return
        inner = transport.get_protocol()
        # aiohttp's ResponseHandler is a plain Protocol; a BoundedReads already there is not.
        if isinstance(inner, asyncio.Protocol):
            transport.set_protocol(BoundedReads(inner, self._read_buffer))

    def place(self, tmp: str, rel: str, size: int, digest: str) -> str:
        """Give the temporary file ``tmp`` its final name (sync: runs in a thread)."""
        final = os.path.join(self.root, rel)
        real = os.path.realpath(final)
        if not real.startswith(self._real_root + os.sep):
            raise SaveFailed(f"file name {rel!r} would leave the save folder")
        os.makedirs(os.path.dirname(final), exist_ok=True)
        candidate, n = final, 0
        while True:
            try:
                os.link(tmp, candidate)
            except FileExistsError:
                if self.template.content_addressed or _same_body(candidate, size, digest):
                    os.unlink(tmp)
                    return candidate
                n += 1
                candidate = f"{final}.{n}"
                continue
            os.unlink(tmp)
            return candidate


def _same_body(path: str, size: int, digest: str) -> bool:
    try:
        if os.stat(path).st_size != size:
            return False
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    except OSError:
        return False
    return h.hexdigest() == digest


class BodyFile:
    """One body on its way to disk: ``write`` as chunks arrive, then ``commit`` or ``discard``.

    The chunks aiohttp hands over are kept as they are (no copy into a bigger buffer) and
    written with one ``writev`` per flush; the digest is computed in the same thread, beside
    the write, so hashing a large body (~500 MB/s) holds neither the loop nor the GIL (hashlib
    releases it). Only the size is counted on the loop, for ``max_bytes``.
    """

    def __init__(self, store: BodyStore) -> None:
        self._store = store
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._fd = -1
        self._tmp = store.temporary_path()
        self._hash = hashlib.sha256()
        self.size = 0

    async def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered >= FLUSH_BYTES:
            chunks, self._chunks, self._buffered = self._chunks, [], 0
            await self._store._writers.run(self._write, chunks)

    def _write(self, chunks: list[bytes]) -> None:
        if self._fd < 0:
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        for chunk in chunks:
            self._hash.update(chunk)
        while chunks:
            written = os.writev(self._fd, chunks)
            while chunks and written >= len(chunks[0]):
                written -= len(chunks[0])
                chunks = chunks[1:]
            if written:  # a short write inside a chunk
                chunks = [chunks[0][written:], *chunks[1:]]

    async def commit(self, name: Callable[[str], str | None]) -> tuple[str, str | None]:
        """Write what is left, then place the file under ``name(digest)``; a name of None
        (the job's checksum did not match) removes it instead. Returns (digest, path)."""
        chunks, self._chunks, self._buffered = self._chunks, [], 0
        return await self._store._writers.run(self._finish, chunks, name)

    def _finish(
        self, chunks: list[bytes], name: Callable[[str], str | None]
    ) -> tuple[str, str | None]:
        try:
            self._write(chunks)  # also opens an empty body's file
            os.close(self._fd)
            self._fd = -1
            digest = self._hash.hexdigest()
            rel = name(digest)
            if rel is None:
                self._remove()
                return digest, None
            return digest, self._store.place(self._tmp, rel, self.size, digest)
        except BaseException:
            self._remove()
            raise

    async def discard(self) -> None:
        self._chunks.clear()
        if self._fd >= 0:
            await self._store._writers.run(self._remove)

    def _remove(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)


_T = TypeVar("_T")
_Task = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class Writers:
    """Threads that run BodyFile's writes off the loop, each one run to its end even if the
    caller is cancelled meanwhile (a write must not outlive the file descriptor it writes
    to); OSError becomes SaveFailed.

    A queue and one asyncio future a write: ``run_in_executor`` adds a concurrent future
    chained to an asyncio one, a lock and the pool's own bookkeeping to each trip, which
    cost the loop ~40 % more CPU a flush than this (and a flush is every FLUSH_BYTES).
    """

    def __init__(self, count: int) -> None:
        self._count = count
        self._queue: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    async def run(self, func: Callable[..., _T], *args: Any) -> _T:
        if not self._threads:  # started in the process that writes (after any fork)
            for i in range(self._count):
                thread = threading.Thread(target=self._work, name=f"save-{i}", daemon=True)
                thread.start()
                self._threads.append(thread)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        self._queue.put((loop, future, func, args))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await asyncio.wait([future])
            if not future.cancelled():
                future.exception()  # seen: its error goes with the cancelled job
            raise
        except SaveFailed:
            raise
        except OSError as exc:
            raise SaveFailed(exc.strerror or type(exc).__name__) from None

    def _work(self) -> None:
        while (task := self._queue.get()) is not None:
            loop, future, func, args = task
            try:
                result, error = func(*args), None
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, raised there
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # a loop already closed
                loop.call_soon_threadsafe(_settle, future, result, error)

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        self._threads = []


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
