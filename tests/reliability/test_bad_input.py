"""Bad input: a fixed catalogue of malformed and hostile specs for both kinds.

`BAD_INPUT_CASES` says, for each case, where it must be refused:
- "schema": the OpenAPI part of the CRD schema (types, patterns, lengths, enums, required,
  unknown fields under `fieldValidation=Strict`, list-map keys);
- "cel": the CRD's CEL rules (the OpenAPI part admits it);
- "operator": only the running operator can tell (other objects, ZenML, its own identity,
  what the schema cannot express): the schema admits it and the object ends Ready=False with
  the case's reason, while a good ServiceAccount created alongside still becomes Ready.
The fast tier checks the schema/CEL cases with `schema_tools.admit` (strict), and checks the
layer too (with the CEL rules taken out, a "schema" case is still refused and a "cel" case
is admitted); the real-apiserver tier POSTs them to a kube-apiserver. `BAD_UPDATE_CASES` are
refused only as an update of another spec (transition rules).

Where no API server enforces the schema (the emulated tier), the operator is the last line of
defence: every schema/CEL case must end Ready=False InvalidSpec, except the fixed list in
`BYPASS_ACCEPTED` (each with the reason the operator's own parsing accepts it).
"""

from __future__ import annotations

import asyncio
import copy
import datetime
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import pydantic
import pytest

from e2e.conftest import ready
from fixtures_zenml import OPERATOR_ACCOUNT
from reliability.helpers import (
    NS,
    ROT_LIST,
    SA_LIST,
    SECRET_LIST,
    condition,
    create_foreign_secret,
    rotation_body,
    sa_body,
    sa_path,
    secret_path,
    unique,
)
from schema_tools import CelEvaluationError, admit, apply_defaults, crd_schema, validate
from zenml_operator.handlers.common import ReconcileProblem
from zenml_operator.handlers.rotation import RotationReconciler
from zenml_operator.handlers.service_account import parse_spec
from zenml_operator.models import ClusterZenMLServerSpec, ZenMLServerSpec

SA = "ServiceAccount"
ROT = "ApiKeyRotation"
ZS = "ZenMLServer"
CZS = "ClusterZenMLServer"
SERVER_KINDS = (ZS, CZS)
GOOD_ROT = {"serviceAccountName": "x", "apiKeyName": "main", "period": "2h"}
GOOD_SERVER = {"url": "https://zenml.example.com", "credentials": {"secretName": "zenml-admin"}}
GOOD_CLUSTER_SERVER = {
    "url": "https://zenml.example.com",
    "credentials": {"secretName": "zenml-admin", "namespace": "zenml"},
}
GOOD_REF = {"kind": "ClusterZenMLServer", "name": "prod"}


class BadInput(NamedTuple):
    """One bad input. Operator cases' specs hold placeholders filled at run time: `{name}`
    (the object's name), `{good}` (a good ServiceAccount's name), `{id}` (a unique suffix)."""

    kind: str  # "ServiceAccount" | "ApiKeyRotation" | "ZenMLServer" | "ClusterZenMLServer"
    name: str  # the case's name
    spec: dict[str, Any]
    layer: str  # "schema" | "cel" | "operator"
    reason: str | None  # "operator": the Ready=False reason; otherwise None


class BadUpdate(NamedTuple):
    """A spec refused only as an update of `old` (a CEL transition rule)."""

    kind: str
    name: str
    old: dict[str, Any]
    spec: dict[str, Any]
    layer: str
    reason: str | None


def rot(**fields: Any) -> dict[str, Any]:
    return {**GOOD_ROT, **fields}


def drop(spec: dict[str, Any], field: str) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k != field}


def server(**fields: Any) -> dict[str, Any]:
    return {**GOOD_SERVER, **fields}


def cluster_server(**fields: Any) -> dict[str, Any]:
    return {**GOOD_CLUSTER_SERVER, **fields}


def template(**template: Any) -> dict[str, Any]:
    return {"apiKeys": [{"name": "a", "secretTemplate": template}]}


def key(**fields: Any) -> dict[str, Any]:
    return {"apiKeys": [{"name": "a", **fields}]}


