"""A managed Secret is repaired within seconds, by the Secret watch, not at the next resync.

Every test runs the operator with a 600 s resync (the default), so only the watch can repair
within the deadlines below. Each damage is checked by behaviour: the repaired Secret's key
logs in to ZenML as the declared account. The secret-hygiene plugin scans every test for key
values in logs, Events and objects.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from e2e.conftest import SA_PATH, SECRET_PATH, logs_in_as, secret_value, wait_ready
from e2e.test_rotation import ROT_PATH, rotation_body, wait_count
from e2e.test_service_account import sa_body, unique
from zenml_operator import crashpoints
from zenml_operator.handlers.rotation import RotationReconciler
from zenml_operator.secret_record import ANN_KEY_ID, ANN_VALUE_DIGEST

RESYNC = 600.0  # never reached in a test: a repair within REPAIRED is the watch's
REPAIRED = 15.0  # seconds: the deadline of every repair here (measured: well under 2 s)
EVENTS = "/api/v1/namespaces/default/events"
KEY = "ZENML_STORE_API_KEY"


async def ready_account(cluster, start_zenml_operator) -> tuple[str, str, Any]:
    """A Ready ServiceAccount with key `main` under an operator that resyncs every 600 s;
    (name, Secret path, memo)."""
    _, memo = await start_zenml_operator(resync_seconds=RESYNC)
    name = unique("repair")
    await cluster.create(
        SA_PATH.format(ns="default"), sa_body(name, {"apiKeys": [{"name": "main"}]})
    )
    await wait_ready(cluster, "default", name)
    return name, SECRET_PATH.format(ns="default", name=f"{name}-main"), memo


async def wait_logs_in(cluster, zenml_server, path: str, name: str, **expect: Any) -> dict:
    """Wait until the Secret exists, matches `expect` and its key logs in as `name`."""

    async def check() -> dict | None:
        secret = await cluster.get(path)
        if secret is None or KEY not in (secret.get("data") or {}):
            return None
        if not all(predicate(secret) for predicate in expect.values()):
            return None
        return secret if await logs_in_as(zenml_server.url, secret_value(secret)) == name else None

    return await cluster.wait_for(
        check, timeout=REPAIRED, interval=0.1, message=f"{path} logs in as {name}"
    )


async def rotated_once(cluster, name: str, path: str) -> tuple[dict, dict]:
    """An ApiKeyRotation of key `main` (retention 5 min) asked to rotate once, done:
    (its status, the Secret after the rotation)."""
    await cluster.create(ROT_PATH, rotation_body(name, name, period="1h", retainPeriodMinutes=5))
    await cluster.patch(
        f"{ROT_PATH}/{name}", {"metadata": {"annotations": {"zenml.io/rotate": "1"}}}
    )
    status = await wait_count(cluster, name, 1, timeout=REPAIRED)
    return status, await cluster.get(path)


async def wait_rotations_key(
    cluster, zenml_server, path: str, name: str, status: dict, *old: dict
) -> dict:
    """Wait for a value none of the `old` Secrets held that logs in, and check that the
    Secret records the rotation's current key (its status)."""
    values = {secret["data"][KEY] for secret in old}
    secret = await wait_logs_in(
        cluster, zenml_server, path, name, fresh=lambda s: s["data"][KEY] not in values
    )
    assert secret["metadata"]["annotations"][ANN_KEY_ID] == status["currentKeyId"]
    return secret


async def events_of(cluster, reason: str) -> list[dict[str, Any]]:
    return [e for e in (await cluster.get(EVENTS))["items"] if e.get("reason") == reason]


def rotation_looks(memo) -> float:
    """How many rotation looks finished (the reconcile metric of ApiKeyRotations)."""
    (family,) = memo.metrics.reconcile_total.collect()
    return sum(
        s.value
        for s in family.samples
        if s.name.endswith("_total") and s.labels.get("resource") == "apikeyrotation"
    )


async def settled(cluster, memo, path: str) -> None:
    """The watch saw the Secret as it is now and no repair is waiting or running."""
    ns, name = path.split("/")[4], path.split("/")[6]
    watch, repairs = memo.secret_watch, memo.secret_repairs

    async def check() -> bool:
        secret = await cluster.get(path)
        version = secret["metadata"]["resourceVersion"] if secret else None
        return repairs.idle and (version is None or watch.seen_version(ns, name) == version)

    await cluster.wait_for(check, timeout=REPAIRED, message="the repairs settled")


