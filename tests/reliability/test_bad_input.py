"""Bad input: a catalogue of malformed and hostile specs for both kinds.

Each case is refused at the earliest place that can tell:
- the CRD schema and its CEL rules (what the API server enforces), applied here with
  `schema_tools.admit` (defaults, OpenAPI checks, CEL via cel-python);
- the running operator, for what only it can see (other objects, ZenML, the operator's own
  identity): the objects are applied through the emulated API to a running operator, and each
  must end Ready=False with its specific reason, while a good ServiceAccount created alongside
  still becomes Ready and the operator keeps running.

The schema cases that the operator's own parsing also refuses are then applied to the
operator as if the API server did not enforce the schema (the operator is the last line of
defence there): each must end Ready=False InvalidSpec and touch nothing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

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
from schema_tools import admit
from zenml_operator.handlers.common import ReconcileProblem
from zenml_operator.handlers.rotation import RotationReconciler
from zenml_operator.handlers.service_account import parse_spec

SA = "ServiceAccount"
ROT = "ApiKeyRotation"
GOOD_ROT = {"serviceAccountName": "x", "apiKeyName": "main", "period": "2h"}


def rot(**fields: Any) -> dict[str, Any]:
    return {**GOOD_ROT, **fields}


def key_with(**template: Any) -> dict[str, Any]:
    return {"apiKeys": [{"name": "a", "secretTemplate": template}]}


def drop(spec: dict[str, Any], field: str) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k != field}


# (id, kind, spec, old spec for an update or None, fragment of the expected error)
SCHEMA_CASES: list[tuple[str, str, dict[str, Any], dict[str, Any] | None, str]] = [
    # ServiceAccount: names
    ("sa-name-not-dns", SA, {"name": "Not_DNS"}, None, "does not match"),
    ("sa-name-leading-dash", SA, {"name": "-ml"}, None, "does not match"),
    ("sa-name-with-dot", SA, {"name": "ml.pipelines"}, None, "does not match"),
    ("sa-name-too-long", SA, {"name": "a" * 64}, None, "longer than 63"),
    ("sa-name-renamed", SA, {"name": "b"}, {"name": "a"}, "immutable"),
    ("sa-name-removed", SA, {}, {"name": "a"}, "immutable"),
    ("key-name-empty", SA, {"apiKeys": [{"name": ""}]}, None, "shorter than 1"),
    # a declared name that looks like a rotated generation of another key
    ("key-name-generation", SA, {"apiKeys": [{"name": "main.r1"}]}, None, "does not match"),
    ("key-name-missing", SA, {"apiKeys": [{"description": "x"}]}, None, "required"),
    ("key-name-duplicate", SA, {"apiKeys": [{"name": "a"}, {"name": "a"}]}, None, "unique"),
    (
        "secret-name-duplicate",
        SA,
        {"apiKeys": [{"name": "a", "secretName": "s"}, {"name": "b", "secretName": "s"}]},
        None,
        "secretName must be unique",
    ),
    # a Secret in another namespace
    (
        "secret-name-with-slash",
        SA,
        {"apiKeys": [{"name": "a", "secretName": "kube-system/creds"}]},
        None,
        "does not match",
    ),
    (
        "secret-namespace-field",
        SA,
        {"apiKeys": [{"name": "a", "namespace": "kube-system"}]},
        None,
        "unknown field",
    ),
    ("secret-name-upper", SA, {"apiKeys": [{"name": "a", "secretName": "UP"}]}, None, "match"),
    (
        "secret-name-too-long",
        SA,
        {"apiKeys": [{"name": "a", "secretName": "s" * 254}]},
        None,
        "longer than 253",
    ),
    # huge values
    ("description-1mb", SA, {"description": "x" * 1_000_000}, None, "longer than 1024"),
    (
        "key-description-huge",
        SA,
        {"apiKeys": [{"name": "a", "description": "x" * 5000}]},
        None,
        "longer than 1024",
    ),
    ("too-many-keys", SA, {"apiKeys": [{"name": f"k{i}"} for i in range(33)]}, None, "more than"),
    (
        "too-many-labels",
        SA,
        {
            "apiKeys": [
                {"name": "a", "secretTemplate": {"labels": {f"l{i}": "v" for i in range(65)}}}
            ]
        },
        None,
        "more than 64",
    ),
    # data keys
    (
        "data-keys-equal",
        SA,
        {"apiKeys": [{"name": "a", "secretTemplate": {"keys": {"url": "K", "apiKey": "K"}}}]},
        None,
        "must differ",
    ),
    (
        "data-key-invalid",
        SA,
        {"apiKeys": [{"name": "a", "secretTemplate": {"keys": {"apiKey": "bad key!"}}}]},
        None,
        "does not match",
    ),
    (
        "data-key-empty",
        SA,
        {"apiKeys": [{"name": "a", "secretTemplate": {"keys": {"url": ""}}}]},
        None,
        "does not match",
    ),
    # enums, types, unknown fields
    ("deletion-policy-unknown", SA, {"deletionPolicy": "Purge"}, None, "must be one of"),
    ("active-string", SA, {"active": "yes"}, None, "must be boolean"),
    ("adopt-number", SA, {"adopt": 1}, None, "must be boolean"),
    ("api-keys-string", SA, {"apiKeys": "main"}, None, "must be array"),
    ("api-key-string", SA, {"apiKeys": ["main"]}, None, "must be object"),
    (
        "labels-not-strings",
        SA,
        {"apiKeys": [{"name": "a", "secretTemplate": {"labels": {"a": 1}}}]},
        None,
        "must be string",
    ),
    ("sa-unknown-field", SA, {"apiKey": [{"name": "typo"}]}, None, "unknown field"),
    # ApiKeyRotation: durations
    ("period-equals-retention", ROT, rot(period="1h", retainPeriodMinutes=60), None, "longer than"),
    ("period-below-retention", ROT, rot(period="90m", retainPeriodMinutes=120), None, "longer"),
    ("period-negative", ROT, rot(period="-5m"), None, "does not match"),
    ("period-zero", ROT, rot(period="0s", retainPeriodMinutes=0), None, "at least 5m"),
    ("period-too-short", ROT, rot(period="1m", retainPeriodMinutes=0), None, "at least 5m"),
    ("period-absurd", ROT, rot(period="999999h"), None, "at most 87600h"),
    ("period-days", ROT, rot(period="30d"), None, "does not match"),
    ("period-malformed", ROT, rot(period="1h30"), None, "does not match"),
    ("period-empty", ROT, rot(period=""), None, "does not match"),
    ("period-huge-string", ROT, rot(period="1h" * 40), None, "longer than 32"),
    ("period-number", ROT, rot(period=720), None, "must be string"),
    ("retention-negative", ROT, rot(retainPeriodMinutes=-1), None, "below 0"),
    ("retention-absurd", ROT, rot(retainPeriodMinutes=10**9), None, "above"),
    ("retention-string", ROT, rot(retainPeriodMinutes="60"), None, "must be integer"),
    # ApiKeyRotation: references
    ("rot-sa-other-namespace", ROT, rot(serviceAccountName="team-a/ml"), None, "does not match"),
    ("rot-sa-missing-field", ROT, drop(GOOD_ROT, "serviceAccountName"), None, "required"),
    ("rot-key-generation", ROT, rot(apiKeyName="main.r1"), None, "does not match"),
    ("rot-namespace-field", ROT, rot(namespace="kube-system"), None, "unknown field"),
    (
        "restart-kind-pod",
        ROT,
        rot(rolloutRestartTargets=[{"kind": "Pod", "name": "p"}]),
        None,
        "must be one of",
    ),
    (
        "restart-name-path",
        ROT,
        rot(rolloutRestartTargets=[{"kind": "Deployment", "name": "../etc"}]),
        None,
        "does not match",
    ),
    (
        "restart-too-many",
        ROT,
        rot(rolloutRestartTargets=[{"kind": "Deployment", "name": f"d{i}"} for i in range(33)]),
        None,
        "more than 32",
    ),
    ("suspend-string", ROT, rot(suspend="false"), None, "must be boolean"),
]


@pytest.mark.parametrize(
    ("kind", "spec", "old", "fragment"),
    [pytest.param(k, s, o, f, id=i) for i, k, s, o, f in SCHEMA_CASES],
)
def test_schema_rejects(kind: str, spec: dict[str, Any], old: Any, fragment: str) -> None:
    errors = admit(kind, spec, old)
    assert any(fragment in e for e in errors), errors


def test_good_specs_are_admitted() -> None:
    """The controls: the catalogue's cases fail for their defect, not for the base spec."""
    assert admit(ROT, GOOD_ROT) == []
    assert admit(SA, {"apiKeys": [{"name": "a", "secretName": "s"}]}) == []