# (case, kind, spec, layer, a fragment of the expected schema/CEL error)
_REFUSED: list[tuple[str, str, dict[str, Any], str, str]] = [
    # ServiceAccount: names
    ("sa-name-not-dns", SA, {"name": "Not_DNS"}, "schema", "does not match"),
    ("sa-name-leading-dash", SA, {"name": "-ml"}, "schema", "does not match"),
    ("sa-name-with-dot", SA, {"name": "ml.pipelines"}, "schema", "does not match"),
    ("sa-name-too-long", SA, {"name": "a" * 64}, "schema", "longer than 63"),
    ("key-name-empty", SA, {"apiKeys": [{"name": ""}]}, "schema", "shorter than 1"),
    # a declared name that looks like a rotated generation of another key
    ("key-name-generation", SA, {"apiKeys": [{"name": "main.r1"}]}, "schema", "does not match"),
    ("key-name-missing", SA, {"apiKeys": [{"description": "x"}]}, "schema", "required"),
    (
        "key-name-duplicate",
        SA,
        {"apiKeys": [{"name": "a"}, {"name": "a"}]},
        "schema",  # apiKeys is a list-map keyed by name
        "Duplicate value",
    ),
    (
        "secret-name-duplicate",
        SA,
        {"apiKeys": [{"name": "a", "secretName": "s"}, {"name": "b", "secretName": "s"}]},
        "cel",
        "secretName must be unique",
    ),
    # a Secret in another namespace
    (
        "secret-name-with-slash",
        SA,
        key(secretName="kube-system/creds"),
        "schema",
        "does not match",
    ),
    ("secret-namespace-field", SA, key(namespace="kube-system"), "schema", "unknown field"),
    ("secret-name-upper", SA, key(secretName="UP"), "schema", "does not match"),
    ("secret-name-too-long", SA, key(secretName="s" * 254), "schema", "longer than 253"),
    # huge values
    ("description-1mb", SA, {"description": "x" * 1_000_000}, "schema", "longer than 1024"),
    ("key-description-huge", SA, key(description="x" * 5000), "schema", "longer than 1024"),
    (
        "too-many-keys",
        SA,
        {"apiKeys": [{"name": f"k{i}"} for i in range(33)]},
        "schema",
        "more than 32",
    ),
    (
        "too-many-labels",
        SA,
        template(labels={f"l{i}": "v" for i in range(65)}),
        "schema",
        "more than 64",
    ),
    # Secret labels and annotations (a bad one would fail the Secret write later)
    ("label-value-invalid", SA, template(labels={"team": "not valid!"}), "schema", "match"),
    ("label-value-too-long", SA, template(labels={"team": "v" * 64}), "schema", "longer than 63"),
    ("labels-not-strings", SA, template(labels={"a": 1}), "schema", "must be string"),
    ("label-key-invalid", SA, template(labels={"bad key!": "v"}), "cel", "qualified names"),
    ("label-key-name-too-long", SA, template(labels={"a" * 64: "v"}), "cel", "qualified names"),
    ("annotation-key-invalid", SA, template(annotations={"-bad": "v"}), "cel", "qualified names"),
    (
        "annotation-key-prefix-invalid",
        SA,
        template(annotations={"Not_DNS/x": "v"}),
        "cel",
        "qualified names",
    ),
    # data keys
    ("data-keys-equal", SA, template(keys={"url": "K", "apiKey": "K"}), "cel", "must differ"),
    ("data-key-invalid", SA, template(keys={"apiKey": "bad key!"}), "schema", "does not match"),
    ("data-key-empty", SA, template(keys={"url": ""}), "schema", "does not match"),
    # enums, types, unknown fields
    ("deletion-policy-unknown", SA, {"deletionPolicy": "Purge"}, "schema", "must be one of"),
    ("active-string", SA, {"active": "yes"}, "schema", "must be boolean"),
    ("adopt-number", SA, {"adopt": 1}, "schema", "must be boolean"),
    ("api-keys-string", SA, {"apiKeys": "main"}, "schema", "must be array"),
    ("api-key-string", SA, {"apiKeys": ["main"]}, "schema", "must be object"),
    ("sa-unknown-field", SA, {"apiKey": [{"name": "typo"}]}, "schema", "unknown field"),
    # ApiKeyRotation: durations
    (
        "period-equals-retention",
        ROT,
        rot(period="1h", retainPeriodMinutes=60),
        "cel",
        "longer than",
    ),
    ("period-below-retention", ROT, rot(period="90m", retainPeriodMinutes=120), "cel", "longer"),
    ("period-negative", ROT, rot(period="-5m"), "schema", "does not match"),
    ("period-zero", ROT, rot(period="0s", retainPeriodMinutes=0), "cel", "at least 5m"),
    ("period-too-short", ROT, rot(period="1m", retainPeriodMinutes=0), "cel", "at least 5m"),
    ("period-absurd", ROT, rot(period="999999h"), "cel", "at most 87600h"),
    ("period-days", ROT, rot(period="30d"), "schema", "does not match"),
    ("period-malformed", ROT, rot(period="1h30"), "schema", "does not match"),
    ("period-empty", ROT, rot(period=""), "schema", "does not match"),
    ("period-huge-string", ROT, rot(period="1h" * 40), "schema", "longer than 32"),
    ("period-number", ROT, rot(period=720), "schema", "must be string"),
    ("retention-negative", ROT, rot(retainPeriodMinutes=-1), "schema", "below 0"),
    ("retention-absurd", ROT, rot(retainPeriodMinutes=10**9), "schema", "above"),
    ("retention-string", ROT, rot(retainPeriodMinutes="60"), "schema", "must be integer"),
    # ApiKeyRotation: references
    ("rot-sa-other-namespace", ROT, rot(serviceAccountName="team-a/ml"), "schema", "match"),
    ("rot-sa-missing-field", ROT, drop(GOOD_ROT, "serviceAccountName"), "schema", "required"),
    ("rot-key-generation", ROT, rot(apiKeyName="main.r1"), "schema", "does not match"),
    ("rot-namespace-field", ROT, rot(namespace="kube-system"), "schema", "unknown field"),
    (
        "restart-kind-pod",
        ROT,
        rot(rolloutRestartTargets=[{"kind": "Pod", "name": "p"}]),
        "schema",
        "must be one of",
    ),
    (
        "restart-name-path",
        ROT,
        rot(rolloutRestartTargets=[{"kind": "Deployment", "name": "../etc"}]),
        "schema",
        "does not match",
    ),
    (
        "restart-too-many",
        ROT,
        rot(rolloutRestartTargets=[{"kind": "Deployment", "name": f"d{i}"} for i in range(33)]),
        "schema",
        "more than 32",
    ),
    ("suspend-string", ROT, rot(suspend="false"), "schema", "must be boolean"),
    # ServiceAccount: spec.serverRef
    (
        "server-ref-kind-typo",
        SA,
        {"serverRef": {"kind": "ZenmlServer", "name": "prod"}},
        "schema",
        "must be one of",
    ),
    ("server-ref-name-missing", SA, {"serverRef": {"kind": ZS}}, "schema", "required"),
    ("server-ref-name-path", SA, {"serverRef": {**GOOD_REF, "name": "a/b"}}, "schema", "match"),
    # team A naming team B's server (and credentials)
    (
        "server-ref-with-namespace",
        SA,
        {"serverRef": {"kind": ZS, "name": "dev", "namespace": "team-b"}},
        "cel",
        "serverRef.namespace is not allowed",
    ),
    # data keys a server adds, under the name of another data key
    (
        "data-key-pro-api-url-is-url",
        SA,
        template(keys={"proApiUrl": "ZENML_STORE_URL"}),
        "cel",
        "must differ",
    ),
    (
        "data-key-verify-ssl-is-api-key",
        SA,
        template(keys={"verifySsl": "ZENML_STORE_API_KEY"}),
        "cel",
        "must differ",
    ),
    ("data-key-pro-api-url-invalid", SA, template(keys={"proApiUrl": "a b"}), "schema", "match"),
    # ZenMLServer / ClusterZenMLServer
    ("server-url-no-scheme", ZS, server(url="zenml.example.com"), "schema", "does not match"),
    ("server-url-other-scheme", ZS, server(url="ftp://zenml.example.com"), "schema", "match"),
    ("server-url-with-query", ZS, server(url="https://z.example.com/?a=b"), "schema", "match"),
    ("server-url-with-space", ZS, server(url="https://z example.com"), "schema", "match"),
    ("server-url-empty", ZS, server(url=""), "schema", "does not match"),
    ("server-url-huge", ZS, server(url="https://z/" + "a" * 2048), "schema", "longer than 2048"),
    ("server-url-missing", ZS, drop(GOOD_SERVER, "url"), "schema", "required"),
    ("server-secret-url-bad", ZS, server(secretUrl="zenml:8080"), "schema", "does not match"),
    ("server-pro-api-url-bad", ZS, server(proApiUrl="cloudapi.zenml.io"), "schema", "match"),
    ("server-credentials-missing", ZS, drop(GOOD_SERVER, "credentials"), "schema", "required"),
    ("server-credentials-empty", ZS, server(credentials={}), "schema", "required"),
    (
        "server-credentials-secret-name-upper",
        ZS,
        server(credentials={"secretName": "Admin"}),
        "schema",
        "does not match",
    ),
    (
        "server-credentials-with-namespace",
        ZS,
        server(credentials={"secretName": "zenml-admin", "namespace": "zenml"}),
        "cel",
        "only for a ClusterZenMLServer",
    ),
    (
        "cluster-server-credentials-without-namespace",
        CZS,
        cluster_server(credentials={"secretName": "zenml-admin"}),
        "cel",
        "must name the namespace",
    ),
    ("server-ca-bundle-not-pem", ZS, server(caBundle="not a certificate"), "cel", "must be PEM"),
    (
        "server-ca-bundle-huge",
        ZS,
        server(caBundle="-----BEGIN CERTIFICATE-----" + "A" * 70000),
        "schema",
        "longer than 65536",
    ),
    ("server-tls-skip-field", ZS, server(insecureSkipVerify=True), "schema", "unknown field"),
    ("cluster-server-url-bad", CZS, cluster_server(url="//zenml"), "schema", "does not match"),
]

