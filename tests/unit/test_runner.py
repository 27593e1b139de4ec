"""The reconcile runner with an in-memory Kubernetes stand-in (no Kopf, kmock or ZenML):
one status write of the diff, none when converged, a Warning Event once per new reason."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from zenml_operator.handlers.common import Deps, Outcome, ReconcileProblem
from zenml_operator.kube import KubeError
from zenml_operator.metrics import Metrics
from zenml_operator.runner import Kind, Runner
from zenml_operator.secrets import ServerData

KIND = Kind(plural="things", metric_name="thing")


class FakeKube:
    """Just the two calls the runner makes, with a write log."""

    def __init__(self, obj: dict[str, Any] | None) -> None:
        self.obj = obj
        self.status_writes: list[dict[str, Any]] = []
        self.fail_reads = False

    async def get_object(self, api_version: str, plural: str, ns: str, name: str) -> Any:
        if self.fail_reads:
            raise KubeError(503, "GET", "/x", "ServiceUnavailable", "down")
        return self.obj

    async def patch_status(self, api_version: str, plural: str, ns: str, name: str, body: Any):
        self.status_writes.append(dict(body))
        status = dict(self.obj.get("status") or {})
        for k, v in body.items():
            if v is None:
                status.pop(k, None)
            else:
                status[k] = v
        self.obj["status"] = status
        return self.obj


def make(obj: dict[str, Any] | None) -> tuple[Runner, FakeKube, list[tuple[str, str]]]:
    kube = FakeKube(obj)
    events: list[tuple[str, str]] = []
    deps = Deps(
        zenml=None, kube=kube, server_data=ServerData("http://z"), events=lambda *a, **k: None
    )  # type: ignore[arg-type]
    runner = Runner(
        deps=deps,
        metrics=Metrics(),
        slots=asyncio.Semaphore(1),
        post_event=lambda body, **kw: events.append((kw["type"], kw["reason"])),
    )
    return runner, kube, events


def thing(status: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "a", "namespace": "ns", "uid": "u1", **meta},
        "status": status or {},
    }


def ready(ok: bool, reason: str) -> dict[str, Any]:
    return {"conditions": [{"type": "Ready", "status": str(ok), "reason": reason}]}


async def test_writes_only_the_fields_that_differ_then_nothing() -> None:
    runner, kube, _ = make(thing({"keep": 1, "stale": 2}))

    async def reconcile(fresh: dict[str, Any]) -> Outcome:
        return Outcome({"keep": 1, "new": 3, **ready(True, "Reconciled")})

    await runner.run(KIND, "ns", "a", "u1", reconcile)
    assert kube.status_writes == [
        {"new": 3, "conditions": ready(True, "Reconciled")["conditions"], "stale": None}
    ]
    await runner.run(KIND, "ns", "a", "u1", reconcile)
    assert len(kube.status_writes) == 1  # converged: no write at all


async def test_fields_recorded_during_the_run_are_removed_in_the_same_write() -> None:
    # An intent written mid-run (before a ZenML create) is gone from the desired status:
    # the one final write removes it, so a converged object is not written again later.
    runner, kube, _ = make(thing({}))

    async def reconcile(fresh: dict[str, Any]) -> Outcome:
        await kube.patch_status("v", "things", "ns", "a", {"createRequestedAt": "t"})
        return Outcome({"accountId": "x"}, recorded={"createRequestedAt": "t"})

    await runner.run(KIND, "ns", "a", "u1", reconcile)
    assert kube.status_writes[-1] == {"accountId": "x", "createRequestedAt": None}
    assert kube.obj["status"] == {"accountId": "x"}


@pytest.mark.parametrize(
    "obj",
    [None, thing(uid="other"), thing(deletionTimestamp="2026-01-01T00:00:00Z")],
    ids=["gone", "replaced", "deleting"],
)
async def test_skips_what_is_not_this_object_any_more(obj: dict[str, Any] | None) -> None:
    runner, kube, _ = make(obj)
    if obj is not None:
        obj["metadata"].setdefault("uid", "u1")

    async def reconcile(fresh: dict[str, Any]) -> Outcome:
        raise AssertionError("must not run")

    assert await runner.run(KIND, "ns", "a", "u1", reconcile) is None
    assert kube.status_writes == []


async def test_a_warning_event_once_per_new_reason() -> None:
    runner, _, events = make(thing())
    problem = ReconcileProblem("NameConflict", "taken")

    async def reconcile(fresh: dict[str, Any]) -> Outcome:
        return Outcome(ready(False, "NameConflict"), problem)

    await runner.run(KIND, "ns", "a", "u1", reconcile)
    await runner.run(KIND, "ns", "a", "u1", reconcile)
    assert events == [("Warning", "NameConflict")]


async def test_a_kubernetes_error_is_a_retryable_outcome() -> None:
    runner, kube, events = make(thing())
    kube.fail_reads = True

    async def reconcile(fresh: dict[str, Any]) -> Outcome:
        raise AssertionError("must not run")

    outcome = await runner.run(KIND, "ns", "a", "u1", reconcile)
    assert outcome is not None and outcome.problem is not None
    assert (outcome.problem.reason, outcome.problem.retry) == ("KubernetesError", True)
    assert events == []
