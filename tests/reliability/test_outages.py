"""Outages: the ZenML server gone for longer than any retry budget, and a Kubernetes API that
fails writes and drops watch streams. The operator keeps running through both, says what is
wrong while it lasts, and converges by itself afterwards, with nothing created twice.

(a) runs its own ZenML server (own data dir and port; the session's shared server is never
disturbed), stops it, and starts it again on the same data dir and port.
(b) injects faults with kmock reactions: an injected response replaces the emulator's
answer, so the failed request changes nothing (as a failed request on a real cluster).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from e2e.conftest import wait_ready
from e2e.test_rotation import restarts
from reliability.helpers import (
    DEPLOY_LIST,
    NS,
    ROT_LIST,
    SA_LIST,
    SECRET_LIST,
    Expected,
    condition,
    create_foreign_secret,
    deployment_body,
    rot_path,
    rotation_body,
    sa_body,
    sa_path,
    secret_path,
    unique,
    wait_converged,
    wait_warnings,
    writes_to,
)
from zenml_devstack.zenml_server import (
    create_service_account_with_key,
    start_zenml_server,
)
from zenml_operator.zenml_api import ZenMLClient

SCENARIOS: dict[str, list[str]] = {}  # test -> the outage scenarios it covered


async def rotation_status(cluster: Any, name: str) -> dict[str, Any]:
    return ((await cluster.get(rot_path(name))) or {}).get("status") or {}


async def wait_reason(cluster: Any, path: str, status: str, reason: str, timeout: float = 20):
    async def check() -> dict[str, Any] | None:
        obj = await cluster.get(path)
        cond = condition(obj)
        return cond if cond and (cond["status"], cond["reason"]) == (status, reason) else None

    return await cluster.wait_for(
        check, timeout=timeout, interval=0.1, message=f"{path} Ready={status} {reason}"
    )


# --- (a) the ZenML server down, then back on the same data dir and port --------------------


async def test_zenml_server_outage(cluster, start_operator, spare_zenml_server, creations) -> None:
    server = spare_zenml_server
    key = await asyncio.to_thread(
        create_service_account_with_key, server.url, server.admin_password, "zenml-operator"
    )
    server.grant_admin("zenml-operator")
    port = int(server.url.rsplit(":", 1)[1])
    zenml = ZenMLClient(server.url, key)
    try:
        operator, _ = await start_operator(
            zenml_url=server.url,
            api_key=lambda: key,
            resync_seconds=1.0,
            retry_delay=0.5,
            zenml_retries=1,
            zenml_timeout=2.0,
        )
        first, second = unique("before"), unique("during")
        await cluster.create(SA_LIST.format(ns=NS), sa_body(first, {"apiKeys": [{"name": "a"}]}))
        await wait_ready(cluster, NS, first)
        await cluster.create(
            ROT_LIST.format(ns=NS),
            rotation_body(
                first,
                {
                    "serviceAccountName": first,
                    "apiKeyName": "a",
                    "period": "1h",
                    "retainPeriodMinutes": 0,
                },
            ),
        )
        await wait_reason(cluster, rot_path(first), "True", "Scheduled")

        await asyncio.to_thread(server.stop)
        # While it is down: a new resource, a spec change, an on-demand rotation.
        await cluster.create(
            SA_LIST.format(ns=NS), sa_body(second, {"apiKeys": [{"name": "a"}, {"name": "b"}]})
        )
        await cluster.patch(sa_path(first), {"spec": {"apiKeys": [{"name": "a"}, {"name": "b"}]}})
        await cluster.patch(
            rot_path(first), {"metadata": {"annotations": {"zenml.io/rotate": "during"}}}
        )
        watched = (sa_path(first), sa_path(second), rot_path(first))
        for path in watched:
            cond = await wait_reason(cluster, path, "False", "ZenMLUnavailable")
            assert "cannot be reached" in cond["message"], cond
        expected = {("ServiceAccount", first), ("ServiceAccount", second)}
        await wait_warnings(cluster, "ZenMLUnavailable", expected | {("ApiKeyRotation", first)})

        # Back on the same data dir and port. Its start takes ~15 s: the outage lasts far
        # longer than one reconcile's retry budget (2 attempts, < 2 s), and all along the
        # operator keeps running and keeps saying why.
        restart = asyncio.ensure_future(
            asyncio.to_thread(start_zenml_server, server.data_dir, port=port)
        )
        while not restart.done():
            assert operator.running
            for path in watched:
                assert condition(await cluster.get(path))["reason"] == "ZenMLUnavailable"
            await asyncio.wait({restart}, timeout=1.0)
        server.process = restart.result().process  # the session's finish stops this one
        expected = Expected(live=[first, second])
        await wait_converged(cluster, zenml, server.url, expected, timeout=30)
        status = await cluster.wait_for(
            lambda: _rotated(cluster, first), timeout=20, message="rotation after the outage"
        )
        assert status["rotationCount"] == 1 and status["lastRotateRequest"] == "during"
        assert operator.running  # it converged by itself: never restarted
        assert creations.duplicates() == [], creations.duplicates()
        account = await zenml.get_service_account(second)
        assert creations.created(account.id) == ["a", "b"]
    finally:
        await zenml.aclose()
    SCENARIOS["zenml"] = ["zenml-server-down-then-back"]


async def _rotated(cluster: Any, name: str) -> dict[str, Any] | None:
    status = await rotation_status(cluster, name)
    cond = condition(await cluster.get(rot_path(name)))
    ok = status.get("rotationCount") == 1 and cond and cond["status"] == "True"
    return status if ok else None


# --- (b) a Kubernetes API that fails writes and drops watches --------------------------------

FAULTS = [
    "secret-create-500",
    "status-patch-429",
    "kopf-finalizer-patch-500",
    "event-post-500",
    "secret-patch-409",
    "workload-patch-500",
    "secret-delete-500",
    "watch-request-500",
    "watch-streams-dropped",
]


async def test_kubernetes_api_faults(
    cluster, start_operator, zenml_server, zenml_client, creations, operator_login_cached
) -> None:
    emulator = cluster.emulator
    await start_operator(retry_delay=0.3, resync_seconds=600)
    name = unique("faulty")
    foreign = await create_foreign_secret(cluster, f"{name}-foreign")
    secrets = SECRET_LIST.format(ns=NS)
    injected = {
        "secret-create-500": (emulator["post", secrets][:2] << 500, ("post", secrets)),
        # The intent record (the first status write) fails; the reconcile reports it.
        "status-patch-429": (
            emulator["patch", f"{sa_path(name)}/status"][:1] << 429,
            ("patch", f"{sa_path(name)}/status"),
        ),
        "kopf-finalizer-patch-500": (
            emulator["patch", sa_path(name)][:1] << 500,
            ("patch", sa_path(name)),
        ),
        "event-post-500": (
            emulator["post", f"/api/v1/namespaces/{NS}/events"][:2] << 500,
            ("post", f"/api/v1/namespaces/{NS}/events"),
        ),
        "watch-request-500": (
            emulator["watch", re.compile(r".*/serviceaccounts$")][:1] << 500,
            ("watch", re.compile(r".*/serviceaccounts$")),
        ),
    }
    await cluster.create(
        SA_LIST.format(ns=NS), sa_body(name, {"apiKeys": [{"name": "a"}, {"name": "b"}]})
    )
    await asyncio.sleep(0.3)
    emulator.close_watches()  # every open watch stream ends at once
    expected = Expected(live=[name], foreign={secret_path(f"{name}-foreign"): foreign})
    await wait_converged(cluster, zenml_client, zenml_server.url, expected, timeout=30)

    # A rotation whose Secret write meets a conflict and whose restart fails once.
    await cluster.create(DEPLOY_LIST.format(ns=NS), deployment_body(name))
    secret_a = secret_path(f"{name}-a")
    deploy = f"{DEPLOY_LIST.format(ns=NS)}/{name}"
    injected["secret-patch-409"] = (emulator["patch", secret_a][:1] << 409, ("patch", secret_a))
    injected["workload-patch-500"] = (emulator["patch", deploy][:1] << 500, ("patch", deploy))
    await cluster.create(
        ROT_LIST.format(ns=NS),
        rotation_body(
            name,
            {
                "serviceAccountName": name,
                "apiKeyName": "a",
                "period": "1h",
                "retainPeriodMinutes": 0,
                "rolloutRestartTargets": [{"kind": "Deployment", "name": name}],
            },
            annotations={"zenml.io/rotate": "now"},
        ),
    )
    await asyncio.sleep(0.2)
    emulator.close_watches()
    status = await cluster.wait_for(
        lambda: _rotated_and_restarted(cluster, name), timeout=30, message="rotated"
    )
    assert restarts(cluster, name) == [status["currentKeyId"]]
    await wait_converged(cluster, zenml_client, zenml_server.url, expected, timeout=30)
    account = await zenml_client.get_service_account(name)

    # Deletion, with a Secret delete failing once.
    injected["secret-delete-500"] = (
        emulator["delete", secret_path(f"{name}-b")][:1] << 500,
        ("delete", secret_path(f"{name}-b")),
    )
    await cluster.delete(rot_path(name))
    await cluster.delete(sa_path(name))
    expected = Expected(
        gone={name: (name, "Delete", [f"{name}-a", f"{name}-b"])},
        foreign=expected.foreign,
    )
    await wait_converged(cluster, zenml_client, zenml_server.url, expected, timeout=30)

    # Every injected fault was met (the failing answer, then at least one retry).
    for fault, (_, criteria) in injected.items():
        assert len(emulator[criteria]) >= 2, fault
    assert creations.duplicates() == [], creations.duplicates()
    created = creations.created(account.id)
    # a and b once each; the rotation's first new key met the 409 on its Secret write and was
    # deleted unused by the retry, which rotated with a second one.
    assert [n for n in created if ".r" not in n] == ["a", "b"], created
    assert len([n for n in created if ".r" in n]) == 2, created
    assert writes_to(cluster, "secrets", f"{name}-foreign") == 1
    SCENARIOS["kube"] = FAULTS


async def _rotated_and_restarted(cluster: Any, name: str) -> dict[str, Any] | None:
    status = await rotation_status(cluster, name)
    cond = condition(await cluster.get(rot_path(name)))
    ok = (
        status.get("rotationCount") == 1
        and status.get("restartedForKeyId") == status.get("currentKeyId")
        and cond
        and cond["status"] == "True"
    )
    return status if ok else None


@pytest.mark.parametrize(
    "fault", ["object-get-503", "status-write-429"], ids=["fresh-read", "status-write"]
)
async def test_kubernetes_error_outside_the_reconciler_is_retried_promptly(
    cluster, start_operator, zenml_server, zenml_client, operator_login_cached, fault
) -> None:
    await start_operator(retry_delay=0.3)
    name = unique("prompt")
    if fault == "object-get-503":
        criteria: tuple[str, str] = ("get", sa_path(name))
        cluster.emulator[criteria][:1] << 503
    else:  # the intent record, then the status write that reports the failure
        criteria = ("patch", f"{sa_path(name)}/status")
        cluster.emulator[criteria][:2] << 429
    await cluster.create(SA_LIST.format(ns=NS), sa_body(name, {"apiKeys": [{"name": "a"}]}))
    # (No HTTP read by the test before the operator met the fault: it could take it.)
    await cluster.wait_for(lambda: len(cluster.emulator[criteria]) >= 1, timeout=5)
    await wait_converged(cluster, zenml_client, zenml_server.url, Expected(live=[name]), timeout=6)
    SCENARIOS.setdefault("kube", list(FAULTS)).append(fault)


def test_outage_counts(capsys) -> None:
    """Prints how many outage scenarios ran (after the tests above, in file order)."""
    ran = [s for group in SCENARIOS.values() for s in group]
    with capsys.disabled():
        print(f"\noutages: {len(ran)} outage scenarios survived: {', '.join(ran)}")