# (case, kind, spec, reason): what only the running operator can tell (the schema admits it).
_OPERATOR: list[tuple[str, str, dict[str, Any], str]] = [
    ("secret-name-of-unowned-secret", SA, key(secretName="{name}-taken"), "SecretConflict"),
    ("secret-name-of-other-resource", SA, key(secretName="{good}-main"), "SecretConflict"),
    # key b's explicit secretName is key a's default one: CEL only compares explicit names
    (
        "secret-name-clashes-with-default",
        SA,
        {"apiKeys": [{"name": "a"}, {"name": "b", "secretName": "{name}-a"}]},
        "InvalidSpec",
    ),
    ("zenml-name-of-foreign-account", SA, {"apiKeys": [{"name": "a"}]}, "NameConflict"),
    (
        "zenml-name-of-another-resource",
        SA,
        {"name": "{name}-shared", "apiKeys": [{"name": "a"}]},
        "NameConflict",
    ),
    # whoever may create a ServiceAccount would get keys of the operator's admin identity
    (
        "adopt-operators-own-account",
        SA,
        {"name": OPERATOR_ACCOUNT, "adopt": True, "apiKeys": [{"name": "a"}]},
        "NameConflict",
    ),
    # template annotations that overwrite the operator's own record in the Secret
    (
        "template-overwrites-bookkeeping",
        SA,
        template(annotations={"zenml.io/api-key-id": "bogus"}),
        "InvalidSpec",
    ),
    # metadata.name may be 253 characters; <name>-<key> then exceeds a Secret name's limit
    (
        "default-secret-name-too-long",
        SA,
        {"name": "long-{id}", "apiKeys": [{"name": "main"}]},
        "InvalidSpec",
    ),
    # a label key whose prefix is longer than a DNS subdomain (253): the CRD's CEL lets it
    # through, the Secret write would fail; the operator refuses it before any write
    (
        "label-key-prefix-too-long",
        SA,
        template(labels={"a" * 254 + "/x": "v"}),
        "InvalidSpec",
    ),
    (
        "rotation-of-missing-account",
        ROT,
        rot(serviceAccountName="{name}-nope"),
        "ServiceAccountNotFound",
    ),
    (
        "rotation-of-missing-key",
        ROT,
        rot(serviceAccountName="{good}", apiKeyName="nope"),
        "ApiKeyNotFound",
    ),
    # the good account's key is rotated by the good rotation already (older: it wins)
    ("two-rotations-one-key", ROT, rot(serviceAccountName="{good}"), "DuplicateRotation"),
    (
        "restart-target-missing",
        ROT,
        rot(
            serviceAccountName="{name}",
            retainPeriodMinutes=0,
            rolloutRestartTargets=[{"kind": "Deployment", "name": "{name}-nope"}],
        ),
        "RestartFailed",
    ),
    (
        "rotation-of-conflicting-key",
        ROT,
        rot(serviceAccountName="{name}-sa"),
        "ServiceAccountNotReady",
    ),
]

