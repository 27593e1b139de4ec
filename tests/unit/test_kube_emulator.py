"""The emulated Kubernetes API (devstack.kube_emulator) and the Kopf runner on top of it."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import httpx
import kopf
import pytest

from fixtures_kube import Cluster, OperatorFactory
from zenml_devstack.kube_emulator import (
    ClusterEmulator,
    api_path,
    declare_resources,
    running_emulator,
)

SA = "zenml.io/v1alpha1/serviceaccounts"
SA_LIST = api_path(SA, namespace="team-a")
SECRETS = api_path("v1/secrets", namespace="team-a")


def sa_path(name: str, subresource: str | None = None) -> str:
    return api_path(SA, namespace="team-a", name=name, subresource=subresource)


def sa_body(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "zenml.io/v1alpha1",
        "kind": "ServiceAccount",
        "metadata": {"name": name},
        "spec": spec or {"description": "x"},
    }


async def watch_events(
    cluster: Cluster, path: str, *, count: int | None = None, **params: str
) -> list[dict[str, Any]]:
    """The events of a watch until `count` arrived or the server ends it (timeoutSeconds)."""
    query = {"watch": "true", "timeoutSeconds": "0.2" if count is None else "5", **params}
    events: list[dict[str, Any]] = []
    async with cluster.http.stream("GET", path, params=query) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.strip():
                events.append(json.loads(line))
            if count is not None and len(events) >= count:
                break
    return events


# --- the emulator -----------------------------------------------------------------------------


async def test_create_fills_server_metadata(cluster: Cluster) -> None:
    body = sa_body("one")
    body["status"] = {"ignored": True}
    obj = await cluster.create(SA_LIST, body)
    meta = obj["metadata"]
    assert meta["namespace"] == "team-a"  # from the URL
    assert meta["uid"] and meta["creationTimestamp"].endswith("Z")
    assert int(meta["resourceVersion"]) == cluster.emulator.resource_version
    assert meta["generation"] == 1
    assert "status" not in obj  # reset on create for a status subresource
    assert await cluster.get(sa_path("one")) == obj


async def test_create_conflicts_and_validation(cluster: Cluster) -> None:
    await cluster.create(SA_LIST, sa_body("one"))
    again = await cluster.request("POST", SA_LIST, json=sa_body("one"))
    assert again.status_code == 409 and again.json()["reason"] == "AlreadyExists"

    other_ns = sa_body("two")
    other_ns["metadata"]["namespace"] = "default"
    assert (await cluster.request("POST", SA_LIST, json=other_ns)).status_code == 400
    assert (await cluster.request("POST", SA_LIST, json=sa_body("Bad_Name"))).status_code == 422
    missing_ns = api_path(SA, namespace="nowhere")
    assert (await cluster.request("POST", missing_ns, json=sa_body("x"))).status_code == 404


async def test_generate_name_gives_unique_names(cluster: Cluster) -> None:
    # What Kopf does for every Event it posts.
    events = api_path("v1/events", namespace="team-a")
    body = {"metadata": {"generateName": "kopf-event-"}, "reason": "Test"}
    first = await cluster.create(events, body)
    second = await cluster.create(events, body)
    assert first["metadata"]["name"].startswith("kopf-event-")
    assert first["metadata"]["name"] != second["metadata"]["name"]
    assert first["kind"] == "Event" and first["apiVersion"] == "v1"  # filled from the URL


async def test_secret_string_data_is_stored_as_data(cluster: Cluster) -> None:
    body = {"metadata": {"name": "s"}, "stringData": {"ZENML_STORE_URL": "http://z"}}
    secret = await cluster.create(SECRETS, body)
    assert "stringData" not in secret and "generation" not in secret["metadata"]
    assert base64.b64decode(secret["data"]["ZENML_STORE_URL"]) == b"http://z"


async def test_resource_version_bumps_and_stale_merge_patch_conflicts(cluster: Cluster) -> None:
    created = await cluster.create(SA_LIST, sa_body("one"))
    rv1 = created["metadata"]["resourceVersion"]
    patched = await cluster.patch(sa_path("one"), {"metadata": {"labels": {"a": "b"}}})
    rv2 = patched["metadata"]["resourceVersion"]
    assert int(rv2) > int(rv1)
    assert patched["metadata"]["generation"] == 1  # metadata-only change

    stale = {"metadata": {"resourceVersion": rv1, "labels": {"a": "c"}}}
    response = await cluster.request(
        "PATCH", sa_path("one"), json=stale, content_type="application/merge-patch+json"
    )
    assert response.status_code == 409 and response.json()["reason"] == "Conflict"

    fresh = {"metadata": {"resourceVersion": rv2, "labels": {"a": "c"}}}
    assert (await cluster.patch(sa_path("one"), fresh))["metadata"]["labels"] == {"a": "c"}


async def test_noop_patch_keeps_the_resource_version(cluster: Cluster) -> None:
    created = await cluster.create(SA_LIST, sa_body("one", description="x"))
    same = await cluster.patch(sa_path("one"), {"spec": {"description": "x"}})
    assert same["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]


async def test_json_patch_test_op(cluster: Cluster) -> None:
    created = await cluster.create(SA_LIST, sa_body("one"))
    rv = created["metadata"]["resourceVersion"]
    add_finalizer = {"op": "add", "path": "/metadata/finalizers", "value": ["x/y"]}
    failing = [{"op": "test", "path": "/metadata/resourceVersion", "value": "0"}, add_finalizer]
    response = await cluster.request(
        "PATCH", sa_path("one"), json=failing, content_type="application/json-patch+json"
    )
    assert response.status_code == 422
    passing = [{"op": "test", "path": "/metadata/resourceVersion", "value": rv}, add_finalizer]
    assert (await cluster.patch(sa_path("one"), passing))["metadata"]["finalizers"] == ["x/y"]


async def test_status_and_spec_are_separated(cluster: Cluster) -> None:
    await cluster.create(SA_LIST, sa_body("one", description="a"))

    via_status = await cluster.patch(
        sa_path("one", "status"), {"status": {"phase": "Ready"}, "spec": {"description": "b"}}
    )
    assert via_status["status"] == {"phase": "Ready"}
    assert via_status["spec"] == {"description": "a"}  # the status endpoint ignores spec
    assert via_status["metadata"]["generation"] == 1  # status changes keep the generation

    via_main = await cluster.patch(
        sa_path("one"), {"status": {"phase": "Hacked"}, "spec": {"description": "c"}}
    )
    assert via_main["status"] == {"phase": "Ready"}  # the main endpoint ignores status
    assert via_main["spec"] == {"description": "c"}
    assert via_main["metadata"]["generation"] == 2

    secret_status = await cluster.request(
        "PATCH",
        api_path("v1/secrets", namespace="team-a", name="none", subresource="status"),
        json={},
        content_type="application/merge-patch+json",
    )
    assert secret_status.status_code == 404


async def test_put_replaces_with_concurrency_check(cluster: Cluster) -> None:
    await cluster.create(SA_LIST, sa_body("one", description="a", active=True))
    await cluster.patch(sa_path("one", "status"), {"status": {"phase": "Ready"}})
    current = await cluster.get(sa_path("one"))
    assert current is not None

    stale = dict(current, metadata=dict(current["metadata"], resourceVersion="1"))
    assert (await cluster.request("PUT", sa_path("one"), json=stale)).status_code == 409

    replaced = await cluster.replace(sa_path("one"), dict(current, spec={"description": "b"}))
    assert replaced["spec"] == {"description": "b"}  # wholesale: `active` is gone
    assert replaced["status"] == {"phase": "Ready"}
    assert replaced["metadata"]["uid"] == current["metadata"]["uid"]
    assert replaced["metadata"]["generation"] == 2


async def test_list_reports_the_current_resource_version(cluster: Cluster) -> None:
    await cluster.create(SA_LIST, sa_body("one"))
    await cluster.create(
        SA_LIST, dict(sa_body("two"), metadata={"name": "two", "labels": {"x": "1"}})
    )
    listing = await cluster.get(SA_LIST)
    assert listing is not None
    assert listing["metadata"]["resourceVersion"] == str(cluster.emulator.resource_version)
    assert listing["kind"] == "ServiceAccountList"
    assert sorted(item["metadata"]["name"] for item in listing["items"]) == ["one", "two"]

    selected = await cluster.request("GET", SA_LIST, params={"labelSelector": "x in (1,2)"})
    assert [item["metadata"]["name"] for item in selected.json()["items"]] == ["two"]
    everywhere = await cluster.get(api_path(SA))
    assert everywhere is not None and len(everywhere["items"]) == 2


async def test_namespace_objects_are_served(cluster: Cluster) -> None:
    namespace = await cluster.get("/api/v1/namespaces/team-a")
    assert namespace is not None and namespace["status"] == {"phase": "Active"}
    listing = await cluster.get("/api/v1/namespaces")
    assert listing is not None
    assert {item["metadata"]["name"] for item in listing["items"]} == {"default", "team-a"}


async def test_watch_skips_events_up_to_the_requested_version(cluster: Cluster) -> None:
    await cluster.create(SA_LIST, sa_body("one"))
    await cluster.create(SA_LIST, sa_body("two"))
    listing = await cluster.get(SA_LIST)
    assert listing is not None
    since = listing["metadata"]["resourceVersion"]
    modified = await cluster.patch(sa_path("one"), {"spec": {"description": "changed"}})

    events = await watch_events(cluster, SA_LIST, resourceVersion=since)  # ends by timeout
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("MODIFIED", "one")]
    assert (
        events[0]["object"]["metadata"]["resourceVersion"]
        == (modified["metadata"]["resourceVersion"])
    )

    # Without a resourceVersion: the current state as ADDED events (as on a real cluster).
    events = await watch_events(cluster, SA_LIST, count=2)
    assert sorted((e["type"], e["object"]["metadata"]["name"]) for e in events) == [
        ("ADDED", "one"),
        ("ADDED", "two"),
    ]


async def test_watch_streams_live_changes_and_deletion_with_finalizers(cluster: Cluster) -> None:
    body = sa_body("one")
    body["metadata"]["finalizers"] = ["x/y"]
    created = await cluster.create(SA_LIST, body)
    since = created["metadata"]["resourceVersion"]

    async def watch() -> list[dict[str, Any]]:
        return await watch_events(cluster, SA_LIST, resourceVersion=since, count=2)

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.05)  # not a synchronisation: history replay covers a late watch too
    marked = await cluster.delete(sa_path("one"))
    assert marked is not None and marked["metadata"]["deletionTimestamp"]
    assert marked["metadata"]["generation"] == 2  # bumped when a graceful deletion begins
    assert await cluster.get(sa_path("one")) is not None  # held by the finalizer
    refused = await cluster.request(
        "PATCH",
        sa_path("one"),
        json={"metadata": {"finalizers": ["x/y", "new/one"]}},
        content_type="application/merge-patch+json",
    )
    assert refused.status_code == 422  # no new finalizers on a deleting object
    await cluster.patch(sa_path("one"), {"metadata": {"finalizers": None}})
    assert await cluster.get(sa_path("one")) is None

    events = await watcher
    assert [e["type"] for e in events] == ["MODIFIED", "DELETED"]
    versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert versions == sorted(versions) and versions[0] > int(since)


async def test_label_selected_watch_sees_objects_enter_and_leave_the_selection(
    cluster: Cluster,
) -> None:
    """As a real API server's watch cache: losing the selected label is a DELETED event (with
    the last matching content), gaining it an ADDED one; other objects are never sent."""
    selected = {"app": "mine"}
    first = await cluster.create(
        SECRETS, {"metadata": {"name": "s", "labels": selected}, "data": {"k": "dg=="}}
    )
    await cluster.create(SECRETS, {"metadata": {"name": "other"}, "data": {"k": "dg=="}})
    since = first["metadata"]["resourceVersion"]
    path = f"{SECRETS}/s"
    stripped = await cluster.patch(path, {"metadata": {"labels": {"app": None}}})
    await cluster.patch(path, {"data": {"k": "dw=="}})  # unselected before and after: not sent
    back = await cluster.patch(path, {"metadata": {"labels": selected}})
    await cluster.patch(f"{SECRETS}/other", {"data": {"k": "dw=="}})
    await cluster.delete(path)

    events = await watch_events(cluster, SECRETS, resourceVersion=since, labelSelector="app=mine")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("DELETED", "s"),
        ("ADDED", "s"),
        ("DELETED", "s"),
    ]
    gone = events[0]["object"]
    assert gone["metadata"]["labels"] == selected  # the last content that matched
    assert gone["metadata"]["resourceVersion"] == stripped["metadata"]["resourceVersion"]
    assert events[1]["object"]["metadata"]["resourceVersion"] == back["metadata"]["resourceVersion"]


async def test_watch_too_old_version_is_gone() -> None:
    emulator = ClusterEmulator(history_limit=2)
    declare_resources(emulator)
    for name in ("default", "a", "b", "c"):
        emulator.create_object("v1/namespaces", {"metadata": {"name": name}})
    async with running_emulator(emulator) as url, httpx.AsyncClient(base_url=url) as http:
        params = {"watch": "true", "resourceVersion": "1", "timeoutSeconds": "0.2"}
        response = await http.get("/api/v1/namespaces", params=params)
        events = [json.loads(line) for line in response.text.splitlines()]
        assert [(e["type"], e["object"]["code"]) for e in events] == [("ERROR", 410)]
        assert not emulator.errors


async def test_injected_failure_leaves_the_state_unchanged(cluster: Cluster) -> None:
    await cluster.create(SA_LIST, sa_body("one", description="a"))
    cluster.emulator["patch", sa_path("one")][:1] << 500
    failed = await cluster.request(
        "PATCH",
        sa_path("one"),
        json={"spec": {"description": "b"}},
        content_type="application/merge-patch+json",
    )
    assert failed.status_code == 500
    after = await cluster.get(sa_path("one"))
    assert after is not None and after["spec"] == {"description": "a"}


# --- a cluster-scoped kind (ClusterZenMLServer) ------------------------------------------------

CZS = "zenml.io/v1alpha1/clusterzenmlservers"
CZS_LIST = api_path(CZS)


def czs_path(name: str, subresource: str | None = None) -> str:
    return api_path(CZS, name=name, subresource=subresource)


def czs_body(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "zenml.io/v1alpha1",
        "kind": "ClusterZenMLServer",
        "metadata": {"name": name},
        "spec": spec or {"url": "https://zenml.example.com"},
    }


async def test_cluster_scoped_kind_is_discovered_as_such(cluster: Cluster) -> None:
    group = await cluster.get("/apis/zenml.io/v1alpha1")
    assert group is not None
    scopes = {r["name"]: r["namespaced"] for r in group["resources"] if "/" not in r["name"]}
    assert scopes["clusterzenmlservers"] is False
    assert scopes["zenmlservers"] is True and scopes["serviceaccounts"] is True
    kinds = {r["name"]: r["kind"] for r in group["resources"]}
    assert kinds["clusterzenmlservers"] == "ClusterZenMLServer"
    assert kinds["zenmlservers/status"] == "ZenMLServer"
    assert "clusterzenmlservers/status" in kinds


async def test_cluster_scoped_objects_live_outside_namespaces(cluster: Cluster) -> None:
    created = await cluster.create(CZS_LIST, czs_body("prod"))
    meta = created["metadata"]
    assert "namespace" not in meta
    assert meta["uid"] and meta["generation"] == 1 and meta["resourceVersion"]
    assert created["kind"] == "ClusterZenMLServer"
    assert await cluster.get(czs_path("prod")) == created
    listing = await cluster.get(CZS_LIST)
    assert listing is not None and listing["kind"] == "ClusterZenMLServerList"
    assert [item["metadata"]["name"] for item in listing["items"]] == ["prod"]
    assert (await cluster.request("POST", CZS_LIST, json=czs_body("prod"))).status_code == 409

    # A namespace in the body is dropped (as the API server does for cluster-scoped kinds),
    # and no URL under /namespaces/ serves the kind.
    body = czs_body("dev")
    body["metadata"]["namespace"] = "team-a"
    assert "namespace" not in (await cluster.create(CZS_LIST, body))["metadata"]
    namespaced_list = api_path(CZS, namespace="team-a")
    assert (await cluster.request("GET", namespaced_list)).status_code == 404
    assert (await cluster.request("POST", namespaced_list, json=czs_body("x"))).status_code == 404
    namespaced = api_path(CZS, namespace="team-a", name="prod")
    assert (await cluster.request("GET", namespaced)).status_code == 404
    assert (await cluster.request("DELETE", namespaced)).status_code == 404
    assert await cluster.get(czs_path("prod")) is not None

    # The namespaced ZenMLServer is the other way round.
    zs_list = api_path("zenml.io/v1alpha1/zenmlservers", namespace="team-a")
    zs = await cluster.create(zs_list, {"metadata": {"name": "prod"}, "spec": {"url": "u"}})
    assert zs["metadata"]["namespace"] == "team-a" and zs["kind"] == "ZenMLServer"
    refused = await cluster.request(
        "POST", api_path("zenml.io/v1alpha1/zenmlservers"), json={"metadata": {"name": "x"}}
    )
    assert refused.status_code == 404


async def test_cluster_scoped_status_subresource(cluster: Cluster) -> None:
    await cluster.create(CZS_LIST, czs_body("prod"))
    via_status = await cluster.patch(
        czs_path("prod", "status"),
        {"status": {"conditions": [{"type": "Ready"}]}, "spec": {"url": "hacked"}},
    )
    assert via_status["status"] == {"conditions": [{"type": "Ready"}]}
    assert via_status["spec"] == {"url": "https://zenml.example.com"}
    assert via_status["metadata"]["generation"] == 1
    via_main = await cluster.patch(czs_path("prod"), {"spec": {"url": "b"}, "status": None})
    assert via_main["status"] == {"conditions": [{"type": "Ready"}]}
    assert via_main["metadata"]["generation"] == 2


async def test_cluster_scoped_watch_and_deletion_with_finalizers(cluster: Cluster) -> None:
    body = czs_body("prod")
    body["metadata"]["finalizers"] = ["x/y"]
    created = await cluster.create(CZS_LIST, body)
    since = created["metadata"]["resourceVersion"]
    await cluster.create(SA_LIST, sa_body("not-a-server"))  # another kind: never sent

    marked = await cluster.delete(czs_path("prod"))
    assert marked is not None and marked["metadata"]["deletionTimestamp"]
    assert await cluster.get(czs_path("prod")) is not None  # held by the finalizer
    await cluster.patch(czs_path("prod"), {"metadata": {"finalizers": None}})
    assert await cluster.get(czs_path("prod")) is None

    events = await watch_events(cluster, CZS_LIST, resourceVersion=since)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("MODIFIED", "prod"),
        ("DELETED", "prod"),
    ]
    # A watch of one object by name (what a reader of one server resource does).
    await cluster.create(CZS_LIST, czs_body("dev"))
    await cluster.create(CZS_LIST, czs_body("other"))
    named = await watch_events(cluster, CZS_LIST, fieldSelector="metadata.name=dev", count=1)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in named] == [("ADDED", "dev")]


async def test_kopf_handles_a_cluster_scoped_kind_beside_namespaced_ones(
    cluster: Cluster, kopf_operator: OperatorFactory
) -> None:
    """Kopf with exact namespaces still serves a cluster-scoped kind: create, status, and a
    deletion held by its finalizer until the delete handler returns."""
    registry = kopf.OperatorRegistry()
    release = asyncio.Event()
    seen: dict[str, list[str]] = {"create": [], "refused": [], "delete": [], "ns-create": []}

    @kopf.on.create("zenml.io", "v1alpha1", "clusterzenmlservers", registry=registry)
    async def created(name: str, namespace: str | None, patch: kopf.Patch, **_: Any) -> None:
        assert namespace is None
        seen["create"].append(name)
        patch.status["phase"] = "Ready"

    @kopf.on.delete("zenml.io", "v1alpha1", "clusterzenmlservers", registry=registry)
    async def deleted(name: str, **_: Any) -> None:
        if not release.is_set():
            seen["refused"].append(name)
            raise kopf.TemporaryError("still in use", delay=0.05)
        seen["delete"].append(name)

    @kopf.on.create("zenml.io", "v1alpha1", "zenmlservers", registry=registry)
    async def ns_created(name: str, namespace: str, **_: Any) -> None:
        seen["ns-create"].append(f"{namespace}/{name}")

    await kopf_operator(registry)
    await cluster.create(CZS_LIST, czs_body("prod"))
    await cluster.create(
        api_path("zenml.io/v1alpha1/zenmlservers", namespace="team-a"),
        {"metadata": {"name": "team"}, "spec": {"url": "u"}},
    )

    async def phase() -> str | None:
        return ((await cluster.get(czs_path("prod"))) or {}).get("status", {}).get("phase")

    assert await cluster.wait_for(phase, message="the status of the cluster-scoped object")
    await cluster.wait_for(lambda: seen["ns-create"] == ["team-a/team"], message="ZenMLServer")
    obj = await cluster.get(czs_path("prod"))
    assert obj is not None and obj["metadata"].get("finalizers")  # Kopf's own

    await cluster.delete(czs_path("prod"))

    await cluster.wait_for(lambda: len(seen["refused"]) >= 2, message="delete handler retries")
    assert await cluster.get(czs_path("prod")) is not None  # held
    release.set()
    await cluster.wait_for(lambda: _gone(cluster, czs_path("prod")), message="the deletion")
    assert seen["create"] == ["prod"] and seen["delete"] == ["prod"]


# --- a tiny Kopf operator end to end ---------------------------------------------------------


def tiny_operator(cluster: Cluster, calls: dict[str, int]) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.create("zenml.io", "v1alpha1", "serviceaccounts", registry=registry)
    async def created(
        name: str, namespace: str, spec: kopf.Spec, patch: kopf.Patch, body: kopf.Body, **_: Any
    ) -> None:
        calls["create"] += 1
        # Kopf 1.45 posts Events only for explicit kopf.event()/info()/warn() calls by default
        # (settings.posting.loggers=False); they are posted with generateName (trap 4).
        kopf.info(body, reason="Creating", message="creating the key Secret")
        secret = {"metadata": {"name": f"{name}-key"}, "stringData": {"KEY": str(spec["key"])}}
        async with httpx.AsyncClient(base_url=cluster.url, verify=False) as http:
            response = await http.post(f"/api/v1/namespaces/{namespace}/secrets", json=secret)
            response.raise_for_status()
        patch.status["phase"] = "Ready"

    @kopf.on.update("zenml.io", "v1alpha1", "serviceaccounts", registry=registry)
    async def updated(**_: Any) -> None:
        calls["update"] += 1

    @kopf.on.resume("zenml.io", "v1alpha1", "serviceaccounts", registry=registry)
    async def resumed(**_: Any) -> None:
        calls["resume"] += 1

    @kopf.on.delete("zenml.io", "v1alpha1", "serviceaccounts", registry=registry)
    async def deleted(name: str, namespace: str, **_: Any) -> None:
        calls["delete"] += 1
        async with httpx.AsyncClient(base_url=cluster.url, verify=False) as http:
            await http.delete(f"/api/v1/namespaces/{namespace}/secrets/{name}-key")

    return registry


@pytest.mark.parametrize("initial_streaming", [False, True], ids=["list-then-watch", "streaming"])
async def test_kopf_operator_end_to_end(
    cluster: Cluster, kopf_operator: OperatorFactory, initial_streaming: bool
) -> None:
    calls = {"create": 0, "update": 0, "resume": 0, "delete": 0}
    registry = tiny_operator(cluster, calls)

    def settings_hook(settings: kopf.OperatorSettings) -> None:
        # Both ways Kopf starts its watches: a list + a watch from the list's resourceVersion,
        # or one watch with sendInitialEvents=true ending in a BOOKMARK.
        settings.watching.initial_streaming = initial_streaming

    operator = await kopf_operator(registry, settings_hook=settings_hook)

    await cluster.create(SA_LIST, sa_body("one", key="k1"))
    secret_path = api_path("v1/secrets", namespace="team-a", name="one-key")
    secret = await cluster.wait_for(lambda: cluster.get(secret_path), message="the Secret")
    assert base64.b64decode(secret["data"]["KEY"]) == b"k1"

    async def status_phase() -> str | None:
        obj = await cluster.get(sa_path("one"))
        return (obj or {}).get("status", {}).get("phase")

    assert await cluster.wait_for(status_phase) == "Ready"

    async def kopf_events() -> list[dict[str, Any]]:
        listing = await cluster.get(api_path("v1/events", namespace="team-a"))
        return [e for e in (listing or {}).get("items", []) if e["reason"] == "Creating"]

    [event] = await cluster.wait_for(kopf_events, message="the Event posted by Kopf")
    assert event["involvedObject"]["name"] == "one"
    assert event["metadata"]["name"].startswith("kopf-event-")

    await cluster.patch(sa_path("one"), {"spec": {"key": "k2"}})
    await cluster.wait_for(lambda: calls["update"] == 1, message="the update handler")

    # A restart: the new instance must resume, not create again (last-handled state persisted).
    started = time.monotonic()
    await operator.stop()
    assert time.monotonic() - started < 1.0
    second = await kopf_operator(registry, settings_hook=settings_hook)
    await cluster.wait_for(lambda: calls["resume"] == 1, message="the resume handler")
    assert calls["create"] == 1 and calls["update"] == 1

    await cluster.delete(sa_path("one"))
    await cluster.wait_for(lambda: _gone(cluster, sa_path("one")), message="the deletion")
    assert calls["delete"] == 1
    assert await cluster.get(secret_path) is None
    await second.stop()


async def _gone(cluster: Cluster, path: str) -> bool:
    return await cluster.get(path) is None


async def test_stopping_spares_foreign_tasks_and_graceful_stop_cleans_up(
    cluster: Cluster, kopf_operator: OperatorFactory
) -> None:
    cleanups: list[bool] = []
    registry = kopf.OperatorRegistry()

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        cleanups.append(True)

    @kopf.on.create("zenml.io", "v1alpha1", "serviceaccounts", registry=registry)
    async def created(**_: Any) -> None:
        pass

    operator = await kopf_operator(registry)
    foreign = asyncio.create_task(asyncio.sleep(30))  # created while the operator runs
    await operator.kill()  # Kopf cancels its "hung" tasks, but only its own ones
    assert not foreign.done()
    assert not cleanups  # a kill skips the cleanup handlers
    foreign.cancel()

    operator = await kopf_operator(registry)
    await operator.stop()  # Kopf's cancellation: the cleanup handlers still run
    assert cleanups == [True]
    cleanups.clear()

    operator = await kopf_operator(registry)
    started = time.monotonic()
    await operator.stop(graceful=True)
    assert cleanups == [True]
    assert time.monotonic() - started < 1.0
