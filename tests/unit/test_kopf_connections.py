"""Kopf's API session gets a bounded pool that always leaves room for its watch streams."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import kopf
import pytest
from aiohttp import web

from zenml_operator.config import OperatorConfig
from zenml_operator.kube import KubeClient, kopf_session


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


def _listing(kind: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "metadata": {"resourceVersion": "7"},
        "items": [
            {
                "metadata": {"name": f"o-{i}", "managedFields": [{"manager": "kubectl"}]},
                "spec": {"apiKeys": [{"name": "a"}]},
            }
            for i in range(3)
        ],
    }


@contextlib.asynccontextmanager
async def _serving(path: str, answer: Any) -> AsyncIterator[str]:
    """An HTTP server on loopback answering GET `path`; yields its base URL."""
    app = web.Application()
    app.router.add_get(path, answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _lean(data: dict[str, Any]) -> None:
    assert [item["metadata"] for item in data["items"]] == [{"name": f"o-{i}"} for i in range(3)]
    assert [item["spec"] for item in data["items"]] == [{"apiKeys": [{"name": "a"}]}] * 3
    assert data["metadata"] == {"resourceVersion": "7"}


async def test_the_session_kopf_gets_reads_answers_without_managed_fields() -> None:
    """What Kopf lists and reads keeps everything but metadata.managedFields."""

    async def answer(request: web.Request) -> web.Response:
        return web.json_response(_listing("ServiceAccountList"))

    async with _serving("/list", answer) as server:
        context = kopf_session(kopf.ConnectionInfo(server=server), limit=4)
        try:
            async with context.aiohttp_session.get(f"{server}/list") as response:
                _lean(await response.json())
        finally:
            await context.aiohttp_session.close()


async def test_the_operators_own_client_reads_and_watches_without_managed_fields() -> None:
    """The Secret listing and watch events of the operator's own client: the same."""

    async def answer(request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") != "true":
            return web.json_response(_listing("SecretList"))
        stream = web.StreamResponse()
        await stream.prepare(request)
        for item in _listing("SecretList")["items"]:
            await stream.write(json.dumps({"type": "ADDED", "object": item}).encode() + b"\n")
        return stream

    async with _serving("/api/v1/namespaces/ns/secrets", answer) as server:
        kube = KubeClient(kopf.ConnectionInfo(server=server))
        try:
            items, version = await kube.list_secrets("ns", label_selector="a=b")
            _lean({"items": items, "metadata": {"resourceVersion": version}})
            events = kube.watch_secrets(
                "ns", label_selector="a=b", resource_version=version, timeout_seconds=5
            )
            watched = [event["object"] async for event in events]
            _lean({"items": watched, "metadata": {"resourceVersion": "7"}})
        finally:
            await kube.aclose()
