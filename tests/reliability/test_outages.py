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
from e2e.test_rotation import restarts, rotated_keys
from fixtures_kube import NAMESPACES
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

# Every outage scenario, with the test that runs it. The README quotes the count.
OUTAGES: dict[str, str] = {
    "zenml-server-down-then-back": "test_zenml_server_outage",
    **{
        fault: "test_kubernetes_api_faults"
        for fault in (
            "secret-create-500",
            "status-patch-429",
            "kopf-finalizer-patch-500",
            "event-post-500",
            "secret-patch-409",
            "workload-patch-500",
            "secret-delete-500",
            "watch-request-500",
            "watch-streams-dropped",
        )
    },
    "object-get-503": "test_kubernetes_error_outside_the_reconciler_is_retried_promptly",
    "status-write-429": "test_kubernetes_error_outside_the_reconciler_is_retried_promptly",
}
OUTAGE_COUNT = 12
# Scenarios survived in this run: recorded by a test at its very end (so only when it passed),
# and only for the faults it saw fire.
SURVIVED: list[str] = []


def survived(*names: str) -> None:
    assert set(names) <= set(OUTAGES), names
    SURVIVED.extend(names)


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
        duplicates = creations.duplicates(cluster)
        assert duplicates == [], duplicates
        account = await zenml.get_service_account(second)
        assert creations.created(account.id) == ["a", "b"]
    finally:
        await zenml.aclose()
    survived("zenml-server-down-then-back")  # it fired: every object said ZenMLUnavailable


async def _rotated(cluster: Any, name: str) -> dict[str, Any] | None:
    status = await rotation_status(cluster, name)
    cond = condition(await cluster.get(rot_path(name)))
    ok = status.get("rotationCount") == 1 and cond and cond["status"] == "True"
    return status if ok else None


# --- (b) a Kubernetes API that fails writes and drops watches --------------------------------

WATCHED_KINDS = ("serviceaccounts", "apikeyrotations")


def _watch_requests(emulator: Any, ns: str, kind: str) -> int:
    return len(emulator["watch", re.compile(rf".*/namespaces/{ns}/{kind}$")])


async def drop_watch_streams(cluster: Any) -> int:
    """End every open watch stream at once; return when the operator has watched each kind in
    each namespace again (how many streams were dropped is returned)."""
    emulator = cluster.emulator
    dropped = len(emulator._watchers)
    assert dropped >= len(WATCHED_KINDS) * len(NAMESPACES), f"only {dropped} streams open"
    before = {(ns, k): _watch_requests(emulator, ns, k) for ns in NAMESPACES for k in WATCHED_KINDS}
    emulator.close_watches()

    def watched_again() -> bool:
        return all(_watch_requests(emulator, ns, k) > n for (ns, k), n in before.items())

    await cluster.wait_for(watched_again, timeout=10, message="watch streams opened again")
    return dropped


