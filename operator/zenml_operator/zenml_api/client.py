"""The ZenML endpoints the operator uses: service accounts and their API keys.

Each method is one REST call (the key list: one per page) on a `ZenMLConnection`, which
logs in, retries and queues; shapes were checked against a real zenml 0.98.0 server (see
notes/zenml_facts.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self, Unpack

from zenml_operator.zenml_api.connection import ConnectionOptions, ZenMLConnection
from zenml_operator.zenml_api.errors import UnauthorizedError
from zenml_operator.zenml_api.models import (
    ApiKeyInfo,
    IssuedApiKey,
    ServiceAccountInfo,
    api_key_from,
    issued_key_from,
    parse_time,
    service_account_from,
)
from zenml_operator.zenml_api.routes import API_PREFIX, segment


class ZenMLClient:
    """Service accounts and API keys on one ZenML server, as one identity.

    `api_key` may be a callable, re-read on every login. With `username`, the secret is
    that user's password instead (ZenML OSS only lets admin *users* manage service
    accounts; see notes/zenml_facts.md). `observer` is called once per HTTP attempt.
    `background_rate`: requests per second at most for calls made inside
    `pacing.background_lane()` (None: not paced).
    """

    page_size: int = 100

    def __init__(
        self, url: str, api_key: str | Callable[[], str], **options: Unpack[ConnectionOptions]
    ) -> None:
        self._connection = ZenMLConnection(url, api_key, **options)

    @property
    def url(self) -> str:
        return self._connection.url

    @property
    def login_refused(self) -> UnauthorizedError | None:
        """The error of the last login if the server (or the key file) refused it."""
        return self._connection.login_refused

    async def aclose(self) -> None:
        await self._connection.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ---------------------------------------------------------- service accounts

    async def current_user_name(self) -> str:
        data = await self._connection.call("GET", f"{API_PREFIX}/current-user")
        return str(data["name"])

    async def server_info(self) -> ServerInfo:
        """The server's id, version and deployment type (`GET /info`)."""
        data = await self._connection.call("GET", f"{API_PREFIX}/info") or {}
        return ServerInfo(
            id=_text(data.get("id")),
            version=_text(data.get("version")),
            deployment_type=_text(data.get("deployment_type")),
        )

    async def ensure_login(self) -> None:
        """Log in unless already logged in; raises UnauthorizedError when refused."""
        await self._connection.ensure_login()

    def forget_token(self) -> None:
        """The credential changed: log in with it at the next request."""
        self._connection.forget_token()

    async def get_service_account(self, name_or_id: str) -> ServiceAccountInfo:
        data = await self._connection.call("GET", _account_path(name_or_id))
        return service_account_from(data)

    async def create_service_account(
        self, name: str, *, description: str = "", active: bool = True
    ) -> ServiceAccountInfo:
        data = await self._connection.call(
            "POST",
            f"{API_PREFIX}/service_accounts",
            json={"name": name, "description": description, "active": active},
            unsent_only=True,
        )
        return service_account_from(data)

    async def update_service_account(
        self, account_id: str, *, description: str | None = None, active: bool | None = None
    ) -> ServiceAccountInfo:
        update: dict[str, Any] = {}
        if description is not None:
            update["description"] = description
        if active is not None:
            update["active"] = active
        data = await self._connection.call("PUT", _account_path(account_id), json=update)
        return service_account_from(data)

    async def delete_service_account(self, account_id: str) -> None:
        await self._connection.call("DELETE", _account_path(account_id))

    # ------------------------------------------------------------------ API keys

    async def list_api_keys(self, account_id: str) -> list[ApiKeyInfo]:
        keys: list[ApiKeyInfo] = []
        page = 1
        while True:
            data = await self._connection.call(
                "GET",
                _keys_path(account_id),
                # hydrate=true: without it list items carry no metadata (description).
                params={"page": page, "size": self.page_size, "hydrate": "true"},
            )
            keys.extend(api_key_from(item) for item in data.get("items", []))
            if page >= int(data.get("total_pages") or 0):
                return keys
            page += 1

    async def get_api_key(self, account_id: str, name_or_id: str) -> ApiKeyInfo:
        data = await self._connection.call("GET", _key_path(account_id, name_or_id))
        return api_key_from(data)

    async def create_api_key(
        self, account_id: str, name: str, *, description: str = ""
    ) -> IssuedApiKey:
        data = await self._connection.call(
            "POST",
            _keys_path(account_id),
            json={"name": name, "description": description},
            unsent_only=True,
            heavy=True,
        )
        return issued_key_from(data)

    async def update_api_key(
        self,
        account_id: str,
        key_id: str,
        *,
        description: str | None = None,
        active: bool | None = None,
    ) -> ApiKeyInfo:
        update: dict[str, Any] = {}
        if description is not None:
            update["description"] = description
        if active is not None:
            update["active"] = active
        data = await self._connection.call("PUT", _key_path(account_id, key_id), json=update)
        return api_key_from(data)

    async def rotate_api_key(
        self, account_id: str, key_id: str, *, retain_period_minutes: int = 0
    ) -> IssuedApiKey:
        # Not idempotent: a blind second rotation would kill the retained previous key.
        data = await self._connection.call(
            "PUT",
            f"{_key_path(account_id, key_id)}/rotate",
            json={"retain_period_minutes": retain_period_minutes},
            unsent_only=True,
            heavy=True,
        )
        issued = issued_key_from(data)
        if data.get("metadata"):
            return issued
        # The rotate response has `metadata: null`. The server sets last_rotated to the
        # same instant as `updated` and stores the requested retain period, so fill them
        # in here rather than risk a follow-up GET failing after the key was issued.
        filled = dataclasses.replace(
            issued.info,
            last_rotated=parse_time((data.get("body") or {}).get("updated")),
            retain_period_minutes=retain_period_minutes,
        )
        return IssuedApiKey(info=filled, value=issued.value)

    async def delete_api_key(self, account_id: str, key_id: str) -> None:
        await self._connection.call("DELETE", _key_path(account_id, key_id))


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    id: str | None
    version: str | None
    deployment_type: str | None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _account_path(name_or_id: str) -> str:
    return f"{API_PREFIX}/service_accounts/{segment(name_or_id)}"


def _keys_path(account_id: str) -> str:
    # Key routes take the account UUID only; a name gives 422.
    return f"{_account_path(account_id)}/api_keys"


def _key_path(account_id: str, name_or_id: str) -> str:
    return f"{_keys_path(account_id)}/{segment(name_or_id)}"
