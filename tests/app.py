"""A fault server for the HTTP tests: one aiohttp.web route per outcome fetcher must classify.

Routes (all under http://127.0.0.1:PORT):

    /ok                          200, a small text body
    /status/{code}               that status, a short body and an ``X-Status`` header
    /redirect/{n}                a chain of n redirects ending at /redirect/0 (200)
    /loop                        redirects to itself forever
    /to-file                     redirects to file:///etc/passwd
    /flaky/{key}/{n}             429 until the n-th request with this key, then 200;
                                 ``?ra=SECONDS`` or ``?date=SECONDS`` sets Retry-After
                                 (delta-seconds, or an HTTP date that far ahead)
    /count/{key}                 how many requests /flaky and /fail saw for ``key`` (JSON)
    /fail/{key}/{status}         always that status, counting requests per key
    /hang                        reads the request, never answers
    /trickle                     headers at once, then one byte every ``?interval=`` seconds
    /drop                        chunked body, connection closed mid-body
    /cl-lie                      Content-Length 1000, sends 10 bytes and closes
    /huge                        ``?size=`` bytes with Content-Length (``&chunked=1``: without)
    /gzip                        a small gzip-encoded text body
    /gzip-bomb                   a gzip body of ~20 KB that inflates to 20 MB
    /slow-big                    ``?size=`` bytes in 64 KiB blocks ``?interval=`` seconds apart
    /blob/{stem}.{ext}           a 3,200-byte body that depends only on the stem, typed by ext
    /noise                       ``?size=`` bytes that do not compress, by ``?seed=``
    /echo                        method, headers, query and body of the request as JSON
    /json                        a JSON body
    /not-json                    text that is not JSON, served as application/json
    /headers                     mixed-case and repeated response headers
    /many-headers                ``?n=`` (200) response header fields, past the client's limit
    /slow                        answers after ``?delay=`` seconds

The app keeps per-key counters in ``app[COUNTS]`` so that tests using distinct keys never share
state, whichever order they run in.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import random
import time
from email.utils import formatdate

from aiohttp import web
from multidict import CIMultiDict

from tests.peers.base import AppThread

COUNTS = web.AppKey("counts", dict)
BOMB = web.AppKey("bomb", bytes)

BOMB_INFLATED = 20 * 1024 * 1024
GZIP_TEXT = b"hello, compressed world\n" * 100
JSON_BODY = {"name": "fetcher", "items": [1, 2, 3], "nested": {"ok": True}}


async def ok(request: web.Request) -> web.Response:
    return web.Response(text="hello\n")


async def peer(request: web.Request) -> web.Response:
    """The client's port: which connection the request came on."""
    assert request.transport is not None
    return web.Response(text=str(request.transport.get_extra_info("peername")[1]))


async def status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    return web.Response(status=code, text=f"status {code}\n", headers={"X-Status": str(code)})


async def redirect(request: web.Request) -> web.Response:
    n = int(request.match_info["n"])
    if n == 0:
        return web.Response(text="end of the chain\n")
    raise web.HTTPFound(f"/redirect/{n - 1}")


async def loop(request: web.Request) -> web.Response:
    raise web.HTTPFound("/loop")


async def to_file(request: web.Request) -> web.Response:
    raise web.HTTPFound("file:///etc/passwd")


def _count(request: web.Request) -> int:
    counts: dict[str, int] = request.app[COUNTS]
    key = request.match_info["key"]
    counts[key] = counts.get(key, 0) + 1
    return counts[key]


async def flaky(request: web.Request) -> web.Response:
    seen = _count(request)
    if seen >= int(request.match_info["n"]):
        return web.Response(text=f"ok after {seen}\n")
    headers = {}
    if "ra" in request.query:
        headers["Retry-After"] = request.query["ra"]
    elif "date" in request.query:
        headers["Retry-After"] = formatdate(time.time() + float(request.query["date"]), usegmt=True)
    return web.Response(status=429, text="slow down\n", headers=headers)


async def fail(request: web.Request) -> web.Response:
    _count(request)
    return web.Response(status=int(request.match_info["status"]), text="failing\n")


async def count(request: web.Request) -> web.Response:
    return web.json_response({"count": request.app[COUNTS].get(request.match_info["key"], 0)})


async def hang(request: web.Request) -> web.Response:
    await request.read()
    # The runner cancels this handler when the client goes away (handler_cancellation=True).
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def trickle(request: web.Request) -> web.StreamResponse:
    interval = float(request.query.get("interval", "1"))
    resp = web.StreamResponse()
    resp.content_length = 100
    await resp.prepare(request)
    for _ in range(100):
        await resp.write(b"x")
        await asyncio.sleep(interval)
    await resp.write_eof()
    return resp


def _cut(request: web.Request) -> None:
    transport = request.transport
    assert transport is not None
    transport.close()