async def test_deleted_secret_is_restored_with_a_key_that_logs_in(
    cluster, start_zenml_operator, zenml_server
) -> None:
    name, path, memo = await ready_account(cluster, start_zenml_operator)
    old = secret_value(await cluster.get(path))
    await settled(cluster, memo, path)
    assert memo.secret_repairs.runs == 0  # the operator's own writes caused no reconcile

    await cluster.delete(path)
    secret = await wait_logs_in(cluster, zenml_server, path, name)
    assert secret_value(secret) != old  # ZenML never shows a value twice: a new one
    assert await logs_in_as(zenml_server.url, old) is None  # re-issued with no retention
    (event,) = [e for e in await events_of(cluster, "ApiKeyReissued") if path[-20:] in str(e)]
    assert event["type"] == "Warning" and "was missing" in event["message"]

    # No ping-pong: the repair's own write caused no further reconcile or write.
    await settled(cluster, memo, path)
    assert memo.secret_repairs.runs == 1
    assert (await cluster.get(path))["metadata"]["resourceVersion"] == secret["metadata"][
        "resourceVersion"
    ]


async def test_replaced_value_is_noticed_without_zenml_and_reissued(
    cluster, start_zenml_operator, zenml_server
) -> None:
    """An older value of the SAME key (as a restored backup or a stale GitOps copy would
    write it) carries the right key id and is refused by ZenML: the digest tells."""
    name, path, _ = await ready_account(cluster, start_zenml_operator)
    first = await cluster.get(path)
    await cluster.delete(path)  # the key is re-issued: `first` now holds a refused value
    second = await wait_logs_in(cluster, zenml_server, path, name)
    assert await logs_in_as(zenml_server.url, secret_value(first)) is None
    stale = first["data"][KEY]
    assert (
        second["metadata"]["annotations"][ANN_KEY_ID]
        == first["metadata"]["annotations"][ANN_KEY_ID]
    )  # the same ZenML key id: the id alone cannot tell the stale value

    await cluster.patch(path, {"data": {KEY: stale}})
    repaired = await wait_logs_in(
        cluster, zenml_server, path, name, fresh=lambda s: s["data"][KEY] not in (stale,)
    )
    assert repaired["data"][KEY] != second["data"][KEY]  # a new value, issued now
    reissued = [e for e in await events_of(cluster, "ApiKeyReissued") if path[-20:] in str(e)]
    assert any("not the issued key" in e["message"] for e in reissued), reissued
    digest = repaired["metadata"]["annotations"][ANN_VALUE_DIGEST]
    assert len(digest) == 64 and digest not in str(await cluster.get(EVENTS))


async def test_a_value_of_another_account_is_replaced(
    cluster, start_zenml_operator, zenml_server
) -> None:
    name, path, _ = await ready_account(cluster, start_zenml_operator)
    other = unique("other")
    await cluster.create(
        SA_PATH.format(ns="default"), sa_body(other, {"apiKeys": [{"name": "main"}]})
    )
    await wait_ready(cluster, "default", other)
    foreign = (await cluster.get(SECRET_PATH.format(ns="default", name=f"{other}-main")))["data"]
    await cluster.patch(path, {"data": {KEY: foreign[KEY]}})  # logs in, as the wrong account
    await wait_logs_in(cluster, zenml_server, path, name)
    # The other account's Secret and key are untouched.
    other_path = SECRET_PATH.format(ns="default", name=f"{other}-main")
    assert (await cluster.get(other_path))["data"][KEY] == foreign[KEY]
    assert await logs_in_as(zenml_server.url, secret_value({"data": foreign})) == other


async def test_removed_data_key_is_restored(cluster, start_zenml_operator, zenml_server) -> None:
    name, path, _ = await ready_account(cluster, start_zenml_operator)
    await cluster.patch(path, {"data": {KEY: None}})
    await wait_logs_in(cluster, zenml_server, path, name)
    reissued = [e for e in await events_of(cluster, "ApiKeyReissued") if path[-20:] in str(e)]
    assert any("no key value" in e["message"] for e in reissued), reissued


async def test_stripped_label_is_restored_without_a_new_key(
    cluster, start_zenml_operator, zenml_server
) -> None:
    """The label the watch selects on: the Secret leaves the watched set (DELETED in the
    stream) and is found by name through the owner."""
    name, path, _ = await ready_account(cluster, start_zenml_operator)
    before = await cluster.get(path)
    await cluster.patch(path, {"metadata": {"labels": {"app.kubernetes.io/managed-by": None}}})
    secret = await wait_logs_in(
        cluster,
        zenml_server,
        path,
        name,
        labelled=lambda s: (
            s["metadata"]["labels"].get("app.kubernetes.io/managed-by") == "zenml-operator"
        ),
    )
    assert secret["data"] == before["data"]  # the value was intact: no re-issue
    (event,) = [e for e in await events_of(cluster, "SecretRepaired") if path[-20:] in str(e)]
    assert "app.kubernetes.io/managed-by" in event["message"]


