"""Crash injection: the operator dies at every step boundary and a new one converges.

Every crash point in the operator's code is a step boundary: after an intent record, after
each ZenML create/update/delete (each branch of a key retirement has its own), after each
Secret write or delete, before and after the status write. For each one a scenario drives
the operator to that point, the point raises `SimulatedCrash` (nothing
after it runs) and kills the operator at once, as a SIGKILL would (`BackgroundOperator.kill`,
no cleanup handlers, and no time for Kopf's workers to drain: `queueing.exit_timeout = 0`),
and a fresh operator is started on the same cluster and ZenML server. Then the declared
state must be reached with nothing leaked or doubled:

- every declared key's Secret logs in to ZenML as its account;
- no declared key is missing in ZenML, no undeclared key is left, at most two generations
  per declared key (the previous one only inside the retention recorded in its Secret, or
  deactivated after it);
- nothing was created twice in ZenML: each account and each declared key created once, and
  every key the operator created got its value into a Secret, but for the one value a crash
  between a create and its Secret write loses (named per crash point in UNWRITTEN);
- a Secret the operator does not own (dressed up with the operator's labels) is unchanged;
- scenario specifics: the exact rotation count, one restart per rotation, ZenML's own key
  list for the account (names, ids, active flags), deletion policy, ...

`test_every_crash_point_has_a_scenario` scans the operator's sources for crash points and
fails when one has no scenario, or a scenario names a point the code no longer has.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
import pytest

from e2e.conftest import logs_in_as, wait_ready
from e2e.test_rotation import restarts, rotated_keys
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
from zenml_operator.handlers import rotation as rotation_handler
from zenml_operator.handlers import service_account as sa_handler

SOURCE = Path(crashpoints.__file__).parent  # the operator package


@dataclass
class Run:
    """One scenario run: the test's handles plus what the scenario declared."""

    cluster: Any
    zenml: Any
    url: str
    creations: Any
    name: str
    monkeypatch: Any
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
    with run.creations.seeding():
        await run.zenml.create_api_key(account.id, "a.r7")
    run.expected.live = [run.name]


async def retire_trigger(run: Run) -> None:
    await _poke(run)


async def retire_after(run: Run) -> None:
    account = await run.account()
    keys = await run.zenml.list_api_keys(account.id)
    assert [(k.name, k.active) for k in keys] == [("a", True)], keys  # the leftover is gone


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


async def rotate_trigger(run: Run, request: str = "go") -> None:
    await run.cluster.patch(
        rot_path(run.name), {"metadata": {"annotations": {"zenml.io/rotate": request}}}
    )


async def rotated(run: Run, count: int) -> dict[str, Any]:
    """Wait until the rotation reports `count` rotations, the restarts made, and Ready."""

    async def done() -> dict[str, Any] | None:
        obj = await run.cluster.get(rot_path(run.name))
        status = (obj or {}).get("status") or {}
        cond = condition(obj)
        ok = (
            status.get("rotationCount") == count
            and status.get("restartedForKeyId") == status.get("currentKeyId")
            and cond is not None
            and cond["status"] == "True"
        )
        return status if ok else None

    return await run.cluster.wait_for(done, timeout=20, interval=0.1, message=f"{count} rotated")


async def assert_rotations(run: Run, count: int, *, seeded: int = 0) -> dict[str, Any]:
    """Exactly `count` rotations, each written and restarted once, and ZenML's own key list
    is exactly the current key and the previous one (active while its retention lasts)."""
    status = await rotated(run, count)
    assert status["rotationCount"] == count, status
    written = rotated_keys(run.cluster, f"{run.name}-main")
    assert len(written) == count and written[-1] == status["currentKeyId"], written
    assert restarts(run.cluster, run.name) == written  # one restart per rotation, in order
    secret = await run.cluster.get(secret_path(f"{run.name}-main"))
    assert secret["metadata"]["annotations"]["zenml.io/rotation-count"] == str(count)
    account = await run.account()
    keys = await run.zenml.list_api_keys(account.id)
    retained = bool(run.notes["retain"]) and not run.notes.get("retention_over")
    previous = "main" if count == 1 else f"main.r{count - 1}"
    assert sorted((k.id, k.name, k.active) for k in keys) == sorted(
        [
            (status["previousKeyId"], previous, retained),
            (status["currentKeyId"], f"main.r{count}", True),
        ]
    ), keys
    # Every key created: the base key, one per rotation, plus what the test planted (a
    # crash's lost value is counted by the UNWRITTEN check).
    created = run.creations.created(account.id)
    lost = UNWRITTEN.get(run.notes["point"], [])
    expected = ["main", *[f"main.r{i}" for i in range(1, count + 1)]]
    assert created == sorted(expected + lost + ["main.r1"] * seeded), created
    old_value_works = await logs_in_as(run.url, run.notes["old_value"]) == run.name
    assert old_value_works == (retained and count == 1)
    return status


async def rotate_after(run: Run) -> None:
    await assert_rotations(run, 1)


def rotated_setup(retain: int) -> Callable[[Run], Awaitable[None]]:
    """A rotation with a Deployment to restart, rotated once already."""

    async def setup(run: Run) -> None:
        await rotate_setup(retain)(run)
        await rotate_trigger(run, "first")
        await rotated(run, 1)

    return setup


async def second_rotation_trigger(run: Run) -> None:
    await rotate_trigger(run, "second")


async def second_rotation_after(run: Run) -> None:
    await assert_rotations(run, 2)


def retention_over(handler: Any) -> Callable[[], datetime.datetime]:
    """The clock of one handler module jumps past the 1-minute retention (the other one's
    stays real, so only this handler sees the previous key expired)."""

    def later() -> datetime.datetime:
        return datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=2)

    return later