async def drop(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    await resp.write(b"a" * 500)
    await asyncio.sleep(0.05)
    _cut(request)
    return resp


async def cl_lie(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    resp.content_length = 1000
    await resp.prepare(request)
    await resp.write(b"b" * 10)
    await asyncio.sleep(0.05)
    _cut(request)
    return resp


async def huge(request: web.Request) -> web.StreamResponse:
    size = int(request.query.get("size", str(5 * 1024 * 1024)))
    resp = web.StreamResponse()
    if "chunked" in request.query:
        resp.enable_chunked_encoding()
    else:
        resp.content_length = size
    await resp.prepare(request)
    if request.method == "HEAD":
        return resp  # the headers only, with the Content-Length a GET would have
    block = b"z" * 65536
    sent = 0
    try:
        while sent < size:
            piece = block[: size - sent]
            await resp.write(piece)
            sent += len(piece)
        await resp.write_eof()
    except ConnectionError:
        pass  # the client stopped reading at max_bytes, as it should
    return resp


async def slow_big(request: web.Request) -> web.StreamResponse:
    """``size`` bytes in 64 KiB blocks, ``interval`` seconds apart: a download to kill midway."""
    size = int(request.query.get("size", str(1024 * 1024)))
    interval = float(request.query.get("interval", "0.05"))
    resp = web.StreamResponse()
    resp.content_length = size
    await resp.prepare(request)
    sent = 0
    while sent < size:
        piece = min(65536, size - sent)
        await resp.write(b"s" * piece)
        sent += piece
        await asyncio.sleep(interval)
    await resp.write_eof()
    return resp


async def blob(request: web.Request) -> web.Response:
    """A body that depends only on ``name``'s stem, typed by its extension."""
    name = request.match_info["name"]
    stem, _, ext = name.partition(".")
    types = {"png": "image/png", "pdf": "application/pdf", "txt": "text/plain"}
    return web.Response(
        body=blob_bytes(stem), content_type=types.get(ext, "application/octet-stream")
    )


async def noise(request: web.Request) -> web.Response:
    """``size`` bytes that do not compress, the same for the same ``seed``."""
    size = int(request.query.get("size", "1000"))
    seed = request.query.get("seed", "0")
    return web.Response(body=random.Random(seed).randbytes(size))


def blob_bytes(stem: str) -> bytes:
    return hashlib.sha256(stem.encode()).digest() * 100


async def gzipped(request: web.Request) -> web.Response:
    return web.Response(
        body=gzip.compress(GZIP_TEXT),
        headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"},
    )


async def gzip_bomb(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[BOMB],
        headers={"Content-Encoding": "gzip", "Content-Type": "application/octet-stream"},
    )


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path": request.path,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "params": {k: request.query.getall(k) for k in request.query},
            "body": body.decode("utf-8", errors="replace"),
        }
    )


async def json_body(request: web.Request) -> web.Response:
    return web.json_response(JSON_BODY)


async def not_json(request: web.Request) -> web.Response:
    return web.Response(text="this is {not json", content_type="application/json")


async def headers(request: web.Request) -> web.Response:
    resp = web.Response(text="h\n")
    resp.headers["X-Mixed-Case"] = "Value"
    resp.headers.add("X-Repeated", "one")
    resp.headers.add("X-Repeated", "two")
    return resp


async def content_types(request: web.Request) -> web.Response:
    """Two Content-Type headers: a result line joins them, in order."""
    types = [("Content-Type", "text/plain"), ("content-type", "text/x-second")]
    return web.Response(body=b"t\n", headers=CIMultiDict(types))


async def many_headers(request: web.Request) -> web.Response:
    resp = web.Response(text="h\n")
    for i in range(int(request.query.get("n", "200"))):
        resp.headers[f"X-Field-{i}"] = "v"
    return resp


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("delay", "0.2")))
    return web.Response(text="slow\n")


def make_app() -> web.Application:
    app = web.Application()
    app[COUNTS] = {}
    app[BOMB] = gzip.compress(b"\0" * BOMB_INFLATED, compresslevel=9)
    route = web.route
    app.add_routes(
        [
            web.get("/ok", ok),
            web.get("/peer", peer),
            route("*", "/status/{code:\\d+}", status),
            web.get("/redirect/{n:\\d+}", redirect),
            web.get("/loop", loop),
            web.get("/to-file", to_file),
            route("*", "/flaky/{key}/{n:\\d+}", flaky),
            route("*", "/fail/{key}/{status:\\d+}", fail),
            web.get("/count/{key}", count),
            route("*", "/hang", hang),
            web.get("/trickle", trickle),
            web.get("/drop", drop),
            web.get("/cl-lie", cl_lie),
            web.get("/huge", huge),
            web.get("/gzip", gzipped),
            web.get("/slow-big", slow_big),
            web.get("/blob/{name}", blob),
            web.get("/noise", noise),
            web.get("/gzip-bomb", gzip_bomb),
            route("*", "/echo", echo),
            web.get("/json", json_body),
            web.get("/not-json", not_json),
            web.get("/headers", headers),
            web.get("/many-headers", many_headers),
            web.get("/content-types", content_types),
            web.get("/slow", slow),
        ]
    )
    return app


class ServerThread(AppThread):
    """Serves ``make_app()`` on 127.0.0.1 from a thread with its own event loop.

    Usable from sync tests (subprocesses) and from async tests on another loop alike.
    """

    def __init__(self) -> None:
        super().__init__("fault-server", handler_cancellation=True, shutdown_timeout=1)

    def make_app(self) -> web.Application:
        return make_app()

    def count(self, key: str) -> int:
        counts: dict[str, int] = self._runner.app[COUNTS] if self._runner else {}
        return counts.get(key, 0)
