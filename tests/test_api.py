"""The library interface: ``import fetcher``, Runner, run_sync, Result, against real local peers.

The HTTP peer here counts the connections it holds open (aiohttp's ``web.Server.connections``),
so the tests can tell that a run that was broken off or cancelled closed every client socket.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.resources
import inspect
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import tomllib
import warnings
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

import fetcher
from fetcher import HttpJob, InvalidJob, JobParser, Result, Runner, Settings, run_sync

from . import smtp_peer as smtp_peers
from .peers.base import AppThread
from .smtp_peer import Peer as SmtpPeer

# The SMTP server fixtures live in smtp_peer.py; binding them here makes pytest find them.
smtp_peer = smtp_peers.smtp_peer
tls_certs = smtp_peers.tls_certs

ROOT = Path(__file__).resolve().parent.parent

# --- the export list, as httpx tests its own ----------------------------------------------------

EXPORTED = [
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

#  Data, not code: nothing to hang a docstring on.
DATA_NAMES = {"ERROR_TYPES", "ErrorType", "__version__"}


def _isort_order(name: str) -> tuple[int, str]:
    """Constants, then classes, then the rest (ruff's RUF022 order)."""
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


def test_all_is_the_expected_sorted_list() -> None:
    assert fetcher.__all__ == EXPORTED
    assert fetcher.__all__ == sorted(fetcher.__all__, key=_isort_order)


@pytest.mark.parametrize("name", EXPORTED)
def test_every_exported_name_resolves(name: str) -> None:
    value = getattr(fetcher, name)
    assert value is not None
    if name not in DATA_NAMES:
        module = value.__module__
        assert module.startswith("fetcher."), (name, module)
    assert name in dir(fetcher)


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        fetcher.no_such_name  # type: ignore[attr-defined]  # noqa: B018


def _public_members(obj: Any) -> Iterator[tuple[str, Any]]:
    """Public methods and properties defined by fetcher itself (not inherited from dict or
    pydantic's BaseModel)."""
    for name, member in vars(obj).items():
        if name.startswith("_") or not (callable(member) or isinstance(member, property)):
            continue
        yield name, member


def _own_doc(obj: Any) -> str:
    """The object's own docstring; not inspect.getdoc, which falls back to a base class's."""
    return (obj.__doc__ or "").strip()


@pytest.mark.parametrize("name", sorted(set(EXPORTED) - DATA_NAMES))
def test_every_public_name_has_a_docstring(name: str) -> None:
    value = getattr(fetcher, name)
    assert _own_doc(value), f"fetcher.{name} has no docstring"
    if inspect.isclass(value) and value.__module__ in ("fetcher.api", "fetcher.schema"):
        for member_name, member in _public_members(value):
            assert _own_doc(member), f"fetcher.{name}.{member_name} has no docstring"


def test_import_is_cheap() -> None:
    """``import fetcher`` (the CLI's first import) loads neither aiohttp nor pydantic."""
    code = (
        "import sys, fetcher, fetcher.cli\n"
        "heavy = [m for m in ('aiohttp', 'pydantic', 'yaml', 'orjson', 'fetcher.api')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert fetcher.__version__\n"
        "fetcher.Runner\n"
        "assert 'aiohttp' in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode()


# --- a local HTTP peer that counts open connections ---------------------------------------------


class CountingServer(AppThread):
    """aiohttp.web on 127.0.0.1:0 in its own thread: /ok, /slow?delay=S, /json, /status/N."""

    def __init__(self) -> None:
        super().__init__("counting-server", handler_cancellation=True)
        self.requests = 0
        self._transports: set[int] = set()

    def make_app(self) -> web.Application:
        @web.middleware
        async def track(request: web.Request, handler: Any) -> web.StreamResponse:
            self.requests += 1
            self._transports.add(id(request.transport))
            response: web.StreamResponse = await handler(request)
            return response

        async def ok(request: web.Request) -> web.Response:
            return web.Response(text="hello\n")

        async def slow(request: web.Request) -> web.Response:
            await asyncio.sleep(float(request.query.get("delay", "0.5")))
            return web.Response(text="slow\n")

        async def json_body(request: web.Request) -> web.Response:
            return web.json_response({"answer": 42})

        async def status(request: web.Request) -> web.Response:
            return web.Response(status=int(request.match_info["code"]), text="status\n")

        app = web.Application(middlewares=[track])
        app.add_routes(
            [
                web.get("/ok", ok),
                web.get("/slow", slow),
                web.get("/json", json_body),
                web.get("/status/{code:\\d+}", status),
            ]
        )
        return app

    def open_connections(self) -> int:
        """Connections clients hold open to this server right now."""

        async def count() -> int:
            assert self._runner is not None and self._runner.server is not None
            return len(self._runner.server.connections)

        return asyncio.run_coroutine_threadsafe(count(), self._loop).result(timeout=5)

    def connections_seen(self) -> int:
        return len(self._transports)

    def wait_closed(self, timeout: float = 5.0) -> int:
        """Open connections once the server has seen every client close (or the timeout)."""
        deadline = _monotonic() + timeout
        while (n := self.open_connections()) and _monotonic() < deadline:
            threading.Event().wait(0.02)
        return n


def _monotonic() -> float:
    import time

    return time.monotonic()


@pytest.fixture
def peer() -> Iterator[CountingServer]:
    srv = CountingServer()
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def fast(**overrides: Any) -> Settings:
    """Settings for tests: no backoff to speak of, short timeouts."""
    values: dict[str, Any] = {"timeout": 5, "retries": 0, "backoff_base": 0.01}
    values.update(overrides)
    return Settings(**values)


def sample_jobs(base: str, closed_port: int) -> list[dict[str, Any]]:
    return [
        {"id": "ok", "url": f"{base}/ok", "body": "text", "meta": {"row": 1}},
        {"id": "json", "url": f"{base}/json", "body": "json"},
        {"id": "s404", "url": f"{base}/status/404"},
        {"id": "closed", "url": f"http://127.0.0.1:{closed_port}/"},
        {"id": "ftp", "url": "ftp://files.test/a"},
        {"id": "bad", "url": f"{base}/ok", "retries": "many"},
        {"url": f"{base}/ok"},  # position 7: its id is "7"
    ]


def check_sample(results: list[Result], base: str) -> None:
    by_id = {r.id: r for r in results}
    assert sorted(by_id) == ["7", "bad", "closed", "ftp", "json", "ok", "s404"]
    ok = by_id["ok"]
    assert ok.ok and ok.status == 200 and ok.body == "hello\n" and ok.meta == {"row": 1}
    assert ok.url == ok.final_url == f"{base}/ok" and ok.attempts == 1 and ok.error is None
    assert ok.headers is not None and ok.headers["content-type"].startswith("text/plain")
    assert by_id["json"].body == {"answer": 42}
    assert by_id["s404"].error == {"type": "http_status", "message": "HTTP 404 Not Found"}
    assert by_id["closed"].error is not None and by_id["closed"].error["type"] == "connect"
    assert by_id["ftp"].error is not None and by_id["ftp"].error["type"] == "invalid_url"
    assert by_id["bad"].error is not None and by_id["bad"].error["type"] == "invalid_job"
    assert by_id["bad"]["line"] == 6 and by_id["bad"].attempts == 0
    assert by_id["7"].ok and by_id["7"].url == f"{base}/ok"


async def _quiet_finish(peer: CountingServer) -> None:
    """No task but this one left, no connection left open, nothing in the garbage."""
    await asyncio.sleep(0)  # let call_soon callbacks (asyncgen finalizers) run
    others = asyncio.all_tasks() - {asyncio.current_task()}
    assert not others, others
    assert peer.wait_closed() == 0


# --- the ways in ---------------------------------------------------------------------------------


def test_plain_asyncio_run(peer: CountingServer, closed_port: int) -> None:
    async def main() -> list[Result]:
        async with Runner(fast()) as runner:
            return [r async for r in runner.run(sample_jobs(peer.url, closed_port))]

    check_sample(asyncio.run(main()), peer.url)
    assert peer.wait_closed() == 0


async def test_inside_a_running_loop(peer: CountingServer, closed_port: int) -> None:
    """As in a notebook: ``async with`` and ``async for`` on the caller's own loop."""
    results: list[Result] = []
    async with Runner(fast()) as runner:
        async for result in runner.run(sample_jobs(peer.url, closed_port)):
            assert isinstance(result, Result) and isinstance(result, dict)
            results.append(result)
        # The same Runner (one session) serves a second batch.
        again = [r async for r in runner.run([{"id": "x", "url": f"{peer.url}/ok"}])]
    check_sample(results, peer.url)
    assert [r.id for r in again] == ["x"] and again[0].ok
    await _quiet_finish(peer)


def test_run_sync_without_a_loop(peer: CountingServer, closed_port: int) -> None:
    check_sample(run_sync(sample_jobs(peer.url, closed_port), fast()), peer.url)
    assert peer.wait_closed() == 0


async def test_run_sync_inside_a_running_loop(peer: CountingServer, closed_port: int) -> None:
    """A notebook cell calling run_sync: the jobs run on a private loop in a helper thread."""
    results = run_sync(sample_jobs(peer.url, closed_port), fast())
    check_sample(results, peer.url)
    assert not [t for t in threading.enumerate() if t.name == "fetcher-run-sync"]
    await _quiet_finish(peer)


def test_run_sync_default_settings(peer: CountingServer) -> None:
    [result] = run_sync([{"url": f"{peer.url}/ok"}])
    assert result.ok and result.id == "1"


async def test_async_iterable_of_jobs_and_job_objects(peer: CountingServer) -> None:
    parsed = JobParser().parse({"id": "model", "url": f"{peer.url}/ok"}, 1)
    assert isinstance(parsed, HttpJob)
    constructed = HttpJob(id="built", url=f"{peer.url}/json", body="json")

    async def jobs() -> AsyncIterator[Any]:
        yield parsed
        yield constructed
        yield {"id": "dict", "url": f"{peer.url}/ok"}

    async with Runner(fast()) as runner:
        results = {r.id: r async for r in runner.run(jobs())}
    assert set(results) == {"model", "built", "dict"}
    assert all(r.ok for r in results.values())
    assert results["built"].body == {"answer": 42}


async def test_invalid_dicts_are_results_not_exceptions() -> None:
    jobs: list[Any] = [
        "not an object",
        {"url": 5},
        {"kind": "nope", "id": "k"},
        {"id": "ftp", "url": "ftp://files.test/"},
        {"id": "env", "url": "http://127.0.0.1/${API_TEST_UNSET_VARIABLE}"},
        {"id": "mail", "kind": "mail", "smtp": "nowhere", "from": "a@b.c", "to": "d@e.f"},
        [1, 2],
    ]
    async with Runner(fast()) as runner:
        results = {r.id: r async for r in runner.run(jobs)}
    types = {job_id: r.error["type"] for job_id, r in results.items() if r.error}
    assert types == {
        "1": "invalid_job",
        "2": "invalid_job",
        "k": "invalid_job",
        "ftp": "invalid_url",
        "env": "invalid_job",
        "mail": "invalid_job",
        "7": "invalid_job",
    }
    assert all(r.attempts == 0 and not r.ok and r.elapsed_ms == 0 for r in results.values())
    assert [results[i]["line"] for i in ("1", "2", "k", "ftp")] == [1, 2, 3, 4]
    assert results["mail"].kind == "mail" and results["k"].kind is None
    assert "API_TEST_UNSET_VARIABLE" in results["env"].error["message"]  # type: ignore[index]


def test_runner_outside_async_with_is_refused() -> None:
    with pytest.raises(RuntimeError, match="async with"):
        Runner(fast()).run([])


def test_result_is_a_plain_json_object(peer: CountingServer) -> None:
    [result] = run_sync([{"id": "a", "url": f"{peer.url}/json", "body": "json"}], fast())
    plain = result.to_dict()
    assert type(plain) is dict and plain == result
    assert orjson.loads(orjson.dumps(result)) == plain
    assert result.started_at.endswith("Z") and result.elapsed_ms >= 0
    assert result.kind == "http" and result.status == 200


# --- the same results as `fetcher run` ----------------------------------------------------------


def _comparable(result: dict[str, Any]) -> dict[str, Any]:
    """A result without what differs from run to run: timings and the Date header."""
    out = {k: v for k, v in result.items() if k not in ("started_at", "elapsed_ms")}
    if out.get("headers"):
        out["headers"] = {k: v for k, v in out["headers"].items() if k != "date"}
    return out


def test_same_results_as_the_command(
    peer: CountingServer, closed_port: int, tmp_path: Path
) -> None:
    jobs = sample_jobs(peer.url, closed_port)
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_bytes(b"".join(orjson.dumps(j) + b"\n" for j in jobs))
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FETCHER_")}
    proc = subprocess.run(
        [sys.executable, "-m", "fetcher", "run", str(jobs_file), "--retries", "0"],
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr.decode()
    from_cli = {r["id"]: _comparable(r) for r in map(orjson.loads, proc.stdout.splitlines())}
    from_api = {r.id: _comparable(r.to_dict()) for r in run_sync(jobs, Settings(retries=0))}
    assert from_api == from_cli


# --- stopping early -----------------------------------------------------------------------------


class Counted:
    """A job generator that counts how far it was read."""

    def __init__(self, base: str, n: int, path: str = "/slow?delay=0.3") -> None:
        self.base, self.n, self.path, self.read = base, n, path, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(self.n):
            self.read += 1
            yield {"id": f"j{i}", "url": f"{self.base}{self.path}"}


@pytest.fixture
def no_stray_warnings(caplog: pytest.LogCaptureFixture) -> Iterator[list[warnings.WarningMessage]]:
    """Warnings (ResourceWarning of an unclosed session or socket included) and asyncio's
    "Task was destroyed but it is pending!" log records: there must be none."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with caplog.at_level(logging.WARNING, logger="asyncio"):
            yield caught
            gc.collect()
    assert not caught, [str(w.message) for w in caught]
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text


async def test_break_out_of_the_loop_closes_everything(
    peer: CountingServer, no_stray_warnings: list[warnings.WarningMessage]
) -> None:
    jobs = Counted(peer.url, 10_000, "/slow?delay=0.2")
    async with Runner(fast(concurrency=8)) as runner:
        async for result in runner.run(jobs):
            assert result.ok
            break
        assert peer.open_connections() > 0  # the session still holds its idle connections
    assert peer.connections_seen() >= 8
    assert jobs.read < 100  # read as the pool had room, never ahead
    await _quiet_finish(peer)


def established(port: int) -> int:
    """TCP connections to or from ``port`` on this machine that are still established."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, state = line.split()[1:4]
        ports = {int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16)}
        count += state == "01" and port in ports
    return count


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
async def test_break_out_of_a_mail_loop_closes_the_smtp_connections(
    smtp_peer: Any, no_stray_warnings: list[warnings.WarningMessage]
) -> None:
    peer: SmtpPeer = smtp_peer(data_delay=0.05)
    settings = fast(concurrency=6, smtp={"default": peer.profile(pool_size=3)})
    jobs = (
        {"id": f"m{i}", "kind": "mail", "smtp": "default", "from": "a@example.com",
         "to": [f"r{i}@example.org"], "subject": "s", "text": "t"}
        for i in range(10_000)
    )  # fmt: skip
    async with Runner(settings) as runner:
        async for result in runner.run(jobs):
            assert result.ok, result.error
            break
        assert established(peer.port) > 0  # the pool still holds its connections
    assert peer.recorder.connections >= 1
    assert established(peer.port) == 0
    assert len(peer.recorder.deliveries) < 20  # jobs were read as the pool had room
    await asyncio.sleep(0)
    others = asyncio.all_tasks() - {asyncio.current_task()}
    assert not others, others


async def test_break_then_keep_using_the_runner(peer: CountingServer) -> None:
    async with Runner(fast(concurrency=4)) as runner:
        async for _ in runner.run(Counted(peer.url, 1_000, "/slow?delay=0.2")):
            break
        await asyncio.sleep(0)
        # The broken-off run is stopped; the session goes on serving a new one.
        results = [r async for r in runner.run(Counted(peer.url, 6, "/ok"))]
        assert len(results) == 6 and all(r.ok for r in results)
        others = asyncio.all_tasks() - {asyncio.current_task()}
        assert not [t for t in others if t.get_name() == "fetcher-runner"], others
    await _quiet_finish(peer)


async def test_leaving_the_runner_stops_a_held_stream(peer: CountingServer) -> None:
    """A stream kept (not garbage) but no longer iterated is closed by leaving the Runner."""
    async with Runner(fast(concurrency=4)) as runner:
        stream = runner.run(Counted(peer.url, 1_000, "/slow?delay=0.2"))
        first = await anext(stream)
        assert first.ok
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    await _quiet_finish(peer)


async def test_cancelling_the_consumer_closes_everything(
    peer: CountingServer, no_stray_warnings: list[warnings.WarningMessage]
) -> None:
    got: list[Result] = []
    jobs = Counted(peer.url, 10_000, "/slow?delay=0.3")

    async def consume() -> None:
        async with Runner(fast(concurrency=6)) as runner:
            async for result in runner.run(jobs):
                got.append(result)

    task = asyncio.create_task(consume())
    while peer.requests < 6:  # jobs are in flight on the server
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert got == []  # cancelled before the first answer
    await _quiet_finish(peer)


async def test_cancelling_mid_stream_with_results_delivered(peer: CountingServer) -> None:
    got: list[Result] = []

    async def consume() -> None:
        async with Runner(fast(concurrency=4)) as runner:
            async for result in runner.run(Counted(peer.url, 10_000, "/slow?delay=0.05")):
                got.append(result)

    task = asyncio.create_task(consume())
    while len(got) < 10:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(got) < 10_000
    await _quiet_finish(peer)


def test_timeout_around_run_sync_style_asyncio_run(peer: CountingServer) -> None:
    """asyncio.timeout around the loop: the run stops, asyncio.run finds nothing left over."""

    async def main() -> int:
        n = 0
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5), Runner(fast(concurrency=4)) as runner:
                async for _ in runner.run(Counted(peer.url, 10_000, "/slow?delay=0.1")):
                    n += 1
        assert asyncio.all_tasks() == {asyncio.current_task()}
        return n

    assert 0 < asyncio.run(main()) < 10_000
    assert peer.wait_closed() == 0


# --- types, as a mypy --strict user sees them ---------------------------------------------------

TYPED_EXAMPLE = """
from __future__ import annotations

import asyncio
from typing import Any, assert_type

import fetcher


async def main() -> None:
    settings = fetcher.Settings(concurrency=10, retries=0)
    async with fetcher.Runner(settings) as runner:
        async for result in runner.run([{"url": "http://127.0.0.1:9/"}]):
            assert_type(result, fetcher.Result)
            assert_type(result.ok, bool)
            assert_type(result.id, str)
            assert_type(result.status, int | None)
            assert_type(result.headers, dict[str, str] | None)
            error = result.error
            if error is not None:
                assert_type(error["message"], str)
                kind: fetcher.ErrorType = error["type"]
                assert kind in fetcher.ERROR_TYPES
            row: dict[str, Any] = result.to_dict()
            print(row)
    results = fetcher.run_sync([fetcher.HttpJob(id="a", url="http://127.0.0.1:9/")], settings)
    assert_type(results, list[fetcher.Result])
    schema: dict[str, Any] = fetcher.result_schema()
    print(schema)


asyncio.run(main())
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fetcher's wheel, built from the files the Dockerfile copies (the source tree stays clean)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "fetcher", src / "fetcher", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    (built,) = out.glob("fetcher-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory the wheel is installed into, as pip lays out site-packages."""
    site = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
         "--target", str(site), str(wheel)],
        capture_output=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    return site


