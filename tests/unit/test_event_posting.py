"""Kopf's Event poster, with the operator's settings, keeps up with a burst of objects.

Kopf posts each object's Events from a worker that lingers after the object's last Event,
and the operator allows only a few workers at once. With Kopf's default linger (1 s) a
burst of creates (one or two Events each) was posted at ~4 objects per second: slower than
creates go, so Events lagged and queued up. Only the Kubernetes POST is replaced here (a
fixed 10 ms, like a loopback API server); the routing and workers are Kopf's own (its
private modules: a Kopf release that moves them fails this test at import, loudly).
"""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
import pytest
from kopf._cogs.clients import events as kopf_events
from kopf._cogs.structs import references
from kopf._core.engines import posting

from waiting import until
from zenml_operator import lifecycle

OBJECTS = 100
POST_SECONDS = 0.01


async def test_a_burst_of_objects_events_is_posted_promptly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = kopf.OperatorSettings()
    lifecycle.configure(settings)
    posted: list[str] = []

    async def post_event(*, ref: Any, reason: str, **_: Any) -> None:
        await asyncio.sleep(POST_SECONDS)  # the API server's answer
        posted.append(f"{ref['uid']}/{reason}")

    monkeypatch.setattr(kopf_events, "post_event", post_event)
    backbone = references.Backbone()
    await backbone.fill(
        resources=[references.Resource(group="", version="v1", plural="events", namespaced=True)]
    )
    queue: asyncio.Queue[posting.K8sEvent] = asyncio.Queue()
    poster = asyncio.create_task(
        posting.poster(event_queue=queue, backbone=backbone, settings=settings)
    )
    try:
        for i in range(OBJECTS):
            ref = {"apiVersion": "zenml.io/v1alpha1", "kind": "ServiceAccount", "uid": f"u{i}"}
            for reason in ("AccountCreated", "ApiKeyCreated"):
                queue.put_nowait(posting.K8sEvent(ref, "Normal", reason, "m"))  # type: ignore[arg-type]
        # Kopf's 1 s linger needs 100 / 8 workers x 1 s = 12.5 s.
        await until(lambda: len(posted) == 2 * OBJECTS, "every Event posted", timeout=5.0)
        # Each object's Events in the order they were made.
        for i in range(OBJECTS):
            assert posted.index(f"u{i}/AccountCreated") < posted.index(f"u{i}/ApiKeyCreated")
    finally:
        poster.cancel()
        await asyncio.gather(poster, return_exceptions=True)