async def test_stripped_owner_reference_is_restored_without_a_new_key(
    cluster, start_zenml_operator, zenml_server
) -> None:
    name, path, _ = await ready_account(cluster, start_zenml_operator)
    before = await cluster.get(path)
    owner = before["metadata"]["ownerReferences"]
    await cluster.patch(path, {"metadata": {"ownerReferences": None}})
    secret = await wait_logs_in(
        cluster,
        zenml_server,
        path,
        name,
        owned=lambda s: s["metadata"].get("ownerReferences") == owner,
    )
    assert secret["data"] == before["data"]
    obj = await wait_ready(cluster, "default", name)
    assert obj["status"]["apiKeys"][0]["state"] == "Ready"


async def test_an_unmanaged_secret_of_that_name_is_never_touched(
    cluster, start_zenml_operator, zenml_server
) -> None:
    """Replaced wholesale by a Secret the operator did not write (no owner, no labels): it
    leaves the watched set, the owner reports SecretConflict, and it stays byte for byte."""
    name, path, _ = await ready_account(cluster, start_zenml_operator)
    current = await cluster.get(path)
    foreign = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": current["metadata"]["name"],
            "resourceVersion": current["metadata"]["resourceVersion"],
            "labels": {"owner": "someone-else"},
        },
        "data": {"password": base64.b64encode(b"hunter2").decode()},
    }
    replaced = await cluster.replace(path, foreign)
    obj = await wait_ready(
        cluster, "default", name, status="False", reason="SecretConflict", timeout=REPAIRED
    )
    assert obj["status"]["apiKeys"][0]["state"] == "SecretConflict"
    assert await cluster.get(path) == replaced


async def test_secret_edit_during_a_rotation_keeps_the_rotations_new_key(
    cluster, start_zenml_operator, zenml_server
) -> None:
    """The Secret is edited between the rotation's key create and its Secret write (its
    write then answers 409): the rotation writes again, the edit is repaired, the Secret
    ends up holding the rotation's new key, and exactly one rotation happened."""
    name, path, _ = await ready_account(cluster, start_zenml_operator)
    old = secret_value(await cluster.get(path))
    await cluster.create(ROT_PATH, rotation_body(name, name, period="1h", retainPeriodMinutes=5))
    await wait_count(cluster, name, 0)
    edited = asyncio.Event()

    async def edit(_: str) -> None:
        await cluster.patch(
            path,
            {
                "metadata": {"labels": {"team": "ml"}},
                "data": {KEY: base64.b64encode(b"x").decode()},
            },
        )
        edited.set()

    crashpoints.arm("rotation.after-create", edit)
    try:
        await cluster.patch(
            f"{ROT_PATH}/{name}", {"metadata": {"annotations": {"zenml.io/rotate": "1"}}}
        )
        await asyncio.wait_for(edited.wait(), timeout=REPAIRED)
    finally:
        crashpoints.disarm_all()
    status = await wait_count(cluster, name, 1, timeout=REPAIRED)
    secret = await wait_logs_in(
        cluster,
        zenml_server,
        path,
        name,
        rotated=lambda s: s["metadata"]["annotations"][ANN_KEY_ID] == status["currentKeyId"],
    )
    assert secret_value(secret) != old
    assert await logs_in_as(zenml_server.url, old) == name  # inside its 5-minute retention
    status = (await cluster.get(f"{ROT_PATH}/{name}"))["status"]
    assert status["rotationCount"] == 1


async def test_stale_value_after_a_rotation_is_reissued_for_the_rotations_key(
    cluster, start_zenml_operator, zenml_server
) -> None:
    """The pre-rotation value written back after a rotation (a stale GitOps copy): the
    Secret gets a new value of the rotation's key; the previous key keeps its retention."""
    name, path, _ = await ready_account(cluster, start_zenml_operator)
    before = await cluster.get(path)
    status, rotated = await rotated_once(cluster, name, path)
    assert rotated["metadata"]["annotations"][ANN_KEY_ID] == status["currentKeyId"]

    await cluster.patch(path, {"data": {KEY: before["data"][KEY]}})
    await wait_rotations_key(cluster, zenml_server, path, name, status, before, rotated)
    assert await logs_in_as(zenml_server.url, secret_value(before)) == name  # still retained


