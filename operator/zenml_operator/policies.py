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
    wake_at: datetime.datetime  # when to look again if nothing changes


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
    wake = [next_due]
    if previous_valid_until is not None and previous_valid_until > now:
        wake.append(previous_valid_until)
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
    return RotationPlan(action, next_due, requested, min(wake))


def restart_owed(*, rotation_count: int, restarted_for: str | None, current_key_id: str) -> bool:
    """Targets are restarted once per key that a rotation put in the Secret."""
    return rotation_count > 0 and restarted_for != current_key_id
