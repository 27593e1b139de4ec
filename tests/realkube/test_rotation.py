"""ApiKeyRotation on a real kube-apiserver: on demand, retention, restart of a Deployment."""

from __future__ import annotations

import datetime

from realkube.conftest import (
    GROUP_PATH,
    Installed,
    ZenMLProbe,
    deployment_body,
    logs_in_as,
    rotation_body,
    secret_value,
    service_account_body,
    wait_for,
    wait_ready,
)

RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"


def parse(ts: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(ts.replace("Z", "+00:00"))


def test_on_demand_rotation_with_one_minute_retention(
    installed: Installed, zenml: ZenMLProbe, namespace: str
) -> None:
    kube, url = installed.kube, installed.zenml_url
    account = f"rot-{namespace[-6:]}"
    sa_path = f"{GROUP_PATH}/namespaces/{namespace}/serviceaccounts"
    rot_path = f"{GROUP_PATH}/namespaces/{namespace}/apikeyrotations"
    secret_path = f"/api/v1/namespaces/{namespace}/secrets/app-ci"
    deploy_path = f"/apis/apps/v1/namespaces/{namespace}/deployments"
    kube.create(sa_path, service_account_body(namespace, "app", name=account))
    kube.create(deploy_path, deployment_body(namespace, "worker", "app-ci"))
    wait_ready(kube, f"{sa_path}/app")
    old = secret_value(kube.get(secret_path))
    kube.create(
        rot_path,
        rotation_body(
            namespace,
            "rot",
            period="720h",
            retainPeriodMinutes=1,
            rolloutRestartTargets=[{"kind": "Deployment", "name": "worker"}],
        ),
    )
    wait_ready(kube, f"{rot_path}/rot")
    kube.merge_patch(f"{rot_path}/rot", {"metadata": {"annotations": {"zenml.io/rotate": "1"}}})

    def rotated() -> dict | None:
        secret = kube.get(secret_path)
        return secret if secret and secret_value(secret) != old else None

    new = secret_value(wait_for(rotated, timeout=60, message="the Secret holds a new key"))
    assert logs_in_as(url, new) == account
    assert logs_in_as(url, old) == account  # inside its retention

    def restarted() -> str | None:
        deploy = kube.get(f"{deploy_path}/worker") or {}
        ann = deploy["spec"]["template"]["metadata"].get("annotations") or {}
        return ann.get(RESTARTED_AT)

    wait_for(restarted, timeout=60, message="the Deployment's pod template restarted")
    status = wait_for(
        lambda: (
            (kube.get(f"{rot_path}/rot") or {}).get("status", {}).get("previousKeyValidUntil")
            and kube.get(f"{rot_path}/rot")["status"]
        ),
        timeout=30,
        message="status.previousKeyValidUntil",
    )
    assert status["rotationCount"] == 1
    valid_until = parse(status["previousKeyValidUntil"])
    rotated_at = parse(status["lastRotationTime"])
    assert abs((valid_until - rotated_at).total_seconds() - 60) < 5, status

    wait_for(
        lambda: logs_in_as(url, old) is None,
        timeout=120,
        interval=2,
        message="the old key refused after its retention",
    )
    refused_at = datetime.datetime.now(datetime.UTC)
    assert refused_at >= valid_until, (refused_at, valid_until)
    assert logs_in_as(url, new) == account
    # ZenML's own list: the current key and the retired previous one (deactivated), no more.
    keys = zenml.keys(zenml.account(account).id)
    assert sorted((k.active for k in keys), reverse=True) == [True, False], keys
    # One restart for the one rotation.
    assert restarted() is not None
