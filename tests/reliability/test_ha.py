"""HA: two operators against one cluster, coordinated by Kopf peering, never rotate twice.

Both run the whole operator (`build_registry`) with peering as the chart sets it up for
replicaCount > 1 (`--peering <name>`: mandatory peering, a KopfPeering object per watched
namespace, different priorities). The leader does all the work; the standby is paused. Checks:
- exactly ROTATIONS rotations (LEADER_ROTATIONS by the leader, the rest by the standby: the test
  suspends the schedule when a phase has made its share), at most one per period; every
  write of a new key value into the Secret carries the next count (no count written twice,
  none skipped); every rotated key created is the one its rotation wrote (no key created twice
  for one rotation, no orphan), and each operator created exactly its phase's keys;
- the leader stops (killed): the standby takes over and the next rotations still happen;
- every Kubernetes request of both operators, peering included, is allowed by the RBAC the
  chart renders for replicaCount 2 in namespaced mode.

`BackgroundOperator` always passes `standalone=True` to `kopf.spawn_tasks()` (which overrides
`settings.peering.standalone`), so the test runs a subclass that passes the settings' value.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml

from reliability.helpers import NS, unique
from reliability.test_rbac import bindings, needs_helm, observed, render
from zenml_devstack import kopf_runner
from zenml_devstack.kube_emulator import declare_resources
from zenml_operator import zenml_api as zc
from zenml_operator.config import OperatorConfig
from zenml_operator.main import build_registry

PEERING_CRDS = (
    Path(__file__).resolve().parents[2] / "charts" / "zenml-operator" / "crds"
) / "kopf.dev_peerings.yaml"
PEERING = "zenml-operator"
WATCHED = ["default", "team-a"]
PERIOD = 3.0  # seconds (the CRD's CEL says >= 5m; the operator itself accepts any)
LEADER_ROTATIONS, ROTATIONS = 3, 5  # the README quotes ROTATIONS
HA_REQUESTS: list[Any] = []  # every request of both operators, once the HA scenario passed
SA = "zenml.io/v1alpha1/serviceaccounts"
COUNT = "zenml.io/rotation-count"
ROT = "zenml.io/v1alpha1/apikeyrotations"


def peering(priority: int):
    def hook(settings: kopf.OperatorSettings) -> None:
        settings.peering.standalone = False
        settings.peering.mandatory = True  # what `--peering NAME` sets: start paused
        settings.peering.name = PEERING
        settings.peering.priority = priority
        settings.peering.lifetime = 10

    return hook


async def test_two_operators_never_rotate_twice(
    cluster, zenml_server, operator_api_key, zenml_client, operator_login_cached, capsys
) -> None:
    emulator = cluster.emulator
    declare_resources(emulator, crds=list(yaml.safe_load_all(PEERING_CRDS.read_text())))
    for ns in WATCHED:
        emulator.create_object(
            "kopf.dev/v1/kopfpeerings", {"metadata": {"name": PEERING, "namespace": ns}}
        )
    creates: dict[str, list[str]] = {"leader": [], "standby": []}
    operators = {}
    try:
        for role, priority in (("leader", 200), ("standby", 100)):
            operators[role] = await _start(cluster, zenml_server, operator_api_key, priority)
            _count_creates(operators[role].memo, creates[role])
        await cluster.wait_for(lambda: _peers(emulator) == 2, timeout=10, message="two peers")
        await _scenario(cluster, zenml_client, operators, creates, capsys)
    finally:
        for operator in operators.values():
            await operator.stop()


async def _start(cluster, zenml_server, key: str, priority: int) -> kopf_runner.BackgroundOperator:
    config = OperatorConfig(
        zenml_url=zenml_server.url,
        zenml_api_key=lambda: key,
        kube_api_url=cluster.url,
        retry_delay=0.3,
        zenml_retries=1,
        namespaces=tuple(WATCHED),  # as the chart runs it: the Secret watch follows them
    )
    operator = kopf_runner.BackgroundOperator(
        registry=build_registry(config),
        namespaces=WATCHED,
        settings=kopf_runner.make_settings(peering(priority)),
        memo=kopf.Memo(),
    )
    await operator.start()
    await operator.wait_ready()
    return operator


def _count_creates(memo: Any, log: list[str]) -> None:
    """Wrap the operator's own ZenML client (made by the startup handler) to log key creates."""

    async def wait_and_wrap() -> None:
        while getattr(memo, "zenml", None) is None:
            await asyncio.sleep(0.01)
        create = memo.zenml.create_api_key

        async def counted(account_id: str, name: str, **kwargs: Any) -> zc.IssuedApiKey:
            issued = await create(account_id, name, **kwargs)
            if ".r" in name:  # a rotated generation (not the ServiceAccount's first key)
                log.append(issued.info.id)
            return issued

        memo.zenml.create_api_key = counted

    memo.wrapping = asyncio.ensure_future(wait_and_wrap())


