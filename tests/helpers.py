"""What many test modules share: the command as a user runs it, and the result schema check."""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable
from typing import Any

#  The fetcher command, as `python -m fetcher` of the interpreter running the tests.
FETCHER = [sys.executable, "-m", "fetcher"]

#  The fields every result line carries: a dict without them is not a result (a job line, say).
RESULT_KEYS = frozenset({"id", "ok", "attempts", "started_at", "elapsed_ms", "error"})


@functools.cache
def result_validator() -> Any:
    """A jsonschema Draft 2020-12 validator of the result schema (`fetcher schema results`)."""
    import jsonschema

    from fetcher.schema import result_schema

    return jsonschema.Draft202012Validator(result_schema())


def is_result(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.keys() >= RESULT_KEYS


def assert_valid_result(result: Any) -> None:
    """Fail with the first schema error of ``result``, if any."""
    errors = sorted(result_validator().iter_errors(result), key=lambda e: list(e.path))
    assert not errors, f"result does not match the schema: {errors[0].message}\n{result}"


def assert_valid_results(results: Iterable[Any]) -> None:
    for result in results:
        if is_result(result):
            assert_valid_result(result)
