"""Pacing of background requests: a rate limit that only background work waits for.

Background work (a resync, the resume of a converged object after an operator restart, an
idle rotation look) runs inside `background_lane()`; every ZenML request sent from there
first waits for its turn at the connection's `RateLimiter`. Everything else (a create, a spec
update, a due rotation) is in no lane and never waits here, so new and changed objects are
not queued behind a wave of background checks. A background run that finds work that cannot
wait (a due rotation) calls `promote()`: its later requests are not paced.

The arithmetic is `wait_before_release` (pure, table-tested); `RateLimiter` applies it with
an injected clock and sleep. Releases are spaced from the previous ACTUAL release, one
waiter at a time (a FIFO lock): a waiter that oversleeps (a busy event loop) does not let
the ones behind it catch up in a bunch, so ZenML never sees more than `rate` + 1 background
requests in any one-second window. (A token bucket that promised slots ahead did let them
catch up: 23 requests in one second at 20/s, measured over 5000 objects.)
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import Awaitable, Callable, Iterator


def wait_before_release(last: float | None, now: float, *, rate: float) -> float:
    """Seconds to wait at `now` before the next release, the previous one having been at
    `last` (None: none yet). Idle time saves nothing up: at most one release per 1/rate."""
    if last is None:
        return 0.0
    return max(0.0, last + 1.0 / rate - now)


class RateLimiter:
    """`await limiter.acquire()` returns when the caller may send one request."""

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive (no limiter means no limit)")
        self.rate = rate
        self._clock = clock
        self._sleep = sleep
        self._last: float | None = None
        self._turn = asyncio.Lock()  # FIFO: waiters are released in the order they came

    async def acquire(self) -> None:
        async with self._turn:
            wait = wait_before_release(self._last, self._clock(), rate=self.rate)
            if wait > 0:
                await self._sleep(wait)
            self._last = self._clock()  # when it actually went, however late it woke


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
