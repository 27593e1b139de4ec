"""Repairing managed Secrets, piece by piece (the pure decisions, the value check and the
peering gate, have their tables in test_policies.py): Kopf's peering object read, the digest
in the Secret record, claiming back a Secret that lost its owner reference, what the key's
rotations vouch for, and the Secret watch against the emulator."""

from __future__ import annotations

import asyncio
import base64
import datetime
from typing import Any

import kopf
import pytest

from fixtures_kube import Cluster
from zenml_devstack.kube_emulator import (
    ClusterEmulator,
    declare_resources,
    merge_patch,
    running_emulator,
)
from zenml_operator import secrets as sec
from zenml_operator.kube import KubeClient, KubeGone
from zenml_operator.models import ApiKeySpec
from zenml_operator.peering import peers_of
from zenml_operator.policies import Peer, ValueCheck
from zenml_operator.secret_record import ANN_VALUE_DIGEST, SecretRecord, value_digest
from zenml_operator.secret_watch import SELECTOR, SecretChange, SecretWatch, owner_of
from zenml_operator.secrets import ServerData

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
T1 = T0 + datetime.timedelta(hours=1)


def test_peers_of_a_kopf_peering_object() -> None:
    body = {
        "status": {
            "a@host": {"priority": 7, "lifetime": 60, "lastseen": "2026-01-01T00:00:00+00:00"},
            "b@host": {"priority": 3, "lifetime": 10, "lastseen": "2026-01-01T00:00:30Z"},
        }
    }
    peers = sorted(peers_of(body), key=lambda p: p.priority)
    assert peers == [
        Peer(3, T0 + datetime.timedelta(seconds=40)),
        Peer(7, T0 + datetime.timedelta(seconds=60)),
    ]


# --- the digest in the Secret record --------------------------------------------------------

OWNER = {"metadata": {"name": "ci", "namespace": "team-a", "uid": "uid-1"}}
URL = "http://zenml.example:8080"
VALUE = "ZENKEY_fake-value-for-unit-tests"


def _secret(key: ApiKeySpec | None = None, value: str = VALUE) -> dict[str, Any]:
    body = sec.new_secret(
        owner=OWNER,
        key=key or ApiKeySpec(name="main"),
        secret_name="ci-main",
        server=ServerData(URL),
        key_id="kid",
        key_value=value,
        issued_at="2026-01-01T00:00:00Z",
    )
    body["metadata"]["resourceVersion"] = "7"
    return body


def test_the_digest_is_recorded_with_every_value_and_reveals_nothing() -> None:
    secret = _secret()
    digest = secret["metadata"]["annotations"][ANN_VALUE_DIGEST]
    assert digest == value_digest(VALUE) and len(digest) == 64 and VALUE not in digest
    assert SecretRecord.of(secret).value_digest == digest
    assert sec.value_check(secret, "kid") is ValueCheck.HELD
    patch = sec.value_patch(
        secret=secret,
        owner=OWNER,
        key=ApiKeySpec(name="main"),
        server=ServerData(URL),
        key_id="kid",
        key_value="ZENKEY_new",
        issued_at="2026-02-01T00:00:00Z",
    )
    rewritten = merge_patch(secret, patch)
    assert SecretRecord.of(rewritten).value_digest == value_digest("ZENKEY_new")
    assert sec.value_check(rewritten, "kid") is ValueCheck.HELD


def test_a_replaced_value_fails_the_check_and_the_url_is_not_part_of_it() -> None:
    secret = _secret()
    replaced = merge_patch(secret, {"data": {"ZENML_STORE_API_KEY": sec.b64("ZENKEY_other")}})
    assert sec.value_check(replaced, "kid") is ValueCheck.REPLACED
    assert not sec.secret_holds_key(replaced, "kid")
    # A changed URL is put back from the spec (a metadata patch), not by a new key.
    moved = merge_patch(secret, {"data": {"ZENML_STORE_URL": sec.b64("http://elsewhere")}})
    assert sec.value_check(moved, "kid") is ValueCheck.HELD
    patch = sec.metadata_patch(
        secret=moved, owner=OWNER, key=ApiKeySpec(name="main"), server=ServerData(URL)
    )
    assert patch == {"data": {"ZENML_STORE_URL": sec.b64(URL)}}


