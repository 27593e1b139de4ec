"""When a rotation daemon looks next: a pure decision, as a table."""

from __future__ import annotations

import datetime

import pytest

from zenml_operator.handlers.common import Outcome, ReconcileProblem
from zenml_operator.scheduling import MIN_DELAY, next_look_in

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
RETRY, RESYNC = 15.0, 600.0


def at(seconds: float) -> datetime.datetime:
    return NOW + datetime.timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        (None, RESYNC),  # the object is gone: nothing scheduled
        (Outcome({}, ReconcileProblem("ZenMLUnavailable", "down", retry=True)), RETRY),
        (Outcome({}, ReconcileProblem("DuplicateRotation", "fix it")), RESYNC),
        (Outcome({}), RESYNC),  # nothing due
        (Outcome({}, wake_at=at(42)), 42.0),
        (Outcome({}, wake_at=at(-5)), MIN_DELAY),  # overdue: look again at once
        (Outcome({}, wake_at=at(10 * RESYNC)), RESYNC),  # never sleep past one resync
    ],
    ids=["gone", "retryable", "needs-human", "idle", "due-soon", "overdue", "far"],
)
def test_next_look_in(outcome: Outcome | None, expected: float) -> None:
    got = next_look_in(outcome, now=NOW, retry_delay=RETRY, resync_seconds=RESYNC)
    assert got == pytest.approx(expected)
