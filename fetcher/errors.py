"""The exceptions fetcher raises, and the error types its result lines carry.

    FetcherError
    ├── SetupError          stops a run before any network use (exit 2)
    │   ├── ConfigError     a bad config file, flag or FETCHER_* variable
    │   └── JobFileError    the job file cannot be opened or read
    ├── OutputError         results can no longer be written (disk full, I/O error)
    │   └── OutputClosed    the reader went away (a closed pipe): stop quietly
    └── JobError            one job failed; becomes that job's result line, never escapes the pool

Per-job error *types* are the strings of docs/results.md's table; ``JobError.type`` is one of them.
"""

from __future__ import annotations

import signal
import sys
from typing import Final, Literal, get_args

from typing_extensions import TypedDict  # pydantic reads typing.TypedDict only from 3.12

#  Every exit code of the commands (README, "Exit codes"), in one place.
EXIT_OK = 0  # every job has a result line, and every result is ok
EXIT_FAILED_JOBS = 1  # every job has a result line, some are not ok
EXIT_USAGE = 2  # usage, config or job-file error: nothing was run
EXIT_OUTPUT = 3  # the results could not be written
EXIT_INTERNAL = 70  # a --processes child died of a bug (EX_SOFTWARE)
EXIT_PIPE = 141  # the reader of OUT went away, as a shell reports SIGPIPE (128 + 13)
#  Stopped by a signal after a graceful drain: 128 + the signal's number, as shells report it.
EXIT_SIGNAL: Final = {signal.SIGINT: 130, signal.SIGTERM: 143}

ErrorType = Literal[
    "invalid_job",
    "invalid_url",
    "blocked",
    "dns",
    "connect",
    "tls",
    "timeout",
    "protocol",
    "too_large",
    "too_many_redirects",
    "http_status",
    "smtp_temporary",
    "smtp_rejected",
    "smtp_auth",
    "proxy",
    "checksum",
    "save",
    "robots",
    "abandoned",
    "internal",
]

ERROR_TYPES: Final[tuple[str, ...]] = get_args(ErrorType)


class ErrorInfo(TypedDict):
    """The ``error`` object of a failed result: ``{"type": ..., "message": ...}``.

    ``type`` is one of ``ERROR_TYPES`` (docs/results.md); ``message`` is one printable line.
    """

    type: ErrorType
    message: str


class FetcherError(Exception):
    """Root of every exception fetcher raises on purpose."""


class SetupError(FetcherError):
    """The run cannot start; nothing was sent."""


class ConfigError(SetupError):
    """A config value is wrong; the message says which and where."""


class JobFileError(SetupError):
    """The job file cannot be opened or read."""


class OutputError(FetcherError):
    """The results output failed; the file keeps only whole lines."""


class OutputClosed(OutputError):
    """The reader of the output closed it (``| head``); the run ends quietly."""


class JobError(FetcherError):
    """A failure of one job, carried into its result line."""

    def __init__(self, type: ErrorType, message: str) -> None:
        super().__init__(message)
        self.type: ErrorType = type
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"type": self.type, "message": self.message}


def report(exc: FetcherError) -> int:
    """The exit code for an expected failure, its one-line reason printed on stderr (none for
    a closed output: the reader that went away wanted nothing more)."""
    if isinstance(exc, OutputClosed):
        return EXIT_PIPE
    print(f"fetcher: {exc}", file=sys.stderr)
    return EXIT_USAGE if isinstance(exc, SetupError) else EXIT_OUTPUT