def test_an_older_record_than_the_status_saw_is_outdated() -> None:
    secret = _secret()
    assert sec.value_check(secret, "kid", last_issued_at="2026-01-01T00:00:00Z").holds
    got = sec.value_check(secret, "kid", last_issued_at="2026-03-01T00:00:00Z")
    assert got is ValueCheck.OUTDATED


def test_a_secret_written_before_digests_gets_one_without_a_new_value() -> None:
    legacy = _secret()
    del legacy["metadata"]["annotations"][ANN_VALUE_DIGEST]
    assert sec.value_check(legacy, "kid") is ValueCheck.UNKNOWN
    assert sec.secret_holds_key(legacy, "kid")  # the old check: key id and a value present
    patch = sec.metadata_patch(
        secret=legacy, owner=OWNER, key=ApiKeySpec(name="main"), server=ServerData(URL)
    )
    assert patch == {"metadata": {"annotations": {ANN_VALUE_DIGEST: value_digest(VALUE)}}}
    upgraded = merge_patch(legacy, patch)
    assert sec.value_check(upgraded, "kid") is ValueCheck.HELD
    assert (
        sec.metadata_patch(
            secret=upgraded, owner=OWNER, key=ApiKeySpec(name="main"), server=ServerData(URL)
        )
        is None
    )


def test_a_secret_that_lost_its_owner_reference_is_claimed_back_by_its_labels() -> None:
    key = ApiKeySpec(name="main")
    stripped = merge_patch(_secret(key), {"metadata": {"ownerReferences": None}})
    assert not sec.is_owned_by(stripped, "uid-1")
    assert sec.claims_owner(stripped, owner_name="ci", key_name="main")
    assert not sec.claims_owner(stripped, owner_name="ci", key_name="other")
    assert not sec.claims_owner(stripped, owner_name="someone", key_name="main")
    unlabelled = merge_patch(stripped, {"metadata": {"labels": {sec.LABEL_MANAGED_BY: None}}})
    assert not sec.claims_owner(unlabelled, owner_name="ci", key_name="main")
    foreign = merge_patch(
        stripped,
        {
            "metadata": {
                "ownerReferences": [{"kind": "X", "name": "x", "uid": "u", "controller": True}]
            }
        },
    )
    assert not sec.claims_owner(foreign, owner_name="ci", key_name="main")

    assert sec.repairs_in(secret=unlabelled, owner=OWNER, key=key) == [
        "its owner reference",
        f"label {sec.LABEL_MANAGED_BY}",
    ]
    patch = sec.metadata_patch(secret=unlabelled, owner=OWNER, key=key, server=ServerData(URL))
    restored = merge_patch(unlabelled, patch)
    assert sec.is_owned_by(restored, "uid-1")
    assert restored["metadata"]["labels"][sec.LABEL_MANAGED_BY] == "zenml-operator"
    assert sec.metadata_patch(secret=restored, owner=OWNER, key=key, server=ServerData(URL)) is None


# --- the watch -------------------------------------------------------------------------------


def test_owner_of() -> None:
    secret = _secret()
    assert owner_of(secret) == ("ci", "uid-1")
    stripped = merge_patch(secret, {"metadata": {"ownerReferences": None}})
    assert owner_of(stripped) == ("ci", None)  # the label still names it
    assert owner_of({"metadata": {"labels": {sec.LABEL_MANAGED_BY: "zenml-operator"}}}) is None


def _managed(name: str, owner: str = "ci") -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "labels": {sec.LABEL_MANAGED_BY: "zenml-operator", sec.LABEL_ACCOUNT: owner},
        },
        "data": {"k": base64.b64encode(b"v").decode()},
    }


