"""Pytest plugin: one real ZenML server per test session, and a second one over TLS for the
tests that need two (`zenml_server_b`).

Load with `pytest_plugins = ["fixtures_zenml"]` (with `tests` on the Python path) or
`-p fixtures_zenml`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tls_ca import make_tls_files
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


# --- server B: a second ZenML server, served over HTTPS with a private CA ---------------------
#
# Started only when a collected test uses `zenml_server_b` (directly or through another
# fixture), in the background from collection on, so that its ~15 s start overlaps the tests
# that run before the first one that needs it. Stopped at the end of the session.

_SERVER_B: dict[str, Any] = {}


def _start_server_b(data_dir: Path) -> ZenMLServer:
    tls = make_tls_files(data_dir / "tls", common_name="zenml-server-b")
    return start_zenml_server(
        data_dir / "zenml",
        ssl_certfile=tls.cert_file,
        ssl_keyfile=tls.key_file,
        ca_file=tls.ca_file,
    )


def _launch_server_b() -> None:
    if _SERVER_B:
        return
    data_dir = Path(tempfile.mkdtemp(prefix="zenml-server-b-"))
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="zenml-b")
    _SERVER_B.update(dir=data_dir, pool=pool, future=pool.submit(_start_server_b, data_dir))


def pytest_collection_finish(session: pytest.Session) -> None:
    # After deselection (-k, -m): only the tests that will run count.
    if any("zenml_server_b" in getattr(item, "fixturenames", ()) for item in session.items):
        _launch_server_b()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _SERVER_B:
        return
    try:
        server = _SERVER_B["future"].result(timeout=180)
    except Exception:  # it never started: nothing to stop
        server = None
    if server is not None:
        server.stop()
    _SERVER_B["pool"].shutdown(wait=False)
    shutil.rmtree(_SERVER_B["dir"], ignore_errors=True)


@pytest.fixture(scope="session")
def zenml_server_b() -> ZenMLServer:
    """A second real ZenML server (its own port and database), served over HTTPS by a
    certificate of a private CA: `url` is https://127.0.0.1:PORT, `ca_pem` the CA's PEM
    text, `verify()` what an httpx client needs to trust it. Tests may `pause()` it but
    must `resume()` it (other tests share it)."""
    _launch_server_b()  # not collected the usual way: start it now
    server: ZenMLServer = _SERVER_B["future"].result(timeout=180)
    return server


@pytest.fixture(scope="session")
def operator_api_key_b(zenml_server_b: ZenMLServer) -> str:
    """The API key of server B's own admin `zenml-operator` service account (see
    `operator_api_key`): the credential a ZenMLServer resource for B holds."""
    key = create_service_account_with_key(
        zenml_server_b.url,
        zenml_server_b.admin_password,
        OPERATOR_ACCOUNT,
        verify=zenml_server_b.verify(),
    )
    zenml_server_b.grant_admin(OPERATOR_ACCOUNT)
    return key


@pytest.fixture(scope="session")
def _operator_token_b(zenml_server_b: ZenMLServer, operator_api_key_b: str) -> str:
    return asyncio.run(
        login_with_api_key(zenml_server_b.url, operator_api_key_b, verify=zenml_server_b.verify())
    )


@pytest.fixture
async def zenml_client_b(
    zenml_server_b: ZenMLServer, operator_api_key_b: str, _operator_token_b: str
) -> AsyncIterator[ZenMLClient]:
    """The tests' own view of server B (its admin `zenml-operator` account), trusting B's CA."""
    transport = httpx.AsyncHTTPTransport(verify=zenml_server_b.verify())
    client = ZenMLClient(zenml_server_b.url, operator_api_key_b, transport=transport)
    client._connection._token = _operator_token_b  # as `zenml_client` does
    try:
        yield client
    finally:
        await client.aclose()
