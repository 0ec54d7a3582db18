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
import logging
import signal
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, Protocol

log = logging.getLogger("fetcher")

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
    """Stop → grace → abort for a pool. ``take`` meets each stop signal: the first is the
    caller's to act on (``begin`` stops the pool taking jobs and aborts what is still in flight
    ``seconds`` later), a second aborts at once, and one that comes before there is a pool is
    kept in ``pending`` for ``replay``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.signal: signal.Signals | None = None  # the first stop signal taken
        self._timer: asyncio.TimerHandle | None = None

    def take(self, sig: signal.Signals, pool: Stoppable | None, *, second_note: str = "") -> bool:
        """Whether ``sig`` is the first stop signal, to be acted on by the caller (logged here)."""
        if pool is None:
            pending[:] = [sig]
            return False
        if self.signal is not None:
            log.warning("second signal: stopping now%s", second_note)
            pool.abort()
            return False
        self.signal = sig
        log.warning(
            "%s: no new jobs; waiting up to %g s for %d in flight (signal again to stop now)",
            sig.name,
            self.seconds,
            pool.counters.in_flight,
        )
        return True

    def begin(self, pool: Stoppable) -> None:
        pool.stop()
        self._timer = asyncio.get_running_loop().call_later(self.seconds, pool.abort)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Stoppable(Protocol):
    @property
    def counters(self) -> Any: ...
    def stop(self) -> None: ...
    def abort(self) -> None: ...
