"""The background lane's rate limit: the token bucket arithmetic as a table, the limiter on
an injected clock (no real sleeps), which requests it paces, and the background checks
queue (de-duplication, the lane, retries)."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from zenml_operator.background import BackgroundChecks
from zenml_operator.zenml_api import pacing
from zenml_operator.zenml_api.pacing import Bucket, RateLimiter, reserve

RATE = 20.0  # tokens per second: one every 0.05 s


@pytest.mark.parametrize(
    ("bucket", "now", "burst", "expected_tokens", "expected_wait"),
    [
        (Bucket(1.0, 0.0), 0.0, 1.0, 0.0, 0.0),  # full: the first request goes at once
        (Bucket(0.0, 0.0), 0.0, 1.0, -1.0, 0.05),  # empty: wait for the next token
        (Bucket(-1.0, 0.0), 0.0, 1.0, -2.0, 0.10),  # in debt: queue behind the promised one
        (Bucket(0.0, 0.0), 0.05, 1.0, 0.0, 0.0),  # one interval later: a token again
        (Bucket(0.0, 0.0), 0.02, 1.0, -0.6, 0.03),  # part of a token: wait for the rest
        (Bucket(0.0, 0.0), 100.0, 1.0, 0.0, 0.0),  # a long idle time refills only to burst
        (Bucket(0.0, 0.0), 100.0, 5.0, 4.0, 0.0),  # ... a larger burst holds more
        (Bucket(-2.0, 0.0), 0.05, 1.0, -2.0, 0.10),  # debt is repaid at the rate
        (Bucket(0.0, 1.0), 0.5, 1.0, -1.0, 0.05),  # a clock behind the stamp adds nothing
    ],
    ids=[
        "full",
        "empty",
        "debt",
        "refilled",
        "partial",
        "capped",
        "burst",
        "repaying",
        "clock-behind",
    ],
)
def test_reserve(
    bucket: Bucket, now: float, burst: float, expected_tokens: float, expected_wait: float
) -> None:
    after, wait = reserve(bucket, now, rate=RATE, burst=burst)
    assert after.tokens == pytest.approx(expected_tokens)
    assert wait == pytest.approx(expected_wait)
    assert after.stamp == max(now, bucket.stamp)


class FakeClock:
    """A clock that only moves when a (fake) sleep is awaited."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


async def test_limiter_spaces_requests_at_the_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RATE, clock=clock, sleep=clock.sleep)
    sent: list[float] = []
    for _ in range(41):
        await limiter.acquire()
        sent.append(clock.now)
    assert clock.sleeps[0] == pytest.approx(0.05)  # the first went at once, then spaced
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert all(g == pytest.approx(1 / RATE) for g in gaps)
    assert sent[-1] - sent[0] == pytest.approx(2.0)  # 40 intervals of 0.05 s
    # Never more than rate + 1 in any one-second window.
    assert max(sum(1 for t in sent if s <= t < s + 1.0) for s in sent) <= RATE + 1


async def test_waiters_are_served_in_order_and_an_oversleeper_costs_no_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RATE, clock=clock, sleep=clock.sleep)
    # Five callers reserve at the same instant (queued in the event loop together).
    waits = [limiter.reserve() for _ in range(5)]
    assert waits == pytest.approx([0.0, 0.05, 0.10, 0.15, 0.20])
    # The first waiter wakes late (a busy loop): the slots promised to the others stand.
    clock.now += 0.30
    assert limiter.reserve() == pytest.approx(0.0)  # the debt was repaid meanwhile
    assert limiter.reserve() == pytest.approx(0.05)


async def test_idle_time_does_not_save_up_a_burst() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RATE, clock=clock, sleep=clock.sleep)
    clock.now += 3600.0
    assert [limiter.reserve() for _ in range(3)] == pytest.approx([0.0, 0.05, 0.10])


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
