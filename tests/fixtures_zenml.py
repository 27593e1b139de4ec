"""Pytest plugin: one real ZenML server per test session.

Load with `pytest_plugins = ["fixtures_zenml"]` (with `tests` on the Python path) or
`-p fixtures_zenml`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from zenml_devstack.zenml_server import (
    ZenMLServer,
    create_service_account_with_key,
    start_zenml_server,
)
from zenml_login import login_with_api_key
from zenml_operator.zenml_api import ZenMLClient

OPERATOR_ACCOUNT = "zenml-operator"


@pytest.fixture(scope="session")
def zenml_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZenMLServer]:
    server = start_zenml_server(tmp_path_factory.mktemp("zenml-server"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def operator_api_key(zenml_server: ZenMLServer) -> str:
    """The API key of the `zenml-operator` service account, with admin rights.

    ZenML OSS has no API to give a service account the admin rights needed to manage
    other service accounts, so the devstack sets the flag in the server's database.
    """
    key = create_service_account_with_key(
        zenml_server.url, zenml_server.admin_password, OPERATOR_ACCOUNT
    )
    zenml_server.grant_admin(OPERATOR_ACCOUNT)
    return key


@pytest.fixture(scope="session")
def _operator_token(zenml_server: ZenMLServer, operator_api_key: str) -> str:
    return asyncio.run(login_with_api_key(zenml_server.url, operator_api_key))


@pytest.fixture
async def zenml_client(
    zenml_server: ZenMLServer, operator_api_key: str, _operator_token: str
) -> AsyncIterator[ZenMLClient]:
    client = ZenMLClient(zenml_server.url, operator_api_key)
    # An API-key login costs the server ~0.3-1 s of bcrypt: seed the token logged in once
    # per session. The client still logs in by itself when the server rejects it.
    client._connection._token = _operator_token
    try:
        yield client
    finally:
        await client.aclose()
