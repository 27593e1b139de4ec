"""Shared checks of the reliability suites: "has everything converged, and is nothing leaked?"."""

from __future__ import annotations

import asyncio
import base64
import datetime
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest

from e2e.conftest import logs_in_as, ready
from fixtures_kube import Cluster
from zenml_operator import keyfamily as kf
from zenml_operator import secret_record as record
from zenml_operator import secrets as sec
from zenml_operator import zenml_api as zc

NS = "default"
SA_LIST = "/apis/zenml.io/v1alpha1/namespaces/{ns}/serviceaccounts"
ROT_LIST = "/apis/zenml.io/v1alpha1/namespaces/{ns}/apikeyrotations"
SECRET_LIST = "/api/v1/namespaces/{ns}/secrets"
DEPLOY_LIST = "/apis/apps/v1/namespaces/{ns}/deployments"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def sa_path(name: str, ns: str = NS) -> str:
    return f"{SA_LIST.format(ns=ns)}/{name}"


def rot_path(name: str, ns: str = NS) -> str:
    return f"{ROT_LIST.format(ns=ns)}/{name}"


def secret_path(name: str, ns: str = NS) -> str:
    return f"{SECRET_LIST.format(ns=ns)}/{name}"


def sa_body(name: str, spec: dict[str, Any], ns: str = NS) -> dict[str, Any]:
    return {
        "apiVersion": "zenml.io/v1alpha1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def rotation_body(name: str, spec: dict[str, Any], ns: str = NS, **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "zenml.io/v1alpha1",
        "kind": "ApiKeyRotation",
        "metadata": {"name": name, "namespace": ns, **meta},
        "spec": spec,
    }


def deployment_body(name: str, ns: str = NS) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]},
            },
        },
    }


def secret_value(secret: dict[str, Any], key: str = "ZENML_STORE_API_KEY") -> str:
    return base64.b64decode(secret["data"][key]).decode()


def condition(obj: dict[str, Any] | None, type_: str = "Ready") -> dict[str, Any] | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return cond
    return None


async def create_foreign_secret(cluster: Cluster, name: str, ns: str = NS) -> dict[str, Any]:
    """A Secret the operator does not own, dressed up to look like one of its own."""
    return await cluster.create(
        SECRET_LIST.format(ns=ns),
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": name,
                "labels": {
                    sec.LABEL_MANAGED_BY: sec.MANAGED_BY,
                    sec.LABEL_ACCOUNT: "whoever",
                    sec.LABEL_KEY: "main",
                },
                "annotations": {record.ANN_KEY_ID: "not-a-real-key"},
            },
            "data": {"ZENML_STORE_API_KEY": base64.b64encode(b"precious").decode()},
        },
    )


def writes_to(cluster: Cluster, plural: str, name: str, ns: str = NS) -> int:
    """How many changes the emulator committed to one object (creation included)."""
    return sum(
        1
        for c in cluster.emulator._history
        if c.resource.plural == plural and c.name == name and c.namespace == ns
    )


@dataclass
class Expected:
    """The declared end state a scenario must converge to."""

    live: list[str] = field(default_factory=list)  # ServiceAccount resources that exist
    # Deleted ServiceAccount resources: name -> (ZenML account name, policy, Secret names)
    gone: dict[str, tuple[str, str, list[str]]] = field(default_factory=dict)
    foreign: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> snapshot


