"""fetcher: run HTTP and mail jobs at high concurrency, one result per job.

The command line (``fetcher run jobs.jsonl``) and the library share one engine::

    import fetcher

    async with fetcher.Runner(fetcher.Settings(concurrency=200)) as runner:
        async for result in runner.run([{"url": "https://example.com/"}]):
            print(result.id, result.ok, result.status)

Every public name is importable from here. They are loaded on first use (PEP 562), so that
``import fetcher`` (which the command line does before anything else) stays a few hundred
microseconds rather than the half second that aiohttp and pydantic take to import.
"""

from __future__ import annotations

from ._version import __version__

# Not typing.TYPE_CHECKING: importing typing alone costs more than the rest of this module.
# Type checkers treat a bare TYPE_CHECKING name as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from .api import run_sync
    from .config import Settings, load_settings
    from .engine import Runner
    from .errors import (
        ERROR_TYPES,
        ConfigError,
        ErrorInfo,
        ErrorType,
        FetcherError,
        JobError,
        JobFileError,
        OutputClosed,
        OutputError,
        SetupError,
    )
    from .jobs import HttpJob, InvalidJob, JobParser, MailJob
    from .results import Result
    from .schema import job_schema, result_schema

__all__ = [
    "ERROR_TYPES",
    "ConfigError",
    "ErrorInfo",
    "ErrorType",
    "FetcherError",
    "HttpJob",
    "InvalidJob",
    "JobError",
    "JobFileError",
    "JobParser",
    "MailJob",
    "OutputClosed",
    "OutputError",
    "Result",
    "Runner",
    "Settings",
    "SetupError",
    "__version__",
    "job_schema",
    "load_settings",
    "result_schema",
    "run_sync",
]

#  Where each lazily loaded name lives (relative to this package).
_LAZY = {
    "ErrorInfo": "errors",
    "Result": "results",
    "Runner": "engine",
    "run_sync": "api",
    "Settings": "config",
    "load_settings": "config",
    "ERROR_TYPES": "errors",
    "ConfigError": "errors",
    "ErrorType": "errors",
    "FetcherError": "errors",
    "JobError": "errors",
    "JobFileError": "errors",
    "OutputClosed": "errors",
    "OutputError": "errors",
    "SetupError": "errors",
    "HttpJob": "jobs",
    "InvalidJob": "jobs",
    "JobParser": "jobs",
    "MailJob": "jobs",
    "job_schema": "schema",
    "result_schema": "schema",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fetcher' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