BAD_INPUT_CASES: list[BadInput] = [
    BadInput(kind, name, spec, layer, None) for name, kind, spec, layer, _ in _REFUSED
] + [BadInput(kind, name, spec, "operator", reason) for name, kind, spec, reason in _OPERATOR]

BAD_UPDATE_CASES: list[BadUpdate] = [
    BadUpdate(SA, "sa-name-renamed", {"name": "a"}, {"name": "b"}, "cel", None),
    BadUpdate(SA, "sa-name-removed", {"name": "a"}, {}, "cel", None),
    BadUpdate(
        SA,
        "server-ref-changed",
        {"serverRef": GOOD_REF},
        {"serverRef": {**GOOD_REF, "name": "dev"}},
        "cel",
        None,
    ),
    BadUpdate(
        SA,
        "server-ref-kind-changed",
        {"serverRef": {"kind": ZS, "name": "prod"}},
        {"serverRef": GOOD_REF},
        "cel",
        None,
    ),
    BadUpdate(SA, "server-ref-added", {}, {"serverRef": GOOD_REF}, "cel", None),
    BadUpdate(SA, "server-ref-removed", {"serverRef": GOOD_REF}, {}, "cel", None),
]

# The fragment each schema/CEL refusal must contain (it is refused for its own defect).
ERRORS: dict[str, str] = {name: fragment for name, _, _, _, fragment in _REFUSED}
ERRORS.update({"sa-name-renamed": "immutable", "sa-name-removed": "immutable"})
ERRORS.update(
    {
        name: "spec.serverRef is immutable"
        for name in (
            "server-ref-changed",
            "server-ref-kind-changed",
            "server-ref-added",
            "server-ref-removed",
        )
    }
)

# Schema/CEL cases the operator's own parsing accepts when no API server enforces the schema,
# and why. Every other one must end Ready=False InvalidSpec.
BYPASS_ACCEPTED: dict[str, str] = {
    "key-name-duplicate": "the model does not check apiKeys[].name uniqueness (the list-map does)",
    "secret-name-duplicate": "the model does not check secretName uniqueness (a CEL rule does)",
    "active-string": "pydantic's lax mode reads 'yes' as true",
    "adopt-number": "pydantic's lax mode reads 1 as true",
    "suspend-string": "pydantic's lax mode reads 'false' as false",
    "retention-string": "pydantic's lax mode reads '60' as 60",
    "period-too-short": "the 5m minimum is the CRD's (tests run the operator with shorter periods)",
    "period-absurd": "the 10-year maximum is the CRD's",
}
# Refused by the operator's parsing, but not applied to the running operator: a 1 MB spec is
# copied into every watch event and Kopf's last-handled annotation and only slows the test.
BYPASS_NOT_APPLIED = {"description-1mb"}
# ZenMLServer and ClusterZenMLServer cases: applied to the running operator too (their own
# Ready=False InvalidSpec); counted apart.
SERVER_CASES = {c for c, kind, *_ in _REFUSED if kind in SERVER_KINDS}
SERVER_PLURALS = {ZS: "zenmlservers", CZS: "clusterzenmlservers"}


