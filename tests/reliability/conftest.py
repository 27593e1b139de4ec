"""Fixtures of the reliability suites: the real operator with tunable settings, and a
recorder of every object the operator created in ZenML."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import contextvars
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest
import pytest_asyncio

from fixtures_kube import Cluster
from zenml_devstack.kopf_runner import BackgroundOperator
from zenml_devstack.zenml_server import ZenMLServer, start_zenml_server
from zenml_operator import crashpoints
from zenml_operator import zenml_api as zc
from zenml_operator.config import OperatorConfig
from zenml_operator.main import build_registry
from zenml_operator.zenml_api.connection import ZenMLConnection

StartOperator = Callable[..., Awaitable[tuple[BackgroundOperator, kopf.Memo]]]


@pytest_asyncio.fixture
async def start_operator(
    cluster: Cluster, zenml_server: Any, operator_api_key: str, kopf_operator: Any
) -> AsyncIterator[StartOperator]:
    """Start the real operator against `cluster`; every knob of OperatorConfig is a kwarg."""

    async def start(
        *,
        zenml_url: str | None = None,
        api_key: Callable[[], str] | None = None,
        resync_seconds: float = 600.0,
        retry_delay: float = 0.3,
        zenml_retries: int = 1,
        zenml_timeout: float = 5.0,
        settings_hook: Callable[[kopf.OperatorSettings], None] | None = None,
        namespaces: list[str] | None = None,
    ) -> tuple[BackgroundOperator, kopf.Memo]:
        config = OperatorConfig(
            zenml_url=zenml_url or zenml_server.url,
            zenml_api_key=api_key or (lambda: operator_api_key),
            kube_api_url=cluster.url,
            resync_seconds=resync_seconds,
            retry_delay=retry_delay,
            zenml_retries=zenml_retries,
            zenml_timeout=zenml_timeout,
        )
        memo = kopf.Memo()
        operator = await kopf_operator(
            build_registry(config),
            login=False,
            memo=memo,
            settings_hook=settings_hook,
            namespaces=namespaces,
        )
        return operator, memo

    yield start
    crashpoints.disarm_all()


ROTATED = re.compile(r"\.r[0-9]+$")  # `<key>.rN`: a rotated generation (declared names have no dot)
_SEEDING: contextvars.ContextVar[bool] = contextvars.ContextVar("seeding", default=False)


class Creations:
    """Every successful create in ZenML, by any client in this process (operators included).

    Creates the test makes itself (leftovers it plants) go inside `with creations.seeding():`.
    """

    def __init__(self) -> None:
        self.accounts: Counter[str] = Counter()
        self.keys: Counter[tuple[str, str]] = Counter()  # (account id, key name)
        # (account id, key name, value) of every key the operator created, in order.
        self.issued: list[tuple[str, str, str]] = []

    @contextlib.contextmanager
    def seeding(self) -> Iterator[None]:
        token = _SEEDING.set(True)
        try:
            yield
        finally:
            _SEEDING.reset(token)

    def unwritten(self, cluster: Cluster) -> list[str]:
        """Names of the keys the operator created whose value no Secret ever held, sorted
        (judged by the bytes: every value of every Secret version in the emulator's log)."""
        held = {
            base64.b64decode(raw).decode(errors="replace")
            for change in cluster.emulator._history
            if change.resource.plural == "secrets"
            for raw in (change.event["object"].get("data") or {}).values()
        }
        return sorted(name for _, name, value in self.issued if value not in held)

    def duplicates(self, cluster: Cluster, *, unwritten: Iterable[str] = ()) -> list[Any]:
        """What was created twice: an account or a declared key created more than once, and
        every key created (a rotated generation included) whose value never got into a
        Secret, but for the expected `unwritten` ones (each name once per expected loss: a
        crash or a failed write between a create and its Secret write loses that value)."""
        found: list[Any] = [n for n, c in self.accounts.items() if c > 1]
        found += [k for k, c in self.keys.items() if c > 1 and not ROTATED.search(k[1])]
        lost = Counter(self.unwritten(cluster))
        lost.subtract(Counter(unwritten))
        found += [f"created, never written: {n}" for n, c in sorted(lost.items()) if c > 0]
        found += [f"expected unwritten, but written: {n}" for n, c in sorted(lost.items()) if c < 0]
        return found

    def created(self, account_id: str) -> list[str]:
        """Every key name created under the account, once per create, sorted."""
        return sorted(n for (acc, n), c in self.keys.items() if acc == account_id for _ in range(c))


@pytest.fixture
def creations(monkeypatch: pytest.MonkeyPatch) -> Creations:
    record = Creations()
    create_account = zc.ZenMLClient.create_service_account
    create_key = zc.ZenMLClient.create_api_key

    async def counted_account(self: zc.ZenMLClient, name: str, **kwargs: Any) -> Any:
        result = await create_account(self, name, **kwargs)
        record.accounts[name] += 1
        return result

    async def counted_key(self: zc.ZenMLClient, account_id: str, name: str, **kwargs: Any) -> Any:
        result = await create_key(self, account_id, name, **kwargs)
        record.keys[account_id, name] += 1
        if not _SEEDING.get():
            record.issued.append((account_id, name, result.value.reveal()))
        return result

    monkeypatch.setattr(zc.ZenMLClient, "create_service_account", counted_account)
    monkeypatch.setattr(zc.ZenMLClient, "create_api_key", counted_key)
    return record


@pytest.fixture
def operator_login_cached(
    monkeypatch: pytest.MonkeyPatch, operator_api_key: str, _operator_token: str
) -> None:
    """Operators started in this test reuse the session's token for the operator's own key.

    An API-key login costs the server ~0.5-1 s of bcrypt and every operator start logs in;
    suites that restart operators many times and are not about logging in skip that. Every
    other login (the keys the operator issued, checked by the tests) stays real.
    """
    login = ZenMLConnection._login

    async def cached(self: ZenMLConnection) -> str:
        if self._username is None and self._read_secret() == operator_api_key:
            return _operator_token
        return await login(self)

    monkeypatch.setattr(ZenMLConnection, "_login", cached)


# --- a second ZenML server, for the outage test (the session's shared one is never stopped) ---

_SPARE: dict[str, Any] = {}
SPARE_USERS = ("test_zenml_server_outage",)


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Start the spare server in the background as soon as a test that needs it is collected:
    its ~15 s start then overlaps with the tests that run before it."""
    if _SPARE or not any(item.name in SPARE_USERS for item in items):
        return
    data_dir = Path(tempfile.mkdtemp(prefix="zenml-spare-"))
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    _SPARE.update(dir=data_dir, pool=pool, future=pool.submit(start_zenml_server, data_dir))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _SPARE:
        return
    future = _SPARE["future"]
    try:
        server = future.result(timeout=180)
    except Exception:  # it never started: nothing to stop
        server = None
    if server is not None:
        server.stop()
    _SPARE["pool"].shutdown(wait=False)
    shutil.rmtree(_SPARE["dir"], ignore_errors=True)


@pytest.fixture(scope="session")
def spare_zenml_server() -> Iterator[ZenMLServer]:
    """A ZenML server of its own (data dir, port) that a test may stop and start again."""
    if not _SPARE:  # collected some other way: start it now
        data_dir = Path(tempfile.mkdtemp(prefix="zenml-spare-"))
        future: concurrent.futures.Future[ZenMLServer] = concurrent.futures.Future()
        future.set_result(start_zenml_server(data_dir))
        _SPARE.update(dir=data_dir, pool=concurrent.futures.ThreadPoolExecutor(), future=future)
    yield _SPARE["future"].result(timeout=180)
