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


ANN_RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
ANN_RESTARTED_FOR = "zenml.io/restarted-for-api-key-id"


def _versions(cluster, plural: str, name: str, namespace: str) -> list[dict[str, Any]]:
    """Every committed version of one object, oldest first (the emulator's change log)."""
    return [
        change.event["object"]
        for change in cluster.emulator._history
        if change.resource.plural == plural
        and change.name == name
        and change.namespace == namespace
        and change.event["type"] != "DELETED"
    ]


def restarts(cluster, deployment: str, namespace: str = "default") -> list[str]:
    """One entry per restart of a Deployment, in order, never merged: every committed change
    of its pod template (what makes a real cluster roll its pods out) is one restart, named
    by the key id it was made for. A template change that did not set a new
    `kubectl.kubernetes.io/restartedAt` is listed too, so it cannot pass as no restart."""
    found: list[str] = []
    before: dict[str, Any] | None = None
    for obj in _versions(cluster, "deployments", deployment, namespace):
        template = obj["spec"]["template"]
        if before is not None and template != before:
            ann = (template.get("metadata") or {}).get("annotations") or {}
            old = (before.get("metadata") or {}).get("annotations") or {}
            key_id = ann.get(ANN_RESTARTED_FOR, "<no key id>")
            same_time = ann.get(ANN_RESTARTED_AT) == old.get(ANN_RESTARTED_AT)
            found.append(f"{key_id} (restartedAt unchanged)" if same_time else key_id)
        before = template
    return found


def rotated_keys(cluster, secret: str, namespace: str = "default") -> list[str]:
    """The key id of every rotation written into a Secret, in order, never merged: one entry
    per committed version whose key value changed and whose rotation count is not 0."""
    found: list[str] = []
    before: str | None = None
    for obj in _versions(cluster, "secrets", secret, namespace):
        value = (obj.get("data") or {}).get("ZENML_STORE_API_KEY")
        ann = obj["metadata"].get("annotations") or {}
        if before is not None and value != before and int(ann.get("zenml.io/rotation-count", 0)):
            found.append(ann["zenml.io/api-key-id"])
        before = value
    return found


async def wait_restarts(
    cluster, deployment: str, expected: list[str] | None = None, *, secret: str | None = None
) -> list[str]:
    """Wait until the Deployment was restarted exactly once for each key in `expected` (or,
    with `secret`, for each rotation written into that Secret so far), in order. Fails at
    once on a restart that is not owed: a repeat, an unknown key, or one ahead of its
    rotation."""

    def check() -> list[str] | None:
        owed = expected if expected is not None else rotated_keys(cluster, str(secret))
        seen = restarts(cluster, deployment)
        assert seen == owed[: len(seen)], f"restarts {seen}; one per rotation owed: {owed}"
        return seen if seen == owed else None

    return await cluster.wait_for(
        check, timeout=20, interval=0.05, message=f"one restart of {deployment} per rotation"
    )


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
    # One restart per rotation: wait until the restarts caught up with the rotations
    # written into the Secret (at least two), failing on any repeat on the way.
    await cluster.wait_for(
        lambda: len(rotated_keys(cluster, f"{name}-main")) >= 2, timeout=10, interval=0.05
    )
    done = await wait_restarts(cluster, name, secret=f"{name}-main")
    assert len(done) >= 2 and len(set(done)) == len(done), done
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
    path = f"{ROT_PATH}/{name}"
    due = parse((await rotation_status(cluster, name))["nextRotationTime"])
    # Overdue by more than two periods while suspended ...
    await cluster.wait_for(
        lambda: now() >= due + datetime.timedelta(seconds=4.5),
        timeout=10,
        interval=0.1,
        message="two periods past the due time",
    )
    # ... the operator looks at it then (a spec change that keeps it suspended) ...
    generation = (await cluster.patch(path, {"spec": {"period": "3s"}}))["metadata"]["generation"]
    status = await cluster.wait_for(
        lambda: _status_if(cluster, name, lambda s: s.get("observedGeneration") == generation),
        timeout=20,
        message="the overdue, suspended rotation looked at",
    )
    # ... and does not rotate: no count, no key written into the Secret.
    assert status.get("rotationCount", 0) == 0, status
    assert condition(status, "Ready")["reason"] == "Suspended", status
    assert rotated_keys(cluster, f"{name}-main") == []
    await cluster.patch(path, {"spec": {"suspend": False}})
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
    await wait_restarts(cluster, name, [status["currentKeyId"]])
    status = await rotation_status(cluster, name)
    assert status["rotationCount"] == 1  # exactly one rotation, not two
    current = secret_value(await cluster.get(secret_path))
    assert await logs_in_as(zenml_server.url, current) == name
    assert await logs_in_as(zenml_server.url, old_value) == name  # retention 1 min not over
    members = await family(zenml_client, name)
    # The current key and the retained previous one; the crash orphan (if any) is gone.
    assert {m.id for m in members} == {status["currentKeyId"], status["previousKeyId"]}
    assert restarts(cluster, name) == [status["currentKeyId"]]