def _peers(emulator: Any) -> int:
    obj = emulator.get_object("kopf.dev/v1/kopfpeerings", NS, PEERING) or {}
    return len(obj.get("status") or {})


def _rotations(emulator: Any, secret: str) -> list[tuple[int, str, str]]:
    """(rotation count, key id, issued-at) of every Secret version that wrote a new key value or
    a new count, one entry per version, never merged (a count written twice shows twice; a
    count written without a new value shows with the same key id as the entry before)."""
    seen: list[tuple[int, str, str]] = []
    before: tuple[Any, str] | None = None
    for change in emulator._history:
        if change.resource.plural != "secrets" or change.name != secret:
            continue
        obj = change.event["object"]
        ann = obj["metadata"].get("annotations") or {}
        state = ((obj.get("data") or {}).get("ZENML_STORE_API_KEY"), ann.get(COUNT, "0"))
        if before is not None and state != before:
            seen.append((int(state[1]), ann["zenml.io/api-key-id"], ann["zenml.io/issued-at"]))
        before = state
    return seen


async def _suspend_at(cluster: Any, name: str, count: int, timeout: float) -> None:
    """Wait for `count` rotations, suspend the schedule at once (the next one is a period
    away), and wait until the operator has seen the suspension."""
    emulator = cluster.emulator

    def reached() -> bool:
        rotations = _rotations(emulator, f"{name}-main")
        counts = [c for c, _, _ in rotations]
        # Each write of a new value carries the next count: none written twice or skipped.
        assert counts == list(range(1, len(counts) + 1)), rotations
        assert len(counts) <= count, f"{len(counts)} rotations, more than the {count} wanted"
        return len(counts) == count

    await cluster.wait_for(reached, timeout=timeout, message=f"{count} rotations")
    await _set_suspend(cluster, name, True)


async def _set_suspend(cluster: Any, name: str, suspend: bool) -> None:
    path = f"/apis/{ROT.rsplit('/', 1)[0]}/namespaces/{NS}/apikeyrotations/{name}"
    obj = await cluster.patch(path, {"spec": {"suspend": suspend}})
    generation = obj["metadata"]["generation"]
    reason = "Suspended" if suspend else "Scheduled"

    async def seen() -> bool:
        status = ((await cluster.get(path)) or {}).get("status") or {}
        return status.get("observedGeneration") == generation and any(
            c["type"] == "Ready" and c["reason"] == reason for c in status.get("conditions") or []
        )

    await cluster.wait_for(seen, timeout=15 + 4 * PERIOD, interval=0.05, message=reason)


