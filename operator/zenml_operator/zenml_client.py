"""Async REST client for the parts of the ZenML server API the operator needs.

The operator never imports `zenml`: it speaks REST with httpx. Shapes and behaviour were
checked against a real zenml 0.98.0 server (see notes/zenml_facts.md).

Safety rules this module keeps:
- No cookie jar. The server sets a session cookie at login and reads it BEFORE the
  Authorization header, so a client that kept cookies would silently act as whoever
  logged in last.
- Error messages name the method, the path and a short, redacted server `detail`; they
  never contain request bodies, API key values or tokens.
- Key values only exist inside `ApiKeyValue`, whose repr/str are masked.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.cookiejar import Cookie, CookieJar
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, unquote

import httpx

API_PREFIX = "/api/v1"
API_KEY_PREFIX = "ZENKEY_"
API_KEY_ENV = "ZENML_STORE_API_KEY"
API_KEY_FILE_ENV = "ZENML_STORE_API_KEY_FILE"

# Errors raised before a single byte of the request reached the server: retrying them
# can never duplicate a create or a rotation.
_UNSENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_MAX_DETAIL = 300
_MAX_BACKOFF = 10.0


# --------------------------------------------------------------------------- errors


class ZenMLError(Exception):
    """A ZenML call failed. The message never contains request bodies or key values."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        method: str | None = None,
        path: str | None = None,
        detail: str = "",
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.method = method
        self.path = path
        self.detail = detail


class NotFoundError(ZenMLError):
    """404: the service account or API key does not exist."""


class ConflictError(ZenMLError):
    """409: an object with that name already exists."""


class ForbiddenError(ZenMLError):
    """403: the operator's identity may not do this (on ZenML OSS: not an admin), or the
    server refuses the operation (e.g. deleting an account that owns resources)."""


class UnauthorizedError(ZenMLError):
    """401: the operator's credential or token was rejected."""


class UnavailableError(ZenMLError):
    """Connection errors, timeouts or 5xx, after the allowed retries."""


class BadRequestError(ZenMLError):
    """400/422: the server rejected the request as invalid."""


_STATUS_ERRORS: dict[int, type[ZenMLError]] = {
    400: BadRequestError,
    401: UnauthorizedError,
    403: ForbiddenError,
    404: NotFoundError,
    409: ConflictError,
    422: BadRequestError,
}


# --------------------------------------------------------------------------- models


