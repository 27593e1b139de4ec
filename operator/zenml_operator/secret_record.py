"""The record the operator keeps in each key Secret's annotations: the one owner of them.

The Secret is the record both controllers read (the ServiceAccount's and the rotation's):
which ZenML key it holds and since when, the previous key and until when it must keep
working, how many rotations were made and which on-demand request was answered last. It is
written in the same update as the value, so it can never disagree with the value.

It also holds a digest of the key value written (SHA-256, hex; as External Secrets Operator
records a data hash on its Secrets): ZenML never shows a key's value again, so the digest is
how the operator tells, without asking ZenML, that the Secret no longer holds the value it
wrote (replaced by hand, an older value of the same key restored, a bad overlay). A SHA-256
of a high-entropy key reveals nothing usable. Only the key value is digested: the URL and
the data key names are restored from the spec without a new key.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
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
ANN_VALUE_DIGEST = "zenml.io/api-key-digest"


def value_digest(value: str | bytes) -> str:
    """SHA-256 (hex) of a key value as the Secret holds it (the decoded bytes)."""
    raw = value.encode() if isinstance(value, str) else value
    return hashlib.sha256(raw).hexdigest()


def data_digest(data_value: str | None) -> str | None:
    """The digest of a Secret `data` entry (base64), None when absent or not base64."""
    if not data_value:
        return None
    try:
        return value_digest(base64.b64decode(data_value, validate=True))
    except (binascii.Error, ValueError):
        return None


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
    value_digest: str | None  # digest of the value written (None: a Secret written before)

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
            value_digest=ann.get(ANN_VALUE_DIGEST) or None,
        )


def value_annotations(key_id: str, issued_at: str, key_value: str) -> dict[str, str]:
    """What a write of a new value records (with the value, in the same update)."""
    return {ANN_KEY_ID: key_id, ANN_ISSUED_AT: issued_at, ANN_VALUE_DIGEST: value_digest(key_value)}


def record_from_rotation_status(status: Mapping[str, Any]) -> dict[str, str]:
    """The rotation record as an ApiKeyRotation's status last saw it, for a Secret that lost
    its own (deleted, or restored from an older copy): the count, the answered request,
    and the previous key with the time it stays valid."""
    record: dict[str, str] = {}
    if status.get("rotationCount"):
        record[ANN_ROTATION_COUNT] = str(int(status["rotationCount"]))
    if status.get("lastRotateRequest"):
        record[ANN_ROTATE_REQUEST] = str(status["lastRotateRequest"])
    if status.get("previousKeyId") and status.get("previousKeyValidUntil"):
        record[ANN_PREVIOUS_KEY_ID] = str(status["previousKeyId"])
        record[ANN_PREVIOUS_VALID_UNTIL] = str(status["previousKeyValidUntil"])
    return record


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
