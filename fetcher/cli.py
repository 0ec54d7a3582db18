"""Command line: argument parsing, logging, exit codes. The only module that calls sys.exit."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from .errors import FetcherError, OutputClosed, SetupError

log = logging.getLogger("fetcher")


def _early_handler(signum: int, frame: Any) -> None:
    # A signal before the event loop is up: remember it, and the run stops as soon as it starts.
    from . import runner

    runner.early_signal[:] = [signal.Signals(signum)]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _shard(text: str) -> tuple[int | None, int]:
    k, sep, n = text.rpartition("/")
    if not sep:
        k, n = "", text
    try:
        count = int(n)
        index = int(k) if k else None
    except ValueError:
        raise argparse.ArgumentTypeError("expected K/N, e.g. 0/4") from None
    if count < 1 or (index is not None and not 0 <= index < count):
        raise argparse.ArgumentTypeError("expected 0 <= K < N")
    return index, count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fetcher",
        description="Run HTTP and mail jobs from a job file at high concurrency; "
        "one JSON result line per job.",
    )
    parser.add_argument("--version", action="version", version=f"fetcher {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run every job in a job file, one result line per job")
    run.add_argument(
        "jobs", metavar="JOBS", help="job file (.jsonl, .ndjson, .yaml, .yml, +.gz) or -"
    )
    run.add_argument(
        "-o", "--output", default="-", metavar="OUT", help="results file, - for stdout"
    )
    add_settings_options(run)
    run.add_argument("--resume", action="store_true", help="append to OUT, skipping jobs it has")
    run.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    run.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    run.add_argument(
        "--shard",
        type=_shard,
        metavar="K/N",
        help="run only jobs whose 0-based position modulo N is K (K from $JOB_COMPLETION_INDEX)",
    )

    val = sub.add_parser("validate", help="check a job file without touching the network")
    val.add_argument("jobs", metavar="JOBS")
    val.add_argument("-c", "--config", metavar="PATH", help="YAML config file (SMTP profiles)")
    return parser


def add_settings_options(p: argparse.ArgumentParser) -> None:
    """Options that map one-to-one to config keys (shared by run and worker)."""
    p.add_argument("-c", "--config", metavar="PATH", help="YAML config file")
    p.add_argument("-n", "--concurrency", type=int, metavar="N", help="jobs in flight (100)")
    p.add_argument(
        "--per-host", type=_positive_int, metavar="N", help="connections per host (0: no cap)"
    )
    p.add_argument("--rate", type=float, metavar="R", help="requests/s per host")
    p.add_argument(
        "--timeout", type=float, metavar="S", help="whole-attempt deadline, seconds (30)"
    )
    p.add_argument("--retries", type=_positive_int, metavar="N", help="extra attempts (2)")
    p.add_argument(
        "--max-bytes", type=_positive_int, metavar="N", help="largest body kept (10 MiB)"
    )
    p.add_argument(
        "--insecure",
        action="store_const",
        const=True,
        default=None,
        help="do not verify TLS certificates (warns)",
    )
    p.add_argument(
        "--fsync-interval", type=float, metavar="S", help="fsync the output every S seconds"
    )


def settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {
        key: getattr(args, key, None)
        for key in (
            "concurrency",
            "per_host",
            "rate",
            "timeout",
            "retries",
            "max_bytes",
            "fsync_interval",
        )
    }
    if getattr(args, "insecure", None):
        overrides["tls"] = {"verify": False}
    return overrides


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("fetcher: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _early_handler)
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        if args.command == "validate":
            return _validate(args)
        return _run(args)
    except SetupError as exc:
        print(f"fetcher: {exc}", file=sys.stderr)
        return 2
    except OutputClosed:
        _silence_stdout()
        return 141
    except FetcherError as exc:
        print(f"fetcher: {exc}", file=sys.stderr)
        return 3


def _silence_stdout() -> None:
    # Point fd 1 at /dev/null so the interpreter's final flush cannot raise BrokenPipeError.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def _run(args: argparse.Namespace) -> int:
    from .config import load_settings
    from .runner import Run, RunOptions

    settings = load_settings(args.config, settings_overrides(args))
    shard = None
    if args.shard is not None:
        index, count = args.shard
        if index is None:
            env = os.environ.get("JOB_COMPLETION_INDEX")
            if env is None or not env.isdigit() or int(env) >= count:
                raise SetupError("--shard N needs K/N or $JOB_COMPLETION_INDEX set below N")
            index = int(env)
        shard = (index, count)
    options = RunOptions(
        jobs=args.jobs,
        output=args.output,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=args.progress,
        shard=shard,
    )
    import uvloop

    code: int = uvloop.run(Run(settings, options).execute())
    if code == 141:
        _silence_stdout()
    return code


def _validate(args: argparse.Namespace) -> int:
    from .config import load_settings
    from .jobs import InvalidJob, JobParser
    from .resume import id_hash
    from .sources import JobSource

    settings = load_settings(args.config)
    source = JobSource(args.jobs, JobParser(smtp_profiles=settings.smtp.keys()))
    where = "<stdin>" if args.jobs == "-" else args.jobs
    total = bad = 0
    seen: dict[int, int] = {}
    for item in source:
        total += 1
        if isinstance(item, InvalidJob):
            bad += 1
            print(f"{where}:{item.line}: {item.type}: {item.message}")
            continue
        first = seen.setdefault(id_hash(item.id), item.line)
        if first != item.line:
            bad += 1
            print(f"{where}:{item.line}: invalid_job: id {item.id!r} repeats line {first}")
    print(f"fetcher: {total} jobs, {bad} invalid", file=sys.stderr)
    return 0 if bad == 0 else 2
