"""RBAC vs code: the Kubernetes requests the operator really makes, against the chart's rules.

An end-to-end scenario (a ServiceAccount, a rotation that restarts a Deployment, a
StatefulSet and a DaemonSet, then deletion of both) runs against the emulated API. The test
itself touches the cluster only through the emulator's in-process methods, never over HTTP,
so every recorded request is the operator's (Kopf's and its own client's). Each request is
mapped to (apiGroup, resource[/subresource], verb) and checked against the rules rendered
from the Helm chart by Helm's own engine:

- every observed request is allowed (namespaced requests by the Role of their namespace or a
  ClusterRole, cluster-scoped ones by a ClusterRole only);
- every granted verb was used, or is in ALLOWED_UNUSED with the reason it exists;
- namespaced mode grants no Secret access outside the watched namespaces.
"""

from __future__ import annotations

import base64
import platform
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml

from reliability.helpers import NS, deployment_body, unique
from zenml_operator import zenml_api as zc
from zenml_operator.config import OperatorConfig
from zenml_operator.main import build_registry

try:
    import helm_python as helm
except ImportError:
    # helm-python-sdk ships no linux-arm64 wheel yet: there, only what renders the chart is
    # skipped (by `needs_helm`); a missing SDK anywhere else is a broken install, not a skip.
    if platform.machine().lower() != "aarch64":
        raise
    helm = None

NO_HELM = "helm-python-sdk has no wheel for this platform (linux-arm64): no chart to render"
needs_helm = pytest.mark.skipif(helm is None, reason=NO_HELM)

RELEASE_NS = "zenml-system"  # where render() installs the chart
CHART = Path(__file__).resolve().parents[2] / "charts" / "zenml-operator"
WATCHED = ["default", "team-a"]  # the namespaces the test operator watches
BASE = {
    "zenml": {"url": "https://zenml.example.com", "existingSecret": {"name": "credential"}},
    "watchNamespaces": WATCHED,
}
MODES = {
    "namespaced": {**BASE, "rbac": {"scope": "namespaced"}},
    "cluster": BASE,
}
# Granted but not exercised by the emulated run, each with the reason it is granted.
ALLOWED_UNUSED: dict[tuple[str, str, str], str] = {
    ("", "namespaces", "list"): "Kopf's namespace observer with --namespace (tests: scanning off)",
    ("", "namespaces", "watch"): "Kopf's namespace observer with --namespace (tests: scanning off)",
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"): "Kopf's resource scanning",
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"): "Kopf's resource scanning",
    ("zenml.io", "serviceaccounts/finalizers", "update"): (
        "checked, not requested: admission (OwnerReferencesPermissionEnforcement) asks for it"
        " when a Secret's ownerReference sets blockOwnerDeletion; tests/realkube enforces it"
    ),
}
# Not resource requests: API discovery, which the system:discovery ClusterRole grants to
# every authenticated user.
DISCOVERY = ("/api", "/apis", "/version")