async def _scenario(cluster, zenml_client, operators, creates, capsys) -> None:
    emulator = cluster.emulator
    name = unique("ha")
    secret = f"{name}-main"
    emulator.create_object(
        SA, {"metadata": {"name": name, "namespace": NS}, "spec": {"apiKeys": [{"name": "main"}]}}
    )
    await cluster.wait_for(lambda: emulator.get_object("v1/secrets", NS, secret), timeout=20)
    emulator.create_object(
        ROT,
        {
            "metadata": {"name": name, "namespace": NS},
            "spec": {
                "serviceAccountName": name,
                "apiKeyName": "main",
                "period": f"{PERIOD:g}s",
                "retainPeriodMinutes": 0,
            },
        },
    )
    await _suspend_at(cluster, name, LEADER_ROTATIONS, timeout=(LEADER_ROTATIONS + 3) * PERIOD)
    assert creates["standby"] == [], "the paused standby created keys"
    by_leader = list(creates["leader"])
    assert len(by_leader) == LEADER_ROTATIONS, by_leader

    # The leader dies; the standby takes over and the schedule goes on (the standby resumes
    # it once the leader is gone: the resumption is handled by whoever leads then).
    await operators["leader"].kill()
    await _set_suspend(cluster, name, False)
    await _suspend_at(cluster, name, ROTATIONS, timeout=15 + (ROTATIONS + 2) * PERIOD)
    await operators["standby"].stop()  # freeze the state for the checks

    rotations = _rotations(emulator, secret)
    counts = [c for c, _, _ in rotations]
    # Exactly ROTATIONS rotations, each count written once, with a new value each time.
    assert counts == list(range(1, ROTATIONS + 1)), rotations
    assert len({key_id for _, key_id, _ in rotations}) == ROTATIONS, rotations
    times = [datetime.datetime.fromisoformat(t.replace("Z", "+00:00")) for _, _, t in rotations]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    # one rotation per period, never two in one (issued-at has whole seconds)
    assert all(gap >= PERIOD - 1 for gap in gaps), gaps
    # Every rotated key created is the one its rotation wrote: none created twice.
    written = [key_id for _, key_id, _ in rotations]
    made = creates["leader"] + creates["standby"]
    assert made == written, (made, written)  # in order: the leader's, then the standby's
    assert creates["leader"] == by_leader, "the killed leader created keys"
    assert len(creates["standby"]) == ROTATIONS - LEADER_ROTATIONS, "the standby never took over"
    account = await zenml_client.get_service_account(name)
    family = [k for k in await zenml_client.list_api_keys(account.id) if k.name.startswith("main")]
    # Retention 0: the current key is the only active one (the previous one, if still there,
    # is deactivated until the next rotation deletes it).
    assert [k.id for k in family if k.active] == [written[-1]], family
    assert len(family) <= 2, family

    HA_REQUESTS[:] = list(emulator._requests)  # for the RBAC check below
    with capsys.disabled():
        print(
            f"\nha: {len(rotations)} rotations ({len(by_leader)} by the leader, then"
            f" {len(creates['standby'])} by the standby after the leader was killed), each count"
            f" written once, {len(made)} keys created for them"
        )


@needs_helm
def test_ha_requests_are_granted_by_the_chart(capsys) -> None:
    """Every Kubernetes request of both operators of the HA test above (file order), peering
    included, is allowed by the RBAC the chart renders for replicaCount 2, namespaced."""
    if not HA_REQUESTS:
        pytest.skip("the HA scenario did not run to its end in this session")
    values = {
        "zenml": {"url": "https://z.example.com", "existingSecret": {"name": "c"}},
        "replicaCount": 2,
        "rbac": {"scope": "namespaced"},
        "watchNamespaces": WATCHED,
    }
    cluster_wide, per_namespace = bindings(render(values))
    seen, _ = observed(HA_REQUESTS)
    denied = sorted(
        (ns, rule)
        for ns, rule in seen
        if rule not in cluster_wide and (ns is None or rule not in per_namespace.get(ns, ()))
    )
    assert denied == [], denied
    peering_used = sorted({rule for _, rule in seen if rule[0] == "kopf.dev"})
    assert peering_used, "no peering request observed"
    with capsys.disabled():
        print(f"\nha: every request granted by the chart; peering requests: {peering_used}")
