"""The Helm chart, rendered and linted by Helm's own engine, checked against Kubernetes.

Helm comes from `helm-python-sdk` (PyPI): Helm v4's Go SDK compiled into a shared library
and bound with ctypes, so `Chart.render`, `Chart.validate_schema` and `lint` here are what
`helm template` and `helm lint` do, with no helm binary. Every rendered manifest, the CRDs
and the examples are validated against the Kubernetes OpenAPI schemas bundled with
`kubernetes-validate` (strict: unknown fields are errors), for the oldest Kubernetes the
chart supports and for the newest the package knows.

The RBAC rules are checked against a table below that names the code needing each one:
change the chart's rules and the table together.
"""

from __future__ import annotations

import copy
import platform
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from schema_tools import admit

try:
    import helm_python as helm
except ImportError:
    # helm-python-sdk ships no linux-arm64 wheel yet: there, only the tests that render or
    # lint the chart are skipped (`needs_helm`); elsewhere a missing SDK is a broken install.
    if platform.machine().lower() != "aarch64":
        raise
    helm = None

NO_HELM = "helm-python-sdk has no wheel for this platform (linux-arm64): no chart to render"
needs_helm = pytest.mark.skipif(helm is None, reason=NO_HELM)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "zenml-operator"
CRDS = ROOT / "crds"
EXAMPLES = ROOT / "examples"
# Chart files in crds/ that are not copies of the repository's generated crds/.
CHART_ONLY_CRDS = {"kopf.dev_peerings.yaml"}

RELEASE = "zenml-operator"
NAMESPACE = "zenml-system"
MIN_KUBE = "1.28.0"  # Chart.yaml kubeVersion
KUBE_VERSIONS = [MIN_KUBE, kubernetes_validate.utils.latest_version()]
# Kinds that kubernetes-validate has no schema for; checked by hand below.
CUSTOM_KINDS = {"ServiceMonitor", "ClusterKopfPeering", "KopfPeering", "ClusterZenMLServer"}

BASE: dict[str, Any] = {
    "zenml": {
        "url": "https://zenml.example.com",
        "existingSecret": {"name": "zenml-operator-credential"},
    }
}