def test_py_typed_ships() -> None:
    """PEP 561: without the marker, type checkers ignore fetcher's annotations."""
    assert importlib.resources.files("fetcher").joinpath("py.typed").is_file()
    with (ROOT / "pyproject.toml").open("rb") as f:
        package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["fetcher"]


def test_wheel_contains_py_typed(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        assert "fetcher/py.typed" in whl.namelist()


@pytest.mark.parametrize(
    "plugin",
    ["pydantic.mypy", None],
)
def test_precise_types_for_a_strict_mypy_user(
    tmp_path: Path, installed: Path, plugin: str | None
) -> None:
    example = tmp_path / "example.py"
    example.write_text(textwrap.dedent(TYPED_EXAMPLE))
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\nstrict = True\n" + (f"plugins = {plugin}\n" if plugin else ""))
    command = [sys.executable, "-m", "mypy", "--config-file", str(config), str(example)]
    # fetcher as a user has it: installed from the wheel, found on sys.path like site-packages,
    # where mypy reads a package's types only if it has py.typed. (The editable install of the
    # development venv is an import hook mypy cannot follow, and MYPYPATH would skip the check.)
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    proc = subprocess.run(
        [*command, "--cache-dir", os.devnull],
        capture_output=True,
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(installed)},
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def test_invalid_job_type_is_exported() -> None:
    item = JobParser().parse({"url": 1}, 3)
    assert isinstance(item, InvalidJob) and item.to_result()["line"] == 3
