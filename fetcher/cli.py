"""Command line: argument parsing, logging, exit codes. The only module that calls sys.exit."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import EXIT_PIPE, FetcherError, OutputClosed, SetupError, report
from .shutdown import install_early_handlers

if TYPE_CHECKING:  # imported where used: `fetcher --help` stays quick
    from .config import Settings
    from .run import RunOptions

log = logging.getLogger("fetcher")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _shard(text: str) -> tuple[int | None, int]:
    from .shard import parse_shard

    try:
        return parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _shard_text(text: str) -> str:
    _shard(text)  # refused here, as a usage error, rather than as a config error later
    return text


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
    run.add_argument("jobs", metavar="JOBS", help=JOBS_HELP)
    run.add_argument(
        "-o", "--output", default="-", metavar="OUT", help="results file, - for stdout"
    )
    add_settings_options(run)
    # Default None, not False: an absent flag leaves FETCHER_RESUME or the config file's say.
    for flag, text in (
        ("--resume", "append to OUT, skipping jobs it has (off)"),
        ("--overwrite", "replace an existing OUT (off)"),
        ("--progress", "progress bar on stderr (default: when stderr is a terminal)"),
    ):
        run.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
    run.add_argument(
        "--shard",
        type=_shard_text,
        metavar="K/N",
        help="run only jobs whose 0-based position modulo N is K (K from $JOB_COMPLETION_INDEX)",
    )
    run.add_argument(
        "--processes", type=int, metavar="P", help="worker processes, one merged output (1)"
    )
    _add_shaping_options(run)
    _add_metrics_options(run)
    add_input_options(run)

    val = sub.add_parser("validate", help="check a job file without touching the network")
    val.add_argument("jobs", metavar="JOBS", help=JOBS_HELP)
    val.add_argument("-c", "--config", metavar="PATH", help="YAML config file (SMTP profiles)")
    add_input_options(val)
    _add_scaleout_parsers(sub)

    merge = sub.add_parser(
        "merge", help="result files in, one line per job id out (the last file's line wins)"
    )
    merge.add_argument("files", nargs="+", metavar="FILE", help="result files, oldest first")
    merge.add_argument(
        "-o", "--output", default="-", metavar="OUT", help="merged results, - for stdout"
    )
    merge.add_argument("--overwrite", action="store_true", help="replace an existing OUT (off)")

    schema = sub.add_parser("schema", help="print the JSON Schema of a job line or a result line")
    schema.add_argument("which", choices=("jobs", "results"), help="jobs or results")
    return parser


JOBS_HELP = "job file (.jsonl, .ndjson, .yaml, .yml, .txt, .csv, .tsv, each +.gz) or -"


def add_input_options(p: argparse.ArgumentParser) -> None:
    """How JOBS is read (run, validate, enqueue); config keys input_format and url_column."""
    p.add_argument(
        "--input-format",
        choices=("jsonl", "yaml", "urls", "csv", "tsv"),
        help="read JOBS as this format, whatever its name says (stdin: jsonl)",
    )
    p.add_argument("--url-column", metavar="NAME", help="the CSV/TSV column of the URLs (url)")


def input_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"input_format": args.input_format, "url_column": args.url_column}


def _add_shaping_options(p: argparse.ArgumentParser) -> None:
    # Config keys fields / format / retry_failed / since (and FETCHER_*) when not given.
    p.add_argument(
        "--fields", metavar="LIST", help="comma-separated result fields to write (id first)"
    )
    p.add_argument(
        "--format", choices=("jsonl", "csv"), help="jsonl or csv (default: csv for OUT *.csv)"
    )
    p.add_argument(
        "--retry-failed", metavar="PREV", help="run only jobs without an ok line in PREV"
    )
    p.add_argument(
        "--since",
        metavar="PREV",
        help="revalidate what PREV fetched ok (If-None-Match / If-Modified-Since)",
    )


def add_settings_options(p: argparse.ArgumentParser) -> None:
    """Options that map one-to-one to config keys (shared by run and worker)."""
    p.add_argument("-c", "--config", metavar="PATH", help="YAML config file")
    p.add_argument("-n", "--concurrency", type=int, metavar="N", help="jobs in flight (100)")
    p.add_argument(
        "--per-host", type=_positive_int, metavar="N", help="connections per host (0: no cap)"
    )
    p.add_argument("--rate", type=float, metavar="R", help="requests/s per host")
    p.add_argument(
        "--adaptive",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="per-host concurrency that backs off on 429/503/Retry-After (off)",
    )
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
    p.add_argument("--save", metavar="DIR", help="stream each http body to a file under DIR")
    p.add_argument(
        "--save-name",
        metavar="TEMPLATE",
        help="file name under DIR: {id} {sha256} {sha256:0:2} {host} {path} {ext} {status}",
    )
    p.add_argument("--warc", metavar="FILE", help="also record every exchange in a WARC file")
    for flag, text in (
        ("--trace", "add timings, redirect_chain and tls to http results (off)"),
        ("--robots", "obey robots.txt of every origin, and its Crawl-delay (off)"),
    ):
        p.add_argument(flag, action="store_const", const=True, default=None, help=text)


def settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    # Nested keys go in as mappings, merged over the config file's (a --save DIR keeps its name).
    save = {"dir": getattr(args, "save", None), "name": getattr(args, "save_name", None)}
    warc = getattr(args, "warc", None)
    return {
        "save": {k: v for k, v in save.items() if v is not None} or None,
        "warc": None if warc is None else {"file": warc},
    } | {
        key: getattr(args, key, None)
        for key in (
            "concurrency",
            "per_host",
            "rate",
            "adaptive",
            "timeout",
            "retries",
            "max_bytes",
            "fsync_interval",
            "insecure",
            "metrics_port",
            "metrics_host",
            "trace",
            "robots",
        )
    }


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("fetcher: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    install_early_handlers()
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        if args.command == "validate":
            return _validate(args)
        if args.command in ("enqueue", "worker", "collect"):
            return _scaleout(args)
        if args.command == "schema":
            return _schema(args)
        if args.command == "merge":
            from .merge import merge_files

            return merge_files(args.files, args.output, overwrite=args.overwrite)
        _tune_gc()
        return _run(args)
    except FetcherError as exc:
        code = report(exc)
        if isinstance(exc, OutputClosed):
            _silence_stdout()
        return code


def _tune_gc() -> None:
    """Collect garbage less often during a run: about 6% of a run's CPU on small responses.

    What start-up built (modules, models, the parser) lives as long as the process: frozen,
    the collector never walks it again. Each job makes a few hundred short-lived objects, so
    at the default threshold (700) a collection runs every few jobs; at 50,000 one runs every
    few hundred, and the few reference cycles a job leaves are still freed within a second.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def _silence_stdout() -> None:
    # Point fd 1 at /dev/null so the interpreter's final flush cannot raise BrokenPipeError.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def _run(args: argparse.Namespace) -> int:
    from .config import load_settings
    from .fdlimit import fit_open_files
    from .run import Run

    overrides = settings_overrides(args)
    overrides.update(
        processes=args.processes,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=args.progress,
        shard=args.shard,
        **input_overrides(args),
        fields=args.fields,
        format=args.format,
        retry_failed=args.retry_failed,
        since=args.since,
    )
    settings = load_settings(args.config, overrides)
    options = _run_options(args, settings)
    settings = fit_open_files(settings)
    if settings.warc.file is not None:
        from .warc import check_target

        if settings.processes > 1:
            raise SetupError("--warc is not available with --processes yet (one file, one writer)")
        check_target(settings.warc.file, resume=settings.resume, overwrite=settings.overwrite)
    if settings.save.dir is not None:
        from .save import prepare_dir, remove_partials

        prepare_dir(settings.save.dir)
        if settings.resume:
            # What a killed run was writing: those jobs have no result line and run again.
            removed = remove_partials(settings.save.dir)
            if removed:
                log.info("removed %d partial file(s) left in %s", removed, settings.save.dir)
    import uvloop

    code: int
    port = settings.metrics_port
    if settings.processes > 1:
        from .processes import ParallelRun

        if port is not None:
            raise SetupError("--metrics-port is not available with --processes yet")
        parallel = ParallelRun(settings, options)
        parallel.start()  # forks the children, before this process runs a loop
        code = uvloop.run(parallel.execute())
    elif port is None:
        code = uvloop.run(Run(settings, options).execute())
    else:
        from .metrics import Metrics, run_with_metrics

        metrics = Metrics()
        run = Run(settings, options, observer=metrics)
        code = uvloop.run(run_with_metrics(metrics, settings.metrics_host, port, run.execute))
    if code == EXIT_PIPE:
        _silence_stdout()
    return code


