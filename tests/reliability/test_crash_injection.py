"""Crash injection: the operator dies at every step boundary and a new one converges.

Every `await crashpoint("...")` in the handlers is a step boundary: after an intent record,
after each ZenML create/update/delete, after each Secret write or delete, before the status
write (plus one this test adds around main.py's status write: `sa.after-status`). For each
one a scenario drives the operator to that point, the point raises `SimulatedCrash` (nothing
after it runs) and kills the operator at once, as a SIGKILL would (`BackgroundOperator.kill`,
no cleanup handlers, and no time for Kopf's workers to drain: `queueing.exit_timeout = 0`),
and a fresh operator is started on the same cluster and ZenML server. Then the declared
state must be reached with nothing leaked or doubled:

- every declared key's Secret logs in to ZenML as its account;
- no declared key is missing in ZenML, no undeclared key is left, at most two generations
  per declared key (the previous one only inside the retention recorded in its Secret, or
  deactivated after it);
- nothing was created twice in ZenML: each account and each declared key created once (a
  rotated generation's name may be created again only after its unused predecessor was
  deleted), and a rotation creates one new key, plus one orphan if it crashed between the
  create and the Secret write;
- a Secret the operator does not own (dressed up with the operator's labels) is unchanged;
- scenario specifics (rotation count 1 and one restart per new key, deletion policy, ...).

A test scans the handler sources for crash points, so a point added without a scenario, or
renamed, fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
import pytest

from e2e.conftest import wait_ready
from e2e.test_rotation import restarts
from reliability.helpers import (
    DEPLOY_LIST,
    NS,
    ROT_LIST,
    SA_LIST,
    Expected,
    condition,
    create_foreign_secret,
    deployment_body,
    rot_path,
    rotation_body,
    sa_body,
    sa_path,
    secret_path,
    secret_value,
    unique,
    wait_converged,
    writes_to,
)
from zenml_operator import crashpoints
from zenml_operator.kube import KubeClient

HANDLERS = Path(crashpoints.__file__).parent / "handlers"
# Injected by this test around the status write in main.py (outside the handler modules).
AFTER_STATUS = "sa.after-status"


@dataclass
class Run:
    """One scenario run: the test's handles plus what the scenario declared."""

    cluster: Any
    zenml: Any
    url: str
    creations: Any
    name: str
    expected: Expected = field(default_factory=Expected)
    notes: dict[str, Any] = field(default_factory=dict)

    async def account(self) -> Any:
        return await self.zenml.get_service_account(self.name)


async def _ready_account(run: Run, spec: dict[str, Any]) -> None:
    await run.cluster.create(SA_LIST.format(ns=NS), sa_body(run.name, spec))
    await wait_ready(run.cluster, NS, run.name)


async def _poke(run: Run, description: str = "poke") -> None:
    await run.cluster.patch(sa_path(run.name), {"spec": {"description": description}})


TWO_KEYS = [{"name": "a"}, {"name": "b"}]


# --- scenarios ------------------------------------------------------------------------------


async def create_setup(run: Run) -> None:
    run.expected.live = [run.name]


async def create_trigger(run: Run) -> None:
    spec = {
        "apiKeys": [
            {"name": "a"},
            {
                "name": "b",
                "secretName": f"{run.name}-bee",
                "secretTemplate": {"keys": {"apiKey": "TOKEN"}},
            },
        ]
    }
    await run.cluster.create(SA_LIST.format(ns=NS), sa_body(run.name, spec))


async def create_after(run: Run) -> None:
    account = await run.account()
    assert run.creations.accounts[run.name] == 1
    assert run.creations.keys[account.id, "a"] == 1
    assert run.creations.keys[account.id, "b"] == 1


async def update_setup(run: Run) -> None:
    await _ready_account(run, {"apiKeys": [{"name": "a"}]})
    run.expected.live = [run.name]


async def update_trigger(run: Run) -> None:
    await run.cluster.patch(
        sa_path(run.name),
        {
            "spec": {
                "description": "changed",
                "apiKeys": [
                    {
                        "name": "a",
                        "description": "key a",
                        "secretTemplate": {"labels": {"team": "ml"}},
                    }
                ],
            }
        },
    )