# ---------------------------------------------------------------------------------------
# The RBAC the operator needs, each rule with the code that uses it.
# (apiGroup, resource) -> verbs
OPERATOR_RULES: dict[tuple[str, str], set[str]] = {
    # Kopf's watcher lists and watches the CRs (main.py: kopf.on.create/update/resume/
    # delete, kopf.timer); it PATCHes them for the finalizer (main.FINALIZER) and for its
    # annotations (AnnotationsProgressStorage / AnnotationsDiffBaseStorage in main.startup).
    # `get`: main.reconcile_service_account / finalize_service_account re-read the object
    # under the lock (kube.KubeClient.get_object).
    ("zenml.io", "serviceaccounts"): {"get", "list", "watch", "patch"},
    ("zenml.io", "apikeyrotations"): {"get", "list", "watch", "patch"},
    # kube.KubeClient.patch_status (main.reconcile_service_account; the createRequestedAt
    # intent record in handlers/service_account.ensure_account).
    ("zenml.io", "serviceaccounts/status"): {"patch"},
    ("zenml.io", "apikeyrotations/status"): {"patch"},
    # secrets.py: the Secret's ownerReference has blockOwnerDeletion, which the
    # OwnerReferencesPermissionEnforcement admission plugin (OpenShift; the real-apiserver
    # tier enables it) allows only with update on the owner's finalizers.
    ("zenml.io", "serviceaccounts/finalizers"): {"update"},
    # ZenMLServer (issue #13, servers.py): watched like the other kinds, held by a finalizer
    # while ServiceAccounts use it, its status (Ready, identity, version) written; finalizers
    # for objects it owns, as for serviceaccounts above.
    ("zenml.io", "zenmlservers"): {"get", "list", "watch", "patch"},
    ("zenml.io", "zenmlservers/status"): {"patch"},
    # kube.KubeClient.get_secret / create_secret / patch_secret / delete_secret
    # (handlers/service_account.py: ensure_key, write_value, remove_key, finalize).
    # list/watch: kube.KubeClient.list_secrets / watch_secrets (secret_watch.SecretWatch,
    # label selector app.kubernetes.io/managed-by=zenml-operator, filtered by the server):
    # a managed Secret deleted or changed is repaired within seconds (repairs.py).
    ("", "secrets"): {"get", "list", "watch", "create", "patch", "delete"},
    # kopf.event() (main.reconcile_service_account, main._post_event) and Kopf's posting of
    # its own log lines (settings.posting.level): POST core v1 Events.
    ("", "events"): {"create"},
    # ApiKeyRotation rolloutRestartTargets: read the workload and patch its pod template.
    ("apps", "deployments"): {"get", "patch"},
    ("apps", "statefulsets"): {"get", "patch"},
    ("apps", "daemonsets"): {"get", "patch"},
}
# ClusterZenMLServer is cluster-scoped: a ClusterRole grants it in every mode (the same use
# as zenmlservers above).
CLUSTER_SERVER_RULES = {
    ("zenml.io", "clusterzenmlservers"): {"get", "list", "watch", "patch"},
    ("zenml.io", "clusterzenmlservers/status"): {"patch"},
}
CLUSTER_RULES = OPERATOR_RULES | CLUSTER_SERVER_RULES
# rbac.scope=namespaced: the Secrets of ClusterZenMLServer credentials in the release
# namespace and serverCredentialNamespaces (when not watched): read, and watched by name so
# that a credential changed in place is picked up without a restart. Never written.
CREDENTIAL_RULES = {("", "secrets"): {"get"}}
# Kopf's resource observer watches CRDs (kopf/_core/reactor/observation.py,
# resource_observer) in every mode; with --all-namespaces it does NOT list namespaces
# (namespace_observer skips them when clusterwide), with --namespace it lists and watches
# them to notice a watched namespace created later. Both fall back with a warning on 403.
CRD_SCANNING = {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"}}
NAMESPACE_SCANNING = {("", "namespaces"): {"list", "watch"}}
# Kopf peering (--peering, replicaCount > 1): kopf/_core/engines/peering.py watches the
# peering object (list, watch) and merge-patches its heartbeat into it (touch, clean).
CLUSTER_PEERING = {("kopf.dev", "clusterkopfpeerings"): {"list", "watch", "patch"}}
NAMESPACED_PEERING = {("kopf.dev", "kopfpeerings"): {"list", "watch", "patch"}}


# --------------------------------------------------------------------------------- helpers


def merged(*layers: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layer in layers:
        out = _deep_merge(out, layer)
    return out


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(a)
    for key, value in b.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": BASE,
    "namespaced": merged(BASE, {"rbac": {"scope": "namespaced"}, "watchNamespaces": ["a", "b"]}),
    "namespaced-no-discovery": merged(
        BASE,
        {"rbac": {"scope": "namespaced", "clusterDiscovery": False}, "watchNamespaces": ["a"]},
    ),
    "cluster-listed-namespaces": merged(BASE, {"watchNamespaces": ["team-a", "team-b"]}),
    "replicas-2": merged(BASE, {"replicaCount": 2}),
    "replicas-2-namespaced": merged(
        BASE, {"replicaCount": 2, "rbac": {"scope": "namespaced"}, "watchNamespaces": ["a", "b"]}
    ),
    "replicas-2-cluster-listed-namespaces": merged(
        BASE, {"replicaCount": 2, "watchNamespaces": ["team-a", "team-b"]}
    ),
    "password": merged(BASE, {"zenml": {"credential": "password"}}),
    "api-key-env": merged(BASE, {"zenml": {"apiKeyAsFile": False}}),
    "default-server": merged(
        BASE,
        {
            "defaultServer": {
                "create": True,
                "proApiUrl": "https://cloudapi.zenml.io",
                "caBundle": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
            },
            "serverCredentialNamespaces": ["zenml-creds", NAMESPACE],
        },
    ),
    "namespaced-credential-namespaces": merged(
        BASE,
        {
            "rbac": {"scope": "namespaced"},
            "watchNamespaces": ["a", "b"],
            "serverCredentialNamespaces": ["zenml-creds", "a"],
        },
    ),
    "servicemonitor": merged(
        BASE, {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}}
    ),
    "everything": merged(
        BASE,
        {
            "zenml": {"secretUrl": "https://zenml.internal:8080"},
            "resyncSeconds": 120,
            "verbose": True,
            "logFormat": "plain",
            "imagePullSecrets": [{"name": "regcred"}],
            "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
            "podAnnotations": {"a": "b"},
            "podLabels": {"team": "ml"},
            "priorityClassName": "system-cluster-critical",
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "k", "operator": "Exists", "effect": "NoSchedule"}],
            "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:x"}},
            "metrics": {"service": {"annotations": {"x": "y"}}},
        },
    ),
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    if helm is None:
        pytest.skip(NO_HELM)
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


