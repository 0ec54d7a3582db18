"""Compile the fetcher package's bytecode before it is timed.

A pip install from a wheel writes ``.pyc`` files, so an installed fetcher starts from cached
bytecode. An editable checkout run with ``PYTHONDONTWRITEBYTECODE=1`` (common in CI and container
environments) would instead compile every module from source at each start, about 30 ms per
process that no user of an installed fetcher pays. ``compileall`` writes the cache whatever that
variable says; Python reads a cache that exists either way.
"""

from __future__ import annotations

import compileall
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fetcher"


def compile_package() -> None:
    compileall.compile_dir(PACKAGE, quiet=1)
