"""Hostile servers: decompression bombs, oversized headers, endless bodies and redirect tricks."""

from __future__ import annotations

import asyncio
import functools
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import brotli
import pytest
from aiohttp import web
from backports import zstd

from .security_peers import raw_server, recording_server, run_one, serve, settings

INFLATED = 1 << 30  # 1 GiB of zeros once decompressed
MiB = 1 << 20


def _deflate_body() -> tuple[bytes, int]:
    """Raw deflate blocks for INFLATED zero bytes, built from one repeated full-flush block."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(b"\0" * MiB) + c.flush(zlib.Z_FULL_FLUSH)
    final = zlib.compressobj(9, zlib.DEFLATED, -15).flush()
    return block * (INFLATED // MiB) + final, INFLATED


@functools.cache
def bomb(encoding: str) -> bytes:
    if encoding in ("gzip", "deflate"):
        body, size = _deflate_body()
        if encoding == "gzip":
            crc = 0
            chunk = b"\0" * MiB
            for _ in range(size // MiB):
                crc = zlib.crc32(chunk, crc)
            return (
                b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
                + body
                + struct.pack("<II", crc, size & 0xFFFFFFFF)
            )
        adler = 1
        chunk = b"\0" * MiB
        for _ in range(size // MiB):
            adler = zlib.adler32(chunk, adler)
        return b"\x78\x9c" + body + struct.pack(">I", adler)
    chunk = b"\0" * (4 * MiB)
    if encoding == "br":
        bc = brotli.Compressor(quality=1)
        return b"".join(bc.process(chunk) for _ in range(INFLATED // len(chunk))) + bc.finish()
    zc = zstd.ZstdCompressor(level=1)
    return b"".join(zc.compress(chunk) for _ in range(INFLATED // len(chunk))) + zc.flush()


def test_bombs_are_real() -> None:
    """The test bombs do inflate (checked on a prefix, without building a gigabyte)."""
    for enc, decompress in (
        ("gzip", lambda b: zlib.decompressobj(31).decompress(b, 8 * MiB)),
        ("deflate", lambda b: zlib.decompressobj().decompress(b, 8 * MiB)),
        ("br", lambda b: brotli.Decompressor().process(b[:4096])),
        ("zstd", lambda b: zstd.ZstdDecompressor().decompress(b, 8 * MiB)),
    ):
        data = bomb(enc)
        assert len(data) < 2 * MiB, enc
        assert len(decompress(data)) >= MiB, enc


def bomb_app(encoding: str, hits: list[int]) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        hits.append(1)
        return web.Response(
            body=bomb(encoding),
            headers={"Content-Encoding": encoding, "Content-Type": "application/octet-stream"},
        )

    app = web.Application()
    app.router.add_get("/bomb", handler)
    return app


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
@pytest.mark.parametrize("body", ["none", "base64"])
async def test_decompression_bomb_is_too_large_in_small_memory(encoding: str, body: str) -> None:
    bomb(encoding)  # build outside the measured region
    hits: list[int] = []
    async with serve(bomb_app(encoding, hits)) as url:
        s = settings(max_bytes=MiB, retries=2)
        tracemalloc.start()
        try:
            result = await run_one(s, {"id": "b", "url": url + "/bomb", "body": body})
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert result["error"] is not None and result["error"]["type"] == "too_large", result
    assert result["attempts"] == 1 and hits == [1]
    assert "body" not in result or result["body"] is None
    # The body is a gigabyte inflated; what was held stays near max_bytes.
    assert peak < 40 * MiB, peak


async def test_bomb_within_a_job_max_bytes_override() -> None:
    hits: list[int] = []
    async with serve(bomb_app("zstd", hits)) as url:
        result = await run_one(settings(), {"id": "b", "url": url + "/bomb", "max_bytes": 1000})
    assert result["error"]["type"] == "too_large"


async def test_endless_chunked_body_is_too_large() -> None:
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
        for _ in range(10_000):
            writer.write(chunk)
            await writer.drain()

    async with raw_server(respond) as peer:
        result = await run_one(settings(max_bytes=MiB), {"id": "e", "url": peer.url + "/"})
    assert result["error"]["type"] == "too_large"


async def test_declared_length_over_max_bytes_is_refused_early() -> None:
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000000\r\n\r\nabc")
        await writer.drain()
        await asyncio.sleep(2)

    async with raw_server(respond) as peer:
        result = await run_one(settings(max_bytes=MiB), {"id": "e", "url": peer.url + "/"})
    assert result["error"]["type"] == "too_large"
    assert result["elapsed_ms"] < 1500


def _headers(block: bytes) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]:
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n" + block + b"Content-Length: 2\r\n\r\nok")
        await writer.drain()

    return respond


@pytest.mark.parametrize(
    "block",
    [
        b"X-Huge: " + b"a" * 100_000 + b"\r\n",
        b"".join(b"X-H%d: v\r\n" % i for i in range(5000)),
        b"X-Long: " + b"a" * 9000 + b"\r\n",
        b"".join(b"X-H%d: v\r\n" % i for i in range(200)),
    ],
    ids=["100KB-line", "5000-headers", "9000-byte-line", "200-headers"],
)
async def test_header_block_past_limits_is_protocol(block: bytes) -> None:
    async with raw_server(_headers(block)) as peer:
        result = await run_one(settings(retries=1), {"id": "h", "url": peer.url + "/"})
    assert result["error"]["type"] == "protocol", result
    assert result["attempts"] == 2  # protocol failures are retryable
    assert len(result["error"]["message"]) < 300
    assert "aaaa" not in result["error"]["message"]


async def test_garbage_status_line_is_protocol() -> None:
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()

    async with raw_server(respond) as peer:
        result = await run_one(settings(retries=0), {"id": "g", "url": peer.url + "/"})
    assert result["error"]["type"] == "protocol", result


async def test_connection_closed_mid_body_is_protocol() -> None:
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nshort")
        await writer.drain()

    async with raw_server(respond) as peer:
        result = await run_one(settings(retries=0), {"id": "m", "url": peer.url + "/"})
    assert result["error"]["type"] == "protocol", result


async def test_endless_redirect_loop() -> None:
    async with recording_server() as peer:
        result = await run_one(settings(max_redirects=5), {"id": "l", "url": peer.url + "/loop/0"})
    assert result["error"]["type"] == "too_many_redirects", result
    assert result["attempts"] == 1
    assert len(peer.seen) == 6


@pytest.mark.parametrize(
    "target",
    ["file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://127.0.0.1:70/", "javascript:alert(1)"],
)
async def test_redirect_to_other_scheme_is_refused(target: str) -> None:
    async with recording_server() as peer:
        result = await run_one(settings(), {"id": "r", "url": f"{peer.url}/redirect?to={target}"})
    assert result["error"]["type"] == "too_many_redirects", result
    assert result["attempts"] == 1


async def test_redirect_to_denied_address_is_blocked() -> None:
    async with recording_server() as peer, recording_server(host="127.0.0.9") as inner:
        s = settings(network={"deny_networks": ["127.0.0.9/32"]})
        result = await run_one(s, {"id": "r", "url": f"{peer.url}/redirect?to={inner.url}/echo"})
    assert result["error"]["type"] == "blocked", result
    assert len(inner.seen) == 0
