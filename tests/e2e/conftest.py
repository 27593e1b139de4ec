"""The whole operator (Kopf + handlers) against the emulated cluster and a real ZenML."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import kopf
import pytest_asyncio

from fixtures_kube import Cluster
from zenml_devstack.kopf_runner import BackgroundOperator
from zenml_operator.config import OperatorConfig
from zenml_operator.main import build_registry
from zenml_operator.zenml_api import ZenMLClient

SA_PATH = "/apis/zenml.io/v1alpha1/namespaces/{ns}/serviceaccounts"
SECRET_PATH = "/api/v1/namespaces/{ns}/secrets/{name}"

StartOperator = Callable[..., Awaitable[tuple[BackgroundOperator, kopf.Memo]]]


@pytest_asyncio.fixture
async def start_zenml_operator(
    cluster: Cluster, zenml_server: Any, operator_api_key: str, kopf_operator: Any
) -> AsyncIterator[StartOperator]:
    """Start the real operator (its own login handler points at the emulator)."""

    async def start(
        *, resync_seconds: float = 600.0, retry_delay: float = 0.5, **settings: Any
    ) -> tuple[BackgroundOperator, kopf.Memo]:
        """`settings`: more OperatorConfig fields (operator_namespace, zenml_timeout...)."""
        config = OperatorConfig(
            zenml_url=zenml_server.url,
            zenml_api_key=lambda: operator_api_key,
            kube_api_url=cluster.url,
            resync_seconds=resync_seconds,
            retry_delay=retry_delay,
            **{"zenml_retries": 1, **settings},
        )
        memo = kopf.Memo()
        operator = await kopf_operator(build_registry(config), login=False, memo=memo)
        return operator, memo

    yield start


def ready(obj: dict[str, Any] | None) -> dict[str, Any] | None:
    """The Ready condition of an object for the current generation, if any."""
    if not obj:
        return None
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond["type"] == "Ready" and cond.get("observedGeneration") == obj["metadata"].get(
            "generation"
        ):
            return cond
    return None


async def wait_ready(
    cluster: Cluster,
    ns: str,
    name: str,
    *,
    status: str = "True",
    reason: str | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    path = f"{SA_PATH.format(ns=ns)}/{name}"

    async def check() -> dict[str, Any] | None:
        obj = await cluster.get(path)
        cond = ready(obj)
        if cond and cond["status"] == status and (reason is None or cond["reason"] == reason):
            return obj
        return None

    return await cluster.wait_for(check, timeout=timeout, message=f"{name} Ready={status}")


def secret_value(secret: dict[str, Any], key: str = "ZENML_STORE_API_KEY") -> str:
    return base64.b64decode(secret["data"][key]).decode()


async def logs_in_as(url: str, api_key: str, *, verify: Any = True) -> str | None:
    """The account name this key logs in as, or None if ZenML refuses it.

    `verify`: the TLS trust for an https URL (`ZenMLServer.verify()`).
    """
    import httpx

    from zenml_operator.zenml_api import NotFoundError, UnauthorizedError

    transport = None if verify is True else httpx.AsyncHTTPTransport(verify=verify)
    client = ZenMLClient(url, api_key, max_retries=0, transport=transport)
    try:
        return await client.current_user_name()
    except (UnauthorizedError, NotFoundError):  # 404: a deleted key ("API key not found")
        return None
    finally:
        await client.aclose()