def _run_options(args: argparse.Namespace, settings: Settings) -> RunOptions:
    from . import shaping
    from .run import RunOptions

    resume, overwrite = settings.resume, settings.overwrite
    progress, shard = settings.progress, settings.shard
    if resume and overwrite:
        raise SetupError(
            "--resume and --overwrite exclude each other (check the flags, "
            "FETCHER_RESUME / FETCHER_OVERWRITE and the config file's resume / overwrite)"
        )
    return RunOptions(
        jobs=args.jobs,
        output=args.output,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
        shard=None if shard is None else _resolve_shard(shard),
        fields=settings.fields,
        format=shaping.output_format(args.output, settings.format),
        retry_failed=settings.retry_failed,
        since=settings.since,
    )


def _resolve_shard(text: str) -> tuple[int, int]:
    """(K, N) of ``--shard``; K from $JOB_COMPLETION_INDEX (Kubernetes Indexed Jobs) if absent."""
    index, count = _shard(text)
    if index is None:
        env = os.environ.get("JOB_COMPLETION_INDEX")
        if env is None or not env.isdigit() or int(env) >= count:
            raise SetupError("--shard N needs K/N or $JOB_COMPLETION_INDEX set below N")
        index = int(env)
    return index, count


def _schema(args: argparse.Namespace) -> int:
    import json

    from .schema import job_schema, result_schema

    schema = job_schema() if args.which == "jobs" else result_schema()
    print(json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from .config import load_settings
    from .jobs import JobParser
    from .sources import JobCheck, JobSource

    settings = load_settings(args.config, input_overrides(args))
    parser = JobParser(smtp_profiles=settings.smtp.keys())
    source = JobSource.for_settings(args.jobs, parser, settings)
    check = JobCheck(args.jobs, source, sys.stdout)
    for item in source:
        check.good(item)
    print(f"fetcher: {check.total} jobs, {check.bad} invalid", file=sys.stderr)
    return 0 if check.bad == 0 else 2


# -- scale-out: enqueue, worker, collect (Redis Streams) ----------------------------------------


def _add_metrics_options(p: argparse.ArgumentParser) -> None:
    # Config keys metrics_port / metrics_host (and FETCHER_METRICS_PORT / _HOST) when not given.
    p.add_argument(
        "--metrics-port",
        type=_positive_int,
        metavar="PORT",
        help="serve Prometheus /metrics, /healthz and /readyz on this port "
        "(default: $FETCHER_METRICS_PORT, else off)",
    )
    p.add_argument(
        "--metrics-host",
        metavar="HOST",
        help="address for --metrics-port (127.0.0.1; 0.0.0.0 to be scraped from outside)",
    )


def _add_redis_option(p: argparse.ArgumentParser) -> None:
    url = os.environ.get("FETCHER_REDIS")
    p.add_argument(
        "--redis",
        metavar="URL",
        default=url,
        required=url is None,
        help="redis://[:password@]host:port/db (default: $FETCHER_REDIS)",
    )


def _add_scaleout_parsers(sub: Any) -> None:
    from .constants import DEFAULT_GROUP, DEFAULT_RESULTS, DEFAULT_STREAM

    enq = sub.add_parser("enqueue", help="validate a job file and add its jobs to a Redis stream")
    enq.add_argument("jobs", metavar="JOBS", help=JOBS_HELP)
    _add_redis_option(enq)
    enq.add_argument("--stream", default=DEFAULT_STREAM, help=f"job stream ({DEFAULT_STREAM})")
    enq.add_argument("-c", "--config", metavar="PATH", help="YAML config file (SMTP profiles)")
    add_input_options(enq)

    wrk = sub.add_parser("worker", help="run jobs from a Redis stream until stopped")
    _add_redis_option(wrk)
    wrk.add_argument("--stream", default=DEFAULT_STREAM, help=f"job stream ({DEFAULT_STREAM})")
    wrk.add_argument("--group", default=DEFAULT_GROUP, help=f"consumer group ({DEFAULT_GROUP})")
    wrk.add_argument("--consumer", help="consumer name (host name-pid)")
    wrk.add_argument(
        "--results-stream", default=DEFAULT_RESULTS, help=f"results stream ({DEFAULT_RESULTS})"
    )
    wrk.add_argument("--dead-stream", help="dead-letter stream (<stream>:dead)")
    wrk.add_argument(
        "--claim-idle",
        type=float,
        metavar="S",
        help="claim entries other workers left idle this long "
        "(default: a job's worst case, (retries+1)*timeout + retries*backoff_max + 10)",
    )
    wrk.add_argument(
        "--max-deliveries",
        type=int,
        default=5,
        metavar="N",
        help="dead-letter a job as abandoned after N deliveries (5)",
    )
    wrk.add_argument(
        "-o", "--output", metavar="OUT", help="also append results to OUT (- for stdout)"
    )
    wrk.add_argument(
        "--drain", action="store_true", help="exit 0 once the stream has no jobs left to run"
    )
    add_settings_options(wrk)
    _add_metrics_options(wrk)

    col = sub.add_parser("collect", help="write the results stream as JSON lines, each id once")
    _add_redis_option(col)
    col.add_argument(
        "-o", "--output", default="-", metavar="OUT", help="results file (appended), - for stdout"
    )
    col.add_argument(
        "--results-stream", default=DEFAULT_RESULTS, help=f"results stream ({DEFAULT_RESULTS})"
    )
    col.add_argument("--follow", action="store_true", help="keep waiting for new results")
    col.add_argument(
        "--trim", action="store_true", help="delete collected entries once they are on disk"
    )


def _scaleout(args: argparse.Namespace) -> int:
    import uvloop

    code: int
    if args.command == "enqueue":
        code = uvloop.run(_enqueue(args))
    elif args.command == "worker":
        _tune_gc()
        code = _worker(args)
    else:
        code = uvloop.run(_collect(args))
    if code == EXIT_PIPE:
        _silence_stdout()
    return code


async def _enqueue(args: argparse.Namespace) -> int:
    from .config import load_settings
    from .scaleout import enqueue

    settings = load_settings(args.config, input_overrides(args))
    report = await enqueue(args.jobs, url=args.redis, stream=args.stream, settings=settings)
    print(
        f"fetcher: {report.added} jobs added to {args.stream}, {report.invalid} invalid",
        file=sys.stderr,
    )
    return 0 if report.invalid == 0 else 1


def _worker(args: argparse.Namespace) -> int:
    import socket

    import uvloop

    from .config import load_settings
    from .fdlimit import fit_open_files
    from .worker import Worker, WorkerOptions

    settings = load_settings(args.config, settings_overrides(args))
    if args.max_deliveries < 1:
        raise SetupError("--max-deliveries must be at least 1")
    if args.claim_idle is not None and args.claim_idle <= 0:
        raise SetupError("--claim-idle must be more than 0")
    settings = fit_open_files(settings)
    options = WorkerOptions(
        redis_url=args.redis,
        consumer=args.consumer or f"{socket.gethostname()}-{os.getpid()}",
        stream=args.stream,
        group=args.group,
        results_stream=args.results_stream,
        dead_stream=args.dead_stream,
        claim_idle=args.claim_idle,
        max_deliveries=args.max_deliveries,
        output=args.output,
        drain=args.drain,
    )
    port = settings.metrics_port
    if port is None:
        return int(uvloop.run(Worker(settings, options).execute()))
    from .metrics import Metrics, run_with_metrics

    metrics = Metrics(worker=True)
    worker = Worker(settings, options, metrics=metrics)
    return int(uvloop.run(run_with_metrics(metrics, settings.metrics_host, port, worker.execute)))


async def _collect(args: argparse.Namespace) -> int:
    import asyncio

    from .scaleout import Collector
    from .shutdown import STOP_SIGNALS

    collector = Collector(
        url=args.redis,
        results_stream=args.results_stream,
        output=args.output,
        follow=args.follow,
        trim=args.trim,
    )
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, collector.stop)
    try:
        report = await collector.execute()
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
    print(
        f"fetcher: {report.written} results written, {report.duplicates} duplicates skipped"
        + (f", {report.trimmed} entries trimmed" if args.trim else ""),
        file=sys.stderr,
    )
    return 0
