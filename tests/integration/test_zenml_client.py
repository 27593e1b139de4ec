"""ZenMLClient against a real ZenML 0.98 server (plus a few transport tests on a mock)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from zenml_devstack.zenml_server import (
    ZenMLServer,
    _free_port,
    create_service_account_with_key,
)
from zenml_login import login_with_api_key
from zenml_operator.config import api_key_from_env
from zenml_operator.zenml_api import (
    ApiKeyValue,
    BadRequestError,
    ConflictError,
    ForbiddenError,
    IssuedApiKey,
    NotFoundError,
    ServiceAccountInfo,
    UnauthorizedError,
    UnavailableError,
    ZenMLClient,
    ZenMLError,
)

pytestmark = pytest.mark.zenml


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def account(zenml_client: ZenMLClient) -> AsyncIterator[ServiceAccountInfo]:
    info = await zenml_client.create_service_account(unique("sa"), description="test account")
    yield info
    with contextlib.suppress(NotFoundError):
        await zenml_client.delete_service_account(info.id)


class Requests:
    """Counts HTTP attempts (retries included) through the client's observer hook."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, method: str, route: str, status: int | None, seconds: float) -> None:
        self.count += 1


async def assert_login_fails(url: str, key: ApiKeyValue) -> None:
    with pytest.raises(UnauthorizedError) as caught:
        await login_with_api_key(url, key.reveal())
    assert key.reveal() not in str(caught.value)


# ------------------------------------------------------------------ service accounts


async def test_service_account_lifecycle(zenml_client: ZenMLClient) -> None:
    name = unique("sa")
    before = datetime.now(UTC) - timedelta(minutes=1)
    created = await zenml_client.create_service_account(name, description="first")
    assert (created.name, created.active, created.description) == (name, True, "first")
    assert created.created is not None and created.created > before
    assert created.created.tzinfo is not None

    assert await zenml_client.get_service_account(name) == created
    assert await zenml_client.get_service_account(created.id) == created

    updated = await zenml_client.update_service_account(created.id, description="second")
    assert (updated.description, updated.active) == ("second", True)

    deactivated = await zenml_client.update_service_account(created.id, active=False)
    assert (deactivated.description, deactivated.active) == ("second", False)
    assert (await zenml_client.get_service_account(name)).active is False

    await zenml_client.delete_service_account(created.id)
    with pytest.raises(NotFoundError):
        await zenml_client.get_service_account(created.id)


async def test_create_inactive_account(zenml_client: ZenMLClient) -> None:
    info = await zenml_client.create_service_account(unique("sa"), active=False)
    assert info.active is False and info.description == ""
    await zenml_client.delete_service_account(info.id)


async def test_duplicate_account_name_conflicts(
    zenml_client: ZenMLClient, account: ServiceAccountInfo
) -> None:
    with pytest.raises(ConflictError) as caught:
        await zenml_client.create_service_account(account.name)
    assert caught.value.status_code == 409
    assert "POST /api/v1/service_accounts" in str(caught.value)


async def test_missing_account_not_found(zenml_client: ZenMLClient) -> None:
    with pytest.raises(NotFoundError) as caught:
        await zenml_client.get_service_account(unique("missing"))
    assert caught.value.status_code == 404
    with pytest.raises(NotFoundError):
        await zenml_client.delete_service_account(str(uuid.uuid4()))


async def test_names_are_quoted_into_one_path_segment(zenml_client: ZenMLClient) -> None:
    with pytest.raises(NotFoundError):
        await zenml_client.get_service_account("a/../../current-user")


async def test_invalid_request_is_bad_request_without_body(zenml_client: ZenMLClient) -> None:
    too_long = "x" * 300  # names are limited to 255 characters
    with pytest.raises(BadRequestError) as caught:
        await zenml_client.create_service_account(too_long)
    assert caught.value.status_code == 422
    assert too_long not in str(caught.value)
    assert "body.name" in str(caught.value)


# ------------------------------------------------------------------------- API keys