class ApiKeyValue:
    """An API key value that does not leak through repr(), str(), logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<ApiKeyValue ***>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ApiKeyValue) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


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


def _parse_time(value: Any) -> datetime | None:
    """ZenML sends naive ISO timestamps in UTC; return them timezone-aware."""
    if not isinstance(value, str) or not value:
        return None
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _sections(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    # `metadata` is null in list responses unless ?hydrate=true; treat it as empty.
    return data.get("body") or {}, data.get("metadata") or {}


def _service_account(data: dict[str, Any]) -> ServiceAccountInfo:
    body, metadata = _sections(data)
    return ServiceAccountInfo(
        id=str(data["id"]),
        name=str(data["name"]),
        active=bool(body.get("active", False)),
        description=metadata.get("description") or "",
        created=_parse_time(body.get("created")),
    )


def _account_ref(data: Any) -> AccountRef | None:
    if not isinstance(data, dict) or not data.get("id") or not data.get("name"):
        return None
    body = data.get("body") or {}
    return AccountRef(id=str(data["id"]), name=str(data["name"]), active=bool(body.get("active")))


def _api_key(data: dict[str, Any]) -> ApiKeyInfo:
    body, metadata = _sections(data)
    return ApiKeyInfo(
        id=str(data["id"]),
        name=str(data["name"]),
        active=bool(body.get("active", False)),
        description=metadata.get("description") or "",
        created=_parse_time(body.get("created")),
        last_rotated=_parse_time(metadata.get("last_rotated")),
        retain_period_minutes=metadata.get("retain_period_minutes"),
        account=_account_ref(body.get("service_account")),
    )


def _issued_key(data: dict[str, Any]) -> IssuedApiKey:
    key = (data.get("body") or {}).get("key")
    if not isinstance(key, str) or not key:
        # Never echo the response: it may hold other secrets.
        raise ZenMLError("ZenML returned no key value in a create/rotate response")
    return IssuedApiKey(info=_api_key(data), value=ApiKeyValue(key))


# --------------------------------------------------------------------------- helpers


class _NoCookieJar(CookieJar):
    """A jar that never stores a cookie (see the module docstring for why)."""

    def set_cookie(self, cookie: Cookie) -> None:
        return None

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None


def no_cookie_jar() -> CookieJar:
    """A cookie jar for httpx clients that talk to ZenML: it never keeps a cookie."""
    return _NoCookieJar()


_SECRET_PATTERNS = (
    re.compile(re.escape(API_KEY_PREFIX) + r"[A-Za-z0-9+/=_\-]*"),
    re.compile(r"eyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*"),  # JWTs
)
_VALIDATION_ITEM = re.compile(r"'loc': \(([^)]*)\), 'msg': '([^']*)'")


def _redact(text: str) -> str:
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub("***", text)
    return text


def _detail_text(response: httpx.Response) -> str:
    """A short, safe summary of the server's error detail.

    ZenML answers `{"detail": [<ExceptionType>, <message>]}` for most errors but a bare
    `[<ExceptionType>, <message>]` for validation errors, whose message embeds the
    request body as `'input': {...}`: for those keep only the field locations and
    messages, never the input.
    """
    try:
        payload = response.json()
    except ValueError:
        return ""
    detail = payload.get("detail", payload) if isinstance(payload, dict) else payload
    if isinstance(detail, list) and len(detail) == 2 and all(isinstance(x, str) for x in detail):
        text = detail[1]
    elif isinstance(detail, str):
        text = detail
    elif isinstance(detail, list):  # FastAPI's own validation format
        items = [d for d in detail if isinstance(d, dict)]
        text = "; ".join(
            f"{'.'.join(str(p) for p in d.get('loc', ()))}: {d.get('msg', '')}" for d in items
        )
    else:
        return ""
    fields = _VALIDATION_ITEM.findall(text)
    if fields:
        text = "; ".join(
            f"{'.'.join(p.strip().strip(chr(39)) for p in loc.split(',') if p.strip())}: {msg}"
            for loc, msg in fields
        )
    text = _redact(text.strip().splitlines()[0] if text.strip() else "").strip("\"' ")
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


def _error_for(response: httpx.Response, method: str, path: str) -> ZenMLError:
    status = response.status_code
    detail = _detail_text(response)
    message = f"ZenML {method} {path} failed with HTTP {status}"
    if detail:
        message += f": {detail}"
    if status >= 500:
        cls: type[ZenMLError] = UnavailableError
    else:
        cls = _STATUS_ERRORS.get(status, ZenMLError)
    return cls(message, status_code=status, method=method, path=path, detail=detail)


def _seg(value: str) -> str:
    """Quote one path segment so names with '/' or '?' cannot change the route."""
    return quote(value, safe="")


def _validate_api_key(value: str, source: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError(f"{source} is empty: set it to a ZenML service account API key")
    if not value.startswith(API_KEY_PREFIX) or len(value) <= len(API_KEY_PREFIX):
        raise ValueError(
            f"{source} does not hold a ZenML API key (expected a value starting with "
            f"{API_KEY_PREFIX!r})"
        )
    return value


def api_key_from_env(environ: dict[str, str] | None = None) -> str | Callable[[], str]:
    """The operator's own credential from the environment.

    `ZENML_STORE_API_KEY_FILE` wins and yields a callable that re-reads the file on every
    login, so a rotated Secret mounted as a volume is picked up without a restart.
    Otherwise `ZENML_STORE_API_KEY` is returned as a string.
    """
    env = os.environ if environ is None else environ
    file_name = env.get(API_KEY_FILE_ENV, "").strip()
    if file_name:
        path = Path(file_name)
        source = f"{API_KEY_FILE_ENV} ({path})"

        def read_key() -> str:
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(f"cannot read {source}: {exc.strerror}") from None
            return _validate_api_key(text, source)

        read_key()  # fail at start-up, not at the first login
        return read_key
    if API_KEY_ENV not in env:
        raise ValueError(f"{API_KEY_ENV} (or {API_KEY_FILE_ENV}) is not set")
    return _validate_api_key(env[API_KEY_ENV], API_KEY_ENV)


# ------------------------------------------------------------------- observability

# Called once per HTTP attempt (retries included): method, route template (see
# `route_template`), HTTP status or None when no response came back, and seconds taken.
RequestObserver = Callable[[str, str, int | None, float], None]

_VAR = None  # a variable segment in _ROUTES
_ROUTES: tuple[tuple[str | None, ...], ...] = (
    ("login",),
    ("current-user",),
    ("service_accounts",),
    ("service_accounts", _VAR),
    ("service_accounts", _VAR, "api_keys"),
    ("service_accounts", _VAR, "api_keys", _VAR),
    ("service_accounts", _VAR, "api_keys", _VAR, "rotate"),
)
_UUID = re.compile(r"^[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}$")
OTHER_ROUTE = f"{API_PREFIX}/other"


def route_template(path: str) -> str:
    """The route of a request path with its variable parts collapsed, for metric labels.

    Only the routes this client calls are recognised, by position (an account named
    "rotate" stays a variable); a UUID becomes ``{id}`` and any other value ``{name}``, so
    a label never holds a name or an id and the number of label values stays bounded.
    Any other path is ``/api/v1/other``: a path is never echoed.
    """
    path = path.split("?", 1)[0]
    if not path.startswith(API_PREFIX + "/"):
        return OTHER_ROUTE
    segments = path[len(API_PREFIX) + 1 :].rstrip("/").split("/")
    for route in _ROUTES:
        if len(route) != len(segments):
            continue
        parts = []
        for expected, actual in zip(route, segments, strict=True):
            if expected is _VAR:
                if not actual:
                    break
                parts.append("{id}" if _UUID.match(unquote(actual)) else "{name}")
            elif expected == actual:
                parts.append(expected)
            else:
                break
        else:
            return "/".join((API_PREFIX, *parts))
    return OTHER_ROUTE


# --------------------------------------------------------------------------- client


class ZenMLClient:
    """Service accounts and API keys on one ZenML server, as one identity.

    `api_key` may be a callable, re-read on every login. With `username`, the secret is
    that user's password instead (ZenML OSS only lets admin *users* manage service
    accounts; see notes/zenml_facts.md).
    """

    page_size: int = 100

    def __init__(
        self,
        url: str,
        api_key: str | Callable[[], str],
        *,
        timeout: float = 10.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_connections: int = 50,
        heavy_concurrency: int = 8,
        username: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        observer: RequestObserver | None = None,
    ) -> None:
        self._url = url.rstrip("/")
        self._observer = observer
        self._secret = api_key
        self._username = username
        self._max_retries = max(0, max_retries)
        self._backoff = backoff
        self._token: str | None = None
        self._login_lock = asyncio.Lock()
        # The last login's refusal, until a login succeeds: lets callers that need no
        # request right now still report a dead credential (see `login_refused`).
        self._refused: UnauthorizedError | None = None
        # Requests wait here, not in httpcore's pool: its bookkeeping is quadratic in the
        # number of waiters (it was ~40% of the operator's CPU with 1000 queued requests).
        self._in_flight = asyncio.Semaphore(max(1, max_connections))
        # Key creates, rotations and logins cost the server ~0.3-1 s of CPU each (bcrypt).
        # Sent all at once, they queue inside the server until they time out here and the
        # reconciles retry: a few at a time keep the server busy and every request short.
        self._heavy = asyncio.Semaphore(max(1, heavy_concurrency))
        self.request_count = 0
        self._http = httpx.AsyncClient(
            base_url=self._url,
            # No pool timeout: waiting for a connection is queueing, not a slow server.
            timeout=httpx.Timeout(timeout, pool=None),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            cookies=no_cookie_jar(),
            transport=transport,
            follow_redirects=False,
        )

    @property
    def url(self) -> str:
        return self._url

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ----------------------------------------------------------------- transport

    async def _send(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        data: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
        token: str | None = None,
        unsent_only: bool = False,
        heavy: bool = False,
    ) -> httpx.Response:
        """One logical request with bounded retries.

        `unsent_only` is for non-idempotent calls (create, rotate): those are retried
        only when the request surely never reached the server; a retried create that
        did land shows up as a 409 the caller handles. `heavy` requests (key hashing on
        the server) also wait for one of the few heavy slots.
        """
        headers = {"Authorization": f"Bearer {token}"} if token else None
        attempts = self._max_retries + 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            started = time.monotonic()
            try:
                # Heavy slot first: a request waiting for one holds no in-flight slot.
                heavy_slot = self._heavy if heavy else contextlib.nullcontext()
                async with heavy_slot, self._in_flight:
                    started = time.monotonic()
                    self.request_count += 1
                    response = await self._http.request(
                        method, path, json=json, data=data, params=params, headers=headers
                    )
            except httpx.TransportError as exc:
                self._observe(method, path, None, started)
                if last or (unsent_only and not isinstance(exc, _UNSENT_ERRORS)):
                    raise UnavailableError(
                        f"ZenML {method} {path} failed: server at {self._url} unreachable "
                        f"after {attempt + 1} attempt(s) ({type(exc).__name__}: {exc})",
                        method=method,
                        path=path,
                    ) from exc
            else:
                self._observe(method, path, response.status_code, started)
                if response.status_code < 500 or unsent_only or last:
                    return response
            await asyncio.sleep(self._delay(attempt))
        raise AssertionError("unreachable")  # the loop always returns or raises

    def _observe(self, method: str, path: str, status: int | None, started: float) -> None:
        if self._observer is None:
            return
        with contextlib.suppress(Exception):  # metrics must never break a request
            self._observer(method, route_template(path), status, time.monotonic() - started)

    def _delay(self, attempt: int) -> float:
        # Full exponential backoff with jitter so many reconcilers do not retry in step.
        return min(_MAX_BACKOFF, self._backoff * 2**attempt) * random.uniform(0.5, 1.0)

    def _read_secret(self) -> str:
        try:
            secret = self._secret() if callable(self._secret) else self._secret
        except ValueError as exc:  # api_key_from_env's messages name the variable only
            raise UnauthorizedError(f"cannot read the operator's credential: {exc}") from None
        return secret.strip()

    @property
    def login_refused(self) -> UnauthorizedError | None:
        """The error of the last login if the server (or the key file) refused it."""
        return self._refused

    async def _login(self) -> str:
        try:
            token = await self._login_once()
        except UnauthorizedError as exc:
            self._refused = exc
            raise
        self._refused = None
        return token

    async def _login_once(self) -> str:
        secret = self._read_secret()
        form = {"password": secret}
        if self._username is not None:
            form["username"] = self._username
        path = f"{API_PREFIX}/login"
        response = await self._send("POST", path, data=form, heavy=True)
        if response.status_code in (401, 403):
            raise UnauthorizedError(
                self._rejected_message(response),
                status_code=response.status_code,
                method="POST",
                path=path,
                detail=_detail_text(response),
            )
        if not response.is_success:
            raise _error_for(response, "POST", path)
        return _token_from(response, path)

    def _rejected_message(self, response: httpx.Response) -> str:
        if self._username is not None:
            who = f"the password of user {self._username!r}"
        else:
            who = f"the operator's API key ({API_KEY_ENV})"
        message = f"ZenML at {self._url} rejected {who}: revoked, deactivated or malformed"
        detail = _detail_text(response)
        return f"{message} (server said: {detail})" if detail else message

    async def _current_token(self) -> str:
        if self._token is not None:
            return self._token
        async with self._login_lock:  # concurrent first callers share one login
            if self._token is None:
                self._token = await self._login()
            return self._token

    async def _renew_token(self, rejected: str) -> str:
        async with self._login_lock:
            # Another caller may already have replaced the rejected token.
            if self._token is None or self._token == rejected:
                self._token = None
                self._token = await self._login()
            return self._token

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        unsent_only: bool = False,
        heavy: bool = False,
    ) -> Any:
        token = await self._current_token()
        send = {"json": json, "params": params, "unsent_only": unsent_only, "heavy": heavy}
        response = await self._send(method, path, token=token, **send)
        if response.status_code == 401:
            # Token expired or invalidated: log in again once. A 401 means the server
            # rejected the request before acting on it, so a create may be re-sent.
            token = await self._renew_token(token)
            response = await self._send(method, path, token=token, **send)
        if not response.is_success:
            raise _error_for(response, method, path)
        return response.json() if response.content else None

    # ---------------------------------------------------------- service accounts

    async def current_user_name(self) -> str:
        data = await self._call("GET", f"{API_PREFIX}/current-user")
        return str(data["name"])

    async def get_service_account(self, name_or_id: str) -> ServiceAccountInfo:
        data = await self._call("GET", f"{API_PREFIX}/service_accounts/{_seg(name_or_id)}")
        return _service_account(data)

    async def create_service_account(
        self, name: str, *, description: str = "", active: bool = True
    ) -> ServiceAccountInfo:
        data = await self._call(
            "POST",
            f"{API_PREFIX}/service_accounts",
            json={"name": name, "description": description, "active": active},
            unsent_only=True,
        )
        return _service_account(data)

    async def update_service_account(
        self, account_id: str, *, description: str | None = None, active: bool | None = None
    ) -> ServiceAccountInfo:
        update: dict[str, Any] = {}
        if description is not None:
            update["description"] = description
        if active is not None:
            update["active"] = active
        data = await self._call(
            "PUT", f"{API_PREFIX}/service_accounts/{_seg(account_id)}", json=update
        )
        return _service_account(data)

    async def delete_service_account(self, account_id: str) -> None:
        await self._call("DELETE", f"{API_PREFIX}/service_accounts/{_seg(account_id)}")

    # ------------------------------------------------------------------ API keys

    def _keys_path(self, account_id: str) -> str:
        # Key routes take the account UUID only; a name gives 422.
        return f"{API_PREFIX}/service_accounts/{_seg(account_id)}/api_keys"

    async def list_api_keys(self, account_id: str) -> list[ApiKeyInfo]:
        keys: list[ApiKeyInfo] = []
        page = 1
        while True:
            data = await self._call(
                "GET",
                self._keys_path(account_id),
                # hydrate=true: without it list items carry no metadata (description).
                params={"page": page, "size": self.page_size, "hydrate": "true"},
            )
            keys.extend(_api_key(item) for item in data.get("items", []))
            if page >= int(data.get("total_pages") or 0):
                return keys
            page += 1

    async def get_api_key(self, account_id: str, name_or_id: str) -> ApiKeyInfo:
        data = await self._call("GET", f"{self._keys_path(account_id)}/{_seg(name_or_id)}")
        return _api_key(data)

    async def create_api_key(
        self, account_id: str, name: str, *, description: str = ""
    ) -> IssuedApiKey:
        data = await self._call(
            "POST",
            self._keys_path(account_id),
            json={"name": name, "description": description},
            unsent_only=True,
            heavy=True,
        )
        return _issued_key(data)

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
        data = await self._call("PUT", f"{self._keys_path(account_id)}/{_seg(key_id)}", json=update)
        return _api_key(data)

    async def rotate_api_key(
        self, account_id: str, key_id: str, *, retain_period_minutes: int = 0
    ) -> IssuedApiKey:
        # Not idempotent: a blind second rotation would kill the retained previous key.
        data = await self._call(
            "PUT",
            f"{self._keys_path(account_id)}/{_seg(key_id)}/rotate",
            json={"retain_period_minutes": retain_period_minutes},
            unsent_only=True,
            heavy=True,
        )
        issued = _issued_key(data)
        if data.get("metadata"):
            return issued
        # The rotate response has `metadata: null`. The server sets last_rotated to the
        # same instant as `updated` and stores the requested retain period, so fill them
        # in here rather than risk a follow-up GET failing after the key was issued.
        info = issued.info
        filled = ApiKeyInfo(
            id=info.id,
            name=info.name,
            active=info.active,
            description=info.description,
            created=info.created,
            last_rotated=_parse_time((data.get("body") or {}).get("updated")),
            retain_period_minutes=retain_period_minutes,
            account=info.account,
        )
        return IssuedApiKey(info=filled, value=issued.value)

    async def delete_api_key(self, account_id: str, key_id: str) -> None:
        await self._call("DELETE", f"{self._keys_path(account_id)}/{_seg(key_id)}")


def _token_from(response: httpx.Response, path: str) -> str:
    try:
        token = response.json().get("access_token")
    except (ValueError, AttributeError):
        token = None
    if not isinstance(token, str) or not token:
        raise ZenMLError(
            f"ZenML POST {path} returned no access token",
            status_code=response.status_code,
            method="POST",
            path=path,
        )
    return token


async def login_with_api_key(url: str, api_key: str, *, timeout: float = 10.0) -> str:
    """Log in with an API key on a fresh, cookie-less client; return the access token.

    Useful to prove that an issued key works. Raises UnauthorizedError on 401/403.
    """
    path = f"{API_PREFIX}/login"
    async with httpx.AsyncClient(
        base_url=url.rstrip("/"), timeout=httpx.Timeout(timeout), cookies=no_cookie_jar()
    ) as http:
        try:
            response = await http.post(path, data={"password": api_key})
        except httpx.TransportError as exc:
            raise UnavailableError(
                f"ZenML POST {path} failed: server at {url} unreachable ({type(exc).__name__})",
                method="POST",
                path=path,
            ) from exc
    if response.status_code in (401, 403):
        detail = _detail_text(response)
        message = f"ZenML at {url} rejected the API key"
        raise UnauthorizedError(
            f"{message} (server said: {detail})" if detail else message,
            status_code=response.status_code,
            method="POST",
            path=path,
            detail=detail,
        )
    if not response.is_success:
        raise _error_for(response, "POST", path)
    return _token_from(response, path)
