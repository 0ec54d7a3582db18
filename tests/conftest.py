"""Shared fixtures: the fault server (tests/app.py), a closed port, and job/settings helpers."""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from fetcher.jobs import HttpJob, InvalidJob, JobParser

from . import helpers
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


# -- every result line a test leaves on disk is checked against the result schema --------------
#
# The helpers tests read results through (test_e2e.json_lines, the run_jobs of test_mail,
# test_adaptive and security_peers) validate what they return themselves (tests/helpers.py).
# After each test of these modules, every result line left in its tmp_path (output files, also
# of test_crash and test_processes) is validated too. Torn lines (crash tests write them on
# purpose) are skipped; lines that are not results (job files) are told apart by the fields
# every result carries.

_SCHEMA_CHECKED = {
    "test_e2e",
    "test_crash",
    "test_processes",
    "test_mail",
    "test_api",
    "test_scaleout",
    "test_metrics",
    "test_security",
    "test_adaptive",
    "test_hostile",
    "test_save",
    "test_warc",
    "test_inputs",
    "test_reruns",
    "test_proxy",
}
#  Per file: the memory test writes 200,000 lines, all alike.
_SCHEMA_MAX_LINES = 2_000


@pytest.fixture(scope="session")
def result_validator() -> Any:
    """A jsonschema Draft 2020-12 validator of the result schema."""
    return helpers.result_validator()


def _check_results_in(root: Path) -> None:
    for path in root.rglob("*"):
        if not path.is_file() or path.suffix not in (".jsonl", ".ndjson", ".json", ""):
            continue
        with path.open("rb") as f:
            for raw in itertools.islice(f, _SCHEMA_MAX_LINES):
                try:
                    obj = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    continue
                if helpers.is_result(obj):
                    helpers.assert_valid_result(obj)


@pytest.fixture(autouse=True)
def _results_left_match_the_schema(request: pytest.FixtureRequest) -> Iterator[None]:
    module = request.module
    if module is None or module.__name__.rpartition(".")[2] not in _SCHEMA_CHECKED:
        yield
        return
    #  Taken now, so that tmp_path is torn down after this fixture, not before.
    tmp_path = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if tmp_path is not None:
        _check_results_in(tmp_path)
