"""ApiKeyRotation end to end: emulated Kubernetes API, real Kopf, real ZenML server."""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import pytest

from e2e.conftest import SA_PATH, SECRET_PATH, logs_in_as, secret_value, wait_ready
from e2e.test_service_account import sa_body, unique
from zenml_operator import crashpoints
from zenml_operator import keyfamily as kf

ROT_PATH = "/apis/zenml.io/v1alpha1/namespaces/default/apikeyrotations"
DEPLOY_PATH = "/apis/apps/v1/namespaces/default/deployments"


def parse(ts: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(ts.replace("Z", "+00:00"))


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


async def make_account(cluster, name: str) -> str:
    """A Ready ServiceAccount with key `main`; returns the Secret's current value."""
    await cluster.create(
        SA_PATH.format(ns="default"), sa_body(name, {"apiKeys": [{"name": "main"}]})
    )
    await wait_ready(cluster, "default", name)
    return secret_value(await cluster.get(SECRET_PATH.format(ns="default", name=f"{name}-main")))


async def make_deployment(cluster, name: str) -> None:
    await cluster.create(
        DEPLOY_PATH,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {
                        "containers": [
                            {
                                "name": "c",
                                "image": "busybox",
                                "envFrom": [{"secretRef": {"name": f"{name}-main"}}],
                            }
                        ]
                    },
                },
            },
        },
    )


def rotation_body(name: str, account: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "zenml.io/v1alpha1",
        "kind": "ApiKeyRotation",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"serviceAccountName": account, "apiKeyName": "main", **spec},
    }


async def rotation_status(cluster, name: str) -> dict[str, Any]:
    obj = await cluster.get(f"{ROT_PATH}/{name}")
    return (obj or {}).get("status") or {}


async def wait_count(cluster, name: str, count: int, timeout: float = 30) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        status = await rotation_status(cluster, name)
        return status if status.get("rotationCount", 0) >= count else None

    return await cluster.wait_for(
        check, timeout=timeout, interval=0.1, message=f"{name} rotationCount >= {count}"
    )


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status.get("conditions", []) if c["type"] == type_)


async def family(zenml_client, account: str) -> list:
    acc = await zenml_client.get_service_account(account)
    return kf.family(await zenml_client.list_api_keys(acc.id), "main")


def restarts(cluster, deployment: str) -> list[str]:
    """The key ids a Deployment was restarted for, one per restart, in order."""
    seen: list[str] = []
    for change in cluster.emulator._history:
        if change.resource.plural != "deployments" or change.name != deployment:
            continue
        ann = (
            change.event["object"]["spec"]["template"].get("metadata", {}).get("annotations") or {}
        )
        key_id = ann.get("zenml.io/restarted-for-api-key-id")
        if key_id and (not seen or seen[-1] != key_id):
            seen.append(key_id)
    return seen


async def test_scheduled_rotation_fires_when_due_and_restarts_targets_once(
    cluster, start_zenml_operator, zenml_server, zenml_client
) -> None:
    await start_zenml_operator()
    name = unique("sched")
    old_value = await make_account(cluster, name)
    await make_deployment(cluster, name)
    secret_path = SECRET_PATH.format(ns="default", name=f"{name}-main")
    issued = parse(
        (await cluster.get(secret_path))["metadata"]["annotations"]["zenml.io/issued-at"]
    )
    await cluster.create(
        ROT_PATH,
        rotation_body(
            name,
            name,
            period="4s",
            retainPeriodMinutes=0,
            rolloutRestartTargets=[{"kind": "Deployment", "name": name}],
        ),
    )

    status = await wait_count(cluster, name, 1)
    assert parse(status["lastRotationTime"]) >= issued + datetime.timedelta(seconds=3)
    new_value = secret_value(await cluster.get(secret_path))
    assert new_value != old_value
    assert await logs_in_as(zenml_server.url, new_value) == name
    assert await logs_in_as(zenml_server.url, old_value) is None  # retention 0
    status = await wait_count(cluster, name, 2)
    assert [k.id for k in await family(zenml_client, name) if k.active] == [status["currentKeyId"]]
    assert len(await family(zenml_client, name)) <= 2  # current + the deactivated previous
    await cluster.wait_for(lambda: len(restarts(cluster, name)) >= 2, timeout=10)
    assert restarts(cluster, name)[:2] == restarts(cluster, name)[:2]  # no repeats
    assert len(restarts(cluster, name)) == len(set(restarts(cluster, name)))
    assert condition(status, "Ready")["status"] == "True"


