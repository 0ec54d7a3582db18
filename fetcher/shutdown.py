"""Stopping a run: the one lifecycle of ``run``, ``--processes`` and ``worker``.

Signals that arrive before the event loop runs: the CLI installs these handlers first thing,
before the heavy imports, so a SIGTERM during start-up is remembered rather than killing the
process; the run stops as soon as it starts (``replay``). Once the loop runs, ``stop_signals``
routes SIGINT and SIGTERM to the command, which stops its pool with ``Grace``: no new jobs,
``shutdown_grace`` seconds for those in flight, then abort; a second signal aborts at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Protocol

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

#  The signal received before the run could take it, if any.
pending: list[signal.Signals] = []


def _remember(signum: int, frame: FrameType | None) -> None:
    pending[:] = [signal.Signals(signum)]


def install_early_handlers() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _remember)


@contextlib.contextmanager
def stop_signals(on_signal: Callable[[signal.Signals], None]) -> Iterator[None]:
    """SIGINT and SIGTERM go to ``on_signal`` on the running loop while inside; a signal that
    came before (``pending``) is handled by the caller once it can, with ``replay``."""
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        yield
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


def replay(on_signal: Callable[[signal.Signals], None]) -> None:
    """Hand a signal that arrived during start-up to ``on_signal``, now that it can act."""
    if pending:
        on_signal(pending[0])


class Grace:
    """Stop → grace → abort for a pool: ``begin`` stops it taking jobs and aborts what is still
    in flight ``seconds`` later; a second signal aborts at once (``now``)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._timer: asyncio.TimerHandle | None = None

    def begin(self, pool: Stoppable) -> None:
        pool.stop()
        self._timer = asyncio.get_running_loop().call_later(self.seconds, pool.abort)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Stoppable(Protocol):
    def stop(self) -> None: ...
    def abort(self) -> None: ...