async def test_the_watch_reports_changes_of_managed_secrets_only(cluster: Cluster) -> None:
    kube = KubeClient(kopf.ConnectionInfo(server=cluster.url))
    seen: list[SecretChange] = []
    watch = SecretWatch(kube, ["team-a"], seen.append)
    path = "/api/v1/namespaces/team-a/secrets"
    await cluster.create(path, _managed("before"))  # in the first list: not reported
    watch.start()
    try:
        await asyncio.wait_for(watch.listed.wait(), timeout=5)
        await cluster.create(path, {"metadata": {"name": "unmanaged"}, "data": {}})
        own = await kube.create_secret("team-a", _managed("mine"))
        await cluster.patch(
            f"{path}/before", {"metadata": {"labels": {sec.LABEL_MANAGED_BY: None}}}
        )
        await cluster.delete(f"{path}/mine")

        def kinds() -> list[tuple[str, str]]:
            return [(c.type, c.name) for c in seen]

        await cluster.wait_for(lambda: len(seen) >= 3, message="three changes")
        assert kinds() == [("ADDED", "mine"), ("DELETED", "before"), ("DELETED", "mine")]
        added = seen[0]
        assert kube.is_own_change(
            added.type, added.namespace, added.name, version=added.version, uid=added.uid
        )
        assert added.version == own["metadata"]["resourceVersion"]
        assert all(c.owner == "ci" and c.owner_uid is None for c in seen)
        assert not kube.is_own_change(  # deleted by someone else
            "DELETED", "team-a", "mine", version=seen[2].version, uid=seen[2].uid
        )
        assert watch.seen_version("team-a", "mine") is None
    finally:
        await watch.stop()
        await kube.aclose()


async def test_a_compacted_history_is_gone_and_a_relist_reports_what_changed() -> None:
    emulator = ClusterEmulator(history_limit=3)
    declare_resources(emulator)
    emulator.create_object("v1/namespaces", {"metadata": {"name": "ns"}})
    for name in ("a", "b"):
        emulator.create_object("v1/secrets", _managed(name), namespace="ns")
    async with running_emulator(emulator) as url:
        kube = KubeClient(kopf.ConnectionInfo(server=url))
        seen: list[SecretChange] = []
        watch = SecretWatch(kube, ["ns"], seen.append)
        try:
            watch.start()
            await asyncio.wait_for(watch.listed.wait(), timeout=5)
            version = watch.seen_version("ns", "b")
            await watch.stop()  # away while the history is compacted
            emulator.delete_object("v1/secrets", "ns", "a")
            emulator.create_object("v1/secrets", _managed("c"), namespace="ns")
            for n in range(4):  # more changes than the emulator's history keeps
                emulator.create_object(
                    "v1/secrets", {"metadata": {"name": f"x{n}"}}, namespace="ns"
                )
            with pytest.raises(KubeGone):  # what a watch from before answers
                async for _ in kube.watch_secrets(
                    "ns", label_selector=SELECTOR, resource_version=str(version), timeout_seconds=1
                ):
                    pass
            # A 410 makes the watch list again (as a restart does): what changed meanwhile
            # is reported, against the resourceVersions it kept.
            watch.start()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while len(seen) < 2 and loop.time() < deadline:
                await asyncio.sleep(0.02)  # polling the reported changes, with a deadline
            assert sorted((c.type, c.name) for c in seen) == [("DELETED", "a"), ("MODIFIED", "c")]
            assert not emulator.errors
        finally:
            await watch.stop()
            await kube.aclose()


# --- what the key's rotations vouch for ------------------------------------------------------


def _key(name: str, key_id: str) -> Any:
    from zenml_operator.zenml_api import ApiKeyInfo

    return ApiKeyInfo(
        id=key_id,
        name=name,
        active=True,
        description="",
        created=None,
        last_rotated=None,
        retain_period_minutes=None,
    )


def test_newer_generations_and_sparing_what_a_rotation_names() -> None:
    from zenml_operator import keyfamily as kf
    from zenml_operator.secret_record import Retention

    base, r1, r2 = _key("main", "k0"), _key("main.r1", "k1"), _key("main.r2", "k2")
    members = [r2, base, r1]
    assert kf.newer_than(members, base, "main") == [r1, r2]
    assert kf.newer_than(members, r2, "main") == []
    # A Secret restored from before the rotation records k0: r1 and r2 look like leftovers...
    plan = kf.retire(members, base, Retention(None, None), T0)
    assert {k.id for k in plan.delete} == {"k1", "k2"}
    # ... but the rotation's status names k1 (current): only the real leftover goes.
    spared = kf.spare(plan, {"k1"})
    assert [k.id for k in spared.delete] == ["k2"] and spared.deactivate == []