async def update_after(run: Run) -> None:
    account = await run.account()
    assert account.description == "changed"
    assert (await run.zenml.get_api_key(account.id, "a")).description == "key a"
    secret = await run.cluster.get(secret_path(f"{run.name}-a"))
    assert secret["metadata"]["labels"]["team"] == "ml"


async def reissue_setup(run: Run) -> None:
    await _ready_account(run, {"apiKeys": [{"name": "a"}]})
    run.expected.live = [run.name]


async def reissue_trigger(run: Run) -> None:
    await run.cluster.delete(secret_path(f"{run.name}-a"))  # lost by hand: a new value is due
    await _poke(run)


async def retire_setup(run: Run) -> None:
    await _ready_account(run, {"apiKeys": [{"name": "a"}]})
    # A leftover generation (as a rotation that crashed after its create leaves one).
    account = await run.account()
    await run.zenml.create_api_key(account.id, "a.r7")
    run.expected.live = [run.name]


async def retire_trigger(run: Run) -> None:
    await _poke(run)


async def remove_setup(run: Run) -> None:
    await _ready_account(run, {"apiKeys": TWO_KEYS})
    run.expected.live = [run.name]


async def remove_trigger(run: Run) -> None:
    await run.cluster.patch(sa_path(run.name), {"spec": {"apiKeys": [{"name": "a"}]}})


async def remove_after(run: Run) -> None:
    obj = await run.cluster.get(sa_path(run.name))
    assert [k["name"] for k in obj["status"]["apiKeys"]] == ["a"]
    assert await run.cluster.get(secret_path(f"{run.name}-b")) is None


def delete_setup(policy: str) -> Callable[[Run], Awaitable[None]]:
    async def setup(run: Run) -> None:
        await _ready_account(run, {"deletionPolicy": policy, "apiKeys": TWO_KEYS})
        run.expected.gone[run.name] = (run.name, policy, [f"{run.name}-a", f"{run.name}-b"])

    return setup


async def delete_trigger(run: Run) -> None:
    await run.cluster.delete(sa_path(run.name))


def rotate_setup(retain: int) -> Callable[[Run], Awaitable[None]]:
    async def setup(run: Run) -> None:
        await _ready_account(run, {"apiKeys": [{"name": "main"}]})
        secret = await run.cluster.get(secret_path(f"{run.name}-main"))
        run.notes["old_value"] = secret_value(secret)
        run.notes["retain"] = retain
        await run.cluster.create(DEPLOY_LIST.format(ns=NS), deployment_body(run.name))
        await run.cluster.create(
            ROT_LIST.format(ns=NS),
            rotation_body(
                run.name,
                {
                    "serviceAccountName": run.name,
                    "apiKeyName": "main",
                    "period": "1h",
                    "retainPeriodMinutes": retain,
                    "rolloutRestartTargets": [{"kind": "Deployment", "name": run.name}],
                },
            ),
        )
        await _rotation_ready(run)
        run.expected.live = [run.name]

    return setup


async def _rotation_ready(run: Run) -> None:
    async def check() -> bool:
        cond = condition(await run.cluster.get(rot_path(run.name)))
        return bool(cond and cond["status"] == "True")

    await run.cluster.wait_for(check, timeout=20, interval=0.05, message="rotation Ready")


async def rotate_trigger(run: Run) -> None:
    await run.cluster.patch(
        rot_path(run.name), {"metadata": {"annotations": {"zenml.io/rotate": "go"}}}
    )


