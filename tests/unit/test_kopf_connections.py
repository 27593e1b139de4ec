"""Kopf's API session gets a bounded pool that always leaves room for its watch streams."""

from __future__ import annotations

import kopf
import pytest

from zenml_operator.config import OperatorConfig
from zenml_operator.kube import kopf_session


def config(*namespaces: str, kube_connections: int = 32) -> OperatorConfig:
    return OperatorConfig(
        zenml_url="http://zenml.invalid",
        zenml_api_key=lambda: "unused",
        namespaces=namespaces,
        kube_connections=kube_connections,
    )


@pytest.mark.parametrize(
    ("namespaces", "expected"),
    [
        ((), 32 + 4 + 3),  # cluster-wide: one stream per kind
        (("team-a",), 32 + 4 + 3),
        (("team-a", "team-b", "team-c"), 32 + 12 + 3),  # four streams per namespace
        (("team-*",), 0),  # a pattern: streams unknown, so no bound (Kopf's own)
        (("team-a", "!team-b"), 0),
    ],
)
def test_the_bound_leaves_a_connection_per_watch_stream(
    namespaces: tuple[str, ...], expected: int
) -> None:
    assert config(*namespaces).kopf_connections() == expected


async def test_the_session_kopf_gets_has_that_bound_and_the_credentials() -> None:
    info = kopf.ConnectionInfo(server="https://127.0.0.1:6443", token="t0ken", scheme="Bearer")
    context = kopf_session(info, limit=39)
    try:
        assert isinstance(context, kopf.AiohttpSession)
        assert context.server == info.server
        assert context.aiohttp_session.connector is not None
        assert context.aiohttp_session.connector.limit == 39
        assert context.aiohttp_session.headers["Authorization"] == "Bearer t0ken"
    finally:
        await context.aiohttp_session.close()
