"""The CRDs in crds/ are generated from the models, structural, and enforce the rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from schema_tools import admit, crd_schema, default_errors
from zenml_operator.crdgen import all_crds, render

CRDS = Path(__file__).resolve().parents[2] / "crds"


def test_crds_directory_matches_models() -> None:
    for filename, crd in all_crds().items():
        path = CRDS / filename
        assert path.exists(), f"{path} missing: run `zenml-operator crds`"
        assert path.read_text() == render(crd), f"{path} drifted: run `zenml-operator crds`"
    assert {p.name for p in CRDS.glob("*.yaml")} == set(all_crds())


def _walk(schema: dict, path: str = ""):
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("filename", sorted(all_crds()))
def test_schema_is_structural(filename: str) -> None:
    crd = yaml.safe_load((CRDS / filename).read_text())
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert "zenml" in crd["spec"]["names"]["categories"]
    for path, node in _walk(version["schema"]["openAPIV3Schema"]):
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        for banned in ("$ref", "anyOf", "oneOf", "allOf", "title", "nullable", "const"):
            assert banned not in node, f"{path}: {banned}"
        assert not ("properties" in node and "additionalProperties" in node), path


GOOD = {"apiKeys": [{"name": "ci"}, {"name": "batch", "secretName": "batch-creds"}]}


def test_valid_spec_is_admitted() -> None:
    assert admit("ServiceAccount", GOOD) == []
    assert admit("ServiceAccount", {}) == []


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"name": "Not_DNS"}, "does not match"),
        ({"name": "a" * 64}, "longer than 63"),
        ({"deletionPolicy": "Purge"}, "must be one of"),
        ({"apiKeys": [{"name": "a"}, {"name": "a"}]}, "Duplicate value"),
        (
            {"apiKeys": [{"name": "a", "secretName": "s"}, {"name": "b", "secretName": "s"}]},
            "secretName must be unique",
        ),
        ({"apiKeys": [{"name": "a", "secretName": "UPPER"}]}, "does not match"),
        ({"apiKeys": [{"description": "no name"}]}, "required"),
        (
            {"apiKeys": [{"name": "a", "secretTemplate": {"keys": {"url": "X", "apiKey": "X"}}}]},
            "must differ",
        ),
        (
            {"apiKeys": [{"name": "a", "secretTemplate": {"keys": {"url": "bad key!"}}}]},
            "does not match",
        ),
        ({"apiKeys": [{"name": f"k{i}"} for i in range(33)]}, "more than 32"),
        ({"description": "x" * 5000}, "longer than 1024"),
        ({"unknownField": 1}, "unknown field"),
        ({"active": "yes"}, "must be boolean"),
    ],
)
def test_bad_spec_is_rejected(spec: dict, fragment: str) -> None:
    errors = admit("ServiceAccount", spec)
    assert any(fragment in e for e in errors), errors


@pytest.mark.parametrize("kind", ["ServiceAccount", "ApiKeyRotation"])
def test_every_default_passes_its_own_schema(kind: str) -> None:
    # A real API server refuses a CRD whose default fails its schema (the ApiKeyRotation
    # spec once defaulted to {} while requiring two fields).
    assert default_errors(crd_schema(kind)) == []


def test_unknown_fields_are_pruned_unless_strict() -> None:
    spec = {"apiKeys": [{"name": "a", "colour": "red"}], "unknownField": 1}
    assert any("unknown field" in e for e in admit("ServiceAccount", spec))
    assert admit("ServiceAccount", spec, strict=False) == []


@pytest.mark.parametrize(
    ("labels", "ok"),
    [
        ({"team": "ml", "example.com/tier": "gold", "a.b/c_d-e.f": ""}, True),
        ({"bad key!": "x"}, False),
        ({"team": "bad value!"}, False),
        ({"team": "x" * 64}, False),
        ({"n" * 64: "x"}, False),
        ({"UPPER.example.com/x": "y"}, False),
        ({"-leading": "y"}, False),
    ],
)
def test_secret_template_labels_are_valid_kubernetes_labels(labels: dict, ok: bool) -> None:
    spec = {"apiKeys": [{"name": "a", "secretTemplate": {"labels": labels}}]}
    assert (admit("ServiceAccount", spec) == []) is ok


def test_name_is_immutable() -> None:
    assert admit("ServiceAccount", {"name": "a"}, old_spec={"name": "a"}) == []
    assert any("immutable" in e for e in admit("ServiceAccount", {"name": "b"}, {"name": "a"}))
    assert any("immutable" in e for e in admit("ServiceAccount", {"name": "b"}, {}))
    assert any("immutable" in e for e in admit("ServiceAccount", {}, {"name": "a"}))


PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
SERVER = {
    "url": "https://zenml.example.com",
    "secretUrl": "http://zenml.zenml.svc:8080/",
    "proApiUrl": "https://cloudapi.zenml.io",
    "caBundle": PEM,
    "credentials": {"secretName": "zenml-admin"},
}
CLUSTER_SERVER = {**SERVER, "credentials": {"secretName": "zenml-admin", "namespace": "zenml"}}


def test_server_kinds_are_scoped() -> None:
    scopes = {c["spec"]["names"]["kind"]: c["spec"]["scope"] for c in all_crds().values()}
    assert scopes["ZenMLServer"] == "Namespaced"
    assert scopes["ClusterZenMLServer"] == "Cluster"


def test_valid_server_specs_are_admitted() -> None:
    assert admit("ZenMLServer", SERVER) == []
    assert admit("ClusterZenMLServer", CLUSTER_SERVER) == []
    minimal = {"url": "http://127.0.0.1:8080", "credentials": {"secretName": "s"}}
    assert admit("ZenMLServer", minimal) == []


@pytest.mark.parametrize(
    ("kind", "spec", "fragment"),
    [
        ("ZenMLServer", {**SERVER, "url": "zenml.example.com"}, "does not match"),
        ("ZenMLServer", {**SERVER, "url": "https://a b"}, "does not match"),
        ("ZenMLServer", {**SERVER, "url": "https://x/?q=1"}, "does not match"),
        ("ZenMLServer", {**SERVER, "secretUrl": "ftp://x"}, "does not match"),
        ("ZenMLServer", {**SERVER, "proApiUrl": "cloudapi.zenml.io"}, "does not match"),
        ("ZenMLServer", {**SERVER, "url": "https://x/" + "a" * 2048}, "longer than 2048"),
        ("ZenMLServer", {k: v for k, v in SERVER.items() if k != "credentials"}, "required"),
        ("ZenMLServer", {**SERVER, "credentials": {}}, "required"),
        ("ZenMLServer", CLUSTER_SERVER, "only for a ClusterZenMLServer"),
        ("ClusterZenMLServer", SERVER, "must name the namespace"),
        ("ZenMLServer", {**SERVER, "caBundle": "not a certificate"}, "caBundle must be PEM"),
        ("ZenMLServer", {**SERVER, "caBundle": "x" * 70000}, "longer than 65536"),
        ("ZenMLServer", {**SERVER, "insecure": True}, "unknown field"),
    ],
)
def test_bad_server_spec_is_rejected(kind: str, spec: dict, fragment: str) -> None:
    errors = admit(kind, spec)
    assert any(fragment in e for e in errors), errors


@pytest.mark.parametrize("kind", ["ZenMLServer", "ClusterZenMLServer"])
def test_server_defaults_pass_their_schema(kind: str) -> None:
    assert default_errors(crd_schema(kind)) == []


REF = {"kind": "ClusterZenMLServer", "name": "prod"}


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"serverRef": {"kind": "ZenmlServer", "name": "a"}}, "must be one of"),
        ({"serverRef": {"kind": "ZenMLServer"}}, "required"),
        ({"serverRef": {"kind": "ZenMLServer", "name": "a", "namespace": "b"}}, "not allowed"),
        (
            {
                "apiKeys": [
                    {"name": "a", "secretTemplate": {"keys": {"proApiUrl": "ZENML_STORE_URL"}}}
                ]
            },
            "must differ",
        ),
        (
            {
                "apiKeys": [
                    {"name": "a", "secretTemplate": {"keys": {"verifySsl": "X", "proApiUrl": "X"}}}
                ]
            },
            "must differ",
        ),
    ],
)
def test_bad_server_ref_is_rejected(spec: dict, fragment: str) -> None:
    errors = admit("ServiceAccount", spec)
    assert any(fragment in e for e in errors), errors


def test_server_ref_is_immutable() -> None:
    assert admit("ServiceAccount", {"serverRef": REF}) == []
    assert admit("ServiceAccount", {"serverRef": REF}, old_spec={"serverRef": REF}) == []
    other = {**REF, "name": "dev"}
    for new, old in (
        ({"serverRef": other}, {"serverRef": REF}),
        ({"serverRef": REF}, {}),
        ({}, {"serverRef": REF}),
    ):
        assert any("serverRef is immutable" in e for e in admit("ServiceAccount", new, old))
