"""Per-attempt deadlines for many attempts at once, kept by one periodic timer.

``asyncio.timeout`` arms a loop timer per attempt; on uvloop arming and cancelling one costs
about 4 us, a twentieth of the whole cost of a small request. Here every attempt in flight is
registered with its deadline in a dict, and one timer, every ``TICK`` seconds while attempts
are in flight, cancels the tasks whose deadline has passed. A deadline so fires up to ``TICK``
late, which no caller of a whole-attempt timeout can tell from network jitter.

Only a task suspended between its ``start()`` and ``stop()`` is ever cancelled: the sweep runs
between task steps, and a task leaves the dict in ``stop()``. So the cancellation always lands
in the section it was meant for, never in whatever the task does next.
"""

from __future__ import annotations

import asyncio

TICK = 0.05

Task = asyncio.Task[object]


class Deadlines:
    """Deadlines of sections of tasks::

    task = deadlines.start(seconds)
    try:
        ...
    except asyncio.CancelledError:
        if deadlines.passed(task):   # ours, and nobody else cancelled the task too
            ...                      # the section timed out
        raise
    finally:
        deadlines.stop(task)
    """

    def __init__(self, tick: float = TICK) -> None:
        self._tick = tick
        self._due: dict[Task, float] = {}
        self._expired: set[Task] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, seconds: float) -> Task:
        """Give the current task's section ``seconds``; returns the task for the other calls."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        # Given the loop, current_task() skips get_running_loop() (and its getpid() syscall).
        task: Task | None = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("a deadline needs a task")
        self._due[task] = loop.time() + seconds
        if self._timer is None:
            self._timer = loop.call_later(self._tick, self._sweep)
        return task

    def passed(self, task: Task) -> bool:
        """For a CancelledError in the section: True when the deadline cancelled it and
        nothing else did (the task's cancellation is then undone)."""
        if task not in self._expired:
            return False
        self._expired.discard(task)
        return task.uncancel() == 0

    def stop(self, task: Task) -> None:
        """The section is over (whatever its outcome)."""
        self._due.pop(task, None)
        if self._expired and task in self._expired:
            # Cancelled by the deadline, but the section swallowed the CancelledError.
            self._expired.discard(task)
            task.uncancel()

    def _sweep(self) -> None:
        self._timer = None
        due = self._due
        if not due:
            return  # nothing in flight: the next start() arms the timer again
        assert self._loop is not None
        now = self._loop.time()
        for task in [task for task, when in due.items() if when <= now]:
            del due[task]
            self._expired.add(task)
            task.cancel()
        self._timer = self._loop.call_later(self._tick, self._sweep)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
