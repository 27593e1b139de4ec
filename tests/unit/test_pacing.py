"""The background lane's rate limit: the slot arithmetic as a table, the limiter on an
injected clock (no real sleeps; late wake-ups and stalls simulated), which requests it
paces, and the background checks queue (de-duplication, the lane, retries)."""

from __future__ import annotations

import asyncio
import itertools
import math

import pytest

from zenml_operator.background import BackgroundChecks
from zenml_operator.zenml_api import pacing
from zenml_operator.zenml_api.pacing import RateLimiter, next_slot

RATE = 20.0  # requests per second: one every 0.05 s


@pytest.mark.parametrize(
    ("slot", "released", "expected"),
    [
        (-math.inf, 5.0, 5.05),  # the first release: the next one interval on
        (1.0, 1.0, 1.05),  # on its slot: the next one interval later
        (1.0, 1.02, 1.05),  # a little late: forgiven, the slots keep the rate
        (1.0, 1.025, 1.05),  # ... up to half an interval
        (1.0, 1.3, 1.35),  # a stall: from the actual release, no slots left behind
        (1.0, 100.0, 100.05),  # idle time saves nothing up
    ],
    ids=["first", "on-time", "late", "half-late", "stalled", "idle"],
)
def test_next_slot(slot: float, released: float, expected: float) -> None:
    assert next_slot(slot, released, rate=RATE) == pytest.approx(expected)


class FakeClock:
    """A clock that only moves when a (fake) sleep is awaited, or a test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.oversleep = 0.0  # added to every sleep: a busy event loop wakes waiters late

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds + self.oversleep
        await asyncio.sleep(0)  # let other tasks run, as a real sleep does


async def sends(limiter: RateLimiter, clock: FakeClock, n: int, *, at_once: bool) -> list[float]:
    """When each of `n` requests went: one after the other, or all waiting at once."""
    sent: list[float] = []

    async def request() -> None:
        await limiter.acquire()
        sent.append(clock.now)

    if at_once:
        await asyncio.gather(*(request() for _ in range(n)))
    else:
        for _ in range(n):
            await request()
    return sent


async def test_limiter_spaces_requests_at_the_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RATE, clock=clock, sleep=clock.sleep)
    sent = await sends(limiter, clock, 41, at_once=False)
    assert clock.sleeps[0] == pytest.approx(0.05)  # the first went at once, then spaced
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert all(g == pytest.approx(1 / RATE) for g in gaps)
    assert sent[-1] - sent[0] == pytest.approx(2.0)  # 40 intervals of 0.05 s


async def test_a_little_timer_lateness_does_not_lower_the_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RATE, clock=clock, sleep=clock.sleep)
    clock.oversleep = 0.01  # every wake-up 10 ms late: a timer on a busy event loop
    sent = await sends(limiter, clock, 41, at_once=False)
    assert sent[-1] - sent[0] == pytest.approx(2.0 + 0.01)  # still 40 intervals of 0.05 s


async def test_concurrent_waiters_go_in_order_and_an_oversleeper_is_no_burst() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RATE, clock=clock, sleep=clock.sleep)
    sent: list[tuple[int, float]] = []

    async def request(i: int) -> None:
        await limiter.acquire()
        sent.append((i, clock.now))

    clock.oversleep = 0.30  # every wake-up is late (a stalled event loop)
    await asyncio.gather(*(request(i) for i in range(6)))
    assert [i for i, _ in sent] == list(range(6))  # in the order they came
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(sent)]
    # Each went a whole interval after the one before ACTUALLY went: late wake-ups cost
    # rate, but never let the waiters behind catch up in a bunch.
    assert all(g >= 1 / RATE for g in gaps)


async def test_many_waiters_never_exceed_the_rate_in_any_second() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RATE, clock=clock, sleep=clock.sleep)
    sent = await sends(limiter, clock, 100, at_once=True)
    assert len(sent) == 100
    assert max(sum(1 for t in sent if s <= t < s + 1.0 - 1e-9) for s in sent) <= RATE


async def test_idle_time_does_not_save_up_a_burst() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RATE, clock=clock, sleep=clock.sleep)
    await limiter.acquire()
    clock.now += 3600.0
    await limiter.acquire()  # at once: a long time since the last one
    await limiter.acquire()  # ... but the next waits a whole interval
    assert clock.sleeps == pytest.approx([0.05])


def test_a_rate_of_zero_is_not_a_limiter() -> None:
    with pytest.raises(ValueError, match="positive"):
        RateLimiter(0)


async def test_only_background_requests_are_paced() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RATE, clock=clock, sleep=clock.sleep)
    for _ in range(5):
        await pacing.pace(limiter)  # no lane: a create, an update, a due rotation
    assert clock.sleeps == []
    with pacing.background_lane():
        assert pacing.in_background()
        for _ in range(3):
            await pacing.pace(limiter)
        assert clock.sleeps == pytest.approx([0.05, 0.05])
        pacing.promote()  # found a due rotation: the rest of the run is not paced
        assert not pacing.in_background()
        for _ in range(3):
            await pacing.pace(limiter)
        assert len(clock.sleeps) == 2
    assert not pacing.in_background()
    await pacing.pace(None)  # no limiter configured (rate 0): nothing to wait for


async def test_the_lane_is_per_task() -> None:
    seen: dict[str, bool] = {}

    async def foreground() -> None:
        seen["foreground"] = pacing.in_background()

    async def background() -> None:
        with pacing.background_lane():
            await asyncio.sleep(0)
            seen["background"] = pacing.in_background()

    await asyncio.gather(foreground(), background())
    assert seen == {"foreground": False, "background": True}


async def test_background_checks_run_once_per_waiting_object_in_the_lane() -> None:
    checks = BackgroundChecks(workers=2, retry_delay=0.0)
    ran: list[tuple[str, bool]] = []
    release = asyncio.Event()
    done = asyncio.Event()

    def check(key: str):  # type: ignore[no-untyped-def]
        async def run() -> bool:
            await release.wait()
            ran.append((key, pacing.in_background()))
            if len(ran) == 3:
                done.set()
            return False

        return run

    try:
        for key in ("a", "b", "c", "a", "b", "c", "c"):  # a resume and resyncs of the same
            checks.submit(key, check(key))
        assert checks.waiting == 3  # each object once, however often it was submitted
        release.set()
        await asyncio.wait_for(done.wait(), 5)
        assert sorted(ran) == [("a", True), ("b", True), ("c", True)]
    finally:
        await checks.aclose()


async def test_a_background_check_that_may_heal_is_queued_again() -> None:
    checks = BackgroundChecks(workers=1, retry_delay=0.0)
    runs: list[int] = []
    done = asyncio.Event()

    async def check() -> bool:
        runs.append(1)
        if len(runs) == 3:
            done.set()
            return False
        return True  # e.g. ZenMLUnavailable: look again after the retry delay

    try:
        checks.submit("a", check)
        await asyncio.wait_for(done.wait(), 5)
        assert len(runs) == 3
    finally:
        await checks.aclose()
    checks.submit("a", check)  # closed: nothing is queued any more
    assert checks.waiting == 0
