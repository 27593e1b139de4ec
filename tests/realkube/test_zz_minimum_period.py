"""Runs last in the tier: a rotation at the minimum allowed period (5m), through the real
schema, started when the tier installed the operator (conftest.start_minimum_period_rotation).
"""

from __future__ import annotations

import datetime

from realkube.conftest import (
    GROUP_PATH,
    MINIMUM_PERIOD_NAMESPACE,
    Installed,
    logs_in_as,
    secret_value,
    wait_for,
)

PERIOD = datetime.timedelta(minutes=5)


def parse(ts: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(ts.replace("Z", "+00:00"))


def test_rotation_at_the_minimum_period_fires_once_on_schedule(installed: Installed) -> None:
    kube, ns = installed.kube, MINIMUM_PERIOD_NAMESPACE
    rot_path = f"{GROUP_PATH}/namespaces/{ns}/apikeyrotations/every-5m"
    sa = kube.get(f"{GROUP_PATH}/namespaces/{ns}/serviceaccounts/app")
    assert sa is not None
    created = parse(sa["metadata"]["creationTimestamp"])

    def rotated_once() -> dict | None:
        status = (kube.get(rot_path) or {}).get("status") or {}
        return status if status.get("rotationCount") else None

    remaining = (created + PERIOD - datetime.datetime.now(datetime.UTC)).total_seconds()
    status = wait_for(
        rotated_once, timeout=max(remaining, 0) + 90, interval=2, message="the 5m rotation"
    )
    assert status["rotationCount"] == 1, status
    # Not before the key was one period old (and not much after).
    waited = parse(status["lastRotationTime"]) - created
    assert PERIOD <= waited < PERIOD + datetime.timedelta(seconds=60), waited
    assert parse(status["nextRotationTime"]) - parse(status["lastRotationTime"]) == PERIOD
    secret = kube.get(f"/api/v1/namespaces/{ns}/secrets/app-ci")
    assert logs_in_as(installed.zenml_url, secret_value(secret)) == sa["status"]["accountName"]