def operator_refuses(kind: str, spec: dict[str, Any]) -> bool:
    """Does the operator's own parsing refuse this spec (where no API server checks it)?"""
    body = {"metadata": {"name": "x", "namespace": NS}, "spec": spec}
    try:
        if kind == SA:
            parse_spec(body)
        else:
            RotationReconciler(body, None).parse_spec()  # type: ignore[arg-type]
    except ReconcileProblem:
        return True
    except pydantic.ValidationError:
        return True
    return False


# --- cases only the running operator can tell --------------------------------------------


@dataclass
class Case:
    id: str
    kind: str  # the kind of the object that must report the problem
    name: str
    reason: str
    make: Callable[[Any, str], Awaitable[None]]  # (ctx, name) -> creates the objects


async def _sa(ctx: Any, name: str, spec: dict[str, Any]) -> None:
    await ctx.cluster.create(SA_LIST.format(ns=NS), sa_body(name, spec))


async def _rot(ctx: Any, name: str, spec: dict[str, Any], **meta: Any) -> None:
    await ctx.cluster.create(ROT_LIST.format(ns=NS), rotation_body(name, spec, **meta))


async def unowned_secret(ctx: Any, name: str) -> None:
    ctx.foreign.append(await create_foreign_secret(ctx.cluster, f"{name}-taken"))
    await _sa(ctx, name, {"apiKeys": [{"name": "a", "secretName": f"{name}-taken"}]})