async def test_on_demand_request_rotates_exactly_once(
    cluster, start_zenml_operator, zenml_server, zenml_client
) -> None:
    await start_zenml_operator()
    name = unique("ondemand")
    await make_account(cluster, name)
    await cluster.create(ROT_PATH, rotation_body(name, name, period="1h", retainPeriodMinutes=0))
    await cluster.wait_for(lambda: _has_condition(cluster, name, "Ready", "True"), timeout=20)
    assert (await rotation_status(cluster, name)).get("rotationCount", 0) == 0

    path = f"{ROT_PATH}/{name}"
    await cluster.patch(path, {"metadata": {"annotations": {"zenml.io/rotate": "req-1"}}})
    status = await wait_count(cluster, name, 1)
    assert status["lastRotateRequest"] == "req-1"
    # A spec change makes the operator look again; the same request must not fire again.
    await cluster.patch(path, {"spec": {"period": "2h"}})
    generation = (await cluster.get(path))["metadata"]["generation"]
    status = await cluster.wait_for(
        lambda: _status_if(cluster, name, lambda s: s.get("observedGeneration") == generation),
        timeout=20,
    )
    assert status["rotationCount"] == 1
    await cluster.patch(path, {"metadata": {"annotations": {"zenml.io/rotate": "req-2"}}})
    status = await wait_count(cluster, name, 2)
    assert status["rotationCount"] == 2
    secret = await cluster.get(SECRET_PATH.format(ns="default", name=f"{name}-main"))
    assert await logs_in_as(zenml_server.url, secret_value(secret)) == name
    assert len([k for k in await family(zenml_client, name) if k.active]) == 1


async def _status_if(cluster, name: str, predicate) -> dict[str, Any] | None:
    status = await rotation_status(cluster, name)
    return status if predicate(status) else None


async def _has_condition(
    cluster, name: str, type_: str, value: str, reason: str | None = None
) -> bool:
    status = await rotation_status(cluster, name)
    for cond in status.get("conditions", []):
        if (
            cond["type"] == type_
            and cond["status"] == value
            and (reason is None or cond["reason"] == reason)
        ):
            return True
    return False


async def test_old_key_works_until_retention_ends_then_gets_401(
    cluster, start_zenml_operator, zenml_server, zenml_client
) -> None:
    await start_zenml_operator()
    name = unique("retain")
    old_value = await make_account(cluster, name)
    secret_path = SECRET_PATH.format(ns="default", name=f"{name}-main")
    await cluster.create(ROT_PATH, rotation_body(name, name, period="2m", retainPeriodMinutes=1))
    await cluster.patch(
        f"{ROT_PATH}/{name}", {"metadata": {"annotations": {"zenml.io/rotate": "now"}}}
    )
    status = await wait_count(cluster, name, 1)
    valid_until = parse(status["previousKeyValidUntil"])
    assert await logs_in_as(zenml_server.url, old_value) == name  # inside the retention

    async def old_refused() -> bool:
        # The Secret's key logs in throughout.
        current = secret_value(await cluster.get(secret_path))
        assert await logs_in_as(zenml_server.url, current) == name
        return await logs_in_as(zenml_server.url, old_value) is None

    await cluster.wait_for(old_refused, timeout=100, interval=1.0, message="old key 401")
    refused_at = now()
    assert refused_at >= valid_until - datetime.timedelta(seconds=1)
    assert refused_at <= valid_until + datetime.timedelta(seconds=15)
    assert len([k for k in await family(zenml_client, name) if k.active]) == 1


async def test_operator_restart_neither_rotates_early_nor_twice(
    cluster, start_zenml_operator, zenml_server
) -> None:
    period = 5.0
    operator, _ = await start_zenml_operator()
    name = unique("restart")
    await make_account(cluster, name)
    await cluster.create(ROT_PATH, rotation_body(name, name, period="5s", retainPeriodMinutes=0))
    first = await wait_count(cluster, name, 1)
    await operator.stop()

    operator, _ = await start_zenml_operator()
    second = await wait_count(cluster, name, 2)
    gap = parse(second["lastRotationTime"]) - parse(first["lastRotationTime"])
    assert gap >= datetime.timedelta(seconds=period - 1), gap  # not early after the restart
    await operator.stop()

    # Down for three periods: on return, one rotation, not three.
    await asyncio.sleep(3 * period)
    operator, _ = await start_zenml_operator()
    third = await wait_count(cluster, name, 3)
    assert third["rotationCount"] == 3
    next_due = parse(third["nextRotationTime"])
    assert next_due - parse(third["lastRotationTime"]) == datetime.timedelta(seconds=period)

    async def still_three_until_due() -> bool:
        status = await rotation_status(cluster, name)
        assert status["rotationCount"] <= 3 or now() >= next_due - datetime.timedelta(
            seconds=0.5
        ), status
        return now() >= next_due - datetime.timedelta(seconds=1)

    await cluster.wait_for(still_three_until_due, timeout=2 * period, interval=0.1)
    secret = await cluster.get(SECRET_PATH.format(ns="default", name=f"{name}-main"))
    assert await logs_in_as(zenml_server.url, secret_value(secret)) == name


