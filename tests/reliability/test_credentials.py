"""The operator's own ZenML credential: missing, malformed, revoked, deactivated.

- Missing or malformed configuration fails at start-up with a ValueError that names the
  variable to fix (and never echoes the value).
- At run time (the key read from a file, as the Helm chart mounts it): when ZenML refuses the
  credential, every object says so (Ready=False ZenMLUnauthorized and a Warning Event), the
  log says how to fix it, and once it is fixed the operator recovers by itself: no restart.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from e2e.conftest import wait_ready
from reliability.helpers import (
    NS,
    ROT_LIST,
    SA_LIST,
    Expected,
    condition,
    rot_path,
    rotation_body,
    sa_body,
    sa_path,
    unique,
    wait_converged,
    wait_warnings,
)
from zenml_devstack.zenml_server import create_service_account_with_key
from zenml_operator.config import api_key_from_env, config_from_env

A_KEY = "ZENKEY_" + "x" * 40
SECRET_LOOKING = "hunter2-do-not-print"

# (environment, the variable the error must name)
BAD_ENVIRONMENTS: list[tuple[str, dict[str, str], str]] = [
    ("url-missing", {"ZENML_STORE_API_KEY": A_KEY}, "ZENML_STORE_URL"),
    ("url-no-scheme", {"ZENML_STORE_URL": "zenml:8080", "ZENML_STORE_API_KEY": A_KEY}, "STORE_URL"),
    ("key-missing", {"ZENML_STORE_URL": "http://z"}, "ZENML_STORE_API_KEY"),
    ("key-empty", {"ZENML_STORE_URL": "http://z", "ZENML_STORE_API_KEY": " "}, "API_KEY"),
    (
        "key-malformed",
        {"ZENML_STORE_URL": "http://z", "ZENML_STORE_API_KEY": SECRET_LOOKING},
        "ZENML_STORE_API_KEY",
    ),
    (
        "key-file-missing",
        {"ZENML_STORE_URL": "http://z", "ZENML_STORE_API_KEY_FILE": "/nonexistent/key"},
        "ZENML_STORE_API_KEY_FILE",
    ),
    ("key-file-malformed", {"ZENML_STORE_URL": "http://z"}, "ZENML_STORE_API_KEY_FILE"),
    (
        "password-missing",
        {"ZENML_STORE_URL": "http://z", "ZENML_STORE_USERNAME": "admin"},
        "ZENML_STORE_PASSWORD",
    ),
    (
        "resync-not-a-number",
        {
            "ZENML_STORE_URL": "http://z",
            "ZENML_STORE_API_KEY": A_KEY,
            "ZENML_OPERATOR_RESYNC_SECONDS": "soon",
        },
        "ZENML_OPERATOR_RESYNC_SECONDS",
    ),
]


@pytest.mark.parametrize(
    ("env", "variable"), [pytest.param(e, v, id=i) for i, e, v in BAD_ENVIRONMENTS]
)
def test_bad_configuration_names_the_variable(
    env: dict[str, str], variable: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("ZENML_"):
            monkeypatch.delenv(name)
    if "ZENML_STORE_API_KEY_FILE" not in env and variable == "ZENML_STORE_API_KEY_FILE":
        bad = tmp_path / "key"
        bad.write_text(SECRET_LOOKING)
        env = {**env, "ZENML_STORE_API_KEY_FILE": str(bad)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as failure:
        config_from_env()
    assert variable in str(failure.value)
    assert SECRET_LOOKING not in str(failure.value)


# --- at run time -------------------------------------------------------------------------


async def _break(zenml: Any, account: str, how: str, key_file: Path) -> None:
    acc = await zenml.get_service_account(account)
    if how == "deactivated":
        await zenml.update_service_account(acc.id, active=False)
        return
    for key in await zenml.list_api_keys(acc.id):
        await zenml.delete_api_key(acc.id, key.id)  # revoked: its tokens die with it
    if how == "revoked-and-garbled-file":
        key_file.write_text("garbled")  # e.g. a Secret edited by hand


async def _fix(zenml: Any, server: Any, account: str, how: str, key_file: Path) -> None:
    acc = await zenml.get_service_account(account)
    if how == "deactivated":
        await zenml.update_service_account(acc.id, active=True)
        return
    issued = await zenml.create_api_key(acc.id, unique("renewed"))
    key_file.write_text(issued.value.reveal() + "\n")  # the kubelet refreshes the mount


@pytest.mark.parametrize("how", ["revoked-and-garbled-file", "deactivated"])
async def test_refused_credential_is_reported_and_recovered_without_restart(
    cluster, start_operator, zenml_server, zenml_client, tmp_path: Path, caplog, how: str
) -> None:
    caplog.set_level(logging.WARNING)
    account = unique("operator")
    key = await asyncio.to_thread(
        create_service_account_with_key, zenml_server.url, zenml_server.admin_password, account
    )
    zenml_server.grant_admin(account)
    key_file = tmp_path / "api-key"
    key_file.write_text(key)
    # What config_from_env builds from ZENML_STORE_API_KEY_FILE: re-read at every login.
    read_key = api_key_from_env({"ZENML_STORE_API_KEY_FILE": str(key_file)})
    assert callable(read_key)
    operator, _ = await start_operator(api_key=read_key, resync_seconds=1.0, retry_delay=0.5)

    before, during = unique("before"), unique("during")
    await cluster.create(SA_LIST.format(ns=NS), sa_body(before, {"apiKeys": [{"name": "a"}]}))
    await wait_ready(cluster, NS, before)
    await cluster.create(
        ROT_LIST.format(ns=NS),
        rotation_body(before, {"serviceAccountName": before, "apiKeyName": "a", "period": "2h"}),
    )
    await _wait_reason(cluster, rot_path(before), "True", "Scheduled")

    await _break(zenml_client, account, how, key_file)
    await cluster.create(SA_LIST.format(ns=NS), sa_body(during, {"apiKeys": [{"name": "a"}]}))
    objects = [sa_path(before), sa_path(during), rot_path(before)]
    for path in objects:
        cond = await _wait_reason(cluster, path, "False", "ZenMLUnauthorized")
        assert "operator's credential" in cond["message"], cond
        if how == "revoked-and-garbled-file":
            assert "ZENML_STORE_API_KEY_FILE" in cond["message"], cond
    expected = {("ServiceAccount", before), ("ServiceAccount", during), ("ApiKeyRotation", before)}
    await wait_warnings(cluster, "ZenMLUnauthorized", expected)
    lines = [r.getMessage() for r in caplog.records if "operator's credential" in r.getMessage()]
    assert lines and all("Fix the operator's" in line for line in lines), lines[:3]

    await _fix(zenml_client, zenml_server, account, how, key_file)
    await wait_converged(
        cluster, zenml_client, zenml_server.url, Expected(live=[before, during]), timeout=30
    )
    await _wait_reason(cluster, rot_path(before), "True", "Scheduled")
    assert operator.running  # recovered by itself, no restart


async def _wait_reason(cluster: Any, path: str, status: str, reason: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        cond = condition(await cluster.get(path))
        return cond if cond and (cond["status"], cond["reason"]) == (status, reason) else None

    return await cluster.wait_for(
        check, timeout=20, interval=0.1, message=f"{path} Ready={status} {reason}"
    )