async def other_resources_secret(ctx: Any, name: str) -> None:
    # The good ServiceAccount's Secret: owned, but by another resource.
    await _sa(ctx, name, {"apiKeys": [{"name": "a", "secretName": f"{ctx.good}-main"}]})


async def default_secret_name_clash(ctx: Any, name: str) -> None:
    # Key b's explicit secretName is key a's default one: CEL only compares explicit names.
    await _sa(ctx, name, {"apiKeys": [{"name": "a"}, {"name": "b", "secretName": f"{name}-a"}]})


async def foreign_account(ctx: Any, name: str) -> None:
    await ctx.zenml.create_service_account(name, description="someone else's")
    await _sa(ctx, name, {"apiKeys": [{"name": "a"}]})


async def same_zenml_name(ctx: Any, name: str) -> None:
    # Two resources, one ZenML name, applied at once (a copy-paste in one GitOps commit).
    shared = f"{name}-shared"
    await asyncio.gather(
        _sa(ctx, f"{name}-twin", {"name": shared, "apiKeys": [{"name": "a"}]}),
        _sa(ctx, name, {"name": shared, "apiKeys": [{"name": "a"}]}),
    )
    ctx.twins[name] = (f"{name}-twin", shared)


async def operators_own_account(ctx: Any, name: str) -> None:
    # Whoever may create a ServiceAccount would get keys of the operator's admin identity.
    await _sa(ctx, name, {"name": OPERATOR_ACCOUNT, "adopt": True, "apiKeys": [{"name": "a"}]})


async def hijacked_bookkeeping(ctx: Any, name: str) -> None:
    # Template annotations that overwrite the operator's own record in the Secret.
    template = {"annotations": {"zenml.io/api-key-id": "bogus"}}
    await _sa(ctx, name, {"apiKeys": [{"name": "a", "secretTemplate": template}]})


async def too_long_secret_name(ctx: Any, name: str) -> None:
    # metadata.name may be 253 characters; <name>-<key> then exceeds a Secret name's limit.
    await _sa(ctx, name, {"name": f"long{name[-9:]}", "apiKeys": [{"name": "main"}]})


async def rotation_no_account(ctx: Any, name: str) -> None:
    await _rot(ctx, name, {"serviceAccountName": f"{name}-nope", "apiKeyName": "main"})


async def rotation_missing_key(ctx: Any, name: str) -> None:
    await _rot(ctx, name, {"serviceAccountName": ctx.good, "apiKeyName": "nope"})


async def rotation_duplicate(ctx: Any, name: str) -> None:
    # The good account's key is rotated by ctx.good already (created first, so it wins).
    await _rot(ctx, name, {"serviceAccountName": ctx.good, "apiKeyName": "main"})


async def rotation_restart_missing(ctx: Any, name: str) -> None:
    await _sa(ctx, name, {"apiKeys": [{"name": "main"}]})
    spec = {
        "serviceAccountName": name,
        "apiKeyName": "main",
        "retainPeriodMinutes": 0,
        "rolloutRestartTargets": [{"kind": "Deployment", "name": f"{name}-nope"}],
    }
    await _rot(ctx, name, spec, annotations={"zenml.io/rotate": "now"})