async def test_suspend_stops_rotations(cluster, start_zenml_operator) -> None:
    await start_zenml_operator()
    name = unique("suspend")
    await make_account(cluster, name)
    await cluster.create(
        ROT_PATH, rotation_body(name, name, period="2s", retainPeriodMinutes=0, suspend=True)
    )
    await cluster.wait_for(
        lambda: _has_condition(cluster, name, "Ready", "True", "Suspended"), timeout=20
    )
    status = await rotation_status(cluster, name)
    await asyncio.sleep(5)  # more than two periods pass while suspended
    assert (await rotation_status(cluster, name)).get("rotationCount", 0) == 0
    assert status.get("rotationCount", 0) == 0
    await cluster.patch(f"{ROT_PATH}/{name}", {"spec": {"suspend": False}})
    await wait_count(cluster, name, 1)


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ({"serviceAccountName": "does-not-exist"}, "ServiceAccountNotFound"),
        ({"apiKeyName": "nope"}, "ApiKeyNotFound"),
    ],
)
async def test_missing_target_is_not_ready(cluster, start_zenml_operator, target, reason) -> None:
    await start_zenml_operator()
    name = unique("missing")
    await make_account(cluster, name)
    body = rotation_body(name, name, period="2h")
    body["spec"].update(target)
    await cluster.create(ROT_PATH, body)
    await cluster.wait_for(
        lambda: _has_condition(cluster, name, "Ready", "False", reason), timeout=20
    )
    status = await rotation_status(cluster, name)
    assert condition(status, "Ready")["message"]


async def test_second_rotation_for_the_same_key_is_refused(cluster, start_zenml_operator) -> None:
    await start_zenml_operator()
    name = unique("dup")
    await make_account(cluster, name)
    await cluster.create(ROT_PATH, rotation_body(name, name, period="2h"))
    await cluster.wait_for(lambda: _has_condition(cluster, name, "Ready", "True"), timeout=20)
    await cluster.create(ROT_PATH, rotation_body(f"{name}-2", name, period="2h"))
    await cluster.wait_for(
        lambda: _has_condition(cluster, f"{name}-2", "Ready", "False", "DuplicateRotation"),
        timeout=20,
    )


@pytest.mark.parametrize("point", ["rotation.after-create", "rotation.after-secret-write"])
async def test_crash_mid_rotation_recovers(
    cluster, start_zenml_operator, zenml_server, zenml_client, point: str
) -> None:
    operator, _ = await start_zenml_operator()
    name = unique("crash")
    old_value = await make_account(cluster, name)
    await make_deployment(cluster, name)
    await cluster.create(
        ROT_PATH,
        rotation_body(
            name,
            name,
            period="1h",
            retainPeriodMinutes=1,
            rolloutRestartTargets=[{"kind": "Deployment", "name": name}],
        ),
    )
    await cluster.wait_for(lambda: _has_condition(cluster, name, "Ready", "True"), timeout=20)

    crashed = asyncio.Event()

    def crash(where: str) -> None:
        crashed.set()
        raise crashpoints.SimulatedCrash(where)

    crashpoints.arm(point, crash)
    try:
        await cluster.patch(
            f"{ROT_PATH}/{name}", {"metadata": {"annotations": {"zenml.io/rotate": "go"}}}
        )
        await asyncio.wait_for(crashed.wait(), timeout=20)
    finally:
        crashpoints.disarm_all()
    await operator.stop()  # the process is gone at that line

    # Whatever happened, the key workloads hold still works before its announced end.
    assert await logs_in_as(zenml_server.url, old_value) == name
    secret_path = SECRET_PATH.format(ns="default", name=f"{name}-main")
    assert await logs_in_as(zenml_server.url, secret_value(await cluster.get(secret_path))) == name

    await start_zenml_operator()
    status = await wait_count(cluster, name, 1)
    await cluster.wait_for(
        lambda: restarts(cluster, name) == [status["currentKeyId"]],
        timeout=20,
        message="one restart for the new key",
    )
    status = await rotation_status(cluster, name)
    assert status["rotationCount"] == 1  # exactly one rotation, not two
    current = secret_value(await cluster.get(secret_path))
    assert await logs_in_as(zenml_server.url, current) == name
    assert await logs_in_as(zenml_server.url, old_value) == name  # retention 1 min not over
    members = await family(zenml_client, name)
    # The current key and the retained previous one; the crash orphan (if any) is gone.
    assert {m.id for m in members} == {status["currentKeyId"], status["previousKeyId"]}
    assert restarts(cluster, name) == [status["currentKeyId"]]
