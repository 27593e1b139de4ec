"""Pytest plugin: an emulated Kubernetes cluster (and Kopf operators) per test.

Enable it with ``pytest_plugins = ["fixtures_kube"]`` in ``tests/conftest.py`` (``tests`` on the
Python path) or with ``-p fixtures_kube``.

Fixtures:

* ``cluster`` — a served `ClusterEmulator` with the operator's resources and the namespaces
  ``default`` and ``team-a``; a `Cluster` with HTTP helpers. At teardown it fails the test if
  the emulator recorded internal errors, unless the test is marked
  ``@pytest.mark.kube_errors_allowed`` or sets ``cluster.allow_errors = True`` (fault injection).
* ``kopf_operator`` — an async factory that starts a `BackgroundOperator` against ``cluster``
  (adding the login handler) and stops it at teardown, before the cluster goes away.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import httpx
import kopf
import pytest
import pytest_asyncio

from zenml_devstack.kopf_runner import (
    BackgroundOperator,
    add_login_handler,
    start_operator,
)
from zenml_devstack.kube_emulator import (
    ClusterEmulator,
    add_namespace,
    declare_resources,
    serve_emulator,
)

T = TypeVar("T")
NAMESPACES = ("default", "team-a")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "kube_errors_allowed: do not fail on internal errors recorded by the Kubernetes emulator",
    )


@dataclasses.dataclass
class Cluster:
    """A running emulated cluster and an HTTP client for it (no cookies, no auth)."""

    url: str
    emulator: ClusterEmulator
    http: httpx.AsyncClient
    allow_errors: bool = False

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, str] | None = None,
        content_type: str | None = None,
    ) -> httpx.Response:
        """Any request; returns the response whatever its status (for asserting on errors)."""
        headers = {"Content-Type": content_type} if content_type else None
        return await self.http.request(method, path, json=json, params=params, headers=headers)

    async def create(self, resource_path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to a collection path; raises httpx.HTTPStatusError on failure."""
        return _json(await self.request("POST", resource_path, json=body))

    async def get(self, path: str) -> dict[str, Any] | None:
        """GET an object or a list; None on 404."""
        response = await self.request("GET", path)
        return None if response.status_code == 404 else _json(response)

    async def patch(
        self,
        path: str,
        body: dict[str, Any] | list[dict[str, Any]],
        *,
        content_type: str | None = None,
    ) -> dict[str, Any]:
        """PATCH an object (or ``.../status``); a list body is sent as a JSON patch."""
        if content_type is None:
            json_patch = isinstance(body, list)
            content_type = (
                "application/json-patch+json" if json_patch else "application/merge-patch+json"
            )
        return _json(await self.request("PATCH", path, json=body, content_type=content_type))

    async def replace(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """PUT an object wholesale."""
        return _json(await self.request("PUT", path, json=body))

    async def delete(self, path: str) -> dict[str, Any] | None:
        """DELETE an object; None on 404."""
        response = await self.request("DELETE", path)
        return None if response.status_code == 404 else _json(response)

    async def wait_for(
        self,
        predicate: Callable[[], T | Awaitable[T]],
        *,
        timeout: float = 5.0,
        interval: float = 0.01,
        message: str = "",
    ) -> T:
        """Poll `predicate` (sync or async) until it returns a truthy value; return it.

        Fails the test with the last value after `timeout` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value  # type: ignore[return-value]
            if loop.time() >= deadline:
                pytest.fail(
                    f"Timed out after {timeout}s waiting for {message or predicate!r}; "
                    f"last value: {value!r}"
                )
            await asyncio.sleep(interval)

    def internal_errors(self) -> list[Exception]:
        """Failures inside the emulator itself (not the 4xx answers of the emulated API)."""
        return list(self.emulator.errors)


def _json(response: httpx.Response) -> dict[str, Any]:
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


@pytest_asyncio.fixture
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    emulator = ClusterEmulator()
    declare_resources(emulator)
    for namespace in NAMESPACES:
        add_namespace(emulator, namespace)
    url, stop = await serve_emulator(emulator)
    errors: list[Exception] = []
    try:
        # verify=False: plain HTTP anyway, and it skips building a CA bundle (~80 ms per client).
        async with httpx.AsyncClient(base_url=url, timeout=10.0, verify=False) as http:
            result = Cluster(url=url, emulator=emulator, http=http)
            if request.node.get_closest_marker("kube_errors_allowed") is not None:
                result.allow_errors = True
            yield result
        errors = result.internal_errors()
    finally:
        await stop()
    if errors and not result.allow_errors:
        details = "\n".join("".join(traceback.format_exception(e)) for e in errors)
        pytest.fail(f"The Kubernetes emulator recorded {len(errors)} internal error(s):\n{details}")


class OperatorFactory(Protocol):
    async def __call__(
        self,
        registry: kopf.OperatorRegistry,
        *,
        namespaces: list[str] | None = None,
        settings_hook: Callable[[kopf.OperatorSettings], None] | None = None,
        memo: object | None = None,
        login: bool = True,
    ) -> BackgroundOperator:
        """Start an operator; `login` adds a login handler to the emulator (once per registry)."""
        ...


@pytest_asyncio.fixture
async def kopf_operator(cluster: Cluster) -> AsyncIterator[OperatorFactory]:
    """Start operators against `cluster`; all are stopped (cancelled) at teardown."""
    started: list[BackgroundOperator] = []
    logged_in: list[kopf.OperatorRegistry] = []  # a second login handler would be a duplicate

    async def factory(
        registry: kopf.OperatorRegistry,
        *,
        namespaces: list[str] | None = None,
        settings_hook: Callable[[kopf.OperatorSettings], None] | None = None,
        memo: object | None = None,
        login: bool = True,
    ) -> BackgroundOperator:
        if login and not any(known is registry for known in logged_in):
            add_login_handler(registry, server=cluster.url)
            logged_in.append(registry)
        operator = await start_operator(
            registry=registry,
            namespaces=list(namespaces if namespaces is not None else NAMESPACES),
            settings_hook=settings_hook,
            memo=memo,
        )
        started.append(operator)
        return operator

    yield factory
    for operator in reversed(started):
        await operator.stop()
