"""No API key value appears anywhere observable: logs (debug), Events, status, annotations."""

from __future__ import annotations

import base64
import json
import logging

from e2e.conftest import SA_PATH, SECRET_PATH, logs_in_as, secret_value, wait_ready
from e2e.test_service_account import _gone, sa_body, unique


def issued_values(cluster) -> set[str]:
    """Every API key value the operator ever wrote into any Secret (all versions)."""
    values = set()
    for change in cluster.emulator._history:
        obj = change.event["object"]
        if change.resource.plural != "secrets":
            continue
        for raw in (obj.get("data") or {}).values():
            text = base64.b64decode(raw).decode(errors="replace")
            if text.startswith("ZENKEY_"):
                values.add(text)
    return values


def observable_texts(cluster, caplog, capsys) -> dict[str, str]:
    """Everything but Secret data a user, a log collector or a GitOps tool could see."""
    texts = {"logs": caplog.text}
    captured = capsys.readouterr()
    texts["stdout"], texts["stderr"] = captured.out, captured.err
    other = []
    for change in cluster.emulator._history:
        obj = change.event["object"]
        if change.resource.plural == "secrets":
            obj = {k: v for k, v in obj.items() if k != "data"}  # metadata is observable
        other.append(json.dumps(obj))
    texts["objects"] = "\n".join(other)
    return texts


async def test_no_key_value_leaks_in_a_full_scenario(
    cluster, start_zenml_operator, zenml_server, zenml_client, caplog, capsys
) -> None:
    caplog.set_level(logging.DEBUG)
    await start_zenml_operator(resync_seconds=0.5)
    name = unique("leak")
    path = f"{SA_PATH.format(ns='default')}/{name}"
    await cluster.create(
        SA_PATH.format(ns="default"), sa_body(name, {"apiKeys": [{"name": "a"}, {"name": "b"}]})
    )
    await wait_ready(cluster, "default", name)
    # Edit, re-issue after a lost Secret, remove a key, then delete everything.
    await cluster.patch(
        path,
        {
            "spec": {
                "description": "x",
                "apiKeys": [
                    {"name": "a", "secretTemplate": {"keys": {"apiKey": "TOKEN"}}},
                    {"name": "b"},
                ],
            }
        },
    )
    await wait_ready(cluster, "default", name)
    await cluster.delete(SECRET_PATH.format(ns="default", name=f"{name}-b"))

    async def reissued() -> bool:
        secret = await cluster.get(SECRET_PATH.format(ns="default", name=f"{name}-b"))
        return (
            secret is not None and await logs_in_as(zenml_server.url, secret_value(secret)) == name
        )

    await cluster.wait_for(reissued, timeout=20, interval=0.2, message="re-issued")
    await cluster.patch(path, {"spec": {"apiKeys": [{"name": "b"}]}})
    await cluster.wait_for(
        lambda: _gone(cluster, SECRET_PATH.format(ns="default", name=f"{name}-a")), timeout=20
    )
    await cluster.delete(path)
    await cluster.wait_for(lambda: _gone(cluster, path), timeout=20, message="deleted")

    values = issued_values(cluster)
    assert len(values) >= 3  # a, b, b re-issued
    texts = observable_texts(cluster, caplog, capsys)
    hits = {where: sum(text.count(v) for v in values) for where, text in texts.items()}
    # A key prefix is not secret; check the distinctive tail too, in case of truncation.
    tails = {v[-16:] for v in values}
    hits.update(
        {f"{where} (tail)": sum(text.count(t) for t in tails) for where, text in texts.items()}
    )
    with capsys.disabled():
        print(
            f"\nsecret hygiene: {len(values)} key values scanned in "
            f"{sum(len(t) for t in texts.values())} characters; hits: {sum(hits.values())}"
        )
    assert sum(hits.values()) == 0, hits
    # Positive control: the same scan finds the values where they belong (Secret data).
    secret_data = json.dumps(
        [
            base64.b64decode(raw).decode(errors="replace")
            for c in cluster.emulator._history
            if c.resource.plural == "secrets"
            for raw in (c.event["object"].get("data") or {}).values()
        ]
    )
    assert all(secret_data.count(v) for v in values)