async def test_created_key_logs_in_as_the_account(
    zenml_client: ZenMLClient, account: ServiceAccountInfo
) -> None:
    issued = await zenml_client.create_api_key(account.id, "k1", description="for pods")
    assert issued.value.reveal().startswith("ZENKEY_")
    assert (issued.info.name, issued.info.active, issued.info.description) == (
        "k1",
        True,
        "for pods",
    )
    assert issued.info.last_rotated is None and issued.info.retain_period_minutes == 0
    assert await login_with_api_key(zenml_client.url, issued.value.reveal())
    async with ZenMLClient(zenml_client.url, issued.value.reveal()) as as_account:
        assert await as_account.current_user_name() == account.name


async def test_list_and_get_keys_carry_no_value(
    zenml_client: ZenMLClient, account: ServiceAccountInfo
) -> None:
    issued = [
        await zenml_client.create_api_key(account.id, f"k{i}", description=f"d{i}")
        for i in range(3)
    ]
    zenml_client.page_size = 1  # force three pages
    listed = await zenml_client.list_api_keys(account.id)
    assert sorted((k.name, k.description) for k in listed) == [
        ("k0", "d0"),
        ("k1", "d1"),
        ("k2", "d2"),
    ]
    assert {k.id for k in listed} == {k.info.id for k in issued}
    by_name = await zenml_client.get_api_key(account.id, "k1")
    by_id = await zenml_client.get_api_key(account.id, issued[1].info.id)
    assert by_name == by_id == issued[1].info
    for info in [*listed, by_name]:
        assert not any(k.value.reveal() in repr(info) for k in issued)


async def test_empty_key_list(zenml_client: ZenMLClient, account: ServiceAccountInfo) -> None:
    assert await zenml_client.list_api_keys(account.id) == []


async def test_duplicate_key_name_conflicts(
    zenml_client: ZenMLClient, account: ServiceAccountInfo
) -> None:
    await zenml_client.create_api_key(account.id, "k")
    with pytest.raises(ConflictError):
        await zenml_client.create_api_key(account.id, "k")


async def test_deactivated_key_is_refused_and_can_come_back(
    zenml_client: ZenMLClient, account: ServiceAccountInfo
) -> None:
    issued = await zenml_client.create_api_key(account.id, "k")
    info = await zenml_client.update_api_key(account.id, issued.info.id, active=False)
    assert info.active is False
    await assert_login_fails(zenml_client.url, issued.value)

    info = await zenml_client.update_api_key(account.id, issued.info.id, active=True)
    assert info.active is True
    info = await zenml_client.update_api_key(account.id, issued.info.id, description="new")
    assert (info.description, info.active) == ("new", True)
    assert await login_with_api_key(zenml_client.url, issued.value.reveal())


async def test_rotate_without_retention_kills_old_value(
    zenml_client: ZenMLClient, account: ServiceAccountInfo
) -> None:
    old = await zenml_client.create_api_key(account.id, "k")
    new = await zenml_client.rotate_api_key(account.id, old.info.id, retain_period_minutes=0)
    assert new.value != old.value and new.info.id == old.info.id
    assert new.info.retain_period_minutes == 0
    assert new.info.last_rotated is not None and new.info.last_rotated.tzinfo is not None
    # The derived fields match what the server stores.
    stored = await zenml_client.get_api_key(account.id, old.info.id)
    assert stored.last_rotated == new.info.last_rotated
    assert stored.retain_period_minutes == 0
    await assert_login_fails(zenml_client.url, old.value)
    assert await login_with_api_key(zenml_client.url, new.value.reveal())


async def test_rotate_with_retention_keeps_old_value_for_now(
    zenml_client: ZenMLClient, account: ServiceAccountInfo
) -> None:
    old = await zenml_client.create_api_key(account.id, "k")
    new = await zenml_client.rotate_api_key(account.id, old.info.id, retain_period_minutes=1)
    assert new.info.retain_period_minutes == 1
    assert await login_with_api_key(zenml_client.url, old.value.reveal())
    assert await login_with_api_key(zenml_client.url, new.value.reveal())


