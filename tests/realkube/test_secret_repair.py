"""A managed Secret deleted or tampered with on a real kube-apiserver is repaired within
seconds by the operator's Secret watch (a server-side label selector, under the chart's RBAC).

The tier's operator resyncs every 600 s (the default), so a repair inside REPAIRED is the
watch's. Each damage is judged by behaviour: the repaired Secret's key logs in to ZenML as
the declared account. The seconds each repair took are printed (figures, not assertions:
the benchmark measures them, tests/bench/benchmark.py --only repair).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any

import pytest

from realkube.conftest import (
    GROUP_PATH,
    Installed,
    logs_in_as,
    secret_value,
    service_account_body,
    wait_for,
    wait_ready,
)

REPAIRED = 30.0  # seconds; the resync is 600 s
KEY = "ZENML_STORE_API_KEY"
MANAGED_BY = "app.kubernetes.io/managed-by"


def _account(installed: Installed, namespace: str) -> tuple[str, str, dict[str, Any]]:
    """A Ready ServiceAccount `app` with key `ci`: (ZenML name, Secret path, Secret)."""
    kube = installed.kube
    account = f"rep-{namespace[-6:]}"
    collection = f"{GROUP_PATH}/namespaces/{namespace}/serviceaccounts"
    kube.create(collection, service_account_body(namespace, "app", name=account))
    wait_ready(kube, f"{collection}/app")
    path = f"/api/v1/namespaces/{namespace}/secrets/app-ci"
    secret = kube.get(path)
    assert secret is not None and logs_in_as(installed.zenml_url, secret_value(secret)) == account
    return account, path, secret


def _repaired(
    installed: Installed,
    path: str,
    account: str,
    what: str,
    check: Callable[[dict[str, Any]], bool] = lambda _: True,
) -> dict[str, Any]:
    """Wait until the Secret passes `check` and its key logs in as `account`; print how long."""
    started = time.monotonic()

    def done() -> dict[str, Any] | None:
        secret = installed.kube.get(path)
        if secret is None or KEY not in (secret.get("data") or {}) or not check(secret):
            return None
        return secret if logs_in_as(installed.zenml_url, secret_value(secret)) == account else None

    secret = wait_for(done, timeout=REPAIRED, message=f"{what}: {path} repaired", interval=0.1)
    print(f"\nrepair ({what}): {time.monotonic() - started:.2f} s to a Secret that logs in")
    return secret


def _events(installed: Installed, namespace: str, reason: str) -> list[dict[str, Any]]:
    items = (installed.kube.get(f"/api/v1/namespaces/{namespace}/events") or {})["items"]
    return [e for e in items if e.get("reason") == reason]


def test_deleted_secret_is_restored(installed: Installed, namespace: str) -> None:
    account, path, before = _account(installed, namespace)
    installed.kube.delete(path)
    after = _repaired(installed, path, account, "deleted")
    assert logs_in_as(installed.zenml_url, secret_value(before)) is None  # re-issued
    assert after["metadata"]["ownerReferences"] == before["metadata"]["ownerReferences"]
    assert any(
        "was missing" in e["message"] for e in _events(installed, namespace, "ApiKeyReissued")
    )


def test_older_value_of_the_same_key_is_noticed_and_reissued(
    installed: Installed, namespace: str
) -> None:
    """The id inside a ZENKEY_ value survives a re-issue: only the recorded digest tells
    that a restored older value is not the issued one (ZenML refuses it)."""
    account, path, first = _account(installed, namespace)
    installed.kube.delete(path)
    second = _repaired(installed, path, account, "deleted")
    stale = first["data"][KEY]
    installed.kube.merge_patch(path, {"data": {KEY: stale}})
    third = _repaired(installed, path, account, "older value", lambda s: s["data"][KEY] != stale)
    assert third["data"][KEY] != second["data"][KEY]
    messages = [e["message"] for e in _events(installed, namespace, "ApiKeyReissued")]
    assert any("not the issued key" in m for m in messages), messages


def test_removed_data_key_is_restored(installed: Installed, namespace: str) -> None:
    account, path, _ = _account(installed, namespace)
    installed.kube.merge_patch(path, {"data": {KEY: None}})
    _repaired(installed, path, account, "data key removed")


@pytest.mark.parametrize(
    ("what", "patch", "restored"),
    [
        (
            "label stripped",
            {"metadata": {"labels": {MANAGED_BY: None}}},
            lambda s: s["metadata"]["labels"].get(MANAGED_BY) == "zenml-operator",
        ),
        (
            "owner reference stripped",
            {"metadata": {"ownerReferences": None}},
            lambda s: bool(s["metadata"].get("ownerReferences")),
        ),
    ],
)
def test_stripped_metadata_is_restored_without_a_new_key(
    installed: Installed,
    namespace: str,
    what: str,
    patch: dict[str, Any],
    restored: Callable[[dict[str, Any]], bool],
) -> None:
    account, path, before = _account(installed, namespace)
    installed.kube.merge_patch(path, patch)
    after = _repaired(installed, path, account, what, restored)
    assert after["data"] == before["data"]  # the value was intact: not re-issued
    assert after["metadata"]["ownerReferences"] == before["metadata"]["ownerReferences"]
    assert _events(installed, namespace, "SecretRepaired")


def test_unmanaged_secret_of_that_name_gets_secret_conflict_and_is_untouched(
    installed: Installed, namespace: str
) -> None:
    kube = installed.kube
    account, path, current = _account(installed, namespace)
    foreign = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": "app-ci",
            "namespace": namespace,
            "resourceVersion": current["metadata"]["resourceVersion"],
            "labels": {"owner": "someone-else"},
        },
        "data": {"password": base64.b64encode(b"hunter2").decode()},
    }
    response = kube.request("PUT", path, json=foreign)
    assert response.status_code == 200, response.text
    replaced = response.json()
    wait_ready(
        kube,
        f"{GROUP_PATH}/namespaces/{namespace}/serviceaccounts/app",
        status="False",
        reason="SecretConflict",
        timeout=REPAIRED,
    )
    assert kube.get(path) == replaced
    assert account  # the account's key was not written anywhere else


def test_no_key_value_in_events_or_the_operator_log(installed: Installed, namespace: str) -> None:
    account, path, first = _account(installed, namespace)
    installed.kube.merge_patch(path, {"data": {KEY: base64.b64encode(b"ZENKEY_typo").decode()}})
    repaired = _repaired(installed, path, account, "value replaced")
    events = str((installed.kube.get(f"/api/v1/namespaces/{namespace}/events") or {})["items"])
    log = installed.operator.log()
    for value in (secret_value(first), secret_value(repaired), "ZENKEY_typo"):
        assert value[-16:] not in events and value[-16:] not in log
