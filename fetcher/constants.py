"""Names fixed by the interface that more than one layer needs: a leaf, importing nothing."""

from __future__ import annotations

#  Scale-out stream and group names (here, not in scaleout.py, so the CLI can show them
#  without importing redis on every command).
DEFAULT_STREAM = "fetcher:jobs"
DEFAULT_RESULTS = "fetcher:results"
DEFAULT_GROUP = "fetcher"
