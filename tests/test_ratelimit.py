"""KeyedSlots, KeyedRate and AdaptiveSlots with an injected clock: no network, no real waiting."""

from __future__ import annotations

import asyncio

import pytest

from fetcher.ratelimit import AdaptiveSlots, KeyedRate, KeyedSlots


class Clock:
    """A fake monotonic clock whose sleep moves time forward at once."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def adaptive(ceiling: int = 8, **kw: float) -> tuple[AdaptiveSlots, Clock]:
    clock = Clock()
    return AdaptiveSlots(ceiling, clock=clock, sleep=clock.sleep, **kw), clock


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


# --- KeyedSlots and KeyedRate ------------------------------------------------------------------


async def test_keyed_slots_caps_each_key_and_forgets_idle_keys() -> None:
    slots = KeyedSlots(2)
    await slots.acquire("a")
    await slots.acquire("a")
    await slots.acquire("b")
    third = asyncio.create_task(slots.acquire("a"))
    await settle()
    assert not third.done()
    slots.release("a")
    await third
    for key in ("a", "a", "b"):
        slots.release(key)
    assert len(slots) == 0


async def test_keyed_slots_without_a_limit_keeps_nothing() -> None:
    slots = KeyedSlots(0)
    for i in range(1000):
        await slots.acquire(f"h{i}")
    assert len(slots) == 0


async def test_keyed_rate_spaces_starts_per_key() -> None:
    clock = Clock()
    rate = KeyedRate(10, clock=clock, sleep=clock.sleep)
    await rate.acquire("a")
    await rate.acquire("a")
    await rate.acquire("b")
    assert clock.sleeps == [pytest.approx(0.1)]


# --- AdaptiveSlots: the window ----------------------------------------------------------------


async def test_a_healthy_host_gets_the_whole_ceiling_and_leaves_no_entry() -> None:
    slots, _ = adaptive(4)
    for _ in range(4):
        await slots.acquire("h")
    fifth = asyncio.create_task(slots.acquire("h"))
    await settle()
    assert not fifth.done()
    slots.feedback("h", status=200, latency=0.05)
    slots.release("h")
    await fifth
    for _ in range(4):
        slots.feedback("h", status=200, latency=0.05)
        slots.release("h")
    assert len(slots) == 0
    assert slots.limit("h") == 4.0


async def test_million_hosts_cost_nothing_once_done() -> None:
    slots, _ = adaptive(8)
    for i in range(20_000):
        key = f"host{i}"
        await slots.acquire(key)
        slots.feedback(key, status=200, latency=0.01)
        slots.release(key)
    assert len(slots) == 0


@pytest.mark.parametrize(
    "signal",
    [
        {"status": 429},
        {"status": 503},
        {"status": 200, "retry_after": 0.0},
        {"error": "connect"},
        {"error": "timeout"},
    ],
)
async def test_pressure_multiplies_the_window_down(signal: dict[str, object]) -> None:
    slots, _ = adaptive(8)
    for _ in range(8):
        await slots.acquire("h")
    slots.feedback("h", latency=0.01, **signal)  # type: ignore[arg-type]
    assert slots.limit("h") == pytest.approx(8 * AdaptiveSlots.BETA)


@pytest.mark.parametrize(
    "signal", [{"status": 404}, {"status": 500}, {"error": "dns"}, {"error": "tls"}]
)
async def test_answers_about_the_request_are_not_pressure(signal: dict[str, object]) -> None:
    slots, _ = adaptive(8)
    await slots.acquire("h")
    slots.feedback("h", latency=0.01, **signal)  # type: ignore[arg-type]
    assert slots.limit("h") == 8.0


async def test_one_cut_per_round_trip() -> None:
    slots, clock = adaptive(10)
    for _ in range(10):
        await slots.acquire("h")
    clock.now += 0.05
    # Every attempt of the first window answers 429: that is one overload, not ten.
    for _ in range(10):
        slots.feedback("h", status=429, latency=0.05)
        slots.release("h")
    assert slots.limit("h") == pytest.approx(7.0)
    # An attempt that started after the cut brings news.
    await slots.acquire("h")
    clock.now += 0.01
    slots.feedback("h", status=429, latency=0.01)
    slots.release("h")
    assert slots.limit("h") == 1.0  # in flight was 1: the window shrinks to it, never below 1


async def test_the_cut_starts_from_what_was_in_flight_not_the_ceiling() -> None:
    slots, _ = adaptive(1000)
    for _ in range(10):
        await slots.acquire("h")
    slots.feedback("h", status=429, latency=0.0)
    assert slots.limit("h") == pytest.approx(7.0)


async def test_a_smaller_window_holds_new_attempts_back() -> None:
    slots, _ = adaptive(4)
    for _ in range(4):
        await slots.acquire("h")
    slots.feedback("h", status=429, latency=0.0)  # window 4 -> 2.8: two may run
    slots.release("h")
    waiter = asyncio.create_task(slots.acquire("h"))
    await settle()
    assert not waiter.done()  # 3 in flight, window 2
    slots.release("h")
    await settle()
    assert not waiter.done()  # 2 in flight
    slots.release("h")
    await asyncio.wait_for(waiter, 1)


async def test_successes_grow_the_window_back_to_the_ceiling() -> None:
    slots, clock = adaptive(4)
    for _ in range(4):
        await slots.acquire("h")
    slots.feedback("h", status=429, latency=0.0)
    slots.release("h")
    slots.release("h")
    held = 2
    assert slots.limit("h") < 3
    for _ in range(400):
        if slots.limit("h") >= 4:
            break
        while held < int(slots.limit("h")):  # keep the window in use, as a busy run does
            await slots.acquire("h")
            held += 1
        clock.now += 0.02
        slots.feedback("h", status=200, latency=0.02)
        slots.release("h")
        await slots.acquire("h")
    assert slots.limit("h") == 4.0
    for _ in range(held):
        slots.release("h")
    assert len(slots) == 0  # back at the ceiling and idle: forgotten


async def test_growth_slows_near_the_window_that_was_too_much() -> None:
    slots, clock = adaptive(16)
    for _ in range(5):
        await slots.acquire("h")
    slots.feedback("h", status=429, latency=0.0)  # overload at 5 in flight: window 3.5
    slots.release("h")
    slots.release("h")  # 3 in flight: the window is in use

    def grow(n: int) -> float:
        before = slots.limit("h")
        for _ in range(n):
            clock.now += 0.02
            slots.feedback("h", status=200, latency=0.02)
        return slots.limit("h") - before

    fast = grow(1)
    assert fast == pytest.approx(1 / 3.5)
    grow(2)  # now past 4 = w_max - 1
    assert 4.0 <= slots.limit("h") < 4.2
    await slots.acquire("h")  # use the fourth slot so growth counts
    slow = grow(1)
    assert slow == pytest.approx(fast * 3.5 / slots.limit("h") / AdaptiveSlots.PROBE, rel=0.1)


async def test_an_unused_window_does_not_grow() -> None:
    slots, _ = adaptive(8)
    for _ in range(8):
        await slots.acquire("h")
    slots.feedback("h", status=429, latency=0.0)
    for _ in range(7):
        slots.release("h")
    before = slots.limit("h")
    for _ in range(50):
        slots.feedback("h", status=200, latency=0.02)  # 1 in flight of a window of 5.6
    assert slots.limit("h") == before


async def test_rising_latency_stops_growth() -> None:
    slots, _ = adaptive(8)
    for _ in range(8):
        await slots.acquire("h")
    slots.feedback("h", status=429, latency=0.0)
    for _ in range(3):
        slots.release("h")  # 5 in flight, window 5.6: in use
    slots.feedback("h", status=200, latency=0.01)  # latency floor 10 ms
    grown = slots.limit("h")
    for _ in range(30):
        slots.feedback("h", status=200, latency=0.2)  # the server queues
    assert slots.limit("h") < grown + 0.5


# --- AdaptiveSlots: Retry-After and pacing ----------------------------------------------------


async def test_retry_after_pauses_the_whole_host_but_not_others() -> None:
    slots, clock = adaptive(8)
    await slots.acquire("h")
    slots.feedback("h", status=429, retry_after=5.0, latency=0.0)
    slots.release("h")
    t0 = clock.now
    await slots.acquire("other")
    assert clock.now == t0
    await slots.acquire("h")
    assert clock.now == pytest.approx(t0 + 5.0)


async def test_retry_after_arriving_while_waiting_extends_the_wait() -> None:
    slots, clock = adaptive(8)
    await slots.acquire("h")
    slots.feedback("h", status=503, retry_after=2.0, latency=0.0)
    slots.release("h")
    t0 = clock.now
    waiting = asyncio.create_task(slots.acquire("h"))
    await asyncio.sleep(0)
    slots.feedback("h", status=503, retry_after=10.0, latency=0.0)
    await waiting
    assert clock.now >= t0 + 10.0


async def test_retry_after_pause_is_capped() -> None:
    slots, clock = adaptive(8, max_pause=3.0)
    await slots.acquire("h")
    slots.feedback("h", status=429, retry_after=3600.0, latency=0.0)
    slots.release("h")
    t0 = clock.now
    await slots.acquire("h")
    assert clock.now == pytest.approx(t0 + 3.0)


async def test_starts_are_paced_while_below_the_ceiling() -> None:
    slots, clock = adaptive(8)
    for _ in range(4):
        await slots.acquire("h")
    slots.feedback("h", status=429, latency=0.0)  # window 2.8
    for _ in range(3):
        slots.feedback("h", status=200, latency=0.1)
        slots.release("h")
    assert clock.sleeps == []
    starts = []
    for _ in range(3):
        await slots.acquire("h")
        starts.append(clock.now)
        slots.release("h")
    gap = starts[2] - starts[1]
    window = slots.limit("h")
    assert gap == pytest.approx(0.1 / window, rel=0.05)


async def test_a_paused_or_slowed_host_is_remembered_then_forgotten() -> None:
    slots, clock = adaptive(8)
    await slots.acquire("h")
    slots.feedback("h", status=429, latency=0.0)
    slots.release("h")
    assert len(slots) == 1  # its window is below the ceiling: worth keeping
    clock.now += AdaptiveSlots.FORGET_AFTER + 1
    slots._prune()
    assert len(slots) == 0


# --- AdaptiveSlots: cancellation ----------------------------------------------------------------


async def test_cancelled_waiters_leave_no_slot_behind() -> None:
    slots, _ = adaptive(1)
    await slots.acquire("h")
    waiters = [asyncio.create_task(slots.acquire("h")) for _ in range(3)]
    await settle()
    waiters[0].cancel()
    slots.release("h")  # hands the slot to waiters[0], already cancelled: passed on
    await settle()
    assert waiters[1].done() and not waiters[1].cancelled()
    waiters[2].cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    slots.release("h")
    assert len(slots) == 0


async def test_cancelled_during_a_pause_releases_its_slot() -> None:
    clock = Clock()
    release_sleep = asyncio.Event()

    async def blocking_sleep(seconds: float) -> None:
        await release_sleep.wait()

    slots = AdaptiveSlots(2, clock=clock, sleep=blocking_sleep)
    await slots.acquire("h")
    slots.feedback("h", status=429, retry_after=30.0, latency=0.0)
    slots.release("h")
    paused = asyncio.create_task(slots.acquire("h"))
    await settle()
    paused.cancel()
    with pytest.raises(asyncio.CancelledError):
        await paused
    assert slots._hosts["h"].in_flight == 0  # the cancelled attempt gave its slot back
    clock.now += 31
    await asyncio.wait_for(slots.acquire("h"), 1)
    slots.release("h")


async def test_adaptive_state_of_many_hosts_is_bounded() -> None:
    slots, clock = adaptive()
    slots.MAX_KEYS = 10
    for i in range(50):
        key = f"h{i}"
        clock.now += 1
        await slots.acquire(key)
        slots.feedback(key, status=429)  # learned: a cut window is kept after release
        slots.release(key)
        assert len(slots) <= 10
    assert slots.limit("h49") < slots.ceiling  # the most recent host keeps what it learned
    assert slots.limit("h0") == slots.ceiling  # the oldest was forgotten