async def rotation_conflict(ctx: Any, name: str) -> None:
    ctx.foreign.append(await create_foreign_secret(ctx.cluster, f"{name}-main"))
    await _sa(ctx, f"{name}-sa", {"apiKeys": [{"name": "main", "secretName": f"{name}-main"}]})
    await _rot(ctx, name, {"serviceAccountName": f"{name}-sa", "apiKeyName": "main"})


OPERATOR_CASES = [
    Case("secret-name-of-unowned-secret", SA, "", "SecretConflict", unowned_secret),
    Case("secret-name-of-other-resource", SA, "", "SecretConflict", other_resources_secret),
    Case("secret-name-clashes-with-default", SA, "", "InvalidSpec", default_secret_name_clash),
    Case("zenml-name-of-foreign-account", SA, "", "NameConflict", foreign_account),
    Case("zenml-name-of-another-resource", "twins", "", "NameConflict", same_zenml_name),
    Case("adopt-operators-own-account", SA, "", "NameConflict", operators_own_account),
    Case("template-overwrites-bookkeeping", SA, "", "InvalidSpec", hijacked_bookkeeping),
    Case("default-secret-name-too-long", SA, "x" * 240, "InvalidSpec", too_long_secret_name),
    Case("rotation-of-missing-account", ROT, "", "ServiceAccountNotFound", rotation_no_account),
    Case("rotation-of-missing-key", ROT, "", "ApiKeyNotFound", rotation_missing_key),
    Case("two-rotations-one-key", ROT, "", "DuplicateRotation", rotation_duplicate),
    Case("restart-target-missing", ROT, "", "RestartFailed", rotation_restart_missing),
    Case("rotation-of-conflicting-key", ROT, "", "ServiceAccountNotReady", rotation_conflict),
]


@dataclass
class Ctx:
    cluster: Any
    zenml: Any
    good: str
    foreign: list[dict[str, Any]]
    twins: dict[str, tuple[str, str]]


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
    await asyncio.sleep(1.1)  # creationTimestamps have seconds: the good rotation is older
    expected = {}
    for case in OPERATOR_CASES:
        name = case.name + unique("") if case.name else unique("bad")
        await case.make(ctx, name)
        expected[case.id] = (case.kind, name, ("False", case.reason))
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
    REPORTED["operator"] = len(OPERATOR_CASES)


async def test_operator_refuses_schema_violations_by_itself(
    cluster, start_operator, zenml_client, operator_login_cached
) -> None:
    """Where no API server enforces the schema, the operator is the last line of defence: the
    schema cases its own parsing refuses end Ready=False InvalidSpec and create nothing."""
    operator, _ = await start_operator(retry_delay=2.0)
    ctx = Ctx(cluster, zenml_client, unique("good"), [], {})
    await _with_good_account(ctx)
    expected = {}
    for case_id, kind, spec, old, _ in SCHEMA_CASES:
        # (The 1 MB description stays out: copied into every watch event and Kopf's
        # last-handled annotation, it only slows the emulator down.)
        if old is None and operator_refuses(kind, spec) and len(json.dumps(spec)) < 65536:
            name = unique("raw")
            await (_sa if kind == SA else _rot)(ctx, name, spec)
            expected[case_id] = (kind, name, ("False", "InvalidSpec"))
    await _settle(ctx, expected)
    assert operator.running
    secrets = (await cluster.get(SECRET_LIST.format(ns=NS)))["items"]
    assert [s for s in secrets if s["metadata"]["name"].startswith("raw-")] == []
    REPORTED["bypass"] = len(expected)


def test_bad_input_counts(capsys) -> None:
    """Prints the catalogue's counts (after the tests above, in file order)."""
    schema_count = len(SCHEMA_CASES)
    assert schema_count + len(OPERATOR_CASES) >= 30
    with capsys.disabled():
        print(
            f"\nbad input: {schema_count + len(OPERATOR_CASES)} bad inputs tried, "
            f"{schema_count} rejected by schema/CEL, {len(OPERATOR_CASES)} reported by the "
            f"operator (Ready=False + reason); {REPORTED.get('bypass', 0)} of the schema cases "
            "also refused by the operator itself when the schema is bypassed"
        )