async def rotate_after(run: Run) -> None:
    async def rotated_once() -> dict[str, Any] | None:
        obj = await run.cluster.get(rot_path(run.name))
        status = (obj or {}).get("status") or {}
        cond = condition(obj)
        done = (
            status.get("rotationCount") == 1
            and status.get("restartedForKeyId") == status.get("currentKeyId")
            and cond is not None
            and cond["status"] == "True"
        )
        return status if done else None

    status = await run.cluster.wait_for(rotated_once, timeout=20, interval=0.1)
    assert restarts(run.cluster, run.name) == [status["currentKeyId"]]  # one restart, once
    secret = await run.cluster.get(secret_path(f"{run.name}-main"))
    assert secret["metadata"]["annotations"]["zenml.io/rotation-count"] == "1"
    account = await run.account()
    created = run.creations.created(account.id)
    # The base key plus ONE rotated generation; a crash between the create and the Secret
    # write leaves an orphan that recovery deletes before the rotation runs again.
    orphans = 1 if run.notes["point"] == "rotation.after-create" else 0
    assert created[0] == "main" and len(created) == 2 + orphans, created
    if run.notes["retain"]:
        from e2e.conftest import logs_in_as

        assert await logs_in_as(run.url, run.notes["old_value"]) == run.name  # retention holds


async def rotation_retire_setup(run: Run) -> None:
    await rotate_setup(1)(run)
    account = await run.account()
    # A crash leftover, referenced by none, named as the next rotation's key would be.
    await run.zenml.create_api_key(account.id, "main.r1")


async def nothing(run: Run) -> None:
    return None


@dataclass(frozen=True)
class Scenario:
    setup: Callable[[Run], Awaitable[None]]
    trigger: Callable[[Run], Awaitable[None]]
    after: Callable[[Run], Awaitable[None]] = nothing


CREATE = Scenario(create_setup, create_trigger, create_after)
UPDATE = Scenario(update_setup, update_trigger, update_after)
REISSUE = Scenario(reissue_setup, reissue_trigger)
RETIRE = Scenario(retire_setup, retire_trigger)
REMOVE = Scenario(remove_setup, remove_trigger, remove_after)
ROTATE = Scenario(rotate_setup(1), rotate_trigger, rotate_after)

CRASH_POINTS: dict[str, Scenario] = {
    # ServiceAccount create
    "sa.create.after-intent": CREATE,
    "sa.create.after-account": CREATE,
    "sa.key.after-create": CREATE,
    "sa.key.after-secret-write": CREATE,
    "sa.reconcile.before-status": CREATE,
    AFTER_STATUS: CREATE,
    # ServiceAccount update
    "sa.update.after-account": UPDATE,
    "sa.key.after-update": UPDATE,
    "sa.key.after-metadata-patch": UPDATE,
    # a Secret lost by hand: the key is re-issued
    "sa.key.after-reissue": REISSUE,
    "sa.key.after-reissue-write": REISSUE,
    # a leftover generation is retired
    "sa.key.after-retire": RETIRE,
    # a key removed from the spec
    "sa.remove-key.after-zenml-delete": REMOVE,
    "sa.remove-key.after-secret-delete": REMOVE,
    # the resource deleted (finalizer)
    "sa.finalize.after-delete": Scenario(delete_setup("Delete"), delete_trigger),
    "sa.finalize.after-deactivate": Scenario(delete_setup("Deactivate"), delete_trigger),
    "sa.finalize.after-secret-delete": Scenario(delete_setup("Delete"), delete_trigger),
    # ApiKeyRotation
    "rotation.before-create": ROTATE,
    "rotation.after-create": ROTATE,
    "rotation.after-secret-write": ROTATE,
    "rotation.after-restart": ROTATE,
    "rotation.after-superseded-retire": Scenario(rotate_setup(0), rotate_trigger, rotate_after),
    # a due rotation meets a leftover of its key's name (409), reads the family, retires it
    "rotation.after-retire": Scenario(rotation_retire_setup, rotate_trigger),
}
CRASHED: set[str] = set()  # points that crashed and recovered in this session


def points_in_source() -> set[str]:
    """Every crash point name in the handlers: `crashpoint("x")` calls, and the names handed to
    helpers that call it (all follow the `sa.` / `rotation.` naming)."""
    calls = re.compile(r"""crashpoint\(\s*["']([^"']+)["']\s*\)""")
    names = re.compile(r"""["']((?:sa|rotation)\.[a-z][a-z0-9-]*(?:\.[a-z][a-z0-9-]*)*)["']""")
    found: set[str] = set()
    for path in HANDLERS.glob("*.py"):
        text = path.read_text()
        found |= set(calls.findall(text)) | set(names.findall(text))
    return found


