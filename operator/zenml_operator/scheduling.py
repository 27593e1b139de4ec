"""When a rotation daemon looks next, and how it sleeps until then (pure, plus one waiter)."""

from __future__ import annotations

import asyncio
import datetime

import kopf

from zenml_operator.handlers.common import Outcome

# A due time in the past still sleeps this long: a clock a hair behind never spins the loop.
MIN_DELAY = 0.05


def next_look_in(
    outcome: Outcome | None,
    *,
    now: datetime.datetime,
    retry_delay: float,
    resync_seconds: float,
) -> float:
    """Seconds until the next look: the retry delay after a problem that may heal itself,
    the resync interval after one a human must fix (or when nothing is scheduled), else
    until the outcome's wake time, never beyond one resync interval."""
    if outcome is None:
        return resync_seconds
    if outcome.problem is not None:
        return retry_delay if outcome.problem.retry else resync_seconds
    if outcome.wake_at is None:
        return resync_seconds
    seconds = (outcome.wake_at - now).total_seconds()
    return min(max(seconds, MIN_DELAY), resync_seconds)


async def sleep_until(stopped: kopf.DaemonStopped, wakeup: asyncio.Event, seconds: float) -> bool:
    """Sleep `seconds`, or less if the daemon is stopped or woken up; True when woken up (the
    object changed)."""
    waiters = {
        asyncio.ensure_future(stopped.wait()),  # type: ignore[arg-type]
        asyncio.ensure_future(wakeup.wait()),
    }
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    woken = wakeup.is_set()
    wakeup.clear()
    return woken
