"""Signals that arrive before the event loop runs.

The CLI installs these handlers first thing, before the heavy imports, so a SIGTERM during start-up
is remembered rather than killing the process; the run stops as soon as it starts.
"""

from __future__ import annotations

import signal
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

#  The signal received before the run could take it, if any.
pending: list[signal.Signals] = []


def _remember(signum: int, frame: FrameType | None) -> None:
    pending[:] = [signal.Signals(signum)]


def install_early_handlers() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _remember)