async def problems(
    cluster: Cluster, zenml: zc.ZenMLClient, url: str, expected: Expected, *, login: bool
) -> list[str]:
    """What still differs from the declared state (empty: converged and nothing leaked)."""
    found: list[str] = []
    now = datetime.datetime.now(datetime.UTC)
    for name in expected.live:
        obj = await cluster.get(sa_path(name))
        if obj is None:
            found.append(f"{name}: resource missing")
            continue
        cond = ready(obj)
        if not cond or cond["status"] != "True":
            found.append(f"{name}: not Ready for its generation: {condition(obj)}")
            continue
        spec = obj.get("spec") or {}
        account_name = spec.get("name") or name
        try:
            account = await zenml.get_service_account(account_name)
        except zc.NotFoundError:
            found.append(f"{name}: ZenML account {account_name!r} missing")
            continue
        if obj["status"].get("accountId") != account.id:
            found.append(f"{name}: status.accountId is not the account's id")
        keys = await zenml.list_api_keys(account.id)
        declared = [k for k in spec.get("apiKeys") or []]
        bases = [k["name"] for k in declared]
        for key in keys:
            if not any(kf.generation(key.name, base) is not None for base in bases):
                found.append(f"{name}: undeclared key {key.name!r} still in ZenML")
        for key in declared:
            secret_name = key.get("secretName") or f"{name}-{key['name']}"
            secret = await cluster.get(secret_path(secret_name))
            members = kf.family(keys, key["name"])
            if not members:
                found.append(f"{name}: declared key {key['name']!r} missing in ZenML")
                continue
            if secret is None:
                found.append(f"{name}: Secret {secret_name!r} missing")
                continue
            if not sec.is_owned_by(secret, obj["metadata"]["uid"]):
                found.append(f"{name}: Secret {secret_name!r} not owned by the resource")
            held = record.SecretRecord.of(secret).key_id
            if held not in {m.id for m in members}:
                found.append(f"{name}: Secret {secret_name!r} names no key of its family")
                continue
            retention = record.SecretRecord.of(secret).retention
            # Besides the current key: the previous one while its retention lasts, or after
            # it, deactivated (refused with 401) until the next rotation deletes it.
            extra = [
                m
                for m in members
                if m.id != held
                and not retention.protects(m.id, now)
                and not (m.id == retention.key_id and not m.active)
            ]
            if extra or len(members) > 2:
                found.append(
                    f"{name}: key {key['name']!r} has {len(members)} generations in ZenML"
                    f" ({[m.name for m in members]}); unretained: {[m.name for m in extra]}"
                )
            active = key.get("active", True) and spec.get("active", True)
            if login and active:
                data_key = ((key.get("secretTemplate") or {}).get("keys") or {}).get(
                    "apiKey", "ZENML_STORE_API_KEY"
                )
                who = await logs_in_as(url, secret_value(secret, data_key))
                if who != account_name:
                    found.append(f"{name}: Secret {secret_name!r} logs in as {who!r}")
    for name, (account_name, policy, secret_names) in expected.gone.items():
        if await cluster.get(sa_path(name)) is not None:
            found.append(f"{name}: resource still exists")
        for secret_name in secret_names:
            if await cluster.get(secret_path(secret_name)) is not None:
                found.append(f"{name}: Secret {secret_name!r} outlived its resource")
        try:
            account = await zenml.get_service_account(account_name)
        except zc.NotFoundError:
            account = None
        if policy == "Delete" and account is not None:
            found.append(f"{name}: ZenML account not deleted (policy Delete)")
        if policy == "Deactivate" and (account is None or account.active):
            found.append(f"{name}: ZenML account not deactivated (policy Deactivate)")
    for path, snapshot in expected.foreign.items():
        if await cluster.get(path) != snapshot:
            found.append(f"foreign Secret {path} was changed")
    return found


async def wait_converged(
    cluster: Cluster,
    zenml: zc.ZenMLClient,
    url: str,
    expected: Expected,
    *,
    timeout: float = 30.0,
) -> None:
    """Poll the cheap checks until they pass, then the logins (bcrypt on the server) once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        last = await problems(cluster, zenml, url, expected, login=False)
        if not last:
            break
        if loop.time() > deadline:
            pytest.fail(f"not converged after {timeout}s: {last}")
        await asyncio.sleep(0.2)
    final = await problems(cluster, zenml, url, expected, login=True)
    assert final == [], final


async def wait_warnings(
    cluster: Cluster, reason: str, expected: set[tuple[str, str]], timeout: float = 10
) -> None:
    """Wait until each (kind, name) got a Warning Event with `reason` (Kopf posts them from a
    queue, a moment after the status that carries the same reason)."""

    async def warned() -> set[tuple[str, str]]:
        events = (await cluster.get(f"/api/v1/namespaces/{NS}/events"))["items"]
        return {
            (e["involvedObject"]["kind"], e["involvedObject"]["name"])
            for e in events
            if e["reason"] == reason and e["type"] == "Warning"
        }

    async def done() -> bool:
        return expected <= await warned()

    await cluster.wait_for(done, timeout=timeout, interval=0.1, message=f"{reason} Events")
