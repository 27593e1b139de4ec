"""Installing on a real kube-apiserver: the CRDs, the examples, the printer columns."""

from __future__ import annotations

from pathlib import Path

import yaml

from realkube.conftest import GROUP_PATH, Installed, Kube, apply_manifest

ROOT = Path(__file__).resolve().parents[2]


def _crd(kube: Kube, name: str) -> dict:
    crd = kube.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
    assert crd is not None, name
    return crd


def test_both_crds_are_established_and_structural(installed: Installed) -> None:
    for name in ("serviceaccounts.zenml.io", "apikeyrotations.zenml.io"):
        conditions = {c["type"]: c for c in _crd(installed.kube, name)["status"]["conditions"]}
        assert conditions["Established"]["status"] == "True", conditions
        # A non-structural schema or a CEL rule over its cost budget shows up here.
        assert conditions.get("NonStructuralSchema", {}).get("status") != "True", conditions


def test_chart_crds_are_accepted_too(installed: Installed) -> None:
    # The chart ships copies of crds/ plus Kopf's peering CRDs: all must install.
    for path in sorted((ROOT / "charts" / "zenml-operator" / "crds").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            apply_manifest(installed.kube, doc, dryRun="All", fieldValidation="Strict")


def test_every_example_is_accepted_by_server_side_apply(installed: Installed) -> None:
    kube = installed.kube
    kube.apply(
        "/api/v1/namespaces/zenml-operator",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "zenml-operator"}},
    )
    applied = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                # Dry run: validated and admitted as for real, but the operator never sees it.
                apply_manifest(kube, doc, dryRun="All", fieldValidation="Strict")
                applied.append(f"{path.name}:{doc['kind']}")
    kinds = {a.split(":")[1] for a in applied}
    assert {
        "ServiceAccount",
        "ApiKeyRotation",
        "ZenMLServer",
        "ClusterZenMLServer",
        "Deployment",
        "Secret",
    } <= kinds, applied


def test_next_rotation_column_shows_a_future_time(installed: Installed, namespace: str) -> None:
    kube = installed.kube
    future = "2099-01-01T00:00:00Z"
    rotation = {
        "apiVersion": "zenml.io/v1alpha1",
        "kind": "ApiKeyRotation",
        "metadata": {"name": "columns", "namespace": namespace},
        "spec": {"serviceAccountName": "nobody", "apiKeyName": "nokey", "suspend": True},
    }
    collection = f"{GROUP_PATH}/namespaces/{namespace}/apikeyrotations"
    kube.create(collection, rotation)
    kube.merge_patch(f"{collection}/columns/status", {"status": {"nextRotationTime": future}})
    table = kube.request(
        "GET",
        collection,
        headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
    ).json()
    names = [c["name"] for c in table["columnDefinitions"]]
    cells = dict(zip(names, table["rows"][0]["cells"], strict=True))
    # A `date` column renders a future time as `<invalid>` in kubectl.
    assert cells["Next Rotation"] == future, cells
