"""A ClusterZenMLServer on a real kube-apiserver (#13): the operator (under the chart's RBAC)
logs in to a second real ZenML server (HTTPS, private CA) with credentials from its own
namespace (and refuses them from any other), writes the server's status, manages a
ServiceAccount there, and holds the server's deletion while that ServiceAccount uses it."""

from __future__ import annotations

import asyncio
import base64
import uuid
from typing import Any

from e2e.conftest import logs_in_as
from realkube.conftest import (
    GROUP_PATH,
    OPERATOR_NAMESPACE,
    Installed,
    Kube,
    service_account_body,
    wait_for,
    wait_ready,
)

CZS = f"{GROUP_PATH}/clusterzenmlservers"


def _server_ready(obj: dict[str, Any] | None) -> dict[str, Any] | None:
    """The Ready condition of a server resource for its current generation."""
    if not obj:
        return None
    status = obj.get("status") or {}
    for cond in status.get("conditions") or []:
        observed = cond.get("observedGeneration", status.get("observedGeneration"))
        if cond["type"] == "Ready" and observed == obj["metadata"].get("generation"):
            return cond
    return None


def _condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == kind:
            return cond
    return None


def _login_name(server: Any, key: str) -> str | None:
    return asyncio.run(logs_in_as(server.url, key, verify=server.verify()))


def _cleanup(kube: Kube, path: str) -> None:
    """Best effort after a failure: delete, and release what the operator may still hold."""
    if kube.get(path) is None:
        return
    kube.delete(path)
    if kube.get(path) is not None:
        kube.merge_patch(path, {"metadata": {"finalizers": None}})


def test_cluster_server_status_service_account_and_held_deletion(
    installed: Installed,
    namespace: str,
    zenml_server_b: Any,
    operator_api_key_b: str,
) -> None:
    kube = installed.kube
    suffix = uuid.uuid4().hex[:6]
    server_name, creds = f"b-{suffix}", f"zenml-b-{suffix}"
    creds_path = f"/api/v1/namespaces/{OPERATOR_NAMESPACE}/secrets/{creds}"
    server_path = f"{CZS}/{server_name}"
    forbidden_path = f"{server_path}-elsewhere"
    sa_collection = f"{GROUP_PATH}/namespaces/{namespace}/serviceaccounts"
    sa_path = f"{sa_collection}/app"
    kube.create(
        f"/api/v1/namespaces/{OPERATOR_NAMESPACE}/secrets",
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": creds},
            "stringData": {"ZENML_STORE_API_KEY": operator_api_key_b},
        },
    )
    try:
        kube.create(
            CZS,
            {
                "apiVersion": "zenml.io/v1alpha1",
                "kind": "ClusterZenMLServer",
                "metadata": {"name": server_name},
                "spec": {
                    "url": zenml_server_b.url,
                    "caBundle": zenml_server_b.ca_pem,
                    "credentials": {"secretName": creds, "namespace": OPERATOR_NAMESPACE},
                },
            },
        )

        def logged_in() -> dict[str, Any] | None:
            obj = kube.get(server_path)
            cond = _server_ready(obj)
            return obj if cond and cond["status"] == "True" else None

        server = wait_for(logged_in, timeout=60, message=f"{server_name} Ready")
        status = server["status"]
        assert _server_ready(server)["reason"] == "LoggedIn"
        assert status["identity"] == "zenml-operator"
        assert status["serverVersion"].startswith("0.98"), status
        assert status["url"] == zenml_server_b.url

        # Credentials anywhere else than the operator's namespace are refused, even when
        # the Secret exists and holds a working key.
        kube.create(
            f"/api/v1/namespaces/{namespace}/secrets",
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": creds},
                "stringData": {"ZENML_STORE_API_KEY": operator_api_key_b},
            },
        )
        kube.create(
            CZS,
            {
                "apiVersion": "zenml.io/v1alpha1",
                "kind": "ClusterZenMLServer",
                "metadata": {"name": f"{server_name}-elsewhere"},
                "spec": {
                    "url": zenml_server_b.url,
                    "caBundle": zenml_server_b.ca_pem,
                    "credentials": {"secretName": creds, "namespace": namespace},
                },
            },
        )

        def refused() -> dict[str, Any] | None:
            cond = _server_ready(kube.get(forbidden_path))
            return cond if cond and cond["status"] == "False" else None

        cond = wait_for(refused, timeout=60, message="a refused credentials namespace")
        assert cond["reason"] == "InvalidSpec" and namespace in cond["message"], cond
        kube.delete(forbidden_path)
        wait_for(lambda: kube.get(forbidden_path) is None, timeout=60, message="deleted")

        account = f"rk-b-{suffix}"
        body = service_account_body(namespace, "app", name=account)
        body["spec"]["serverRef"] = {"kind": "ClusterZenMLServer", "name": server_name}
        kube.create(sa_collection, body)
        wait_ready(kube, sa_path)
        secret = kube.get(f"/api/v1/namespaces/{namespace}/secrets/app-ci")
        assert secret is not None
        data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        assert sorted(data) == [
            "ZENML_STORE_API_KEY",
            "ZENML_STORE_URL",
            "ZENML_STORE_VERIFY_SSL",
        ]
        url_ok = data["ZENML_STORE_URL"] == zenml_server_b.url
        ca_ok = data["ZENML_STORE_VERIFY_SSL"] == zenml_server_b.ca_pem
        assert url_ok and ca_ok, (url_ok, ca_ok)
        who = _login_name(zenml_server_b, data["ZENML_STORE_API_KEY"])
        assert who == account
        key = data["ZENML_STORE_API_KEY"]

        # Deleting the server while the ServiceAccount uses it: held, and said so.
        kube.delete(server_path)

        def blocked() -> dict[str, Any] | None:
            cond = _condition(kube.get(server_path), "DeletionBlocked")
            return cond if cond and cond["status"] == "True" else None

        cond = wait_for(blocked, timeout=60, message="DeletionBlocked")
        assert cond["reason"] == "InUse" and "app" in cond["message"], cond
        held = kube.get(server_path)
        assert held is not None and held["metadata"].get("deletionTimestamp")

        def warning() -> list[dict[str, Any]]:
            events = kube.get(f"/api/v1/events?fieldSelector=involvedObject.name={server_name}")
            return [e for e in (events or {}).get("items", []) if e.get("type") == "Warning"]

        wait_for(warning, timeout=30, message="a Warning Event on the server")

        # The ServiceAccount goes first (its account is deleted on B), then the server.
        kube.delete(sa_path)
        wait_for(lambda: kube.get(sa_path) is None, timeout=60, message="SA deleted")
        wait_for(lambda: kube.get(server_path) is None, timeout=60, message="server deleted")
        who = _login_name(zenml_server_b, key)
        assert who is None
    finally:
        _cleanup(kube, sa_path)
        _cleanup(kube, server_path)
        _cleanup(kube, forbidden_path)
        kube.delete(creds_path)