Rule = tuple[str, str, str]  # (apiGroup, resource[/subresource], verb)


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    helm.disable_logging()
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values, name="zenml-operator", namespace="zenml-system")
    return [
        doc
        for path, text in sorted(files.items())
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def grants(doc: dict[str, Any]) -> set[Rule]:
    return {
        (group, resource, verb)
        for rule in doc.get("rules") or []
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def bindings(docs: list[dict[str, Any]]) -> tuple[set[Rule], dict[str, set[Rule]]]:
    """(cluster-wide grants, grants per namespace) of the roles that are bound."""
    roles = {
        (d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): grants(d)
        for d in docs
        if d["kind"] in ("Role", "ClusterRole")
    }
    cluster: set[Rule] = set()
    per_namespace: dict[str, set[Rule]] = {}
    for d in docs:
        if d["kind"] == "ClusterRoleBinding":
            cluster |= roles["ClusterRole", None, d["roleRef"]["name"]]
        elif d["kind"] == "RoleBinding":
            ns = d["metadata"]["namespace"]
            kind = d["roleRef"]["kind"]
            granted = roles[kind, ns if kind == "Role" else None, d["roleRef"]["name"]]
            per_namespace.setdefault(ns, set()).update(granted)
    return cluster, per_namespace


VERBS = {"FETCH": "get", "LIST": "list", "WATCH": "watch", "CREATE": "create", "DELETE": "delete"}
METHOD_VERBS = {"PATCH": "patch", "PUT": "update"}


def observed(requests: list[Any]) -> tuple[set[tuple[str | None, Rule]], list[str]]:
    """{(namespace or None, rule)} of the resource requests; the discovery paths seen."""
    seen: set[tuple[str | None, Rule]] = set()
    discovery = []
    for request in requests:
        method = str(request.method.value if hasattr(request.method, "value") else request.method)
        if request.resource is None or request.resource.plural is None:  # /api, /apis/g/v
            discovery.append(f"{method} {request.url.path}")
            continue
        action = str(request.action.value) if request.action is not None else ""
        verb = METHOD_VERBS.get(method.upper()) or VERBS[action.upper()]
        if verb == "delete" and request.name is None:
            verb = "deletecollection"
        resource = str(request.resource.plural)
        if request.subresource:
            resource += f"/{request.subresource}"
        seen.add((request.namespace, (str(request.resource.group), resource, verb)))
    return seen, discovery


ZS = "zenml.io/v1alpha1/zenmlservers"
CZS = "zenml.io/v1alpha1/clusterzenmlservers"


async def servers_scenario(emulator: Any, cluster: Any, name: str, api_key: str) -> None:
    """A ZenMLServer and a ClusterZenMLServer (both the test's ZenML server, credentials in a
    Secret of the watched namespace), a ServiceAccount on each, then all of it deleted."""
    sa = "zenml.io/v1alpha1/serviceaccounts"
    creds = f"{name}-creds"
    emulator.create_object(
        "v1/secrets",
        {
            "metadata": {"name": creds, "namespace": NS},
            "data": {"ZENML_STORE_API_KEY": base64.b64encode(api_key.encode()).decode()},
        },
    )
    spec = {"url": SERVER_URL[0], "credentials": {"secretName": creds}}
    emulator.create_object(ZS, {"metadata": {"name": name, "namespace": NS}, "spec": spec})
    cluster_spec = {**spec, "credentials": {"secretName": creds, "namespace": NS}}
    emulator.create_object(CZS, {"metadata": {"name": name}, "spec": cluster_spec})
    users = {}
    for kind in ("ZenMLServer", "ClusterZenMLServer"):
        user = f"{name}-{kind.lower()}"
        emulator.create_object(
            sa,
            {
                "metadata": {"name": user, "namespace": NS},
                "spec": {"serverRef": {"kind": kind, "name": name}, "apiKeys": [{"name": "k"}]},
            },
        )
        users[kind] = user

    def ready(resource: str, namespace: str | None, obj_name: str) -> bool:
        obj = emulator.get_object(resource, namespace, obj_name) or {}
        conds = (obj.get("status") or {}).get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

    for user in users.values():
        await cluster.wait_for(lambda user=user: ready(sa, NS, user), timeout=30)
    # Deleted while still used: held (DeletionBlocked), then released with its users.
    emulator.delete_object(ZS, NS, name)
    emulator.delete_object(CZS, None, name)
    for user in users.values():
        emulator.delete_object(sa, NS, user)
    await cluster.wait_for(
        lambda: (
            emulator.get_object(ZS, NS, name) is None
            and emulator.get_object(CZS, None, name) is None
        ),
        timeout=40,
    )


SERVER_URL: list[str] = []


@needs_helm
async def test_every_request_is_granted_and_every_grant_is_used(
    cluster,
    kopf_operator,
    zenml_server,
    operator_api_key,
    zenml_client,
    operator_login_cached,
    capsys,
) -> None:
    emulator = cluster.emulator
    SERVER_URL[:] = [zenml_server.url]
    # As `zenml-operator run -n default -n team-a` runs it: the Secret watch follows the
    # watched namespaces (a Role grants list/watch there only, in namespaced mode).
    config = OperatorConfig(
        zenml_url=zenml_server.url,
        zenml_api_key=lambda: operator_api_key,
        kube_api_url=cluster.url,
        retry_delay=0.3,
        zenml_retries=1,
        namespaces=tuple(WATCHED),
    )
    await kopf_operator(build_registry(config), login=False, memo=kopf.Memo(), namespaces=WATCHED)
    name = unique("rbac")
    sa = "zenml.io/v1alpha1/serviceaccounts"
    rot = "zenml.io/v1alpha1/apikeyrotations"
    # The test's own changes go through the emulator in-process: no recorded request.
    emulator.create_object(
        sa, {"metadata": {"name": name, "namespace": NS}, "spec": {"apiKeys": [{"name": "main"}]}}
    )
    targets = []
    for kind, plural in (
        ("Deployment", "deployments"),
        ("StatefulSet", "statefulsets"),
        ("DaemonSet", "daemonsets"),
    ):
        body = deployment_body(name)
        body["kind"] = kind
        emulator.create_object(f"apps/v1/{plural}", body)
        targets.append({"kind": kind, "name": name})

    def cond(resource: str, type_: str = "Ready") -> dict[str, Any] | None:
        obj = emulator.get_object(resource, NS, name) or {}
        for c in (obj.get("status") or {}).get("conditions") or []:
            if c["type"] == type_:
                return c
        return None

    await cluster.wait_for(lambda: (cond(sa) or {}).get("status") == "True", timeout=20)
    emulator.create_object(
        rot,
        {
            # The finalizer builds before the rotation schedule put on every rotation (for
            # its Kopf daemon): an upgrade meets them, and Kopf removes them (the patch).
            "metadata": {
                "name": name,
                "namespace": NS,
                "annotations": {"zenml.io/rotate": "1"},
                "finalizers": ["zenml.io/finalizer"],
            },
            "spec": {
                "serviceAccountName": name,
                "apiKeyName": "main",
                "retainPeriodMinutes": 0,
                "rolloutRestartTargets": targets,
            },
        },
    )

    def rotated() -> bool:
        status = (emulator.get_object(rot, NS, name) or {}).get("status") or {}
        return status.get("rotationCount") == 1 and bool(status.get("restartedForKeyId"))

    await cluster.wait_for(rotated, timeout=20)
    emulator.delete_object(rot, NS, name)
    await cluster.wait_for(lambda: emulator.get_object(rot, NS, name) is None, timeout=20)
    emulator.delete_object(sa, NS, name)
    await cluster.wait_for(lambda: emulator.get_object(sa, NS, name) is None, timeout=20)
    with pytest.raises(zc.NotFoundError):
        await zenml_client.get_service_account(name)
    await servers_scenario(emulator, cluster, name, operator_api_key)

    seen, discovery = observed(list(emulator._requests))
    assert all(path.startswith(DISCOVERY) for path in (d.split()[1] for d in discovery))
    used = {rule for _, rule in seen}
    report = {}
    for mode, values in MODES.items():
        docs = render(values)
        cluster_wide, per_namespace = bindings(docs)
        denied = sorted(
            (ns, rule)
            for ns, rule in seen
            if rule not in cluster_wide and (ns is None or rule not in per_namespace.get(ns, ()))
        )
        assert denied == [], f"{mode}: requests the chart does not allow: {denied}"
        granted = cluster_wide | {r for rules in per_namespace.values() for r in rules}
        unused = sorted(granted - used - set(ALLOWED_UNUSED))
        assert unused == [], f"{mode}: granted but never used (and not explained): {unused}"
        if mode == "namespaced":
            assert not any(r[1] == "secrets" for r in cluster_wide), "cluster-wide Secret access"
            # Besides the watched namespaces, only a Role to read ClusterZenMLServer
            # credentials by name in the operator's own namespace.
            assert set(per_namespace) == {*WATCHED, RELEASE_NS}
            assert per_namespace[RELEASE_NS] == {("", "secrets", "get")}
        report[mode] = (len(granted), len(granted & used))
    with capsys.disabled():
        print(
            f"\nrbac: {len(used)} distinct (group, resource, verb) requests observed, all"
            f" granted; grants used/total: "
            + ", ".join(f"{m} {u}/{g}" for m, (g, u) in report.items())
            + f"; {len(ALLOWED_UNUSED)} grants allow-listed as unused in tests"
        )
