"""Pacing of background requests: a token bucket that only background work waits for.

Background work (a resync, the resume of a converged object after an operator restart, an
idle rotation look) runs inside `background_lane()`; every ZenML request sent from there
first takes a token from the connection's `RateLimiter`. Everything else (a create, a spec
update, a due rotation) is in no lane and never waits here, so new and changed objects are
not queued behind a wave of background checks. A background run that finds work that cannot
wait (a due rotation) calls `promote()`: its later requests are not paced.

The arithmetic is `reserve` (pure, table-tested); `RateLimiter` applies it with an injected
clock and sleep. A request reserves the next token even when the bucket is empty (the
bucket goes into debt), so waiters are served in order and an oversleeping waiter does not
lower the rate of the ones behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Bucket:
    """Tokens available at `stamp` (negative: owed to requests already promised a slot)."""

    tokens: float
    stamp: float


def reserve(bucket: Bucket, now: float, *, rate: float, burst: float) -> tuple[Bucket, float]:
    """Take one token at `now`: the new bucket, and how long the taker must wait first.

    The bucket refills at `rate` tokens per second up to `burst`. With `burst` 1 no two
    requests go out closer than 1/rate apart, so ZenML never sees more than rate + 1 of
    them in any one-second window.
    """
    elapsed = max(0.0, now - bucket.stamp)  # a clock never runs backwards here
    tokens = min(burst, bucket.tokens + elapsed * rate) - 1.0
    wait = 0.0 if tokens >= 0 else -tokens / rate
    return Bucket(tokens, max(now, bucket.stamp)), wait


class RateLimiter:
    """`await limiter.acquire()` returns when the caller may send one request."""

    def __init__(
        self,
        rate: float,
        *,
        burst: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive (no limiter means no limit)")
        self.rate = rate
        self.burst = max(1.0, burst)
        self._clock = clock
        self._sleep = sleep
        self._bucket = Bucket(self.burst, clock())

    def reserve(self) -> float:
        """Take a token now; the seconds to wait before using it."""
        self._bucket, wait = reserve(self._bucket, self._clock(), rate=self.rate, burst=self.burst)
        return wait

    async def acquire(self) -> None:
        wait = self.reserve()
        if wait > 0:
            await self._sleep(wait)


class Lane:
    """The lane of one reconcile run (mutable: `promote` changes it for the rest of the run)."""

    def __init__(self, background: bool) -> None:
        self.background = background


_LANE: contextvars.ContextVar[Lane | None] = contextvars.ContextVar(
    "zenml_operator_lane", default=None
)


@contextlib.contextmanager
def background_lane() -> Iterator[Lane]:
    """Run the block as background work: its ZenML requests are paced."""
    lane = Lane(background=True)
    token = _LANE.set(lane)
    try:
        yield lane
    finally:
        _LANE.reset(token)


def promote() -> None:
    """The current run found work that cannot wait (a due rotation): stop pacing it."""
    lane = _LANE.get()
    if lane is not None:
        lane.background = False


def in_background() -> bool:
    lane = _LANE.get()
    return lane is not None and lane.background


async def pace(limiter: RateLimiter | None) -> None:
    """Called before each HTTP attempt: waits for a token when the caller is background."""
    if limiter is not None and in_background():
        await limiter.acquire()
