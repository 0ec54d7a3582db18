"""Shared fixtures: the fault server (tests/app.py), a closed port, and job/settings helpers."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from fetcher.jobs import HttpJob, InvalidJob, JobParser

from .app import ServerThread


@pytest.fixture(scope="session")
def server() -> Iterator[ServerThread]:
    """The fault server, one per test process, on 127.0.0.1 and a free port."""
    srv = ServerThread()
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def base_url(server: ServerThread) -> str:
    return server.url


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
def key(request: pytest.FixtureRequest) -> str:
    """A key unique to the test, for the server's per-key counters."""
    return request.node.name.replace("[", "-").replace("]", "").replace("/", "-")


def http_job(url: str, **fields: Any) -> HttpJob:
    """A validated HttpJob, or the test fails with the reason it was refused."""
    item = JobParser().parse({"id": fields.pop("id", "j"), "url": url, **fields}, 1)
    if isinstance(item, InvalidJob):
        pytest.fail(f"job refused: {item.type}: {item.message}")
    assert isinstance(item, HttpJob)
    return item
