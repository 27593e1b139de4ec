"""One identity's connection to one ZenML server: cookie-less HTTP, login and token
renewal, bounded retries, request queues, and a hook that observes every attempt.

- No cookie jar. The server sets a session cookie at login and reads it BEFORE the
  Authorization header, so a client that kept cookies would silently act as whoever
  logged in last.
- Requests wait in this connection's own queues, not in httpcore's pool (its bookkeeping
  is quadratic in the number of waiters), and with no pool timeout: a burst queues instead
  of timing out and being retried.
- A create or a rotation is retried only when the request surely never left this process.
- Background work (see `pacing`) is paced: each of its attempts first waits for its turn,
  at most one per 1/background rate; other requests never wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from http.cookiejar import Cookie, CookieJar
from typing import Any, TypedDict

import httpx

from zenml_operator.zenml_api.errors import (
    UnauthorizedError,
    UnavailableError,
    ZenMLError,
    detail_text,
    error_for,
)
from zenml_operator.zenml_api.pacing import RateLimiter, pace
from zenml_operator.zenml_api.routes import API_PREFIX, route_template

# Errors raised before a single byte of the request reached the server: retrying them
# can never duplicate a create or a rotation.
_UNSENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_MAX_BACKOFF = 10.0

# Called once per HTTP attempt (retries included): method, route template (see
# `routes.route_template`), HTTP status or None when no response came back, and seconds.
RequestObserver = Callable[[str, str, int | None, float], None]


# Called when the server refused a login: re-reads the credential from where it lives (a
# Secret) and says whether it changed, in which case the login is tried once more.
SecretRefresher = Callable[[], Awaitable[bool]]


class ConnectionOptions(TypedDict, total=False):
    """The keyword arguments of `ZenMLConnection` besides url and secret (`ZenMLClient`
    passes them through)."""

    timeout: float
    max_retries: int
    backoff: float
    max_connections: int
    heavy_concurrency: int
    username: str | None
    transport: httpx.AsyncBaseTransport | None
    observer: RequestObserver | None
    background_rate: float | None
    verify: ssl.SSLContext | bool
    refresh_secret: SecretRefresher | None
    credential_source: str | None


class _NoCookieJar(CookieJar):
    """A jar that never stores a cookie (see the module docstring for why)."""

    def set_cookie(self, cookie: Cookie) -> None:
        return None

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None


def no_cookie_jar() -> CookieJar:
    """A cookie jar for httpx clients that talk to ZenML: it never keeps a cookie."""
    return _NoCookieJar()


def token_from(response: httpx.Response, path: str) -> str:
    """The access token of a successful login response."""
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


class ZenMLConnection:
    """Authenticated requests to one ZenML server, as one identity.

    `secret` may be a callable, re-read on every login. With `username`, the secret is
    that user's password instead of an API key.
    """

    def __init__(
        self,
        url: str,
        secret: str | Callable[[], str],
        *,
        timeout: float = 10.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_connections: int = 16,
        heavy_concurrency: int = 4,
        username: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        observer: RequestObserver | None = None,
        background_rate: float | None = None,
        verify: ssl.SSLContext | bool = True,
        refresh_secret: SecretRefresher | None = None,
        credential_source: str | None = None,
    ) -> None:
        self._url = url.rstrip("/")
        self._refresh_secret = refresh_secret
        # What a refused login names as the credential (default: the operator's own).
        self._credential_source = credential_source
        self._observer = observer
        # Requests made from `pacing.background_lane()` wait for their turn at this limiter
        # (None or <= 0: background work is not paced). Other requests never wait for it.
        self._pacer = RateLimiter(background_rate) if (background_rate or 0) > 0 else None
        self._secret = secret
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
            verify=verify,
        )

    @property
    def url(self) -> str:
        return self._url

    @property
    def login_refused(self) -> UnauthorizedError | None:
        """The error of the last login if the server (or the key file) refused it."""
        return self._refused

    async def aclose(self) -> None:
        await self._http.aclose()

    async def ensure_login(self) -> None:
        """Log in now unless a token is held (raises the refusal)."""
        await self._current_token()

    def forget_token(self) -> None:
        """The credential changed: the next request logs in with it (requests in flight
        finish with the token they have)."""
        self._token = None

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        unsent_only: bool = False,
        heavy: bool = False,
    ) -> Any:
        """One authenticated call: its JSON answer, or the `ZenMLError` for its status.

        Logs in on first use and once more when the token is rejected. `unsent_only` and
        `heavy` as in `_send`.
        """
        token = await self._current_token()
        send = {"json": json, "params": params, "unsent_only": unsent_only, "heavy": heavy}
        response = await self._send(method, path, token=token, **send)
        if response.status_code == 401:
            # Token expired or invalidated: log in again once. A 401 means the server
            # rejected the request before acting on it, so a create may be re-sent.
            token = await self._renew_token(token)
            response = await self._send(method, path, token=token, **send)
        if not response.is_success:
            raise error_for(response, method, path)
        return response.json() if response.content else None

    # ------------------------------------------------------------------ sending

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
            await pace(self._pacer)  # background work only; every attempt waits its turn
            started = time.monotonic()
            try:
                # Heavy slot first: a request waiting for one holds no in-flight slot.
                heavy_slot = self._heavy if heavy else contextlib.nullcontext()
                async with heavy_slot, self._in_flight:
                    started = time.monotonic()
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

    # -------------------------------------------------------------------- login

    def _read_secret(self) -> str:
        try:
            secret = self._secret() if callable(self._secret) else self._secret
        except ValueError as exc:  # api_key_from_env's messages name the variable only
            raise UnauthorizedError(f"cannot read the operator's credential: {exc}") from None
        return secret.strip()

    async def _login(self) -> str:
        try:
            try:
                token = await self._login_once()
            except UnauthorizedError:
                # The credential may have been replaced where it lives (rotated in place):
                # read it again, and try once more only if it changed.
                if self._refresh_secret is None or not await self._refresh_secret():
                    raise
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
                detail=detail_text(response),
            )
        if not response.is_success:
            raise error_for(response, "POST", path)
        return token_from(response, path)

    def _rejected_message(self, response: httpx.Response) -> str:
        if self._credential_source is not None:
            who = self._credential_source
        elif self._username is not None:
            who = f"the password of user {self._username!r}"
        else:
            # The variable `config.api_key_from_env` reads it from.
            who = "the operator's API key (ZENML_STORE_API_KEY)"
        message = f"ZenML at {self._url} rejected {who}: revoked, deactivated or malformed"
        detail = detail_text(response)
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