@pytest.mark.parametrize(
    ("held", "recorded_current", "restored"),
    [
        ("k0", "k1", True),  # the Secret holds the key before the rotation's current one
        ("k0", "k2", True),  # ... or two generations before
        ("k1", "k1", False),  # the Secret holds the current key
        ("k2", "k1", False),  # newer than the status: a crash after the write, a leftover case
        ("k0", None, False),  # the rotation never rotated: nothing to compare
        ("k0", "gone", False),  # the status names a key ZenML no longer has
    ],
)
def test_a_secret_restored_from_an_older_copy(
    held: str, recorded_current: str | None, restored: bool
) -> None:
    from zenml_operator import keyfamily as kf

    members = [_key("main", "k0"), _key("main.r1", "k1"), _key("main.r2", "k2")]
    by_id = {k.id: k for k in members}
    assert kf.restored_from_older_copy(members, by_id[held], recorded_current, "main") is restored


def test_the_rotation_record_rebuilt_from_a_rotation_status() -> None:
    from zenml_operator.secret_record import record_from_rotation_status

    status = {
        "rotationCount": 3,
        "lastRotateRequest": "go",
        "previousKeyId": "k2",
        "previousKeyValidUntil": "2026-01-01T01:00:00Z",
        "currentKeyId": "k3",
    }
    record = record_from_rotation_status(status)
    secret = {"metadata": {"annotations": record}}
    got = SecretRecord.of(secret)
    assert (got.rotation_count, got.answered_request) == (3, "go")
    assert got.retention.key_id == "k2" and got.retention.valid_until == T1
    assert record_from_rotation_status({}) == {}  # never rotated: nothing to carry over


async def test_an_echo_that_comes_before_its_writes_answer_is_still_the_operators(
    cluster: Cluster,
) -> None:
    """On a busy loop the watch can deliver the change before the write's answer is read:
    `secret_writes_settled` waits for that answer, and the echo is then known as own."""
    kube = KubeClient(kopf.ConnectionInfo(server=cluster.url))
    seen: list[SecretChange] = []
    watch = SecretWatch(kube, ["team-a"], seen.append)
    answer_held = asyncio.Event()
    release = asyncio.Event()
    request = kube._request

    async def slow_answer(method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        answer = await request(method, path, **kwargs)
        if method == "PATCH":
            answer_held.set()
            await release.wait()
        return answer

    kube._request = slow_answer  # type: ignore[method-assign]
    watch.start()
    try:
        await asyncio.wait_for(watch.listed.wait(), timeout=5)
        await kube.create_secret("team-a", _managed("slow"))
        patch = {"metadata": {"annotations": {"note": "x"}}}
        writing = asyncio.create_task(kube.patch_secret("team-a", "slow", patch))
        await asyncio.wait_for(answer_held.wait(), timeout=5)
        await cluster.wait_for(lambda: len(seen) >= 2, message="the patch's echo")
        echo = seen[1]
        assert not kube.is_own_change(  # the answer is not read yet
            echo.type, echo.namespace, echo.name, version=echo.version, uid=echo.uid
        )
        settled = asyncio.create_task(kube.secret_writes_settled("team-a", ["slow"], timeout=10))
        await asyncio.sleep(0)
        assert not settled.done()
        release.set()
        await asyncio.wait_for(settled, timeout=5)
        await writing
        assert kube.is_own_change(
            echo.type, echo.namespace, echo.name, version=echo.version, uid=echo.uid
        )
        # Nothing in flight: no wait at all.
        await asyncio.wait_for(kube.secret_writes_settled("team-a", ["slow"], timeout=10), 0.1)
    finally:
        await watch.stop()
        await kube.aclose()
