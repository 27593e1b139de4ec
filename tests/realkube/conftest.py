"""The real-apiserver tier: a real etcd + kube-apiserver + kube-controller-manager.

Once per test session (package-scoped: started by the tier's first test, and the operator
process and the control plane are stopped when the tier ends, so that nothing of it runs
beside the tests that follow and share the session's ZenML server): the control plane
starts on loopback from KUBEBUILDER_ASSETS (the envtest convention; skipped with one line
saying how to get them when absent), the CRDs from `crds/` are applied, the chart's
ServiceAccount and RBAC are rendered by Helm and applied, and the operator runs as a
separate process (`zenml-operator run --all-namespaces`) with a token of that
ServiceAccount from the TokenRequest API, so the real server enforces the chart's RBAC.
Each test gets its own namespace. The audit log records every request the operator makes.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from control_plane import HOW_TO_GET_ASSETS, ControlPlane, find_assets, free_port
from e2e.conftest import ready  # the Ready condition of the current generation
from helm_render import render_chart

ROOT = Path(__file__).resolve().parents[2]
GROUP_PATH = "/apis/zenml.io/v1alpha1"
RELEASE = "zenml-operator"
OPERATOR_NAMESPACE = "zenml-operator"
T = TypeVar("T")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.realkube)


class KubeError(Exception):
    def __init__(self, response: httpx.Response) -> None:
        self.status_code = response.status_code
        try:
            self.body: dict[str, Any] = response.json()
        except ValueError:
            self.body = {"message": response.text}
        super().__init__(f"{response.status_code}: {self.body.get('message', '')}")


def wait_for(
    predicate: Callable[[], T], *, timeout: float, message: str, interval: float = 0.2
) -> T:
    """Poll until `predicate()` is truthy; fail the test with the last value at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}; last: {value!r}")
        time.sleep(interval)


@dataclasses.dataclass
class Kube:
    """The cluster admin's view (system:masters), for the tests' own reads and writes."""

    http: httpx.Client

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.http.request(method, path, **kwargs)

    def _ok(self, response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            raise KubeError(response)
        result: dict[str, Any] = response.json()
        return result

    def get(self, path: str) -> dict[str, Any] | None:
        response = self.request("GET", path)
        return None if response.status_code == 404 else self._ok(response)

    def create(self, path: str, body: dict[str, Any], **params: str) -> dict[str, Any]:
        return self._ok(self.request("POST", path, json=body, params=params))

    def replace(self, path: str, body: dict[str, Any], **params: str) -> dict[str, Any]:
        return self._ok(self.request("PUT", path, json=body, params=params))

    def merge_patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/merge-patch+json"}
        return self._ok(self.request("PATCH", path, json=body, headers=headers))

    def apply(self, path: str, body: dict[str, Any], **params: str) -> dict[str, Any]:
        """Server-side apply (what `kubectl apply --server-side` sends)."""
        params = {"fieldManager": "zenml-operator-tests", "force": "true", **params}
        headers = {"Content-Type": "application/apply-patch+yaml"}
        return self._ok(
            self.request("PATCH", path, content=json.dumps(body), headers=headers, params=params)
        )

    def delete(self, path: str) -> dict[str, Any] | None:
        response = self.request("DELETE", path)
        return None if response.status_code == 404 else self._ok(response)


def object_path(obj: dict[str, Any]) -> tuple[str, str]:
    """(collection path, object path) of a manifest, for the kinds the tests use."""
    api_version, kind = obj["apiVersion"], obj["kind"]
    plural = {
        "ServiceAccount": "serviceaccounts",
        "ClusterRole": "clusterroles",
        "ClusterRoleBinding": "clusterrolebindings",
        "Role": "roles",
        "RoleBinding": "rolebindings",
        "Secret": "secrets",
        "Deployment": "deployments",
        "StatefulSet": "statefulsets",
        "DaemonSet": "daemonsets",
        "ApiKeyRotation": "apikeyrotations",
        "ZenMLServer": "zenmlservers",
        "ClusterZenMLServer": "clusterzenmlservers",
        "Namespace": "namespaces",
        "CustomResourceDefinition": "customresourcedefinitions",
    }[kind]
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    namespace = obj["metadata"].get("namespace")
    collection = f"{base}/namespaces/{namespace}/{plural}" if namespace else f"{base}/{plural}"
    return collection, f"{collection}/{obj['metadata']['name']}"


def apply_manifest(kube: Kube, obj: dict[str, Any], **params: str) -> dict[str, Any]:
    return kube.apply(object_path(obj)[1], obj, **params)


@dataclasses.dataclass
class OperatorProcess:
    """`zenml-operator run` in its own process, as the chart runs it (kill -9 is real)."""

    argv: list[str]
    env: dict[str, str]
    log_path: Path
    metrics_port: int
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        wait_for(self._ready, timeout=60, message="the operator's /readyz")

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"operator exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        try:
            url = f"http://127.0.0.1:{self.metrics_port}/readyz"
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """SIGKILL: no cleanup, no finalizer release, as a crashed pod."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclasses.dataclass
class Installed:
    plane: ControlPlane
    kube: Kube
    operator: OperatorProcess
    operator_user: str  # the ServiceAccount's user name, as the audit log records it
    zenml_url: str

    def audit_events(self) -> list[dict[str, Any]]:
        path = self.plane.workdir / "audit.log"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def operator_requests(self) -> list[dict[str, Any]]:
        return [e for e in self.audit_events() if e["user"]["username"] == self.operator_user]


class ZenMLProbe:
    """The tests' own view of ZenML (the operator's identity), from sync tests.

    One client on a loop in a thread of its own: an API-key login costs the server a bcrypt,
    so the tests log in once, not per check.
    """

    def __init__(self, url: str, api_key: str) -> None:
        from zenml_operator.zenml_api import ZenMLClient

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._client = ZenMLClient(url, api_key, max_retries=2)

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=60)

    def account(self, name: str) -> Any:
        """ZenML's service account of that name, or None."""
        from zenml_operator.zenml_api import NotFoundError

        try:
            return self._run(self._client.get_service_account(name))
        except NotFoundError:
            return None

    def keys(self, account_id: str) -> list[Any]:
        return list(self._run(self._client.list_api_keys(account_id)))

    def close(self) -> None:
        self._run(self._client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


@pytest.fixture(scope="package")
def zenml(zenml_server: Any, operator_api_key: str) -> Iterator[ZenMLProbe]:
    probe = ZenMLProbe(zenml_server.url, operator_api_key)
    try:
        yield probe
    finally:
        probe.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    installed = getattr(item, "funcargs", {}).get("installed")
    if report.failed and isinstance(installed, Installed):
        tail = "\n".join(installed.operator.log().splitlines()[-80:])
        report.sections.append(("operator log (last 80 lines)", tail))


@pytest.fixture(scope="package")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    assets = find_assets()
    if assets is None:
        pytest.skip(HOW_TO_GET_ASSETS)
    from control_plane import start_control_plane

    plane = start_control_plane(assets, tmp_path_factory.mktemp("control-plane"))
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="package")
def kube(control_plane: ControlPlane) -> Iterator[Kube]:
    with httpx.Client(timeout=30, **control_plane.admin_client_kwargs()) as http:
        yield Kube(http)