async def expire_for_sa_trigger(run: Run) -> None:
    run.monkeypatch.setattr(sa_handler, "utcnow", retention_over(sa_handler))
    run.notes["retention_over"] = True
    await _poke(run)


async def expire_for_rotation_trigger(run: Run) -> None:
    run.monkeypatch.setattr(rotation_handler, "utcnow", retention_over(rotation_handler))
    run.notes["retention_over"] = True
    # A spec change makes the rotation look again (nothing is due: period 1h -> 2h).
    await run.cluster.patch(rot_path(run.name), {"spec": {"period": "2h"}})


async def rotation_retire_setup(run: Run) -> None:
    await rotate_setup(1)(run)
    account = await run.account()
    # A crash leftover, referenced by none, named as the next rotation's key would be.
    with run.creations.seeding():
        await run.zenml.create_api_key(account.id, "main.r1")


async def rotation_retire_after(run: Run) -> None:
    await assert_rotations(run, 1, seeded=1)


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
RETIRE = Scenario(retire_setup, retire_trigger, retire_after)
REMOVE = Scenario(remove_setup, remove_trigger, remove_after)
ROTATE = Scenario(rotate_setup(1), rotate_trigger, rotate_after)

EXPIRED = "the previous key's retention over"
CRASH_POINTS: dict[str, Scenario] = {
    # ServiceAccount create
    "sa.create.after-intent": CREATE,
    "sa.create.after-account": CREATE,
    "sa.key.after-create": CREATE,
    "sa.key.after-secret-write": CREATE,
    "sa.reconcile.before-status": CREATE,
    "sa.after-status": CREATE,
    # ServiceAccount update
    "sa.update.after-account": UPDATE,
    "sa.key.after-update": UPDATE,
    "sa.key.after-metadata-patch": UPDATE,
    # a Secret lost by hand: the key is re-issued
    "sa.key.after-reissue": REISSUE,
    "sa.key.after-reissue-write": REISSUE,
    # a leftover generation is deleted; an expired previous key is deactivated
    "sa.key.after-retire-delete": RETIRE,
    "sa.key.after-retire-deactivate": Scenario(
        rotated_setup(1), expire_for_sa_trigger, rotate_after
    ),
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
    # the key a rotation superseded: deactivated at once with retention 0 (first rotation),
    # and the one before it deleted (second rotation)
    "rotation.after-superseded-deactivate": Scenario(rotate_setup(0), rotate_trigger, rotate_after),
    "rotation.after-superseded-delete": Scenario(
        rotated_setup(0), second_rotation_trigger, second_rotation_after
    ),
    # a due rotation meets a leftover of its key's name (409), reads the family, deletes it
    "rotation.after-retire-delete": Scenario(
        rotation_retire_setup, rotate_trigger, rotation_retire_after
    ),
    # a look after the retention ended reads the family and deactivates the previous key
    "rotation.after-retire-deactivate": Scenario(
        rotated_setup(1), expire_for_rotation_trigger, rotate_after
    ),
}
# The keys whose value a crash at the point loses (created, never written to a Secret): the
# create answered, the process died before the Secret write. Nothing else may be lost.
UNWRITTEN: dict[str, list[str]] = {
    "sa.key.after-create": ["a"],  # re-issued (ZenML rotate) on recovery: same key, new value
    "rotation.after-create": ["main.r1"],  # an orphan; recovery deletes it and rotates again
}
CRASH_POINT_COUNT = 26  # the figure the README quotes
CRASHED: set[str] = set()  # points that crashed and recovered in this session


def points_in_source() -> dict[str, int]:
    """Every crash point name in the operator's code, with how often it occurs: the names of
    `crashpoint("x")` calls, and the names handed to helpers that call it (all string literals
    named `sa.` / `rotation.` + steps). crashpoints.py itself (the mechanism) is left out."""
    names = re.compile(r"""["']((?:sa|rotation)\.[a-z][a-z0-9-]*(?:\.[a-z][a-z0-9-]*)*)["']""")
    found: Counter[str] = Counter()
    for path in sorted(SOURCE.rglob("*.py")):
        if path.name == "crashpoints.py" or "devstack" in path.parts:
            continue
        found.update(names.findall(path.read_text()))
    return dict(found)


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
    ignore_crash_leftovers(asyncio.get_running_loop())
    run = Run(cluster, zenml_client, zenml_server.url, creations, unique("crash"), monkeypatch)
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
    duplicates = creations.duplicates(cluster, unwritten=UNWRITTEN.get(point, []))
    assert duplicates == [], duplicates
    assert writes_to(cluster, "secrets", foreign["metadata"]["name"]) == 1
    CRASHED.add(point)


def test_every_crash_point_has_a_scenario(capsys) -> None:
    """The code's crash points and the scenario table are the same set, each point at one
    place in the code (a name reused at two steps would crash only one of them). Runs whatever
    else is selected; each scenario test asserts that its own point crashed and recovered."""
    in_code = points_in_source()
    reused = sorted(name for name, count in in_code.items() if count > 1)
    assert reused == [], f"crash point names used at more than one step: {reused}"
    assert set(in_code) == set(CRASH_POINTS), (
        f"without a scenario: {sorted(set(in_code) - set(CRASH_POINTS))}; "
        f"scenario for a point that no longer exists: {sorted(set(CRASH_POINTS) - set(in_code))}"
    )
    assert set(UNWRITTEN) <= set(CRASH_POINTS)
    assert len(CRASH_POINTS) == CRASH_POINT_COUNT
    with capsys.disabled():
        print(
            f"\ncrash injection: {len(in_code)} crash points in the code, each with a scenario; "
            f"{len(CRASHED)} crashed and recovered in this run"
        )
