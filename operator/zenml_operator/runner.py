"""One reconcile runner for every resource kind (no Kopf in here).

Every reconcile goes through the same steps, in this order:
concurrency slot -> per-object lock -> fresh read -> reconcile -> ONE status write (only the
fields that differ) -> a Warning Event when Ready turns False for a new reason -> metrics.
The reconcile itself is a plain async function of the freshly read object that returns an
`Outcome`; what to do next (retry, sleep until `wake_at`) is the caller's to map to Kopf.

Why a fresh read under the lock: the body a handler or a schedule has may predate the status
the previous run wrote, and deciding on stale status is how duplicates and false
NameConflicts happen. Why the status is written here and not by Kopf after the handler: a
check handed an older body would otherwise overwrite it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from zenml_operator.crashpoints import crashpoint
from zenml_operator.handlers.common import Deps, Outcome, ReconcileProblem, classify, status_patch
from zenml_operator.kube import KubeError
from zenml_operator.metrics import Metrics
from zenml_operator.models import API_VERSION

Reconcile = Callable[[dict[str, Any]], Awaitable[Outcome]]
# Called after the status write with (object, status before, status after): metric series.
Observe = Callable[[Mapping[str, Any], Mapping[str, Any], Mapping[str, Any]], None]
EventPoster = Callable[..., None]


@dataclass(frozen=True)
class Kind:
    """What the runner needs to know about a resource kind."""

    plural: str
    metric_name: str  # the `resource` label of the reconcile metrics
    crash_after_status: str | None = None


def ready_of(status: Mapping[str, Any]) -> tuple[bool, str]:
    """(Ready is True, its reason) from a status about to be written."""
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True", str(cond.get("reason") or "Unknown")
    return False, "Unknown"


def reason_of(exc: BaseException) -> str | None:
    """The Ready reason an exception maps to, for the reconcile metrics."""
    problem = classify(exc)
    return problem.reason if problem is not None else None


def is_new_problem(before: Mapping[str, Any], problem: ReconcileProblem) -> bool:
    """A Warning Event is posted once per reason, not at every retry of the same problem."""
    return not any(c.get("reason") == problem.reason for c in before.get("conditions") or [])


class Runner:
    def __init__(
        self,
        *,
        deps: Deps,
        metrics: Metrics,
        slots: asyncio.Semaphore,
        post_event: EventPoster,
        logger: logging.Logger | None = None,
    ) -> None:
        self.deps = deps
        self.metrics = metrics
        # Taken before any per-object or per-Secret lock, never while holding one: no deadlock.
        self.slots = slots
        self.post_event = post_event
        self.logger = logger or logging.getLogger(__name__)

    async def run(
        self,
        kind: Kind,
        namespace: str,
        name: str,
        uid: str,
        reconcile: Reconcile,
        *,
        observe: Observe | None = None,
        slots: asyncio.Semaphore | None = None,
    ) -> Outcome | None:
        """One reconcile of one object; None when it is gone or being deleted.

        `slots`: the concurrency slots to take instead of the runner's own (background work
        has its own few, so that it never holds a slot a new or changed object needs).

        A Kubernetes error on the read or on the status write comes back as an Outcome with
        a retryable KubernetesError problem (the status could not say so itself).
        """
        async with slots if slots is not None else self.slots:
            with self.metrics.track(kind.metric_name, reason_of=reason_of) as tracked:
                async with self.deps.lock_for(uid):
                    try:
                        fresh = await self.deps.kube.get_object(
                            API_VERSION, kind.plural, namespace, name
                        )
                        if fresh is None or fresh["metadata"].get("uid") != uid:
                            return None
                        if fresh["metadata"].get("deletionTimestamp"):
                            return None  # the deletion handler owns it now
                        outcome = await reconcile(fresh)
                        before = {**(fresh.get("status") or {}), **outcome.recorded}
                        before = {k: v for k, v in before.items() if v is not None}
                        changes = status_patch(before, outcome.status)
                        if changes:
                            await self.deps.kube.patch_status(
                                API_VERSION, kind.plural, namespace, name, changes
                            )
                            if kind.crash_after_status:
                                await crashpoint(kind.crash_after_status)
                    except KubeError as exc:
                        problem = classify(exc)
                        assert problem is not None
                        tracked.failed(problem.reason)
                        return Outcome(status={}, problem=problem)
                    if observe is not None:
                        observe(fresh, before, outcome.status)
                if outcome.problem is None:
                    tracked.outcome(*ready_of(outcome.status))
                else:
                    tracked.failed(outcome.problem.reason)
                    if is_new_problem(before, outcome.problem):
                        self.post_event(
                            fresh,
                            type="Warning",
                            reason=outcome.problem.reason,
                            message=outcome.problem.message,
                        )
                        self.logger.warning(
                            f"{kind.plural} {namespace}/{name}: {outcome.problem.reason}:"
                            f" {outcome.problem.message}"
                        )
                return outcome
