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


# -- every result line the end-to-end tests see is checked against the result schema -------------
#
# Without touching those tests: the helpers they read results through (test_e2e's json_lines,
# test_mail's run_jobs) are wrapped to validate what they return, and after each test every
# result line left in its tmp_path (output files, also of test_crash and test_processes) is
# validated too. Torn lines (crash tests write them on purpose) are skipped; lines that are not
# results (job files) are told apart by the fields every result carries.

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
}
_SCHEMA_WRAPPED = ("json_lines", "run_jobs")
_RESULT_KEYS = frozenset({"id", "ok", "attempts", "started_at", "elapsed_ms", "error"})
#  Per file: the memory test writes 200,000 lines, all alike.
_SCHEMA_MAX_LINES = 2_000


@pytest.fixture(scope="session")
def result_validator() -> Any:
    """A jsonschema Draft 2020-12 validator of the result schema."""
    import jsonschema

    from fetcher.schema import result_schema

    return jsonschema.Draft202012Validator(result_schema())


def assert_valid_result(validator: Any, result: Any) -> None:
    """Fail with the first schema error of ``result``, if any."""
    errors = sorted(validator.iter_errors(result), key=lambda e: list(e.path))
    assert not errors, f"result does not match the schema: {errors[0].message}\n{result}"


def _check_results_in(validator: Any, root: Any) -> None:
    import itertools

    import orjson

    for path in root.rglob("*"):
        if not path.is_file() or path.suffix not in (".jsonl", ".ndjson", ".json", ""):
            continue
        with path.open("rb") as f:
            for raw in itertools.islice(f, _SCHEMA_MAX_LINES):
                try:
                    obj = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    continue
                if _is_result(obj):
                    assert_valid_result(validator, obj)


def _is_result(obj: Any) -> bool:
    #  Some tests write made-up partial lines (a file to resume): only whole results count.
    return isinstance(obj, dict) and obj.keys() >= _RESULT_KEYS


def _validating(validator: Any, fn: Any) -> Any:
    import functools
    import inspect

    def check(value: Any) -> Any:
        for result in value.values() if isinstance(value, dict) else value:
            if _is_result(result):
                assert_valid_result(validator, result)
        return value

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            return check(await fn(*args, **kwargs))

        return async_wrapper

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return check(fn(*args, **kwargs))

    return wrapper


@pytest.fixture(autouse=True)
def _results_match_the_schema(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    module = request.module
    if module is None or module.__name__.rpartition(".")[2] not in _SCHEMA_CHECKED:
        yield
        return
    validator = request.getfixturevalue("result_validator")
    #  Taken now, so that tmp_path is torn down after this fixture, not before.
    tmp_path = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    for name in _SCHEMA_WRAPPED:
        fn = getattr(module, name, None)
        if fn is not None:
            monkeypatch.setattr(module, name, _validating(validator, fn))
    yield
    if tmp_path is not None:
        _check_results_in(validator, tmp_path)
