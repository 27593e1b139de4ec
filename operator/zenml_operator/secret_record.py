"""The record the operator keeps in each key Secret's annotations: the one owner of them.

The Secret is the record both controllers read (the ServiceAccount's and the rotation's):
which ZenML key it holds and since when, the previous key and until when it must keep
working, how many rotations were made and which on-demand request was answered last. It is
written in the same update as the value, so it can never disagree with the value.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from zenml_operator.timestamps import iso, parse_time

ANN_KEY_ID = "zenml.io/api-key-id"
ANN_ISSUED_AT = "zenml.io/issued-at"
ANN_PREVIOUS_KEY_ID = "zenml.io/previous-api-key-id"
ANN_PREVIOUS_VALID_UNTIL = "zenml.io/previous-key-valid-until"
ANN_ROTATION_COUNT = "zenml.io/rotation-count"
ANN_ROTATE_REQUEST = "zenml.io/rotate-request"


def annotations(secret: Mapping[str, Any] | None) -> Mapping[str, str]:
    return ((secret or {}).get("metadata") or {}).get("annotations") or {}


@dataclass(frozen=True)
class Retention:
    """The previous key and until when it must keep working."""

    key_id: str | None
    valid_until: datetime.datetime | None

    def protects(self, key_id: str, now: datetime.datetime) -> bool:
        return self.key_id == key_id and self.valid_until is not None and now < self.valid_until


@dataclass(frozen=True)
class SecretRecord:
    key_id: str | None  # the ZenML key whose value the Secret holds
    issued_at: datetime.datetime | None  # when that value was issued
    retention: Retention
    rotation_count: int
    answered_request: str  # the last on-demand rotation request acted on ("" if none)

    @classmethod
    def of(cls, secret: Mapping[str, Any] | None) -> SecretRecord:
        ann = annotations(secret)
        return cls(
            key_id=ann.get(ANN_KEY_ID) or None,
            issued_at=parse_time(ann.get(ANN_ISSUED_AT)),
            retention=Retention(
                ann.get(ANN_PREVIOUS_KEY_ID) or None, parse_time(ann.get(ANN_PREVIOUS_VALID_UNTIL))
            ),
            rotation_count=int(ann.get(ANN_ROTATION_COUNT, "0") or 0),
            answered_request=ann.get(ANN_ROTATE_REQUEST, ""),
        )


def value_annotations(key_id: str, issued_at: str) -> dict[str, str]:
    """What a write of a new value records (with the value, in the same update)."""
    return {ANN_KEY_ID: key_id, ANN_ISSUED_AT: issued_at}


def rotation_annotations(
    *, previous_key_id: str, previous_valid_until: datetime.datetime, count: int, request: str
) -> dict[str, str]:
    """What a rotation records besides the new value: the previous key and its retention,
    the count, and the on-demand request it answers (each request fires once)."""
    record = {
        ANN_PREVIOUS_KEY_ID: previous_key_id,
        ANN_PREVIOUS_VALID_UNTIL: iso(previous_valid_until),
        ANN_ROTATION_COUNT: str(count),
    }
    if request:
        record[ANN_ROTATE_REQUEST] = request
    return record