def _caused_by_crash(exc: BaseException | None) -> bool:
    while exc is not None:
        if isinstance(exc, crashpoints.SimulatedCrash):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def ignore_crash_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    """The killed operator's tasks that died of the crash are dead with it: asyncio need not
    report their exceptions as "never retrieved" when they are collected (maybe at exit)."""

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not _caused_by_crash(context.get("exception")):
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)  # this test's own loop (function-scoped)


def killable(settings: kopf.OperatorSettings) -> None:
    # Kopf gives workers 2 s to drain their queues when the operator is cancelled; a killed
    # process gets none.
    settings.queueing.exit_timeout = 0


async def kill(operator: Any) -> None:
    # The crash may surface through the operator's task: it is dead either way.
    with contextlib.suppress(crashpoints.SimulatedCrash):
        await operator.kill()


@pytest.mark.parametrize("point", list(CRASH_POINTS))
async def test_crash_and_restart_converges(
    point: str,
    cluster,
    start_operator,
    zenml_server,
    zenml_client,
    creations,
    monkeypatch,
    operator_login_cached,
) -> None:
    scenario = CRASH_POINTS[point]
    if point == AFTER_STATUS:
        patch_status = KubeClient.patch_status

        async def patch_then_crash(self, api_version, plural, namespace, name, status):
            written = await patch_status(self, api_version, plural, namespace, name, status)
            if plural == "serviceaccounts" and "conditions" in status:
                await crashpoints.crashpoint(AFTER_STATUS)
            return written

        monkeypatch.setattr(KubeClient, "patch_status", patch_then_crash)

    ignore_crash_leftovers(asyncio.get_running_loop())
    run = Run(cluster, zenml_client, zenml_server.url, creations, unique("crash"))
    run.notes["point"] = point
    foreign = await create_foreign_secret(cluster, f"{run.name}-foreign")
    run.expected.foreign[secret_path(foreign["metadata"]["name"])] = foreign
    operator, _ = await start_operator(settings_hook=killable)
    await scenario.setup(run)

    killed: list[asyncio.Task[None]] = []

    def crash(where: str) -> None:
        # The process dies HERE: nothing after the point runs, and the rest of the operator
        # (other workers, a retry of this handler) gets no time to act either. The kill runs
        # in a task outside the operator's context, or the operator would cancel it as its own.
        loop = asyncio.get_running_loop()
        killed.append(loop.create_task(kill(operator), context=contextvars.Context()))
        raise crashpoints.SimulatedCrash(where)

    crashpoints.arm(point, crash)
    try:
        await scenario.trigger(run)
        await run.cluster.wait_for(lambda: killed, timeout=20, message=f"crash at {point}")
    finally:
        crashpoints.disarm_all()
    await killed[0]
    assert point in crashpoints.seen

    await start_operator(settings_hook=killable)
    await wait_converged(cluster, zenml_client, zenml_server.url, run.expected)
    await scenario.after(run)
    assert creations.duplicates() == [], creations.duplicates()
    assert writes_to(cluster, "secrets", foreign["metadata"]["name"]) == 1
    CRASHED.add(point)


def test_every_crash_point_has_a_scenario(request, capsys) -> None:
    """Runs after the crash tests (file order): checks and prints the coverage."""
    declared = points_in_source() | {AFTER_STATUS}
    assert declared == set(CRASH_POINTS), (
        f"without a scenario: {sorted(declared - set(CRASH_POINTS))}; "
        f"scenario for a point that no longer exists: {sorted(set(CRASH_POINTS) - declared)}"
    )
    selected = {
        item.callspec.params["point"]
        for item in request.session.items
        if item.originalname == "test_crash_and_restart_converges"
    }
    with capsys.disabled():
        print(
            f"\ncrash injection: {len(declared)} injection points declared, "
            f"{len(CRASHED)} crashed and recovered in this run"
        )
    if selected == declared:  # the whole suite ran: every point was reached and survived
        assert declared <= crashpoints.seen, sorted(declared - crashpoints.seen)
        assert declared == CRASHED, sorted(declared - CRASHED)