async def test_kubernetes_api_faults(
    cluster, start_operator, zenml_server, zenml_client, creations, operator_login_cached
) -> None:
    emulator = cluster.emulator
    await start_operator(retry_delay=0.3, resync_seconds=600)
    name = unique("faulty")
    foreign = await create_foreign_secret(cluster, f"{name}-foreign")
    secrets = SECRET_LIST.format(ns=NS)
    # fault -> (the kmock reaction, the criteria of the requests it answers, how many answers
    # it replaces): each must be met in full and then retried at least once.
    injected = {
        "secret-create-500": (emulator["post", secrets][:2] << 500, ("post", secrets), 2),
        # The intent record (the first status write) fails; the reconcile reports it.
        "status-patch-429": (
            emulator["patch", f"{sa_path(name)}/status"][:1] << 429,
            ("patch", f"{sa_path(name)}/status"),
            1,
        ),
        "kopf-finalizer-patch-500": (
            emulator["patch", sa_path(name)][:1] << 500,
            ("patch", sa_path(name)),
            1,
        ),
        "event-post-500": (
            emulator["post", f"/api/v1/namespaces/{NS}/events"][:2] << 500,
            ("post", f"/api/v1/namespaces/{NS}/events"),
            2,
        ),
        "watch-request-500": (
            emulator["watch", re.compile(r".*/serviceaccounts$")][:1] << 500,
            ("watch", re.compile(r".*/serviceaccounts$")),
            1,
        ),
    }
    await cluster.create(
        SA_LIST.format(ns=NS), sa_body(name, {"apiKeys": [{"name": "a"}, {"name": "b"}]})
    )
    # Mid-reconcile (the first Secret write met its fault), every open watch stream ends.
    await cluster.wait_for(lambda: len(emulator["post", secrets]) >= 1, timeout=10)
    dropped = [await drop_watch_streams(cluster)]
    expected = Expected(live=[name], foreign={secret_path(f"{name}-foreign"): foreign})
    await wait_converged(cluster, zenml_client, zenml_server.url, expected, timeout=30)

    # A rotation whose Secret write meets a conflict and whose restart fails once.
    await cluster.create(DEPLOY_LIST.format(ns=NS), deployment_body(name))
    secret_a = secret_path(f"{name}-a")
    deploy = f"{DEPLOY_LIST.format(ns=NS)}/{name}"
    injected["secret-patch-409"] = (
        emulator["patch", secret_a][:1] << 409,
        ("patch", secret_a),
        1,
    )
    injected["workload-patch-500"] = (
        emulator["patch", deploy][:1] << 500,
        ("patch", deploy),
        1,
    )
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
    # Mid-rotation (its Secret write met the conflict), the streams end again.
    await cluster.wait_for(lambda: len(emulator["patch", secret_a]) >= 1, timeout=10)
    dropped.append(await drop_watch_streams(cluster))
    status = await cluster.wait_for(
        lambda: _rotated_and_restarted(cluster, name), timeout=30, message="rotated"
    )
    assert restarts(cluster, name) == rotated_keys(cluster, f"{name}-a") == [status["currentKeyId"]]
    await wait_converged(cluster, zenml_client, zenml_server.url, expected, timeout=30)
    account = await zenml_client.get_service_account(name)

    # Deletion, with a Secret delete failing once.
    injected["secret-delete-500"] = (
        emulator["delete", secret_path(f"{name}-b")][:1] << 500,
        ("delete", secret_path(f"{name}-b")),
        1,
    )
    await cluster.delete(rot_path(name))
    await cluster.delete(sa_path(name))
    expected = Expected(
        gone={name: (name, "Delete", [f"{name}-a", f"{name}-b"])},
        foreign=expected.foreign,
    )
    await wait_converged(cluster, zenml_client, zenml_server.url, expected, timeout=30)

    # Every injected fault was met in full, then retried.
    for fault, (_, criteria, answers) in injected.items():
        assert len(emulator[criteria]) >= answers + 1, fault
    # The first Secret create of key a failed after its ZenML create (its first value never
    # reached a Secret: re-issued); the rotation's Secret write met the 409 and was written
    # again with the same new key (no second key for one rotation).
    duplicates = creations.duplicates(cluster, unwritten=["a"])
    assert duplicates == [], duplicates
    created = creations.created(account.id)
    assert created == ["a", "a.r1", "b"], created
    assert writes_to(cluster, "secrets", f"{name}-foreign") == 1
    survived(*injected, "watch-streams-dropped")


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
    answers = 1 if fault == "object-get-503" else 2
    assert len(cluster.emulator[criteria]) >= answers + 1  # met in full, then retried
    survived(fault)


def test_outage_counts(capsys) -> None:
    """The scenario table holds the README's count; prints what survived in this run (each
    recorded by its test only after it passed, for the faults it saw fire)."""
    assert len(OUTAGES) == OUTAGE_COUNT
    assert len(SURVIVED) == len(set(SURVIVED)), SURVIVED
    with capsys.disabled():
        print(
            f"\noutages: {len(OUTAGES)} outage scenarios; {len(SURVIVED)} survived in this run:"
            f" {', '.join(SURVIVED) or 'none'}"
        )
