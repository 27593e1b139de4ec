"""When a rotation is looked at next (pure)."""

from __future__ import annotations

import datetime

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