def _install_crds(kube: Kube) -> None:
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        apply_manifest(kube, crd)
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        name = yaml.safe_load(path.read_text())["metadata"]["name"]

        def established(name: str = name) -> bool:
            crd = kube.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
            conditions = ((crd or {}).get("status") or {}).get("conditions") or []
            return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

        wait_for(established, timeout=30, message=f"CRD {name} Established")


def _install_rbac(kube: Kube, zenml_url: str) -> tuple[str, str]:
    """Apply the chart's ServiceAccount and RBAC; return a token of that ServiceAccount."""
    pytest.importorskip("helm_python", reason="the chart is rendered with helm-python-sdk")
    kube.apply(
        f"/api/v1/namespaces/{OPERATOR_NAMESPACE}",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NAMESPACE}},
    )
    values = {"zenml": {"url": zenml_url, "existingSecret": {"name": "zenml-operator-cred"}}}
    docs = render_chart(values, release=RELEASE, namespace=OPERATOR_NAMESPACE)
    rbac_kinds = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    account = None
    for doc in docs:
        if doc["kind"] in rbac_kinds:
            apply_manifest(kube, doc)
            if doc["kind"] == "ServiceAccount":
                account = doc["metadata"]["name"]
    assert account, "the chart rendered no ServiceAccount"
    token = kube.create(
        f"/api/v1/namespaces/{OPERATOR_NAMESPACE}/serviceaccounts/{account}/token",
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 24 * 3600},
        },
    )
    return f"system:serviceaccount:{OPERATOR_NAMESPACE}:{account}", token["status"]["token"]