@pytest.fixture(scope="module", autouse=True)
def _quiet_helm():
    if helm is not None:
        helm.disable_logging()


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(values) for name, values in SCENARIOS.items()}


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def env_of(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(docs).get("env", [])}


def watched_roles(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Roles of the watched namespaces (not the credential namespaces' Roles)."""
    return [r for r in by_kind(docs, "Role") if r["metadata"]["name"] == RELEASE]


def credential_roles(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in by_kind(docs, "Role") if r["metadata"]["name"] == f"{RELEASE}-credentials"]


def rules_of(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    table: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, rule  # no resourceNames etc.
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                table.setdefault((group, resource), set()).update(rule["verbs"])
    return table


# ----------------------------------------------------------------------- chart and CRDs


def test_chart_crds_are_copies_of_the_generated_crds() -> None:
    """`zenml-operator crds --output charts/zenml-operator/crds` regenerates the copies."""
    generated = sorted(CRDS.glob("*.yaml"))
    assert generated, "crds/ is empty"
    for source in generated:
        copy_ = CHART / "crds" / source.name
        assert copy_.exists(), f"{copy_} missing: run `zenml-operator crds --output {copy_.parent}`"
        assert copy_.read_bytes() == source.read_bytes(), (
            f"{copy_} differs from {source}: run `zenml-operator crds --output {copy_.parent}`"
        )
    extra = {p.name for p in (CHART / "crds").iterdir()} - {p.name for p in generated}
    assert extra == CHART_ONLY_CRDS


@needs_helm
def test_helm_loads_the_crds() -> None:
    with helm.Chart.load(CHART) as chart:
        assert chart.name == "zenml-operator"
        loaded = {Path(c["name"]).name for c in chart.crds}
    assert loaded == {p.name for p in (CHART / "crds").glob("*.yaml")}


@pytest.mark.parametrize("path", sorted((CHART / "crds").glob("*.yaml")), ids=lambda p: p.name)
@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_crds_are_valid_kubernetes_objects(path: Path, kube: str) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        assert doc["apiVersion"] == "apiextensions.k8s.io/v1"
        kubernetes_validate.validate(doc, kube, strict=True)


@needs_helm
def test_helm_lint_strict() -> None:
    lint_scenarios = ("everything", "replicas-2-namespaced", "default-server")
    for values in (None, *(SCENARIOS[name] for name in lint_scenarios)):
        report = helm.lint(CHART, values, strict=True, kube_version=f"v{MIN_KUBE}")
        assert report["errors"] == []
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert problems == [], problems


# ------------------------------------------------------------------- rendered manifests


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_manifests_are_valid_kubernetes_objects(rendered, scenario: str) -> None:
    docs = rendered[scenario]
    assert {d["kind"] for d in docs} >= {"Deployment", "ServiceAccount"}
    for doc in docs:
        if doc["kind"] == "ClusterZenMLServer":
            assert admit(doc["kind"], doc["spec"]) == [], scenario
        if doc["kind"] in CUSTOM_KINDS:
            continue
        for kube in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, kube, strict=True)
            except kubernetes_validate.ValidationError as exc:
                name = f"{doc['kind']}/{doc['metadata']['name']}"
                pytest.fail(f"{scenario}: {name} invalid for Kubernetes {kube}: {exc.message}")


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_no_secret_values_are_rendered(rendered, scenario: str) -> None:
    """The chart only references the credential Secret; it never creates one or inlines it."""
    docs = rendered[scenario]
    assert by_kind(docs, "Secret") == []
    for name in ("ZENML_STORE_API_KEY", "ZENML_STORE_PASSWORD", "ZENML_STORE_USERNAME"):
        env = env_of(docs).get(name)
        if env is not None:
            assert "value" not in env and "secretKeyRef" in env["valueFrom"], env
    assert "ZENKEY" not in yaml.safe_dump_all(docs)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_security_context(rendered, scenario: str) -> None:
    docs = rendered[scenario]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 65532
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "privileged" not in sc
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert set(c["resources"]) == {"requests", "limits"}
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_probes_and_ports(rendered, scenario: str) -> None:
    docs = rendered[scenario]
    c = container(docs)
    args = c["args"]
    liveness_port = int(args[args.index("--liveness-port") + 1])
    metrics_port = int(args[args.index("--metrics-port") + 1])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"healthz": liveness_port, "metrics": metrics_port}
    assert metrics_port == 9090
    # Liveness is Kopf's /healthz; readiness is the operator's /readyz (started + logged in).
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    service = one(docs, "Service")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}
    ]
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_args_all_namespaces(rendered) -> None:
    c = container(rendered["defaults"])
    assert c["args"] == [
        "run",
        "--all-namespaces",
        "--log-format",
        "json",
        "--liveness-port",
        "8080",
        "--metrics-port",
        "9090",
    ]
    assert c["image"] == "zenml-operator:0.1.0"
    assert c["imagePullPolicy"] == "IfNotPresent"


