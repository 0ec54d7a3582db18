"""Local peers for the security tests: recording HTTP servers, raw hostile servers, a forward
proxy, TLS material from trustme, and helpers to run jobs in process or through the CLI.

Everything binds to 127.0.0.0/8 or ::1 on port 0; nothing here resolves a real name.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from fetcher.config import Settings
from fetcher.http import HttpHandler
from fetcher.jobs import HttpJob, InvalidJob, JobParser
from fetcher.pool import Pool, RetryPolicy

from .helpers import FETCHER, assert_valid_results


@dataclass
class Seen:
    """What one server received: one entry per request, headers as sent."""

    requests: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.requests)


@dataclass
class Peer:
    url: str
    port: int
    seen: Seen


@asynccontextmanager
async def serve(
    app: web.Application, host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    """Serve ``app`` on ``host`` port 0; yields the base URL (no trailing slash)."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, 0, ssl_context=ssl_context)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    scheme = "https" if ssl_context else "http"
    shown = f"[{host}]" if ":" in host else host
    try:
        yield f"{scheme}://{shown}:{port}"
    finally:
        await runner.cleanup()


def recording_app(
    seen: Seen, extra: Callable[[web.Application], None] | None = None
) -> web.Application:
    """/echo answers 200 with the request's headers; /status/N; /redirect?to=URL&code=302."""

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.requests.append(
            {
                "method": request.method,
                "path": request.path_qs,
                "headers": dict(request.headers),
                "host": request.host,
            }
        )
        return await handler(request)  # type: ignore[no-any-return]

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"headers": dict(request.headers)})

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="status")

    async def redirect(request: web.Request) -> web.Response:
        code = int(request.query.get("code", "302"))
        return web.Response(status=code, headers={"Location": request.query["to"]})

    async def loop(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        return web.Response(status=302, headers={"Location": f"/loop/{n + 1}"})

    async def drop(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.close()
        return web.Response(text="never")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="late")

    app = web.Application(middlewares=[record])
    app.router.add_get("/echo", echo)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/loop/{n}", loop)
    app.router.add_get("/drop", drop)
    app.router.add_get("/slow", slow)
    if extra is not None:
        extra(app)
    return app


@asynccontextmanager
async def recording_server(
    host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[Peer]:
    seen = Seen()
    async with serve(recording_app(seen), host, ssl_context) as url:
        yield Peer(url=url, port=int(url.rsplit(":", 1)[1]), seen=seen)


@asynccontextmanager
async def raw_server(
    respond: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    host: str = "127.0.0.1",
) -> AsyncIterator[Peer]:
    """A TCP server that answers each connection with ``respond`` (a hostile peer)."""
    seen = Seen()

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            seen.requests.append({"raw": head})
            await respond(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_conn, host, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield Peer(url=f"http://{host}:{port}", port=port, seen=seen)
    finally:
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def forward_proxy(
    username: str | None = None, password: str | None = None
) -> AsyncIterator[Peer]:
    """A tiny HTTP forward proxy: takes absolute-form requests, fetches them, counts them.

    With credentials it answers 407 to requests without the matching Proxy-Authorization.
    """
    seen = Seen()
    expected = (
        "Basic " + base64.b64encode(f"{username}:{password or ''}".encode()).decode()
        if username is not None
        else None
    )

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.requests.append(
            {"method": request.method, "target": str(request.url), "headers": dict(request.headers)}
        )
        if expected is not None and request.headers.get("Proxy-Authorization") != expected:
            return web.Response(status=407, text="proxy auth required")
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in ("proxy-authorization", "proxy-connection", "host", "connection")
        }
        async with (
            aiohttp.ClientSession(auto_decompress=False) as s,
            s.request(
                request.method, request.url, headers=headers, allow_redirects=False
            ) as upstream,
        ):
            body = await upstream.read()
            return web.Response(
                status=upstream.status,
                body=body,
                headers={
                    "X-Via-Test-Proxy": "1",
                    "Content-Type": upstream.content_type,
                    **({"Location": loc} if (loc := upstream.headers.get("Location")) else {}),
                },
            )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    async with serve(app) as url:
        yield Peer(url=url, port=int(url.rsplit(":", 1)[1]), seen=seen)


def settings(**kw: Any) -> Settings:
    """Settings for a test: no retries' backoff to wait for, short timeouts."""
    base: dict[str, Any] = {"timeout": 5, "backoff_base": 0, "retries": 2}
    base.update(kw)
    return Settings(**base)


def job(spec: dict[str, Any], environ: dict[str, str] | None = None) -> HttpJob:
    parsed = JobParser(environ=environ or {}).parse(spec, 1)
    assert isinstance(parsed, HttpJob), parsed
    return parsed


def refused(spec: dict[str, Any], environ: dict[str, str] | None = None) -> InvalidJob:
    parsed = JobParser(environ=environ or {}).parse(spec, 1)
    assert isinstance(parsed, InvalidJob), parsed
    return parsed


async def run_jobs(s: Settings, *jobs: HttpJob) -> list[dict[str, Any]]:
    """Run jobs through the real handler and pool (retries included); results in input order."""
    out: list[dict[str, Any]] = []
    async with HttpHandler(s) as handler:
        pool = Pool(
            handlers={"http": handler},
            emit=out.append,
            concurrency=4,
            policy=RetryPolicy(retries=s.retries, backoff_base=0, backoff_max=0),
        )
        results = [await pool.run_job(j) for j in jobs]
    assert_valid_results(results)
    return results


async def run_one(s: Settings, spec: dict[str, Any]) -> dict[str, Any]:
    return (await run_jobs(s, job(spec)))[0]


@dataclass
class CliRun:
    code: int
    stdout: bytes
    stderr: bytes

    @property
    def results(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.stdout.splitlines() if line.strip()]


async def run_cli(
    *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None, timeout: float = 40
) -> CliRun:
    """Run the ``fetcher`` command while this loop keeps serving the test peers."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FETCHER_")}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        full_env.pop(name, None)
        full_env.pop(name.lower(), None)
    full_env.update(env or {})
    proc = await asyncio.create_subprocess_exec(
        *FETCHER,
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=full_env,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    assert proc.returncode is not None
    return CliRun(proc.returncode, out, err)


def write_jobs(path: Path, jobs: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(j) + b"\n" for j in jobs))
    return path


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@contextmanager
def blocking_tls_server(ctx: ssl.SSLContext) -> Iterator[Peer]:
    """A TLS server on a thread, using the blocking ssl module.

    asyncio's server side closes without sending the TLS alert when a handshake fails, so a
    client would see a bare reset; a blocking socket sends the alert, as real servers do.
    """
    seen = Seen()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    seen.requests.append({"raw": tls.recv(65536)})
                    tls.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                    )
            except OSError:
                pass
            finally:
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    try:
        yield Peer(url=f"https://127.0.0.1:{port}", port=port, seen=seen)
    finally:
        stop.set()
        thread.join(5)
        listener.close()