@pytest.fixture(scope="package")
def installed(
    control_plane: ControlPlane,
    kube: Kube,
    zenml_server: Any,
    operator_api_key: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Installed]:
    _install_crds(kube)
    user, token = _install_rbac(kube, zenml_server.url)
    kubeconfig = control_plane.token_kubeconfig(token, "operator")
    metrics_port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("ZENML_", "KUBE"))},
        "KUBECONFIG": str(kubeconfig),
        "ZENML_STORE_URL": zenml_server.url,
        "ZENML_STORE_API_KEY": operator_api_key,
        "ZENML_OPERATOR_RETRY_DELAY": "1",
        # As the chart's Deployment sets it (downward API): ClusterZenMLServer credentials
        # are read from this namespace only (the chart's serverCredentialNamespaces: none).
        "ZENML_OPERATOR_NAMESPACE": OPERATOR_NAMESPACE,
    }
    operator = OperatorProcess(
        argv=[
            sys.executable,
            "-m",
            "zenml_operator.cli",
            "run",
            "--all-namespaces",
            "--liveness-port=0",
            f"--metrics-port={metrics_port}",
            "--log-format=full",
        ],
        env=env,
        log_path=tmp_path_factory.mktemp("operator") / "operator.log",
        metrics_port=metrics_port,
    )
    operator.start()
    # The minimum period (5m) runs through the real schema, started now so that its wait
    # overlaps the rest of the tier; tests/realkube/test_zz_minimum_period.py checks it last.
    start_minimum_period_rotation(kube)
    try:
        yield Installed(
            plane=control_plane,
            kube=kube,
            operator=operator,
            operator_user=user,
            zenml_url=zenml_server.url,
        )
    finally:
        operator.stop()


MINIMUM_PERIOD_NAMESPACE = "min-period"


def service_account_body(namespace: str, resource: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "zenml.io/v1alpha1",
        "kind": "ServiceAccount",
        "metadata": {"name": resource, "namespace": namespace},
        "spec": {"apiKeys": [{"name": "ci"}], **spec},
    }


def deployment_body(namespace: str, name: str, secret: str) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "containers": [
                        {
                            "name": "c",
                            "image": "zenmldocker/zenml:0.98.0",
                            "envFrom": [{"secretRef": {"name": secret}}],
                        }
                    ]
                },
            },
        },
    }


def rotation_body(namespace: str, name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "zenml.io/v1alpha1",
        "kind": "ApiKeyRotation",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"serviceAccountName": "app", "apiKeyName": "ci", **spec},
    }


def start_minimum_period_rotation(kube: Kube) -> None:
    ns = MINIMUM_PERIOD_NAMESPACE
    kube.create("/api/v1/namespaces", {"metadata": {"name": ns}})
    kube.create(
        f"{GROUP_PATH}/namespaces/{ns}/serviceaccounts",
        service_account_body(ns, "app", name=f"min-period-{uuid.uuid4().hex[:6]}"),
    )
    kube.create(
        f"{GROUP_PATH}/namespaces/{ns}/apikeyrotations",
        rotation_body(ns, "every-5m", period="5m", retainPeriodMinutes=1),
    )


@pytest.fixture
def namespace(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test (deleted at the end, without waiting)."""
    name = f"t-{request.node.name[:30].lower().strip('_-').replace('_', '-')}"
    name = "".join(c for c in name if c.isalnum() or c == "-").strip("-")
    name = f"{name[:40]}-{uuid.uuid4().hex[:6]}"
    kube.create("/api/v1/namespaces", {"metadata": {"name": name}})
    yield name
    kube.delete(f"/api/v1/namespaces/{name}")


@pytest.fixture
def kube_namespace_factory(kube: Kube) -> Iterator[Callable[[str], str]]:
    """Namespaces a test creates (and may delete itself); the rest are deleted at the end."""
    made: list[str] = []

    def make(prefix: str) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        kube.create("/api/v1/namespaces", {"metadata": {"name": name}})
        made.append(name)
        return name

    yield make
    for name in made:
        kube.delete(f"/api/v1/namespaces/{name}")


def wait_ready(
    kube: Kube,
    path: str,
    *,
    status: str = "True",
    reason: str | None = None,
    timeout: float = 60,
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        obj = kube.get(path)
        cond = ready(obj)
        if cond and cond["status"] == status and (reason is None or cond["reason"] == reason):
            return obj
        return None

    return wait_for(check, timeout=timeout, message=f"{path} Ready={status} {reason or ''}")


def secret_value(secret: dict[str, Any], key: str = "ZENML_STORE_API_KEY") -> str:
    return base64.b64decode(secret["data"][key]).decode()


def logs_in_as(url: str, api_key: str) -> str | None:
    """The account this key logs in to ZenML as, or None when ZenML refuses it."""
    from zenml_operator.zenml_api import NotFoundError, UnauthorizedError, ZenMLClient

    async def run() -> str | None:
        client = ZenMLClient(url, api_key, max_retries=0)
        try:
            return await client.current_user_name()
        except (UnauthorizedError, NotFoundError):
            return None
        finally:
            await client.aclose()

    return asyncio.run(run())
