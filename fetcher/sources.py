"""Job sources: a JSONL stream (plain, .gz or stdin) or a YAML document, as an async iterator.

JSONL is read in batches in a thread so that a slow pipe on stdin never blocks the event loop,
and only one batch is held at a time: a ten-million-line file costs no more memory than a short
one. YAML has no streaming form worth the name, so a YAML job file is loaded whole (keep those
small; use JSONL for big batches).
"""

from __future__ import annotations

import asyncio
import gzip
import io
import sys
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, BinaryIO

import orjson
import yaml

from .errors import JobFileError
from .jobs import HttpJob, InvalidJob, JobParser, MailJob

SUFFIXES = (".jsonl", ".ndjson", ".yaml", ".yml")
BATCH_LINES = 2048
#  A job line longer than this is refused (and skipped without being held in memory).
MAX_LINE_BYTES = 4 * 1024 * 1024
#  YAML aliases let a few lines describe billions of nodes; a job file needs few of them.
MAX_YAML_ALIASES = 1000
#  ... and even a few aliases nest into billions ("billion laughs"): cap the document's size
#  counted as if every alias were a copy.
MAX_YAML_NODES = 1_000_000

Item = HttpJob | MailJob | InvalidJob


def job_format(path: str) -> str:
    """``jsonl`` or ``yaml`` from the file name; ``-`` is JSONL on stdin."""
    if path == "-":
        return "jsonl"
    name = path[:-3] if path.endswith(".gz") else path
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return "yaml" if suffix in (".yaml", ".yml") else "jsonl"
    raise JobFileError(
        f"{path}: job files must end in .jsonl, .ndjson, .yaml or .yml (optionally .gz), or be -"
    )