async def test_a_whole_secret_restored_from_before_a_rotation_keeps_the_rotations_key(
    cluster, start_zenml_operator, zenml_server, zenml_client
) -> None:
    """A backup of the whole Secret from before a rotation (annotations included: its key id,
    digest and issue time are consistent) is put back: the rotation's key, which the
    rotation's status names, is re-issued into it, not retired as a leftover; the previous
    key keeps the retention the rotation gave it."""
    name, path, memo = await ready_account(cluster, start_zenml_operator)
    backup = await cluster.get(path)
    status, rotated = await rotated_once(cluster, name, path)
    looks = rotation_looks(memo)

    restored = {**backup, "metadata": {**backup["metadata"]}}
    restored["metadata"]["resourceVersion"] = rotated["metadata"]["resourceVersion"]
    await cluster.replace(path, restored)
    secret = await wait_rotations_key(cluster, zenml_server, path, name, status, backup, rotated)
    account = await zenml_client.get_service_account(name)
    keys = {k.id for k in await zenml_client.list_api_keys(account.id)}
    assert {status["currentKeyId"], status["previousKeyId"]} <= keys
    assert await logs_in_as(zenml_server.url, secret_value(backup)) == name  # retained
    # The repair woke the rotation; its look finds the record rebuilt from its status: the
    # answered request does not fire again, and the count stays.
    await cluster.wait_for(lambda: rotation_looks(memo) > looks, timeout=REPAIRED)
    after = (await cluster.get(f"{ROT_PATH}/{name}"))["status"]
    assert (after["rotationCount"], after["currentKeyId"]) == (1, status["currentKeyId"])
    assert (await cluster.get(path))["data"][KEY] == secret["data"][KEY]


async def test_a_rotation_look_before_the_repair_leaves_a_restored_secrets_key_alone(
    cluster, start_zenml_operator, zenml_server, zenml_client
) -> None:
    """The order that once lost the rotation's key: a rotation look runs on a Secret put back
    from before the rotation, before the Secret watch's repair (its daemon woke for another
    reason). The Secret records the older key, but the rotation's status names the newer
    one: the look waits (SecretNotReady) instead of deleting that key as a crash leftover or
    rotating again, and the repair then writes the rotation's key back."""
    name, path, memo = await ready_account(cluster, start_zenml_operator)
    backup = await cluster.get(path)
    status, rotated = await rotated_once(cluster, name, path)
    restored = {**backup, "metadata": {**backup["metadata"]}}
    restored["metadata"]["resourceVersion"] = rotated["metadata"]["resourceVersion"]
    await cluster.replace(path, restored)
    # At once: the watch's repair settles for a moment first, and waits for the Secret lock.
    outcome = await RotationReconciler(await cluster.get(f"{ROT_PATH}/{name}"), memo.deps).run()
    assert outcome.problem is not None and outcome.problem.reason == "SecretNotReady"
    account = await zenml_client.get_service_account(name)
    assert status["currentKeyId"] in {k.id for k in await zenml_client.list_api_keys(account.id)}

    await wait_rotations_key(cluster, zenml_server, path, name, status, backup, rotated)
    after = (await cluster.get(f"{ROT_PATH}/{name}"))["status"]
    assert (after["rotationCount"], after["currentKeyId"]) == (1, status["currentKeyId"])


async def test_a_secret_deleted_after_a_rotation_keeps_the_rotation_record(
    cluster, start_zenml_operator, zenml_server
) -> None:
    """Deleted inside the previous key's retention: the new Secret gets its record back from
    the rotation's status, so the previous key is not retired early and the answered
    on-demand request does not rotate again."""
    name, path, memo = await ready_account(cluster, start_zenml_operator)
    before = await cluster.get(path)
    status, _ = await rotated_once(cluster, name, path)
    looks = rotation_looks(memo)

    await cluster.delete(path)
    secret = await wait_logs_in(cluster, zenml_server, path, name)
    ann = secret["metadata"]["annotations"]
    assert ann[ANN_KEY_ID] == status["currentKeyId"]
    assert ann["zenml.io/rotation-count"] == "1" and ann["zenml.io/rotate-request"] == "1"
    assert ann["zenml.io/previous-api-key-id"] == status["previousKeyId"]
    assert await logs_in_as(zenml_server.url, secret_value(before)) == name  # retained
    await cluster.wait_for(lambda: rotation_looks(memo) > looks, timeout=REPAIRED)
    after = (await cluster.get(f"{ROT_PATH}/{name}"))["status"]
    assert (after["rotationCount"], after["currentKeyId"]) == (1, status["currentKeyId"])
