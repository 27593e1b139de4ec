"""A ServiceAccount on a real kube-apiserver: Secret, login, policies, namespace deletion."""

from __future__ import annotations

from typing import Any

import pytest

from realkube.conftest import (
    GROUP_PATH,
    Installed,
    KubeError,
    ZenMLProbe,
    logs_in_as,
    secret_value,
    service_account_body,
    wait_for,
    wait_ready,
)

_sa = service_account_body


def _collection(namespace: str) -> str:
    return f"{GROUP_PATH}/namespaces/{namespace}/serviceaccounts"


def test_secret_key_logs_in_to_zenml(installed: Installed, namespace: str) -> None:
    kube = installed.kube
    account = f"rk-{namespace[-6:]}"
    kube.create(_collection(namespace), _sa(namespace, "app", name=account))
    obj = wait_ready(kube, f"{_collection(namespace)}/app")
    assert obj["status"]["accountName"] == account
    secret = kube.get(f"/api/v1/namespaces/{namespace}/secrets/app-ci")
    assert secret is not None and secret["type"] == "Opaque"
    owner = secret["metadata"]["ownerReferences"][0]
    assert owner["uid"] == obj["metadata"]["uid"], owner
    assert logs_in_as(installed.zenml_url, secret_value(secret)) == account


def test_spec_name_change_is_refused_by_the_server(installed: Installed, namespace: str) -> None:
    kube = installed.kube
    kube.create(_collection(namespace), _sa(namespace, "fixed", name=f"fx-{namespace[-6:]}"))
    with pytest.raises(KubeError) as refused:
        kube.merge_patch(f"{_collection(namespace)}/fixed", {"spec": {"name": "another"}})
    assert refused.value.status_code == 422
    assert "immutable" in refused.value.body["message"]


@pytest.mark.parametrize(
    ("policy", "exists", "active"),
    [("Delete", False, None), ("Deactivate", True, False), ("Retain", True, True)],
)
def test_deletion_policy(
    installed: Installed,
    zenml: ZenMLProbe,
    namespace: str,
    policy: str,
    exists: bool,
    active: bool | None,
) -> None:
    kube = installed.kube
    account = f"dp-{policy.lower()}-{namespace[-6:]}"
    path = f"{_collection(namespace)}/gone"
    kube.create(_collection(namespace), _sa(namespace, "gone", name=account, deletionPolicy=policy))
    wait_ready(kube, path)
    secret = kube.get(f"/api/v1/namespaces/{namespace}/secrets/gone-ci")
    assert secret is not None
    key = secret_value(secret)
    kube.delete(path)
    wait_for(lambda: kube.get(path) is None, timeout=60, message="the finalizer released")
    assert kube.get(f"/api/v1/namespaces/{namespace}/secrets/gone-ci") is None
    found = zenml.account(account)
    assert (found is not None) is exists
    if found is not None:
        assert found.active is active
    assert (logs_in_as(installed.zenml_url, key) == account) is (policy == "Retain")


def test_namespace_deletion_completes_and_follows_the_policy(
    installed: Installed, zenml: ZenMLProbe, kube_namespace_factory: Any
) -> None:
    kube = installed.kube
    namespace = kube_namespace_factory("ns-delete")
    account = f"nsdel-{namespace[-6:]}"
    kube.create(_collection(namespace), _sa(namespace, "app", name=account))
    wait_ready(kube, f"{_collection(namespace)}/app")
    assert zenml.account(account) is not None
    kube.delete(f"/api/v1/namespaces/{namespace}")
    # Needs the namespace controller (kube-controller-manager) and the operator's finalizer.
    wait_for(
        lambda: kube.get(f"/api/v1/namespaces/{namespace}") is None,
        timeout=120,
        message=f"namespace {namespace} deleted",
    )
    assert zenml.account(account) is None  # deletionPolicy Delete (the default)


def test_kill_during_a_burst_of_creates_converges_without_extra_keys(
    installed: Installed, zenml: ZenMLProbe, namespace: str
) -> None:
    kube = installed.kube
    names = [f"burst-{i}" for i in range(12)]
    accounts = {n: f"{n}-{namespace[-6:]}" for n in names}
    for name in names:
        kube.create(_collection(namespace), _sa(namespace, name, name=accounts[name]))

    def some_progress() -> bool:
        return any(zenml.account(a) is not None for a in accounts.values())

    wait_for(some_progress, timeout=60, message="the operator started on the burst")
    installed.operator.kill()  # SIGKILL in the middle of the burst
    installed.operator.start()
    for name in names:
        wait_ready(kube, f"{_collection(namespace)}/{name}", timeout=120)
    for name in names:
        secret = kube.get(f"/api/v1/namespaces/{namespace}/secrets/{name}-ci")
        assert secret is not None, name
        assert logs_in_as(installed.zenml_url, secret_value(secret)) == accounts[name]
        account = zenml.account(accounts[name])
        keys = zenml.keys(account.id)
        # Exactly the declared key: no duplicate created across the kill.
        assert [k.name for k in keys] == ["ci"], (name, [k.name for k in keys])


def test_unknown_fields_are_pruned_for_a_lax_client_and_refused_under_strict(
    installed: Installed, namespace: str
) -> None:
    kube = installed.kube
    body = _sa(namespace, "lax", name=f"lax-{namespace[-6:]}")
    body["spec"]["colour"] = "red"
    body["spec"]["apiKeys"][0]["ttl"] = "1h"
    with pytest.raises(KubeError) as refused:
        kube.create(_collection(namespace), body, fieldValidation="Strict")
    assert refused.value.status_code == 400  # strict decoding error
    assert 'unknown field "spec.colour"' in refused.value.body["message"]
    # Without Strict (older kubectl, many GitOps tools) the server drops them: the operator
    # never sees them and reconciles the rest.
    kube.create(_collection(namespace), body)
    obj = wait_ready(kube, f"{_collection(namespace)}/lax")
    assert "colour" not in obj["spec"] and "ttl" not in obj["spec"]["apiKeys"][0]
