"""The reconcilers' pure decisions, as tables (no Kopf, kmock or ZenML)."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from zenml_operator.policies import (
    AccountVerdict,
    KeyAction,
    Peer,
    RotationAction,
    Trigger,
    ValueCheck,
    check_value,
    judge_account,
    peering_allows,
    plan_key,
    plan_reconcile,
    plan_rotation,
    restart_owed,
    rotation_look_in_background,
)
from zenml_operator.secret_record import value_digest

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
    # due now: the look rotates and plans its own next wake; nothing ahead to wake for here
    ("due", HOUR, False, "", "", None, False, RotationAction.ROTATE, None),
    ("overdue-once", 5 * HOUR, False, "", "", None, False, RotationAction.ROTATE, None),
    ("on-demand", minutes(1), False, "r1", "", None, False, RotationAction.ROTATE, HOUR),
    ("answered", minutes(1), False, "r1", "r1", None, False, RotationAction.IDLE, HOUR),
    # overdue while suspended: no wake time in the past (that was a 50 ms busy loop)
    ("suspended", HOUR, True, "r2", "r1", None, False, RotationAction.SUSPENDED, None),
    ("suspended-early", minutes(5), True, "", "", None, False, RotationAction.SUSPENDED, HOUR),
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
    ("retention-over", HOUR, False, "", "", minutes(30), False, RotationAction.ROTATE, None),
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
    wake: datetime.timedelta | None,
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
    assert plan.wake_at == (T0 + wake if wake is not None else None)
    assert plan.requested is (bool(asked) and asked != answered)


@pytest.mark.parametrize(
    ("count", "restarted_for", "owed"),
    [(0, None, False), (1, None, True), (1, "k2", False), (2, "k1", True)],
)
def test_restart_owed(count: int, restarted_for: str | None, owed: bool) -> None:
    assert (
        restart_owed(rotation_count=count, restarted_for=restarted_for, current_key_id="k2") is owed
    )


# trigger, observedGeneration (generation is 3), Ready -> (background, one read)
PATH_CASES = [
    (Trigger.CREATE, None, False, (False, False)),  # new: the full path, never queued
    (Trigger.UPDATE, 2, True, (False, False)),  # spec changed: the full path
    (Trigger.UPDATE, 3, True, (False, False)),  # metadata change: still a change
    (Trigger.RESUME, 3, True, (True, True)),  # restart over a converged object: one read
    (Trigger.RESUME, 2, True, (False, False)),  # changed while the operator was down
    (Trigger.RESUME, 3, False, (False, False)),  # its last run failed: work to do
    (Trigger.RESUME, None, False, (False, False)),  # never reconciled
]


@pytest.mark.parametrize(
    ("trigger", "observed", "ready", "expected"),
    PATH_CASES,
    ids=[
        "create",
        "update",
        "update-metadata",
        "resume-converged",
        "resume-changed",
        "resume-failed",
        "resume-new",
    ],
)
def test_plan_reconcile(
    trigger: Trigger, observed: int | None, ready: bool, expected: tuple[bool, bool]
) -> None:
    path = plan_reconcile(trigger=trigger, generation=3, observed_generation=observed, ready=ready)
    assert (path.background, path.one_read) == expected


NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
LATER = NOW + datetime.timedelta(hours=1)
EARLIER = NOW - datetime.timedelta(seconds=1)


@pytest.mark.parametrize(
    ("woken", "next_rotation", "asked", "answered", "background"),
    [
        (False, LATER, "", "", True),  # first look after a start / periodic: nothing due
        (False, LATER, "r1", "r1", True),  # the request was answered already
        (True, LATER, "", "", False),  # woken by a change of the object
        (False, EARLIER, "", "", False),  # due by the schedule
        (False, NOW, "", "", False),  # due right now
        (False, LATER, "r2", "r1", False),  # an on-demand request not answered yet
        (False, None, "", "", False),  # no status yet: a new rotation
    ],
    ids=["idle", "answered", "changed", "overdue", "due-now", "on-demand", "new"],
)
def test_rotation_look_in_background(
    woken: bool,
    next_rotation: datetime.datetime | None,
    asked: str,
    answered: str,
    background: bool,
) -> None:
    got = rotation_look_in_background(
        woken_by_change=woken,
        now=NOW,
        next_rotation=next_rotation,
        request=asked,
        answered_request=answered,
    )
    assert got is background


# --- Secret repair: does a Secret hold the issued value; may a peer act ---------------------

OLD = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
NEW = OLD + datetime.timedelta(hours=1)
DG = value_digest("ZENKEY_issued")  # the digest recorded with the value
XX = value_digest("ZENKEY_something-else")

# key id matches, value present, recorded digest, digest of the value held,
# issue time in the Secret, issue time the owner's status last saw -> check
VALUE_CASES = [
    ((True, True, DG, DG, NEW, NEW), ValueCheck.HELD),  # converged
    ((True, True, DG, DG, NEW, None), ValueCheck.HELD),  # the status has not seen it yet
    ((True, True, DG, DG, NEW, OLD), ValueCheck.HELD),  # newer than the status: a re-issue
    ((True, True, None, DG, NEW, NEW), ValueCheck.UNKNOWN),  # written before digests
    ((True, True, None, XX, None, None), ValueCheck.UNKNOWN),  # ... only the old check then
    ((False, True, DG, DG, NEW, NEW), ValueCheck.OTHER_KEY),  # the record names another key
    ((True, False, DG, None, NEW, NEW), ValueCheck.MISSING),  # data key removed
    ((True, True, DG, XX, NEW, NEW), ValueCheck.REPLACED),  # value replaced, record kept
    ((True, True, DG, None, NEW, NEW), ValueCheck.REPLACED),  # not base64: not what we wrote
    ((True, True, DG, DG, OLD, NEW), ValueCheck.OUTDATED),  # a whole-object copy from before
    ((True, True, None, DG, OLD, NEW), ValueCheck.OUTDATED),  # ... also of a pre-digest one
]


@pytest.mark.parametrize(
    ("inputs", "expected"),
    VALUE_CASES,
    ids=[f"{e.value}-{i}" for i, (_, e) in enumerate(VALUE_CASES)],
)
def test_check_value(inputs: tuple[Any, ...], expected: ValueCheck) -> None:
    matches, present, recorded, held, issued_at, last_issued_at = inputs
    got = check_value(
        key_id_matches=matches,
        value_present=present,
        recorded_digest=recorded,
        held_digest=held,
        issued_at=issued_at,
        last_issued_at=last_issued_at,
    )
    assert got is expected
    assert got.holds is (expected in (ValueCheck.HELD, ValueCheck.UNKNOWN))


LIVE, DEAD = NEW, OLD - datetime.timedelta(seconds=1)  # alive until, seen at OLD
# peers (priority, alive until), own priority -> may act outside Kopf's handlers
PEERING_CASES = [
    (([(5, LIVE)], 5), True),  # alone
    (([(5, LIVE), (3, LIVE)], 5), True),  # the leader
    (([(5, LIVE), (9, LIVE)], 5), False),  # a higher live peer: Kopf pauses us
    (([(5, LIVE), (9, DEAD)], 5), True),  # ... unless it is dead
    (([(5, LIVE), (5, LIVE)], 5), False),  # same priority: Kopf pauses everyone
    (([(9, LIVE)], 5), False),  # not in the object yet (not joined): wait
    (([], 5), False),
]


@pytest.mark.parametrize(("inputs", "allowed"), PEERING_CASES)
def test_peering_allows(inputs: tuple[list[tuple[int, Any]], int], allowed: bool) -> None:
    peers, own = inputs
    got = peering_allows(peers=[Peer(p, until) for p, until in peers], own_priority=own, now=OLD)
    assert got is allowed
