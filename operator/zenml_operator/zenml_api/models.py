"""The service accounts and API keys ZenML returns, as frozen dataclasses.

Parsing is lenient where the server is: `metadata` is null in list responses unless
hydrated and in the rotate response, and timestamps come without a time zone (UTC).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from zenml_operator.zenml_api.errors import ZenMLError
from zenml_operator.zenml_api.secrecy import ApiKeyValue


@dataclass(frozen=True)
class ServiceAccountInfo:
    id: str
    name: str
    active: bool
    description: str
    created: datetime | None


@dataclass(frozen=True)
class AccountRef:
    """The owning account as a key response nests it (no description: metadata is null)."""

    id: str
    name: str
    active: bool


@dataclass(frozen=True)
class ApiKeyInfo:
    id: str
    name: str
    active: bool
    description: str
    created: datetime | None
    last_rotated: datetime | None
    retain_period_minutes: int | None
    # What the response said about the owning account: lets a resync check the account
    # (exists, name, active) from the key list alone. Not part of a key's identity.
    account: AccountRef | None = field(default=None, compare=False)


@dataclass(frozen=True)
class IssuedApiKey:
    info: ApiKeyInfo
    value: ApiKeyValue


def parse_time(value: Any) -> datetime | None:
    """ZenML sends naive ISO timestamps in UTC; return them timezone-aware."""
    if not isinstance(value, str) or not value:
        return None
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _sections(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    # `metadata` is null in list responses unless ?hydrate=true; treat it as empty.
    return data.get("body") or {}, data.get("metadata") or {}


def service_account_from(data: dict[str, Any]) -> ServiceAccountInfo:
    body, metadata = _sections(data)
    return ServiceAccountInfo(
        id=str(data["id"]),
        name=str(data["name"]),
        active=bool(body.get("active", False)),
        description=metadata.get("description") or "",
        created=parse_time(body.get("created")),
    )


def _account_ref(data: Any) -> AccountRef | None:
    if not isinstance(data, dict) or not data.get("id") or not data.get("name"):
        return None
    body = data.get("body") or {}
    return AccountRef(id=str(data["id"]), name=str(data["name"]), active=bool(body.get("active")))


def api_key_from(data: dict[str, Any]) -> ApiKeyInfo:
    body, metadata = _sections(data)
    return ApiKeyInfo(
        id=str(data["id"]),
        name=str(data["name"]),
        active=bool(body.get("active", False)),
        description=metadata.get("description") or "",
        created=parse_time(body.get("created")),
        last_rotated=parse_time(metadata.get("last_rotated")),
        retain_period_minutes=metadata.get("retain_period_minutes"),
        account=_account_ref(body.get("service_account")),
    )


def issued_key_from(data: dict[str, Any]) -> IssuedApiKey:
    """A create/rotate response: the key and its value (the only time ZenML sends it)."""
    key = (data.get("body") or {}).get("key")
    if not isinstance(key, str) or not key:
        # Never echo the response: it may hold other secrets.
        raise ZenMLError("ZenML returned no key value in a create/rotate response")
    return IssuedApiKey(info=api_key_from(data), value=ApiKeyValue(key))