async def test_delete_key(zenml_client: ZenMLClient, account: ServiceAccountInfo) -> None:
    issued = await zenml_client.create_api_key(account.id, "k")
    await zenml_client.delete_api_key(account.id, issued.info.id)
    with pytest.raises(NotFoundError):
        await zenml_client.get_api_key(account.id, issued.info.id)
    with pytest.raises(NotFoundError):
        await zenml_client.delete_api_key(account.id, issued.info.id)
    await assert_login_fails(zenml_client.url, issued.value)


async def test_deleting_account_with_keys_removes_them(
    zenml_client: ZenMLClient, account: ServiceAccountInfo
) -> None:
    issued = await zenml_client.create_api_key(account.id, "k")
    await zenml_client.delete_service_account(account.id)
    with pytest.raises(NotFoundError):
        await zenml_client.get_service_account(account.id)
    with pytest.raises(NotFoundError):
        await zenml_client.list_api_keys(account.id)
    await assert_login_fails(zenml_client.url, issued.value)


async def test_deactivated_account_disables_its_keys(
    zenml_client: ZenMLClient, account: ServiceAccountInfo
) -> None:
    issued = await zenml_client.create_api_key(account.id, "k")
    await zenml_client.update_service_account(account.id, active=False)
    await assert_login_fails(zenml_client.url, issued.value)
    # The key itself still reads as active: only the account was switched off.
    assert (await zenml_client.get_api_key(account.id, issued.info.id)).active is True


# ------------------------------------------------------------------- authentication


async def test_logs_in_lazily_and_again_when_token_is_rejected(
    zenml_server: ZenMLServer, operator_api_key: str
) -> None:
    requests = Requests()
    async with ZenMLClient(zenml_server.url, operator_api_key, observer=requests) as client:
        assert requests.count == 0  # no login before the first call
        assert await client.current_user_name() == "zenml-operator"
        assert requests.count == 2  # login + call
        assert await client.current_user_name() == "zenml-operator"
        assert requests.count == 3  # token reused
        client._connection._token = "not-a-valid-token"
        assert await client.current_user_name() == "zenml-operator"
        assert requests.count == 6  # rejected call + login + retried call


async def test_keeps_no_cookies(zenml_server: ZenMLServer, operator_api_key: str) -> None:
    # The server sets a session cookie at login and prefers it over the bearer token.
    requests = Requests()
    async with ZenMLClient(zenml_server.url, operator_api_key, observer=requests) as client:
        await client.current_user_name()
        assert requests.count == 2  # a real login happened
        assert list(client._connection._http.cookies.jar) == []


async def test_concurrent_callers_share_one_login(
    zenml_server: ZenMLServer, operator_api_key: str
) -> None:
    requests = Requests()
    async with ZenMLClient(zenml_server.url, operator_api_key, observer=requests) as client:
        names = await asyncio.gather(*(client.current_user_name() for _ in range(10)))
        assert set(names) == {"zenml-operator"}
        assert requests.count == 11


