"""Pure decisions of the reconcilers (no I/O): gather inputs, decide here, then act once.

Each function has a table test in tests/unit/test_policies.py. The reconcilers read
Kubernetes and ZenML, call one of these, and carry out what it returns.
"""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass


class KeyAction(enum.Enum):
    """What one declared API key needs (besides a description/active update)."""

    CONFLICT = "conflict"  # a Secret of that name is not ours: touch nothing
    CREATE = "create"  # no key in ZenML yet: create it and write its value
    REISSUE = "reissue"  # the Secret is missing or holds another value: a new value
    SYNC_METADATA = "sync-metadata"  # the value is in place: labels/annotations/key names only


def plan_key(
    *, secret_exists: bool, secret_owned: bool, key_exists: bool, secret_holds_key: bool
) -> KeyAction:
    """ZenML shows a key's value only once (create/rotate): a Secret that does not hold the
    current key can only be filled with a new value."""
    if secret_exists and not secret_owned:
        return KeyAction.CONFLICT
    if not key_exists:
        return KeyAction.CREATE
    if not secret_exists or not secret_holds_key:
        return KeyAction.REISSUE
    return KeyAction.SYNC_METADATA


class ValueCheck(enum.Enum):
    """Whether a Secret holds the value the operator issued for a key (without ZenML)."""

    HELD = "held"  # the recorded digest matches the value
    UNKNOWN = "unknown"  # written before digests: the key id and a value present vouch for it
    OTHER_KEY = "other-key"  # the record names another key (or none)
    MISSING = "missing"  # no value under the data key
    REPLACED = "replaced"  # a value whose digest is not the one recorded when it was written
    OUTDATED = "outdated"  # an older record of this key than the owner's status last saw

    @property
    def holds(self) -> bool:
        return self in (ValueCheck.HELD, ValueCheck.UNKNOWN)


def check_value(
    *,
    key_id_matches: bool,
    value_present: bool,
    recorded_digest: str | None,
    held_digest: str | None,
    issued_at: datetime.datetime | None = None,
    last_issued_at: datetime.datetime | None = None,
) -> ValueCheck:
    """The key id is not enough on its own: ZenML keeps a key's id across re-issues, so an
    older value of the same key (a stale copy, a restored backup) carries the right id and
    is refused by ZenML. The digest of the value, recorded with it, tells them apart; a
    whole-object copy brings its old digest along, but also its older issue time, which the
    owner's status (`last_issued_at`, recorded for the same key id) has seen pass."""
    if not key_id_matches:
        return ValueCheck.OTHER_KEY
    if not value_present:
        return ValueCheck.MISSING
    if recorded_digest is not None and held_digest != recorded_digest:
        return ValueCheck.REPLACED
    if issued_at is not None and last_issued_at is not None and issued_at < last_issued_at:
        return ValueCheck.OUTDATED
    return ValueCheck.HELD if recorded_digest is not None else ValueCheck.UNKNOWN


@dataclass(frozen=True)
class Peer:
    """One entry of Kopf's peering object: an operator's priority and until when it lives."""

    priority: int
    alive_until: datetime.datetime


def peering_allows(*, peers: list[Peer], own_priority: int, now: datetime.datetime) -> bool:
    """Whether an operator running with Kopf peering may act on its own (the Secret watch
    acts outside Kopf's handlers, which Kopf pauses): as Kopf decides it, no live peer of a
    higher priority and no other of the same; and this operator is seen in the object (one
    live entry of its own priority), else it has not joined yet."""
    live = [p for p in peers if p.alive_until > now]
    same = sum(1 for p in live if p.priority == own_priority)
    higher = any(p.priority > own_priority for p in live)
    return same == 1 and not higher


class AccountVerdict(enum.Enum):
    """Whose a ZenML account found by name is."""

    OURS = "ours"  # by id, by adopt, or created after our own recorded intent
    OPERATOR_IDENTITY = "operator-identity"  # never taken, even with adopt
    CONFLICT = "conflict"  # someone else's


def judge_account(
    *,
    known_id: str | None,
    found_id: str,
    adopt: bool,
    created_after_intent: bool,
    is_operator_identity: bool,
) -> AccountVerdict:
    if known_id and found_id == known_id:
        return AccountVerdict.OURS
    if adopt or created_after_intent:
        # Claiming an account found by name: never the operator's own identity (adopting it
        # would hand its keys, admin rights included, to whoever may create this kind).
        if is_operator_identity:
            return AccountVerdict.OPERATOR_IDENTITY
        return AccountVerdict.OURS
    return AccountVerdict.CONFLICT