def test_args_listed_namespaces(rendered) -> None:
    args = container(rendered["cluster-listed-namespaces"])["args"]
    assert "--all-namespaces" not in args
    assert args[:5] == ["run", "--namespace", "team-a", "--namespace", "team-b"]


def test_args_parse_with_the_real_cli(rendered) -> None:
    """Every rendered command line is one `zenml-operator` accepts."""
    from zenml_operator.cli import parser

    for scenario, docs in rendered.items():
        args = parser().parse_args(container(docs)["args"])
        assert args.command == "run", scenario
        assert args.metrics_port == 9090 and args.liveness_port == 8080, scenario
        assert bool(args.all_namespaces) != bool(args.namespace), scenario


def test_single_replica_is_standalone_and_never_overlaps(rendered) -> None:
    deployment = one(rendered["defaults"], "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert "--peering" not in container(rendered["defaults"])["args"]
    assert by_kind(rendered["defaults"], "ClusterKopfPeering") == []


def test_replicas_use_kopf_peering_cluster_wide(rendered) -> None:
    docs = rendered["replicas-2"]
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate"}
    args = container(docs)["args"]
    assert args[args.index("--peering") + 1] == "zenml-operator"
    assert one(docs, "ClusterKopfPeering")["metadata"]["name"] == "zenml-operator"
    assert rules_of(one(docs, "ClusterRole")) == CLUSTER_RULES | CRD_SCANNING | CLUSTER_PEERING


def test_replicas_use_kopf_peering_per_namespace(rendered) -> None:
    docs = rendered["replicas-2-namespaced"]
    peerings = by_kind(docs, "KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["a", "b"]
    assert {p["metadata"]["name"] for p in peerings} == {"zenml-operator"}
    for role in watched_roles(docs):
        assert rules_of(role) == OPERATOR_RULES | NAMESPACED_PEERING


def test_listed_namespaces_with_cluster_scope(rendered) -> None:
    """--namespace makes Kopf scan namespaces and peer per namespace, whatever the RBAC scope."""
    role = one(rendered["cluster-listed-namespaces"], "ClusterRole")
    assert rules_of(role) == CLUSTER_RULES | CRD_SCANNING | NAMESPACE_SCANNING
    docs = rendered["replicas-2-cluster-listed-namespaces"]
    assert rules_of(one(docs, "ClusterRole")) == (
        CLUSTER_RULES | CRD_SCANNING | NAMESPACE_SCANNING | NAMESPACED_PEERING
    )
    assert by_kind(docs, "ClusterKopfPeering") == []
    peerings = by_kind(docs, "KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["team-a", "team-b"]


def test_credential_api_key_as_file(rendered) -> None:
    docs = rendered["defaults"]
    env = env_of(docs)
    assert env["ZENML_STORE_URL"] == {
        "name": "ZENML_STORE_URL",
        "value": "https://zenml.example.com",
    }
    # The file wins over ZENML_STORE_API_KEY and is re-read at every login (no restart on
    # rotation); the env copy would be stale after a rotation, so it is not set at all.
    path = env["ZENML_STORE_API_KEY_FILE"]["value"]
    assert set(env) == {"ZENML_STORE_URL", "ZENML_OPERATOR_NAMESPACE", "ZENML_STORE_API_KEY_FILE"}
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (mount,) = [m for m in container(docs)["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    assert mount["readOnly"] is True and "subPath" not in mount  # subPath never refreshes
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "zenml-operator-credential"
    assert volume["secret"]["items"] == [
        {"key": "ZENML_STORE_API_KEY", "path": path.removeprefix(mount["mountPath"] + "/")}
    ]
    # Readable by the operator's group (fsGroup) only.
    assert volume["secret"]["defaultMode"] == 0o440
    assert pod["securityContext"]["fsGroup"] == 65532


def test_credential_api_key_as_env(rendered) -> None:
    env = env_of(rendered["api-key-env"])
    assert env["ZENML_STORE_API_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "zenml-operator-credential", "key": "ZENML_STORE_API_KEY"}
    }
    assert "ZENML_STORE_API_KEY_FILE" not in env


def test_credential_username_password(rendered) -> None:
    docs = rendered["password"]
    env = env_of(docs)
    ref = {"name": "zenml-operator-credential"}
    assert env["ZENML_STORE_USERNAME"]["valueFrom"] == {
        "secretKeyRef": {**ref, "key": "ZENML_STORE_USERNAME"}
    }
    assert env["ZENML_STORE_PASSWORD"]["valueFrom"] == {
        "secretKeyRef": {**ref, "key": "ZENML_STORE_PASSWORD"}
    }
    assert not {"ZENML_STORE_API_KEY", "ZENML_STORE_API_KEY_FILE"} & set(env)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert [v["name"] for v in pod["volumes"]] == ["tmp"]


def test_optional_env(rendered) -> None:
    env = env_of(rendered["everything"])
    assert env["ZENML_OPERATOR_SECRET_URL"]["value"] == "https://zenml.internal:8080"
    assert env["ZENML_OPERATOR_RESYNC_SECONDS"]["value"] == "120"
    assert env["HTTPS_PROXY"]["value"] == "http://proxy:3128"
    assert "--verbose" in container(rendered["everything"])["args"]
    defaults = env_of(rendered["defaults"])
    assert "ZENML_OPERATOR_SECRET_URL" not in defaults
    assert "ZENML_OPERATOR_RESYNC_SECONDS" not in defaults


def test_config_reads_the_rendered_environment(rendered, tmp_path, monkeypatch) -> None:
    """The environment the chart sets is one the operator's own config accepts."""
    from zenml_operator.config import config_from_env

    key_file = tmp_path / "api-key"
    key_file.write_text("ZENKEY_" + "a" * 40 + "\n")  # a Secret file may end with a newline
    for scenario, resync in (("defaults", 600.0), ("everything", 120.0)):
        env = env_of(rendered[scenario])
        for name in ("ZENML_STORE_API_KEY", "ZENML_OPERATOR_SECRET_URL"):
            monkeypatch.delenv(name, raising=False)
        for name, item in env.items():
            if "value" in item:
                monkeypatch.setenv(name, item["value"])
        if "ZENML_STORE_API_KEY_FILE" in env:
            monkeypatch.setenv("ZENML_STORE_API_KEY_FILE", str(key_file))  # the mounted file
        config = config_from_env(("a",))
        assert config.zenml_url == "https://zenml.example.com"
        assert config.resync_seconds == resync
        assert config.zenml_api_key() == "ZENKEY_" + "a" * 40
        key_file.write_text("ZENKEY_" + "b" * 40)  # rotated: read again, no restart
        assert config.zenml_api_key() == "ZENKEY_" + "b" * 40
        key_file.write_text("ZENKEY_" + "a" * 40)


def test_config_reads_the_rendered_password_environment(rendered, monkeypatch) -> None:
    from zenml_operator.config import config_from_env

    fake_secret = {"ZENML_STORE_USERNAME": "admin", "ZENML_STORE_PASSWORD": "pw"}
    for name in ("ZENML_STORE_API_KEY", "ZENML_STORE_API_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, item in env_of(rendered["password"]).items():
        if "value" in item:
            monkeypatch.setenv(name, item["value"])
        elif "fieldRef" in item["valueFrom"]:  # the downward API: the pod's namespace
            monkeypatch.setenv(name, NAMESPACE)
        else:  # what the kubelet does with secretKeyRef
            monkeypatch.setenv(name, fake_secret[item["valueFrom"]["secretKeyRef"]["key"]])
    config = config_from_env(("a",))
    assert config.zenml_username == "admin"
    assert config.zenml_api_key() == "pw"


def test_service_monitor(rendered) -> None:
    assert by_kind(rendered["defaults"], "ServiceMonitor") == []
    docs = rendered["servicemonitor"]
    monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"


# ------------------------------------------------------------------------------ RBAC


def test_rbac_cluster_scope(rendered) -> None:
    docs = rendered["defaults"]
    role = one(docs, "ClusterRole")
    assert rules_of(role) == CLUSTER_RULES | CRD_SCANNING
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "zenml-operator", "namespace": NAMESPACE}
    ]
    assert by_kind(docs, "Role") == [] and by_kind(docs, "RoleBinding") == []


def test_rbac_namespaced_scope(rendered) -> None:
    docs = rendered["namespaced"]
    roles = watched_roles(docs)
    bindings = [b for b in by_kind(docs, "RoleBinding") if b["metadata"]["name"] == RELEASE]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["a", "b"]
    for role in roles:
        assert rules_of(role) == OPERATOR_RULES
    for binding in by_kind(docs, "RoleBinding"):
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": binding["metadata"]["name"],
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "zenml-operator", "namespace": NAMESPACE}
        ]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["a", "b"]
    # The credentials of a ClusterZenMLServer: read-only, in the release namespace only.
    (credentials,) = credential_roles(docs)
    assert credentials["metadata"]["namespace"] == NAMESPACE
    assert rules_of(credentials) == CREDENTIAL_RULES
    # The only cluster-wide grants: read-only discovery and the cluster-scoped servers;
    # nothing namespaced, no Secrets.
    cluster_roles = {r["metadata"]["name"]: rules_of(r) for r in by_kind(docs, "ClusterRole")}
    assert cluster_roles == {
        f"{RELEASE}-discovery": NAMESPACE_SCANNING | CRD_SCANNING,
        f"{RELEASE}-cluster-servers": CLUSTER_SERVER_RULES,
    }
    bound = {b["roleRef"]["name"] for b in by_kind(docs, "ClusterRoleBinding")}
    assert bound == set(cluster_roles)


def test_credential_namespaces_namespaced_scope(rendered) -> None:
    """A credential namespace gets a read-only Secret Role unless it is watched already."""
    docs = rendered["namespaced-credential-namespaces"]
    roles = {r["metadata"]["namespace"]: rules_of(r) for r in credential_roles(docs)}
    assert roles == {NAMESPACE: CREDENTIAL_RULES, "zenml-creds": CREDENTIAL_RULES}
    env = env_of(docs)
    assert env["ZENML_OPERATOR_CREDENTIAL_NAMESPACES"]["value"] == "zenml-creds,a"


def test_operator_namespace_from_the_downward_api(rendered) -> None:
    for scenario, docs in rendered.items():
        env = env_of(docs)
        assert env["ZENML_OPERATOR_NAMESPACE"]["valueFrom"] == {
            "fieldRef": {"fieldPath": "metadata.namespace"}
        }, scenario
    assert "ZENML_OPERATOR_CREDENTIAL_NAMESPACES" not in env_of(rendered["defaults"])
    # Cluster scope: the ClusterRole reads Secrets everywhere already, no extra Role.
    assert by_kind(rendered["default-server"], "Role") == []


def test_default_server(rendered) -> None:
    assert by_kind(rendered["defaults"], "ClusterZenMLServer") == []
    docs = rendered["default-server"]
    server = one(docs, "ClusterZenMLServer")
    assert server["apiVersion"] == "zenml.io/v1alpha1"
    assert server["metadata"]["name"] == "default"
    # Helm must not delete it with the operator: nothing would release its finalizer.
    assert server["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert server["spec"] == {
        "url": "https://zenml.example.com",
        "proApiUrl": "https://cloudapi.zenml.io",
        "caBundle": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        "credentials": {"secretName": "zenml-operator-credential", "namespace": NAMESPACE},
    }
    assert admit("ClusterZenMLServer", server["spec"]) == []
    env = env_of(docs)
    assert env["ZENML_OPERATOR_CREDENTIAL_NAMESPACES"]["value"] == f"zenml-creds,{NAMESPACE}"


@needs_helm
def test_default_server_with_its_own_values() -> None:
    values = {
        "defaultServer": {
            "create": True,
            "name": "prod",
            "url": "https://prod.zenml.example.com",
            "secretUrl": "http://zenml.zenml.svc:8080",
            "credentials": {"secretName": "prod-admin"},
        }
    }
    server = one(render(merged(BASE, values)), "ClusterZenMLServer")
    assert server["metadata"]["name"] == "prod"
    assert server["spec"] == {
        "url": "https://prod.zenml.example.com",
        "secretUrl": "http://zenml.zenml.svc:8080",
        "credentials": {"secretName": "prod-admin", "namespace": NAMESPACE},
    }
    assert admit("ClusterZenMLServer", server["spec"]) == []


@pytest.mark.parametrize(
    "scenario",
    [
        "namespaced",
        "namespaced-no-discovery",
        "replicas-2-namespaced",
        "namespaced-credential-namespaces",
    ],
)
def test_namespaced_scope_grants_nothing_sensitive_cluster_wide(rendered, scenario: str) -> None:
    for role in by_kind(rendered[scenario], "ClusterRole"):
        for (_, resource), verbs in rules_of(role).items():
            if resource.startswith("clusterzenmlservers"):
                # Cluster-scoped custom resources, not namespaced objects or Secrets.
                assert verbs == CLUSTER_SERVER_RULES[("zenml.io", resource)]
                continue
            assert resource in {"namespaces", "customresourcedefinitions"}, resource
            assert verbs <= {"get", "list", "watch"}


def test_namespaced_scope_without_discovery_has_only_the_cluster_server_grant(rendered) -> None:
    docs = rendered["namespaced-no-discovery"]
    (cluster_role,) = by_kind(docs, "ClusterRole")
    assert rules_of(cluster_role) == CLUSTER_SERVER_RULES
    (binding,) = by_kind(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == cluster_role["metadata"]["name"]
    assert [r["metadata"]["namespace"] for r in watched_roles(docs)] == ["a"]


@needs_helm
def test_rbac_can_be_left_to_the_user() -> None:
    docs = render(merged(BASE, {"rbac": {"create": False}, "serviceAccount": {"create": False}}))
    kinds = {d["kind"] for d in docs}
    assert not kinds & {
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ServiceAccount",
    }
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "default"


def test_namespaced_objects_live_in_the_release_namespace(rendered) -> None:
    for scenario, docs in rendered.items():
        for doc in docs:
            if doc["kind"] in {"Role", "RoleBinding", "KopfPeering"}:
                continue  # in the watched namespaces
            namespace = doc["metadata"].get("namespace")
            if doc["kind"] in {
                "ClusterRole",
                "ClusterRoleBinding",
                "ClusterKopfPeering",
                "ClusterZenMLServer",
            }:
                assert namespace is None, (scenario, doc["kind"])
            else:
                assert namespace == NAMESPACE, (scenario, doc["kind"])


# --------------------------------------------------------------------- values checking


@needs_helm
@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"replicaCount": "two"}, "/replicaCount"),
        ({"rbac": {"scope": "global"}}, "/rbac/scope"),
        ({"logFormat": "xml"}, "/logFormat"),
        ({"watchNamespaces": ["Not_A_Namespace"]}, "/watchNamespaces/0"),
        ({"zenml": {"url": "zenml.example.com"}}, "/zenml/url"),
        ({"zenml": {"credential": "token"}}, "/zenml/credential"),
        # No value can carry a key: the credential only ever comes from an existing Secret.
        ({"zenml": {"apiKey": "ZENKEY_abc"}}, "apiKey"),
        ({"replicas": 2}, "replicas"),
        ({"livenessPort": 0}, "/livenessPort"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"resyncSeconds": 0}, "/resyncSeconds"),
        ({"rbac": {"scope": "namespaced"}}, "/watchNamespaces"),
        ({"serviceMonitor": {"interval": "soon"}}, "/serviceMonitor/interval"),
        ({"serverCredentialNamespaces": ["Not_A_Namespace"]}, "/serverCredentialNamespaces/0"),
        ({"defaultServer": {"url": "zenml.example.com"}}, "/defaultServer/url"),
        ({"defaultServer": {"proApiUrl": "cloudapi.zenml.io"}}, "/defaultServer/proApiUrl"),
        ({"defaultServer": {"caBundle": "not a certificate"}}, "/defaultServer/caBundle"),
        ({"defaultServer": {"name": "Prod"}}, "/defaultServer/name"),
        ({"defaultServer": {"credentials": {"namespace": "x"}}}, "namespace"),
        # The server's credential too only ever comes from an existing Secret.
        ({"defaultServer": {"apiKey": "ZENKEY_abc"}}, "apiKey"),
    ],
)
def test_schema_rejects_bad_values(values: dict[str, Any], fragment: str) -> None:
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError) as info:
            chart.validate_schema(merged(BASE, values))
        assert fragment in str(info.value)
        with pytest.raises(helm.HelmValuesError):  # an install validates too
            chart.render(merged(BASE, values), name=RELEASE, namespace=NAMESPACE)