class CountingTransport(httpx.AsyncBaseTransport):
    """The real HTTP transport, counting how many key creates are in flight at once."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.in_flight = self.peak = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        counted = request.method == "POST" and request.url.path.endswith("/api_keys")
        self.in_flight += counted
        self.peak = max(self.peak, self.in_flight)
        try:
            response = await self._inner.handle_async_request(request)
            await response.aread()
            return response
        finally:
            self.in_flight -= counted

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_key_creates_run_a_few_at_a_time(
    zenml_server: ZenMLServer, operator_api_key: str, account: ServiceAccountInfo
) -> None:
    transport = CountingTransport()
    client = ZenMLClient(
        zenml_server.url, operator_api_key, heavy_concurrency=2, transport=transport
    )
    async with client:
        issued = await asyncio.gather(
            *(client.create_api_key(account.id, f"k{i}") for i in range(6))
        )
        for key in issued[:2]:
            await login_with_api_key(zenml_server.url, key.value.reveal())
    assert transport.peak == 2  # bounded, and the bound was used
    assert len({k.info.id for k in issued}) == 6


async def test_key_list_items_name_their_account(
    zenml_client: ZenMLClient, account: ServiceAccountInfo
) -> None:
    await zenml_client.create_api_key(account.id, "k")
    await zenml_client.update_service_account(account.id, active=False)
    (listed,) = await zenml_client.list_api_keys(account.id)
    assert listed.account is not None
    assert (listed.account.id, listed.account.name) == (account.id, account.name)
    assert listed.account.active is False  # what a one-read resync relies on


async def test_rejected_operator_key_is_unauthorized_without_leaking(
    zenml_client: ZenMLClient, account: ServiceAccountInfo
) -> None:
    issued = await zenml_client.create_api_key(account.id, "k")
    await zenml_client.update_api_key(account.id, issued.info.id, active=False)
    async with ZenMLClient(zenml_client.url, issued.value.reveal()) as client:
        with pytest.raises(UnauthorizedError) as caught:
            await client.get_service_account(account.id)
    message = str(caught.value)
    assert "ZENML_STORE_API_KEY" in message and "rejected" in message
    assert issued.value.reveal() not in message and issued.value.reveal() not in repr(caught.value)


async def test_malformed_operator_key_is_unauthorized(zenml_server: ZenMLServer) -> None:
    async with ZenMLClient(zenml_server.url, "ZENKEY_garbage") as client:
        with pytest.raises(UnauthorizedError) as caught:
            await client.current_user_name()
    assert "ZENKEY_garbage" not in str(caught.value)


async def test_key_re_read_from_callable_on_login(
    zenml_server: ZenMLServer, operator_api_key: str
) -> None:
    calls: list[int] = []

    def read() -> str:
        calls.append(1)
        return operator_api_key

    async with ZenMLClient(zenml_server.url, read) as client:
        await client.current_user_name()
        client._connection._token = "stale"
        await client.current_user_name()
    assert len(calls) == 2


async def test_plain_service_account_may_not_manage_accounts_on_oss(
    zenml_server: ZenMLServer,
) -> None:
    # Stock ZenML OSS: a service account is never an admin, so its key can read but not
    # create/update/delete service accounts or keys.
    key = create_service_account_with_key(
        zenml_server.url, zenml_server.admin_password, unique("plain")
    )
    async with ZenMLClient(zenml_server.url, key) as client:
        await client.get_service_account("zenml-operator")
        with pytest.raises(ForbiddenError) as caught:
            await client.create_service_account(unique("sa"))
    assert "Only admin users" in str(caught.value)


async def test_admin_user_password_login(zenml_server: ZenMLServer) -> None:
    async with ZenMLClient(
        zenml_server.url, zenml_server.admin_password, username="default"
    ) as client:
        info = await client.create_service_account(unique("sa"))
        await client.delete_service_account(info.id)
        assert await client.current_user_name() == "default"


# ------------------------------------------------------------------- secrets hygiene


async def test_reprs_never_show_the_key_value(
    zenml_client: ZenMLClient, account: ServiceAccountInfo
) -> None:
    issued = await zenml_client.create_api_key(account.id, "k")
    secret = issued.value.reveal()
    for text in (repr(issued), str(issued), repr(issued.value), str(issued.value), f"{issued}"):
        assert secret not in text
    assert "<ApiKeyValue ***>" in repr(issued)

    # A refused credential that is the real key value: the worst case for leaking it.
    await zenml_client.update_api_key(account.id, issued.info.id, active=False)

    async def as_refused_key() -> str:
        async with ZenMLClient(zenml_client.url, secret) as client:
            return await client.current_user_name()

    errors: list[ZenMLError] = []
    for action in (
        lambda: zenml_client.create_api_key(account.id, "k"),
        lambda: login_with_api_key(zenml_client.url, secret),
        as_refused_key,
    ):
        with pytest.raises(ZenMLError) as caught:
            await action()
        errors.append(caught.value)
    for error in errors:
        assert secret not in str(error) and secret not in repr(error)
        assert secret not in error.detail


# ------------------------------------------------------------------------ transport


async def test_closed_port_is_unavailable_fast() -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    requests = Requests()
    async with ZenMLClient(
        url, "ZENKEY_x", max_retries=2, backoff=0.01, timeout=2, observer=requests
    ) as client:
        with pytest.raises(UnavailableError) as caught:
            await client.get_service_account("x")
        assert requests.count == 3
    assert "unreachable" in str(caught.value) and caught.value.status_code is None
    with pytest.raises(UnavailableError):
        await login_with_api_key(url, "ZENKEY_x")


def mock_client(
    handler: Callable[[httpx.Request], httpx.Response], requests: Requests | None = None
) -> ZenMLClient:
    return ZenMLClient(
        "http://zenml.test/",
        "ZENKEY_test",
        max_retries=2,
        backoff=0.001,
        transport=httpx.MockTransport(handler),
        observer=requests,
    )


def login_or(respond: Callable[[httpx.Request], httpx.Response]) -> Callable:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/login":
            assert "cookie" not in request.headers
            return httpx.Response(
                200,
                json={"access_token": "tok"},
                headers={"set-cookie": "zenml-server=evil; Path=/"},
            )
        assert request.headers["authorization"] == "Bearer tok"
        assert "cookie" not in request.headers
        return respond(request)

    return handler


async def test_idempotent_calls_retry_5xx() -> None:
    answers = iter([503, 502, 200])
    account = {"id": "1", "name": "a", "body": {"active": True}, "metadata": None}

    requests = Requests()
    respond = login_or(lambda r: httpx.Response(next(answers), json=account))
    async with mock_client(respond, requests) as c:
        assert (await c.get_service_account("a")).description == ""
        assert requests.count == 4


async def test_creates_are_not_retried_after_ambiguous_failures() -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        if request.method == "PUT":
            raise httpx.ReadTimeout("slow", request=request)
        return httpx.Response(503, json={"detail": ["Boom", "down"]})

    requests = Requests()
    async with mock_client(login_or(fail), requests) as c:
        with pytest.raises(UnavailableError) as caught:
            await c.create_service_account("a")
        assert caught.value.status_code == 503 and "down" in str(caught.value)
        assert requests.count == 2  # login + one create
        with pytest.raises(UnavailableError):
            await c.rotate_api_key("1", "2")
        assert requests.count == 3


async def test_creates_are_retried_when_never_sent() -> None:
    attempts: list[int] = []
    account = {"id": "1", "name": "a", "body": {"active": True}, "metadata": {}}

    def flaky(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        if len(attempts) == 1:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json=account)

    async with mock_client(login_or(flaky)) as c:
        assert (await c.create_service_account("a")).name == "a"
    assert len(attempts) == 2


# ------------------------------------------------------------------ api_key_from_env


def test_api_key_from_env(tmp_path: Path) -> None:
    assert api_key_from_env({"ZENML_STORE_API_KEY": " ZENKEY_abc\n"}) == "ZENKEY_abc"
    for env, words in (
        ({}, "ZENML_STORE_API_KEY"),
        ({"ZENML_STORE_API_KEY": ""}, "ZENML_STORE_API_KEY is empty"),
        ({"ZENML_STORE_API_KEY": "secret-ish"}, "ZENKEY_"),
        ({"ZENML_STORE_API_KEY_FILE": str(tmp_path / "nope")}, "ZENML_STORE_API_KEY_FILE"),
    ):
        with pytest.raises(ValueError, match=words) as caught:
            api_key_from_env(env)
        assert "secret-ish" not in str(caught.value)

    key_file = tmp_path / "key"
    key_file.write_text("ZENKEY_one\n")
    read = api_key_from_env({"ZENML_STORE_API_KEY_FILE": str(key_file)})
    assert callable(read) and read() == "ZENKEY_one"
    key_file.write_text("ZENKEY_two")
    assert read() == "ZENKEY_two"


def test_issued_key_value_equality_and_masking() -> None:
    value = ApiKeyValue("ZENKEY_s3cret")
    assert value == ApiKeyValue("ZENKEY_s3cret") and value.reveal() == "ZENKEY_s3cret"
    assert "s3cret" not in repr(IssuedApiKey(info=None, value=value))  # type: ignore[arg-type]
