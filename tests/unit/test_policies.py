"""The reconcilers' pure decisions, as tables (no Kopf, kmock or ZenML)."""

from __future__ import annotations

import datetime

import pytest

from zenml_operator.policies import (
    AccountVerdict,
    KeyAction,
    RotationAction,
    judge_account,
    plan_key,
    plan_rotation,
    restart_owed,
)

# secret_exists, secret_owned, key_exists, secret_holds_key -> action
KEY_CASES = [
    ((False, False, False, False), KeyAction.CREATE),  # a new key
    ((True, True, False, False), KeyAction.CREATE),  # key deleted in ZenML by hand
    ((True, False, False, False), KeyAction.CONFLICT),  # someone else's Secret: hands off
    ((True, False, True, True), KeyAction.CONFLICT),
    ((False, False, True, False), KeyAction.REISSUE),  # Secret deleted by hand / crash
    ((True, True, True, False), KeyAction.REISSUE),  # Secret holds another value
    ((True, True, True, True), KeyAction.SYNC_METADATA),  # converged value
]


@pytest.mark.parametrize(("inputs", "expected"), KEY_CASES, ids=[e.value for _, e in KEY_CASES])
def test_plan_key(inputs: tuple[bool, bool, bool, bool], expected: KeyAction) -> None:
    exists, owned, key, holds = inputs
    got = plan_key(secret_exists=exists, secret_owned=owned, key_exists=key, secret_holds_key=holds)
    assert got is expected


@pytest.mark.parametrize(
    ("known", "adopt", "after_intent", "own_identity", "expected"),
    [
        ("a1", False, False, False, AccountVerdict.OURS),  # by recorded id
        (None, True, False, False, AccountVerdict.OURS),  # adopt
        (None, False, True, False, AccountVerdict.OURS),  # our create landed before a crash
        (None, False, False, False, AccountVerdict.CONFLICT),  # someone else's name
        ("other", False, False, False, AccountVerdict.CONFLICT),  # recreated by someone else
        (None, True, False, True, AccountVerdict.OPERATOR_IDENTITY),  # never, even adopted
        (None, False, True, True, AccountVerdict.OPERATOR_IDENTITY),
    ],
)
def test_judge_account(
    known: str | None, adopt: bool, after_intent: bool, own_identity: bool, expected
) -> None:
    got = judge_account(
        known_id=known,
        found_id="a1",
        adopt=adopt,
        created_after_intent=after_intent,
        is_operator_identity=own_identity,
    )
    assert got is expected


T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
HOUR = datetime.timedelta(hours=1)


def minutes(n: float) -> datetime.timedelta:
    return datetime.timedelta(minutes=n)


# now offset, suspend, request, answered, previous valid until offset, protected -> action, wake
ROTATION_CASES = [
    ("idle", minutes(10), False, "", "", None, False, RotationAction.IDLE, HOUR),
    ("due", HOUR, False, "", "", None, False, RotationAction.ROTATE, HOUR),
    ("overdue-once", 5 * HOUR, False, "", "", None, False, RotationAction.ROTATE, HOUR),
    ("on-demand", minutes(1), False, "r1", "", None, False, RotationAction.ROTATE, HOUR),
    ("answered", minutes(1), False, "r1", "r1", None, False, RotationAction.IDLE, HOUR),
    ("suspended", HOUR, True, "r2", "r1", None, False, RotationAction.SUSPENDED, HOUR),
    (
        "waits-for-retention",
        minutes(2),
        False,
        "r2",
        "r1",
        minutes(30),
        True,
        RotationAction.WAIT_FOR_RETENTION,
        minutes(30),  # wakes when the retention ends
    ),
    ("retention-over", HOUR, False, "", "", minutes(30), False, RotationAction.ROTATE, HOUR),
]


@pytest.mark.parametrize(
    ("now", "suspend", "asked", "answered", "until", "protected", "action", "wake"),
    [c[1:] for c in ROTATION_CASES],
    ids=[c[0] for c in ROTATION_CASES],
)
def test_plan_rotation(
    now: datetime.timedelta,
    suspend: bool,
    asked: str,
    answered: str,
    until: datetime.timedelta | None,
    protected: bool,
    action: RotationAction,
    wake: datetime.timedelta,
) -> None:
    plan = plan_rotation(
        now=T0 + now,
        period=HOUR,
        suspend=suspend,
        issued_at=T0,
        request=asked,
        answered_request=answered,
        previous_valid_until=T0 + until if until is not None else None,
        previous_protected=protected,
    )
    assert plan.action is action
    assert plan.next_due == T0 + HOUR
    assert plan.wake_at == T0 + wake
    assert plan.requested is (bool(asked) and asked != answered)


@pytest.mark.parametrize(
    ("count", "restarted_for", "owed"),
    [(0, None, False), (1, None, True), (1, "k2", False), (2, "k1", True)],
)
def test_restart_owed(count: int, restarted_for: str | None, owed: bool) -> None:
    assert (
        restart_owed(rotation_count=count, restarted_for=restarted_for, current_key_id="k2") is owed
    )