@needs_helm
def test_schema_accepts_every_scenario() -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema({})  # the defaults themselves
        for values in SCENARIOS.values():
            chart.validate_schema(values)


@needs_helm
@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"zenml": {"url": ""}}, "zenml.url is required"),
        ({"zenml": {"existingSecret": {"name": ""}}}, "zenml.existingSecret.name is required"),
        ({"metrics": {"port": 8080}}, "must differ"),
        (
            {"serviceMonitor": {"enabled": True}, "metrics": {"service": {"enabled": False}}},
            "metrics.service.enabled",
        ),
    ],
)
def test_render_fails_with_a_clear_message(values: dict[str, Any], fragment: str) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmRenderError) as info:
        chart.render(merged(BASE, values), name=RELEASE, namespace=NAMESPACE)
    assert fragment in str(info.value)


# --------------------------------------------------------------------------- examples

EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml")) + sorted(EXAMPLES.glob("*.yml"))


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_examples_are_valid(path: Path) -> None:
    """Built-in kinds against Kubernetes' schemas; zenml.io kinds against the CRDs."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, f"{path} holds no object"
    for doc in docs:
        if doc["apiVersion"].startswith("zenml.io/"):
            assert doc["apiVersion"] == "zenml.io/v1alpha1"
            assert admit(doc["kind"], doc.get("spec") or {}) == [], doc["metadata"]["name"]
            continue
        for kube in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, kube, strict=True)