class RotationAction(enum.Enum):
    IDLE = "idle"  # nothing due
    SUSPENDED = "suspended"  # spec.suspend
    WAIT_FOR_RETENTION = "wait-for-retention"  # due, but the previous key is still protected
    ROTATE = "rotate"  # due: rotate now


@dataclass(frozen=True)
class RotationPlan:
    action: RotationAction
    next_due: datetime.datetime  # when the key in the Secret is one period old
    requested: bool  # an on-demand request not answered yet
    # When to look again if nothing changes; None: only on a change or the resync.
    wake_at: datetime.datetime | None


def rotation_due(
    *, now: datetime.datetime, next_due: datetime.datetime, request: str, answered_request: str
) -> bool:
    """Due when the key is one period old, or on an on-demand request not answered yet
    (each value of the request annotation fires once)."""
    return (bool(request) and request != answered_request) or now >= next_due


def plan_rotation(
    *,
    now: datetime.datetime,
    period: datetime.timedelta,
    suspend: bool,
    issued_at: datetime.datetime,
    request: str,
    answered_request: str,
    previous_valid_until: datetime.datetime | None,
    previous_protected: bool,
) -> RotationPlan:
    """Is a rotation due, from the times recorded in the Secret only (never process memory):
    a restart of the operator neither rotates early nor skips one, and rotations missed
    while it was down happen once, not once per missed period."""
    next_due = issued_at + period
    requested = bool(request) and request != answered_request
    due = rotation_due(
        now=now, next_due=next_due, request=request, answered_request=answered_request
    )
    if suspend:
        action = RotationAction.SUSPENDED
    elif due and previous_protected:
        # ZenML keeps ONE previous key: rotating inside its retention would cut off the key
        # that workloads may still hold. The look at the retention's end rotates.
        action = RotationAction.WAIT_FOR_RETENTION
    elif due:
        action = RotationAction.ROTATE
    else:
        action = RotationAction.IDLE
    return RotationPlan(action, next_due, requested, wake_time(now, next_due, previous_valid_until))


def wake_time(
    now: datetime.datetime, *moments: datetime.datetime | None
) -> datetime.datetime | None:
    """The earliest of these moments that is still ahead. A moment already past (a rotation
    overdue while suspended or waiting for a retention) wakes nobody: waking for it would
    look again at once, every time, in a busy loop."""
    ahead = [m for m in moments if m is not None and m > now]
    return min(ahead) if ahead else None


def restart_owed(*, rotation_count: int, restarted_for: str | None, current_key_id: str) -> bool:
    """Targets are restarted once per key that a rotation put in the Secret."""
    return rotation_count > 0 and restarted_for != current_key_id


class Trigger(enum.Enum):
    """Why a ServiceAccount is reconciled."""

    CREATE = "create"  # first seen (Kopf on.create)
    UPDATE = "update"  # its spec or metadata changed (Kopf on.update)
    RESUME = "resume"  # seen again at an operator start (Kopf on.resume)
    # No RESYNC: the periodic drift check is always background, one read; the controller's
    # resync schedule queues it to the background workers without asking.


@dataclass(frozen=True)
class ReconcilePath:
    background: bool  # paced (ZENML_OPERATOR_BACKGROUND_RATE) and run by the background workers
    one_read: bool  # may take the one-read path (the key list names the account)


def plan_reconcile(
    *, trigger: Trigger, generation: int | None, observed_generation: int | None, ready: bool
) -> ReconcilePath:
    """Which path a ServiceAccount reconcile takes.

    The resume of a resource the last run converged (status.observedGeneration is the
    current generation and Ready is True) is a check of known state, as a resync is:
    background, one ZenML read. Everything else has work to do and is never queued behind
    them: a new resource, a spec change (while the operator ran or while it was down: Kopf
    then calls it an update), a resume of a resource whose last run failed."""
    converged = ready and observed_generation is not None and observed_generation == generation
    if trigger is Trigger.RESUME and converged:
        return ReconcilePath(background=True, one_read=True)
    return ReconcilePath(background=False, one_read=False)


def rotation_look_in_background(
    *,
    woken_by_change: bool,
    now: datetime.datetime,
    next_rotation: datetime.datetime | None,
    request: str,
    answered_request: str,
) -> bool:
    """Whether a rotation's look is background work, from what its last status says.

    A look woken by a change of the object, a rotation due by the recorded schedule, or an
    on-demand request not answered yet, is not. The first look after an operator start and
    the periodic ones are (a retention end included: deleting an expired key can wait its
    turn). A look that finds a rotation due anyway leaves the lane (pacing.promote)."""
    if woken_by_change:
        return False
    due = next_rotation is None or rotation_due(
        now=now, next_due=next_rotation, request=request, answered_request=answered_request
    )
    return not due
