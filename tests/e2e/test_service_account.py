"""ServiceAccount end to end: emulated Kubernetes API, real Kopf, real ZenML server."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from e2e.conftest import SA_PATH, SECRET_PATH, logs_in_as, secret_value, wait_ready
from zenml_login import login_with_api_key
from zenml_operator import zenml_api as zc


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def sa_body(name: str, spec: dict[str, Any], ns: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "zenml.io/v1alpha1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


async def test_secret_key_logs_in_as_the_declared_account(
    cluster, start_zenml_operator, zenml_server, zenml_client
) -> None:
    await start_zenml_operator()
    name = unique("ci")
    await cluster.create(
        SA_PATH.format(ns="default"),
        sa_body(
            name,
            {
                "description": "CI pipelines",
                "apiKeys": [
                    {"name": "main"},
                    {
                        "name": "batch",
                        "secretName": f"{name}-batch-creds",
                        "secretTemplate": {
                            "labels": {"team": "ml"},
                            "keys": {"apiKey": "TOKEN", "url": "URL"},
                        },
                    },
                ],
            },
        ),
    )
    obj = await wait_ready(cluster, "default", name)

    status = obj["status"]
    account = await zenml_client.get_service_account(name)
    assert status["accountId"] == account.id
    assert account.description == "CI pipelines" and account.active
    assert status["observedGeneration"] == obj["metadata"]["generation"]
    assert [k["name"] for k in status["apiKeys"]] == ["main", "batch"]
    assert status["readyKeys"] == 2

    main = await cluster.get(SECRET_PATH.format(ns="default", name=f"{name}-main"))
    assert main["type"] == "Opaque"
    assert main["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]
    assert main["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "zenml-operator"
    assert secret_value(main, "ZENML_STORE_URL") == zenml_server.url
    assert await logs_in_as(zenml_server.url, secret_value(main)) == name

    batch = await cluster.get(SECRET_PATH.format(ns="default", name=f"{name}-batch-creds"))
    assert set(batch["data"]) == {"URL", "TOKEN"}
    assert batch["metadata"]["labels"]["team"] == "ml"
    assert await logs_in_as(zenml_server.url, secret_value(batch, "TOKEN")) == name


async def test_spec_edits_reach_zenml(
    cluster, start_zenml_operator, zenml_server, zenml_client
) -> None:
    await start_zenml_operator()
    name = unique("edit")
    path = f"{SA_PATH.format(ns='default')}/{name}"
    await cluster.create(SA_PATH.format(ns="default"), sa_body(name, {"apiKeys": [{"name": "k"}]}))
    await wait_ready(cluster, "default", name)
    secret = await cluster.get(SECRET_PATH.format(ns="default", name=f"{name}-k"))
    value = secret_value(secret)

    await cluster.patch(
        path,
        {
            "spec": {
                "description": "changed",
                "apiKeys": [{"name": "k", "description": "key desc", "active": False}],
            }
        },
    )
    await wait_ready(cluster, "default", name)
    account = await zenml_client.get_service_account(name)
    key = await zenml_client.get_api_key(account.id, "k")
    assert account.description == "changed"
    assert key.description == "key desc" and key.active is False
    assert await logs_in_as(zenml_server.url, value) is None

    await cluster.patch(path, {"spec": {"active": False, "apiKeys": [{"name": "k"}]}})
    obj = await wait_ready(cluster, "default", name, reason="AccountDeactivated")
    assert obj["status"]["active"] is False
    assert (await zenml_client.get_service_account(name)).active is False

    await cluster.patch(path, {"spec": {"active": True}})
    await wait_ready(cluster, "default", name, reason="Reconciled")
    assert await logs_in_as(zenml_server.url, value) == name  # same value works again


async def test_removing_a_key_deletes_it_and_its_secret(
    cluster, start_zenml_operator, zenml_server, zenml_client
) -> None:
    await start_zenml_operator()
    name = unique("rm")
    path = f"{SA_PATH.format(ns='default')}/{name}"
    await cluster.create(
        SA_PATH.format(ns="default"), sa_body(name, {"apiKeys": [{"name": "a"}, {"name": "b"}]})
    )
    await wait_ready(cluster, "default", name)
    value_b = secret_value(await cluster.get(SECRET_PATH.format(ns="default", name=f"{name}-b")))

    await cluster.patch(path, {"spec": {"apiKeys": [{"name": "a"}]}})
    obj = await wait_ready(cluster, "default", name)
    assert [k["name"] for k in obj["status"]["apiKeys"]] == ["a"]
    account = await zenml_client.get_service_account(name)
    assert [k.name for k in await zenml_client.list_api_keys(account.id)] == ["a"]
    assert await cluster.get(SECRET_PATH.format(ns="default", name=f"{name}-b")) is None
    assert await logs_in_as(zenml_server.url, value_b) is None


@pytest.mark.parametrize("policy", ["Delete", "Deactivate", "Retain"])
async def test_deletion_policy(
    cluster, start_zenml_operator, zenml_server, zenml_client, policy: str
) -> None:
    await start_zenml_operator()
    name = unique(policy.lower())
    path = f"{SA_PATH.format(ns='default')}/{name}"
    await cluster.create(
        SA_PATH.format(ns="default"),
        sa_body(name, {"deletionPolicy": policy, "apiKeys": [{"name": "k"}]}),
    )
    await wait_ready(cluster, "default", name)
    value = secret_value(await cluster.get(SECRET_PATH.format(ns="default", name=f"{name}-k")))

    await cluster.delete(path)
    await cluster.wait_for(
        lambda: _gone(cluster, path),
        timeout=30,
        message="resource deleted",
    )
    assert await cluster.get(SECRET_PATH.format(ns="default", name=f"{name}-k")) is None
    if policy == "Delete":
        with pytest.raises(zc.NotFoundError):
            await zenml_client.get_service_account(name)
        assert await logs_in_as(zenml_server.url, value) is None
    elif policy == "Deactivate":
        assert (await zenml_client.get_service_account(name)).active is False
        assert await logs_in_as(zenml_server.url, value) is None
    else:
        assert (await zenml_client.get_service_account(name)).active is True
        assert await logs_in_as(zenml_server.url, value) == name


async def _gone(cluster, path: str) -> bool:
    return await cluster.get(path) is None


async def test_delete_falls_back_to_deactivate_when_zenml_refuses(
    cluster, start_zenml_operator, zenml_server, zenml_client
) -> None:
    """An account that owns ZenML resources cannot be deleted (403): it is deactivated."""
    await start_zenml_operator()
    name = unique("owner")
    path = f"{SA_PATH.format(ns='default')}/{name}"
    await cluster.create(SA_PATH.format(ns="default"), sa_body(name, {"apiKeys": [{"name": "k"}]}))
    await wait_ready(cluster, "default", name)
    value = secret_value(await cluster.get(SECRET_PATH.format(ns="default", name=f"{name}-k")))
    await zenml_server_owned_resource(zenml_server.url, value)

    await cluster.delete(path)
    await cluster.wait_for(lambda: _gone(cluster, path), timeout=30, message="deleted")
    account = await zenml_client.get_service_account(name)
    assert account.active is False
    assert await logs_in_as(zenml_server.url, value) is None
    events = await cluster.get("/api/v1/namespaces/default/events")
    assert any(e.get("reason") == "DeleteFellBackToDeactivate" for e in events["items"])


async def zenml_server_owned_resource(url: str, api_key: str) -> None:
    """Make the account own something in ZenML (a tag), so that ZenML refuses its deletion."""
    import httpx

    token = await login_with_api_key(url, api_key)
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        response = await http.post(
            "/api/v1/tags",
            json={"name": unique("tag")},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert response.status_code < 300, response.text


async def test_name_conflict_touches_nothing(cluster, start_zenml_operator, zenml_client) -> None:
    await start_zenml_operator()
    name = unique("taken")
    foreign = await zenml_client.create_service_account(name, description="not yours")
    path = f"{SA_PATH.format(ns='default')}/{name}"
    await cluster.create(
        SA_PATH.format(ns="default"),
        sa_body(name, {"description": "mine", "active": False, "apiKeys": [{"name": "k"}]}),
    )
    obj = await wait_ready(cluster, "default", name, status="False", reason="NameConflict")
    assert "adopt" in obj["status"]["conditions"][0]["message"]

    after = await zenml_client.get_service_account(name)
    assert (after.id, after.description, after.active) == (foreign.id, "not yours", True)
    assert await zenml_client.list_api_keys(foreign.id) == []
    assert await cluster.get(SECRET_PATH.format(ns="default", name=f"{name}-k")) is None

    # Deleting the resource must not delete an account it never owned.
    await cluster.delete(path)
    await cluster.wait_for(lambda: _gone(cluster, path), timeout=30, message="deleted")
    assert (await zenml_client.get_service_account(name)).id == foreign.id


async def test_adopt_takes_over_an_existing_account(
    cluster, start_zenml_operator, zenml_server, zenml_client
) -> None:
    await start_zenml_operator()
    name = unique("adopt")
    existing = await zenml_client.create_service_account(name, description="old")
    await cluster.create(
        SA_PATH.format(ns="default"),
        sa_body(name, {"adopt": True, "description": "new", "apiKeys": [{"name": "k"}]}),
    )
    obj = await wait_ready(cluster, "default", name)
    assert obj["status"]["accountId"] == existing.id
    assert (await zenml_client.get_service_account(name)).description == "new"
    secret = await cluster.get(SECRET_PATH.format(ns="default", name=f"{name}-k"))
    assert await logs_in_as(zenml_server.url, secret_value(secret)) == name


async def test_unowned_secret_is_left_byte_for_byte_intact(
    cluster, start_zenml_operator, zenml_client
) -> None:
    await start_zenml_operator()
    name = unique("clash")
    secret_path = SECRET_PATH.format(ns="default", name="precious")
    await cluster.create(
        "/api/v1/namespaces/default/secrets",
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": "precious", "labels": {"owner": "someone-else"}},
            "data": {"password": "aHVudGVyMg=="},
        },
    )
    before = await cluster.get(secret_path)
    await cluster.create(
        SA_PATH.format(ns="default"),
        sa_body(name, {"apiKeys": [{"name": "k", "secretName": "precious"}, {"name": "ok"}]}),
    )
    obj = await wait_ready(cluster, "default", name, status="False", reason="SecretConflict")
    assert "precious" in obj["status"]["conditions"][0]["message"]
    assert await cluster.get(secret_path) == before
    states = {k["name"]: k["state"] for k in obj["status"]["apiKeys"]}
    assert states == {"k": "SecretConflict", "ok": "Ready"}
    account = await zenml_client.get_service_account(name)
    assert [k.name for k in await zenml_client.list_api_keys(account.id)] == ["ok"]

    # Deleting the resource leaves the foreign Secret alone too.
    path = f"{SA_PATH.format(ns='default')}/{name}"
    await cluster.delete(path)
    await cluster.wait_for(lambda: _gone(cluster, path), timeout=30, message="deleted")
    assert await cluster.get(secret_path) == before


async def test_drift_is_repaired_on_resync(
    cluster, start_zenml_operator, zenml_server, zenml_client
) -> None:
    await start_zenml_operator(resync_seconds=0.5)
    name = unique("drift")
    await cluster.create(
        SA_PATH.format(ns="default"),
        sa_body(name, {"apiKeys": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}),
    )
    await wait_ready(cluster, "default", name)
    account = await zenml_client.get_service_account(name)
    secret_path = SECRET_PATH.format(ns="default", name=f"{name}-{{}}")

    # By hand: account deactivated, key a deleted, key b deactivated, Secret c deleted.
    await zenml_client.update_service_account(account.id, active=False)
    await zenml_client.delete_api_key(account.id, "a")
    key_b = await zenml_client.get_api_key(account.id, "b")
    await zenml_client.update_api_key(account.id, key_b.id, active=False)
    await cluster.delete(secret_path.format("c"))

    async def converged() -> bool:
        acc = await zenml_client.get_service_account(name)
        keys = {k.name: k for k in await zenml_client.list_api_keys(acc.id)}
        if not acc.active or set(keys) != {"a", "b", "c"} or not keys["b"].active:
            return False
        for key in "abc":
            secret = await cluster.get(secret_path.format(key))
            if secret is None or await logs_in_as(zenml_server.url, secret_value(secret)) != name:
                return False
        return True

    await cluster.wait_for(converged, timeout=30, interval=0.2, message="drift repaired")
    events = await cluster.get("/api/v1/namespaces/default/events")
    assert any(
        e.get("reason") == "ApiKeyReissued" and f"{name}-c" in e.get("message", "")
        for e in events["items"]
    )


async def test_resync_of_a_converged_object_writes_nothing(
    cluster, start_zenml_operator, zenml_client
) -> None:
    _, memo = await start_zenml_operator(resync_seconds=0.3)
    name = unique("idle")
    await cluster.create(
        SA_PATH.format(ns="default"), sa_body(name, {"apiKeys": [{"name": "a"}, {"name": "b"}]})
    )
    await wait_ready(cluster, "default", name)

    def writes() -> int:
        return cluster.emulator.resource_version  # bumps on every change of any object

    # Converged = Ready and Kopf's own bookkeeping of the create done.
    path = f"{SA_PATH.format(ns='default')}/{name}"

    async def create_recorded() -> bool:
        annotations = (await cluster.get(path))["metadata"].get("annotations") or {}
        return "operator.zenml.io/last-handled-configuration" in annotations

    await cluster.wait_for(create_recorded, timeout=10)

    def resyncs() -> float:
        labels = {"resource": "serviceaccount", "result": "success", "reason": "Reconciled"}
        return memo.metrics.registry.get_sample_value("zenml_operator_reconcile_total", labels)

    def zenml_requests() -> float:  # HTTP attempts, as the client's observer reports them
        (family,) = memo.metrics.zenml_requests_total.collect()
        return sum(s.value for s in family.samples if s.name.endswith("_total"))

    # The create intent is removed in the same write that makes the resource Ready: no
    # resync after that has anything left to write (measured from Ready, not after a resync).
    assert "createRequestedAt" not in ((await cluster.get(path)).get("status") or {})
    start_writes, start_reads, start_runs = writes(), zenml_requests(), resyncs()
    await cluster.wait_for(lambda: resyncs() >= start_runs + 3, timeout=10, message="3 resyncs")
    # One ZenML read per resync: the key list, which also names the account (id, active).
    runs, reads = resyncs() - start_runs, zenml_requests() - start_reads
    assert reads <= runs + 1, (reads, runs)  # +1: a resync counted between the two reads
    changes = [
        (c.resource.plural, c.name, c.event["type"], c.event["object"].get("metadata"))
        for c in cluster.emulator._history
        if c.rv > start_writes
    ]
    assert changes == []


async def test_the_operators_shared_parts_are_one_for_all_objects(
    cluster, start_zenml_operator
) -> None:
    """Kopf hands each object's handlers a copy of the operator's memo: the resync schedule,
    the background queue and the look schedule are made before it copies one, or each object
    would get its own (a schedule task and background workers each, and a rotation wake-up
    that reaches only the last one made)."""
    from zenml_operator.controller import BACKGROUND_CONCURRENCY

    _, memo = await start_zenml_operator(resync_seconds=0.3)
    names = [unique("shared") for _ in range(4)]
    for name in names:
        await cluster.create(
            SA_PATH.format(ns="default"), sa_body(name, {"apiKeys": [{"name": "a"}]})
        )
    for name in names:
        await wait_ready(cluster, "default", name)

    def checks() -> float:
        labels = {"resource": "serviceaccount", "result": "success", "reason": "Reconciled"}
        return memo.metrics.registry.get_sample_value("zenml_operator_reconcile_total", labels) or 0

    start = checks()  # every object resynced twice more: each one's check was queued
    await cluster.wait_for(lambda: checks() >= start + 2 * len(names), timeout=15)

    def alive(prefix: str) -> int:
        return sum(1 for t in asyncio.all_tasks() if t.get_name().startswith(prefix))

    assert alive("zenml-operator resyncs") == 1
    assert 1 <= alive("zenml-operator background") <= BACKGROUND_CONCURRENCY
    assert len(memo.resyncs) == len(names)
