"""Which ZenML keys stand for one declared API key, and which of them may be deleted.

Rotation uses two keys instead of ZenML's native rotate: the new value comes from a new
ZenML key named `<name>.r<N>` (a dot cannot occur in a declared name, so the two never
collide), the Secret switches to it in one write, and the previous key is deleted when its
retention ends. A crash between the create and the Secret write leaves an unreferenced
key that is simply deleted; the key that workloads hold is never touched early.

The Secret is the record: its annotations name the current key and the previous one with
the time it stays valid, so whoever reconciles next (rotation or ServiceAccount) reads
the same truth.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from zenml_operator.secret_record import Retention, SecretRecord
from zenml_operator.zenml_api import ApiKeyInfo

_ROTATED = re.compile(r"^(?P<base>.+)\.r(?P<n>[0-9]+)$")


def generation(name: str, base: str) -> int | None:
    """0 for the base name, N for `<base>.rN`, None for another key."""
    if name == base:
        return 0
    match = _ROTATED.match(name)
    if match and match["base"] == base:
        return int(match["n"])
    return None


def family(keys: Iterable[ApiKeyInfo], base: str) -> list[ApiKeyInfo]:
    """The ZenML keys of declared key `base`, oldest generation first."""
    members = [k for k in keys if generation(k.name, base) is not None]
    return sorted(members, key=lambda k: generation(k.name, base) or 0)


def newer_than(members: Iterable[ApiKeyInfo], key: ApiKeyInfo, base: str) -> list[ApiKeyInfo]:
    """The members of a later generation than `key`, oldest first."""
    start = generation(key.name, base) or 0
    return [m for m in family(members, base) if (generation(m.name, base) or 0) > start]


def restored_from_older_copy(
    members: Iterable[ApiKeyInfo], held: ApiKeyInfo, recorded_current: str | None, base: str
) -> bool:
    """Whether the Secret holds an older key than the one a rotation's status names as its
    current (`recorded_current`): the Secret was put back from a copy older than the
    rotation's last write (a backup, a stale GitOps copy). Its newer keys are then not
    crash leftovers, and its record must not be acted on until the current key is back."""
    if not recorded_current or held.id == recorded_current:
        return False
    return any(m.id == recorded_current for m in newer_than(members, held, base))


def next_name(members: Iterable[ApiKeyInfo], base: str) -> str:
    top = max((generation(k.name, base) or 0 for k in members), default=0)
    return f"{base}.r{top + 1}"


def recorded_key(key_id: str, base: str) -> ApiKeyInfo:
    """A key known only by the id a Secret records (its family was not read from ZenML)."""
    return ApiKeyInfo(
        id=key_id,
        name=f"{base} (id {key_id})",
        active=True,
        description="",
        created=None,
        last_rotated=None,
        retain_period_minutes=None,
    )


def current_key(members: list[ApiKeyInfo], secret: Mapping[str, Any] | None) -> ApiKeyInfo | None:
    """The key the Secret holds; without that evidence, the newest generation."""
    by_id = {k.id: k for k in members}
    held = SecretRecord.of(secret).key_id
    if held in by_id:
        return by_id[held]
    return members[-1] if members else None


@dataclass(frozen=True)
class Retirement:
    """What to do with the keys of a family that are not the current one."""

    deactivate: list[ApiKeyInfo]  # the previous key, its retention over: refused with 401
    delete: list[ApiKeyInfo]  # older generations and never-used leftovers of a crash


def spare(plan: Retirement, ids: set[str]) -> Retirement:
    """The plan without the keys in `ids` (keys an ApiKeyRotation's status still names)."""
    return Retirement(
        [k for k in plan.deactivate if k.id not in ids], [k for k in plan.delete if k.id not in ids]
    )


def retire(
    members: list[ApiKeyInfo],
    current: ApiKeyInfo | None,
    retention: Retention,
    now: datetime.datetime,
) -> Retirement:
    """Every member but the current one and a still-protected previous one must stop working.

    The expired previous key is deactivated, not deleted: ZenML then refuses it (and the
    tokens obtained with it) with 401, as a retention end should look; it is deleted at the
    next rotation, when it stops being the recorded previous key. So a family holds at most
    the current key, one previous key and nothing active beyond its retention.
    """
    deactivate: list[ApiKeyInfo] = []
    delete: list[ApiKeyInfo] = []
    for key in members:
        if (current is not None and key.id == current.id) or retention.protects(key.id, now):
            continue
        if key.id == retention.key_id:
            if key.active:
                deactivate.append(key)
        else:
            delete.append(key)
    return Retirement(deactivate, delete)