def open_jobs(path: str) -> BinaryIO:
    """Open a job file for reading; raises JobFileError with the reason."""
    job_format(path)
    if path == "-":
        return sys.stdin.buffer
    try:
        if path.endswith(".gz"):
            gz = gzip.open(path, "rb")  # noqa: SIM115 - JobSource closes it
            gz.peek(1)  # fail now, not mid-run, on a file that is not gzip
            return gz  # type: ignore[return-value]
        return open(path, "rb")
    except (OSError, EOFError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise JobFileError(f"cannot read job file {path}: {reason}") from None


class JobSource:
    """Reads a job file and yields validated jobs (or InvalidJob) with their line numbers."""

    def __init__(
        self, path: str, parser: JobParser, *, select: Callable[[int], bool] | None = None
    ) -> None:
        self.path = path
        self.format = job_format(path)
        self._parser = parser
        #  Which lines (1-based) to read at all: shards and process slices skip the rest unparsed.
        self._select = select
        self._file = open_jobs(path)
        self._yaml_items: list[Item] = []
        if self.format == "yaml":
            # Loaded now, so that a file that is not valid YAML stops the run before it starts
            # (exit 2, one line), not after the output was opened.
            try:
                self._yaml_items = self._load_yaml()
            finally:
                self.close()

    def close(self) -> None:
        if self._file is not sys.stdin.buffer:
            self._file.close()

    async def __aiter__(self) -> AsyncIterator[Item]:
        try:
            select = self._select
            if self.format == "yaml":
                for item in self._yaml_items:
                    if select is None or select(item.line):
                        yield item
            else:
                lines = self._lines()
                while batch := await asyncio.to_thread(_take, lines, BATCH_LINES):
                    for lineno, raw in batch:
                        if select is None or select(lineno):
                            yield self._parse_line(lineno, raw)
        finally:
            self.close()

    def __iter__(self) -> Iterator[Item]:
        """Synchronous reading, for ``fetcher validate`` and other callers without a loop."""
        try:
            if self.format == "yaml":
                yield from self._yaml_items
            else:
                for lineno, raw in self._lines():
                    yield self._parse_line(lineno, raw)
        finally:
            self.close()

    def _lines(self) -> Iterator[tuple[int, bytes | None]]:
        # A file can fail part way (a truncated .gz, an I/O error): stop the run with the
        # reason rather than end it early as if the file were complete.
        try:
            yield from _numbered_lines(self._file)
        except (OSError, EOFError, zlib.error) as exc:
            reason = getattr(exc, "strerror", None) or _first_line(str(exc))
            raise JobFileError(f"cannot read job file {self.path}: {reason}") from None

    def _parse_line(self, lineno: int, raw: bytes | None) -> Item:
        if raw is None:
            return self._parser.invalid(lineno, f"line is longer than {MAX_LINE_BYTES} bytes")
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return self._parser.invalid(lineno, f"not valid JSON: {_first_line(str(exc))}")
        # Expanding ${NAME} walks the whole job; skip the walk when the line holds no reference.
        return self._parser.parse(obj, lineno, expand=b"${" in raw)

    def _load_yaml(self) -> list[Item]:
        try:
            doc = yaml.load(self._file, Loader=_BoundedSafeLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or _first_line(str(exc))
            raise JobFileError(f"job file {self.path}{at}: not valid YAML: {problem}") from None
        except (OSError, EOFError) as exc:
            raise JobFileError(f"cannot read job file {self.path}: {exc}") from None
        except UnicodeDecodeError:
            raise JobFileError(f"job file {self.path}: not UTF-8 text") from None
        except RecursionError:
            raise JobFileError(f"job file {self.path}: nested too deeply") from None
        defaults: dict[str, Any] = {}
        if doc is None:
            jobs: list[Any] = []
        elif isinstance(doc, list):
            jobs = doc
        elif isinstance(doc, dict) and set(doc) <= {"defaults", "jobs"}:
            defaults = doc.get("defaults") or {}
            jobs = doc.get("jobs") or []
            if not isinstance(defaults, dict) or not isinstance(jobs, list):
                raise JobFileError(
                    f"job file {self.path}: 'defaults' must be a mapping and 'jobs' a list"
                )
        else:
            raise JobFileError(
                f"job file {self.path}: expected a list of jobs "
                "or a mapping with 'defaults' and 'jobs'"
            )
        return [
            self._parser.parse(merge_defaults(defaults, job) if defaults else job, pos)
            for pos, job in enumerate(jobs, 1)
        ]


def merge_defaults(defaults: dict[str, Any], job: Any) -> Any:
    """The job over its defaults; ``headers`` and ``params`` are merged one level deep."""
    if not isinstance(job, dict):
        return job
    merged = {**defaults, **job}
    for key in ("headers", "params"):
        if isinstance(defaults.get(key), dict) and isinstance(job.get(key), dict):
            merged[key] = {**defaults[key], **job[key]}
    return merged


def _numbered_lines(f: BinaryIO) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line) for every non-blank line; None for a line too long to hold."""
    lineno = 0
    readline = f.readline
    while True:
        raw = readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while (rest := readline(io.DEFAULT_BUFFER_SIZE * 16)) and not rest.endswith(b"\n"):
                pass
            yield lineno, None
            continue
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if raw.strip():
            yield lineno, raw


def _take(it: Iterator[tuple[int, bytes | None]], n: int) -> list[tuple[int, bytes | None]]:
    batch = []
    for item in it:
        batch.append(item)
        if len(batch) == n:
            break
    return batch


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else text


class _BoundedSafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses documents using more than MAX_YAML_ALIASES aliases."""

    _aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                event = self.peek_event()  # type: ignore[no-untyped-call]
                raise yaml.composer.ComposerError(
                    None, None, f"more than {MAX_YAML_ALIASES} aliases", event.start_mark
                )
        return super().compose_node(parent, index)

    def compose_document(self) -> Any:
        node = super().compose_document()
        problem = None if node is None else _expansion_problem(node)
        if problem is not None:
            raise yaml.composer.ComposerError(None, None, problem, None)
        return node


def _expansion_problem(root: yaml.Node) -> str | None:
    """Why the node graph is too big once aliases are expanded, or recursive; else None.

    Sizes are memoised per node, so this is linear in the nodes the parser actually built.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # on the current path: meeting one again means a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        if finished:
            open_nodes.discard(key)
            size = 1 + sum(sizes[id(child)] for child in children)
            if size > MAX_YAML_NODES:
                return f"more than {MAX_YAML_NODES} values once aliases are expanded"
            sizes[key] = size
        elif key in open_nodes:
            return "an alias refers to a node that contains it"
        elif key not in sizes:
            open_nodes.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)
    return None