def server_path(kind: str, name: str = "") -> str:
    where = f"namespaces/{NS}/" if kind == ZS else ""
    return f"/apis/zenml.io/v1alpha1/{where}{SERVER_PLURALS[kind]}" + (f"/{name}" if name else "")


# The figures the README quotes.
EXPECTED_COUNTS = {"schema": 63, "cel": 17, "operator": 14, "update": 6}


def layer_counts() -> Counter[str]:
    counts = Counter(case.layer for case in BAD_INPUT_CASES)
    counts["update"] = len(BAD_UPDATE_CASES)
    return counts


def fill(value: Any, **names: str) -> Any:
    """A case's spec with its placeholders ({name}, {good}, {id}) filled in."""
    if isinstance(value, str):
        for placeholder, text in names.items():
            value = value.replace("{" + placeholder + "}", text)
        return value
    if isinstance(value, dict):
        return {fill(k, **names): fill(v, **names) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, **names) for v in value]
    return value


def _without_cel(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _without_cel(v) for k, v in schema.items() if k != "x-kubernetes-validations"}
    if isinstance(schema, list):
        return [_without_cel(v) for v in schema]
    return schema


def openapi_errors(kind: str, spec: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """What the OpenAPI part alone refuses (strict: unknown fields too), CEL rules left out."""
    schema = crd_schema(kind)["properties"]["spec"]
    new = apply_defaults(schema, spec)
    previous = apply_defaults(schema, old) if old is not None else None
    return validate(_without_cel(schema), new, previous, "spec", strict=True)


# Cases where a CEL rule of the CRD fails to evaluate instead of answering (schema_tools
# raises CelEvaluationError: a bug in the rule or in the model of the API server, not a
# refusal). Strict xfail: fixing the cause makes these XPASS and fail until removed here.
# Cases whose CEL evaluation errored in schema_tools (strict xfails): none since the period
# rules are guarded by the pattern and type errors block CEL as on a real server.
CEL_EVALUATION_BUGS: dict[str, str] = {}


def _refused_cases() -> list[Any]:
    cases = [
        pytest.param(
            c.kind,
            c.spec,
            None,
            c.layer,
            id=c.name,
            marks=[
                pytest.mark.xfail(
                    strict=True, raises=CelEvaluationError, reason=CEL_EVALUATION_BUGS[c.name]
                )
            ]
            if c.name in CEL_EVALUATION_BUGS
            else [],
        )
        for c in BAD_INPUT_CASES
        if c.layer != "operator"
    ]
    cases += [pytest.param(c.kind, c.spec, c.old, c.layer, id=c.name) for c in BAD_UPDATE_CASES]
    return cases


@pytest.mark.parametrize(("kind", "spec", "old", "layer"), _refused_cases())
def test_schema_or_cel_refuses(
    request: pytest.FixtureRequest, kind: str, spec: dict[str, Any], old: Any, layer: str
) -> None:
    """Refused (strict, as `fieldValidation=Strict`) for its own defect, at its own layer."""
    case = request.node.callspec.id
    errors = admit(kind, spec, old)
    assert any(ERRORS[case] in e for e in errors), errors
    openapi = openapi_errors(kind, spec, old)
    if layer == "schema":
        assert openapi, f"{case}: the OpenAPI part admits it; only CEL refuses it: {errors}"
    else:
        assert openapi == [], f"{case}: the OpenAPI part refuses it already: {openapi}"


@pytest.mark.parametrize(
    "case", [c for c in BAD_INPUT_CASES if ERRORS.get(c.name) == "unknown field"], ids=str
)
def test_unknown_fields_are_pruned_without_strict(case: BadInput) -> None:
    """Without `fieldValidation=Strict` the API server drops an unknown field, it does not
    refuse it (what lands is the spec without it)."""
    assert admit(case.kind, case.spec, strict=False) == []


def test_operator_cases_pass_the_schema() -> None:
    """What only the operator can tell is admitted by the schema and CEL (else it is not
    the operator's to tell)."""
    names = {"name": "bad-0a1b2c3d", "good": "good-0a1b2c3d", "id": "0a1b2c3d"}
    refused = {
        c.name: admit(c.kind, fill(c.spec, **names))
        for c in BAD_INPUT_CASES
        if c.layer == "operator"
    }
    assert {name: errors for name, errors in refused.items() if errors} == {}


def test_good_specs_are_admitted() -> None:
    """The controls: the catalogue's cases fail for their defect, not for the base spec."""
    assert admit(ROT, GOOD_ROT) == []
    assert admit(SA, {"apiKeys": [{"name": "a", "secretName": "s"}]}) == []
    assert admit(SA, template(labels={"team": "ml"}, annotations={"example.com/x": "y"})) == []
    assert admit(SA, {"serverRef": GOOD_REF}) == []
    assert admit(SA, {"serverRef": GOOD_REF}, {"serverRef": GOOD_REF}) == []
    assert admit(ZS, GOOD_SERVER) == []
    assert admit(CZS, GOOD_CLUSTER_SERVER) == []
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    full = {"secretUrl": "http://zenml.zenml:8080", "proApiUrl": "https://cloudapi.zenml.io"}
    assert admit(ZS, server(caBundle=pem, **full)) == []


def operator_refuses(kind: str, spec: dict[str, Any]) -> bool:
    """Does the operator's own parsing refuse this spec (where no API server checks it)?"""
    body = {"metadata": {"name": "x", "namespace": NS}, "spec": copy.deepcopy(spec)}
    try:
        if kind == SA:
            parse_spec(body)
        elif kind == ZS:
            ZenMLServerSpec.model_validate(body["spec"])
        elif kind == CZS:
            ClusterZenMLServerSpec.model_validate(body["spec"])
        else:
            RotationReconciler(body, None).parse_spec()  # type: ignore[arg-type]
    except ReconcileProblem:
        return True
    except pydantic.ValidationError:
        return True
    return False


def test_operator_parsing_refuses_what_the_table_says() -> None:
    """With the schema bypassed, the operator's parsing refuses every schema/CEL case but the
    ones in BYPASS_ACCEPTED, and accepts exactly those (a fixed expectation both ways)."""
    cases = [c for c in BAD_INPUT_CASES if c.layer != "operator"]
    assert set(BYPASS_ACCEPTED) <= {c.name for c in cases}
    wrong = {
        c.name: "accepted" if c.name not in BYPASS_ACCEPTED else "refused"
        for c in cases
        if operator_refuses(c.kind, c.spec) == (c.name in BYPASS_ACCEPTED)
    }
    assert wrong == {}, wrong


# --- cases only the running operator can tell --------------------------------------------


@dataclass
class Ctx:
    cluster: Any
    zenml: Any
    good: str
    foreign: list[dict[str, Any]]
    twins: dict[str, tuple[str, str]]


async def _sa(ctx: Any, name: str, spec: dict[str, Any]) -> None:
    # Only what a real API server would admit reaches the operator here.
    assert admit(SA, spec) == [], spec
    await ctx.cluster.create(SA_LIST.format(ns=NS), sa_body(name, spec))


async def _rot(ctx: Any, name: str, spec: dict[str, Any], **meta: Any) -> None:
    assert admit(ROT, spec) == [], spec
    await ctx.cluster.create(ROT_LIST.format(ns=NS), rotation_body(name, spec, **meta))


Make = Callable[[Ctx, str, dict[str, Any]], Awaitable[None]]


async def applied(ctx: Ctx, name: str, spec: dict[str, Any]) -> None:
    await _sa(ctx, name, spec)


async def rotation_applied(ctx: Ctx, name: str, spec: dict[str, Any]) -> None:
    await _rot(ctx, name, spec)


async def unowned_secret(ctx: Ctx, name: str, spec: dict[str, Any]) -> None:
    ctx.foreign.append(await create_foreign_secret(ctx.cluster, f"{name}-taken"))
    await _sa(ctx, name, spec)


async def foreign_account(ctx: Ctx, name: str, spec: dict[str, Any]) -> None:
    await ctx.zenml.create_service_account(name, description="someone else's")
    await _sa(ctx, name, spec)


async def same_zenml_name(ctx: Ctx, name: str, spec: dict[str, Any]) -> None:
    # Two resources, one ZenML name, applied at once (a copy-paste in one GitOps commit).
    await asyncio.gather(_sa(ctx, f"{name}-twin", spec), _sa(ctx, name, spec))
    ctx.twins[name] = (f"{name}-twin", spec["name"])


async def rotation_duplicate(ctx: Ctx, name: str, spec: dict[str, Any]) -> None:
    # The older of two rotations of one key wins; creationTimestamps have whole seconds, so
    # wait until one created now is later than the good rotation's.
    good = ctx.cluster.emulator.get_object(f"zenml.io/v1alpha1/{ROT_PLURAL}", NS, ctx.good)
    created = datetime.datetime.fromisoformat(
        good["metadata"]["creationTimestamp"].replace("Z", "+00:00")
    )
    await ctx.cluster.wait_for(
        lambda: datetime.datetime.now(datetime.UTC).replace(microsecond=0) > created,
        timeout=3,
        interval=0.05,
        message="a creationTimestamp later than the good rotation's",
    )
    await _rot(ctx, name, spec)


async def rotation_restart_missing(ctx: Ctx, name: str, spec: dict[str, Any]) -> None:
    await _sa(ctx, name, {"apiKeys": [{"name": "main"}]})
    await _rot(ctx, name, spec, annotations={"zenml.io/rotate": "now"})


async def rotation_conflict(ctx: Ctx, name: str, spec: dict[str, Any]) -> None:
    ctx.foreign.append(await create_foreign_secret(ctx.cluster, f"{name}-main"))
    await _sa(ctx, f"{name}-sa", {"apiKeys": [{"name": "main", "secretName": f"{name}-main"}]})
    await _rot(ctx, name, spec)


# How each operator case is set up (the object named in the record reports the reason), and
# a prefix of its object's name (the too-long default Secret name needs a long one).
MAKE: dict[str, tuple[Make, str]] = {
    "secret-name-of-unowned-secret": (unowned_secret, "bad"),
    "secret-name-of-other-resource": (applied, "bad"),
    "secret-name-clashes-with-default": (applied, "bad"),
    "zenml-name-of-foreign-account": (foreign_account, "bad"),
    "zenml-name-of-another-resource": (same_zenml_name, "bad"),
    "adopt-operators-own-account": (applied, "bad"),
    "template-overwrites-bookkeeping": (applied, "bad"),
    "default-secret-name-too-long": (applied, "x" * 240),
    "label-key-prefix-too-long": (applied, "bad"),
    "rotation-of-missing-account": (rotation_applied, "bad"),
    "rotation-of-missing-key": (rotation_applied, "bad"),
    "two-rotations-one-key": (rotation_duplicate, "bad"),
    "restart-target-missing": (rotation_restart_missing, "bad"),
    "rotation-of-conflicting-key": (rotation_conflict, "bad"),
}
ROT_PLURAL = "apikeyrotations"


async def reason_of(cluster: Any, kind: str, name: str) -> tuple[str, str] | None:
    if kind == "twins":  # the loser of two resources with one ZenML name
        states = sorted(
            [await reason_of(cluster, SA, name), await reason_of(cluster, SA, f"{name}-twin")],
            key=str,
        )
        if states[0] and states[1] and states[1] == ("True", "Reconciled"):
            return states[0]
        return None
    # Read the emulator's state directly: polling ~60 objects over HTTP would load the one
    # event loop that also runs the operator.
    if kind in SERVER_KINDS:
        namespace = NS if kind == ZS else None
        obj = cluster.emulator.get_object(
            f"zenml.io/v1alpha1/{SERVER_PLURALS[kind]}", namespace, name
        )
        cond = ready(obj)
        return (cond["status"], cond["reason"]) if cond else None
    plural = "serviceaccounts" if kind == SA else "apikeyrotations"
    obj = cluster.emulator.get_object(f"zenml.io/v1alpha1/{plural}", NS, name)
    cond = ready(obj) if kind == SA else condition(obj)
    return (cond["status"], cond["reason"]) if cond else None


async def _with_good_account(ctx: Ctx) -> None:
    await _sa(ctx, ctx.good, {"apiKeys": [{"name": "main"}]})
    await _rot(ctx, ctx.good, {"serviceAccountName": ctx.good, "apiKeyName": "main"})


async def _settle(
    ctx: Ctx, expected: dict[str, tuple[str, str, tuple[str, str]]], timeout: float = 40
) -> None:
    """Wait until each object (id -> kind, name, (status, reason)) reports its condition and
    the good ServiceAccount is Ready; fail with what each one says."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        seen = {i: await reason_of(ctx.cluster, k, n) for i, (k, n, _) in expected.items()}
        good = await reason_of(ctx.cluster, SA, ctx.good)
        wrong = {i: (seen[i], want) for i, (_, _, want) in expected.items() if seen[i] != want}
        if not wrong and good == ("True", "Reconciled"):
            return
        if loop.time() > deadline:
            pytest.fail(f"good: {good}; not as expected (got, want): {wrong}")
        await asyncio.sleep(0.5)


async def _twins_stay_apart(ctx: Ctx) -> None:
    """The loser of two resources with one ZenML name stays out on later runs too (its intent
    record from the lost race must not make the winner's account look like its own)."""
    for name, (twin, shared) in ctx.twins.items():
        states = {n: await reason_of(ctx.cluster, SA, n) for n in (name, twin)}
        loser = next(n for n, state in states.items() if state == ("False", "NameConflict"))
        winner = twin if loser == name else name
        obj = await ctx.cluster.patch(sa_path(loser), {"spec": {"description": "again"}})
        generation = obj["metadata"]["generation"]

        async def judged_again(loser: str = loser, generation: int = generation) -> Any:
            cond = ready(await ctx.cluster.get(sa_path(loser)))
            return cond if cond and cond.get("observedGeneration") == generation else None

        cond = await ctx.cluster.wait_for(judged_again, timeout=20, interval=0.2)
        assert cond["reason"] == "NameConflict", cond
        assert "createRequestedAt" not in (await ctx.cluster.get(sa_path(loser)))["status"]
        assert await reason_of(ctx.cluster, SA, winner) == ("True", "Reconciled")
        account = await ctx.zenml.get_service_account(shared)
        assert account.description == ""  # the loser's spec never reached it
        assert [k.name for k in await ctx.zenml.list_api_keys(account.id)] == ["a"]


REPORTED: dict[str, int] = {}


async def test_operator_reports_what_only_it_can_tell(
    cluster, start_operator, zenml_client, operator_login_cached
) -> None:
    operator, _ = await start_operator(retry_delay=2.0)
    ctx = Ctx(cluster, zenml_client, unique("good"), [], {})
    await _with_good_account(ctx)
    cases = [c for c in BAD_INPUT_CASES if c.layer == "operator"]
    assert {c.name for c in cases} == set(MAKE)
    expected = {}
    for case in cases:
        make, prefix = MAKE[case.name]
        name = unique(prefix)
        spec = fill(case.spec, name=name, good=ctx.good, id=name[-8:])
        await make(ctx, name, spec)
        kind = "twins" if name in ctx.twins else case.kind
        expected[case.name] = (kind, name, ("False", case.reason))
    await _settle(ctx, expected)
    assert operator.running
    await _twins_stay_apart(ctx)
    # Nothing was touched on the way: foreign Secrets intact, the operator's own account too.
    for secret in ctx.foreign:
        assert await cluster.get(secret_path(secret["metadata"]["name"])) == secret
    own = await zenml_client.get_service_account(OPERATOR_ACCOUNT)
    assert own.active
    keys = [k.name for k in await zenml_client.list_api_keys(own.id)]
    assert keys == ["default"], keys
    REPORTED["operator"] = len(expected)


async def test_operator_refuses_schema_violations_by_itself(
    cluster, start_operator, zenml_client, operator_login_cached
) -> None:
    """Where no API server enforces the schema, the operator is the last line of defence:
    every schema/CEL case but BYPASS_ACCEPTED ends Ready=False InvalidSpec, creates nothing."""
    operator, _ = await start_operator(retry_delay=2.0)
    ctx = Ctx(cluster, zenml_client, unique("good"), [], {})
    await _with_good_account(ctx)
    cases = [
        c
        for c in BAD_INPUT_CASES
        if c.layer != "operator" and c.name not in {*BYPASS_ACCEPTED, *BYPASS_NOT_APPLIED}
    ]
    expected = {}
    for case in cases:
        name = unique("raw")
        # Straight to the emulated API: no schema on the way (as with kmock).
        if case.kind == SA:
            await cluster.create(SA_LIST.format(ns=NS), sa_body(name, case.spec))
        elif case.kind in SERVER_KINDS:
            body = {
                "apiVersion": "zenml.io/v1alpha1",
                "kind": case.kind,
                "metadata": {"name": name},
                "spec": case.spec,
            }
            await cluster.create(server_path(case.kind), body)
        else:
            await cluster.create(ROT_LIST.format(ns=NS), rotation_body(name, case.spec))
        expected[case.name] = (case.kind, name, ("False", "InvalidSpec"))
    await _settle(ctx, expected)
    assert operator.running
    secrets = (await cluster.get(SECRET_LIST.format(ns=NS)))["items"]
    assert [s for s in secrets if s["metadata"]["name"].startswith("raw-")] == []
    refused = len(BAD_INPUT_CASES) - EXPECTED_COUNTS["operator"] - len(BYPASS_ACCEPTED)
    assert len(expected) + len(BYPASS_NOT_APPLIED) == refused
    assert {c for c in expected if c in SERVER_CASES} == SERVER_CASES
    REPORTED["bypass"] = len(expected)


def test_bad_input_counts(capsys) -> None:
    """The catalogue's figures (asserted: the README quotes them), and what ran here."""
    counts = layer_counts()
    assert dict(counts) == EXPECTED_COUNTS, counts
    names = [c.name for c in BAD_INPUT_CASES] + [c.name for c in BAD_UPDATE_CASES]
    assert len(names) == len(set(names)), "case names must be unique"
    assert set(ERRORS) == {n for n in names if n not in MAKE}
    total = sum(counts.values())
    by_schema = counts["schema"] + counts["cel"] + counts["update"]
    with capsys.disabled():
        print(
            f"\nbad input: {total} bad inputs: {by_schema} refused by the CRD"
            f" ({counts['schema']} by the OpenAPI schema, {counts['cel'] + counts['update']}"
            f" by CEL rules, {counts['update']} of them updates), {counts['operator']} reported"
            f" by the operator (Ready=False + reason); with the schema bypassed the operator"
            f" refuses {by_schema - counts['update'] - len(BYPASS_ACCEPTED)} of the"
            f" {by_schema - counts['update']} creates itself; run here: operator"
            f" {REPORTED.get('operator', 0)}, bypass {REPORTED.get('bypass', 0)}"
        )
