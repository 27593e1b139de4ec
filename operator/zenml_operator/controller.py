"""What each Kopf handler does, as plain methods (main.py only wires them to Kopf).

One `Controller` per operator: it owns the reconcile slots and builds the runner from the
clients start-up opened. ServiceAccounts are reconciled on create/update/resume (handed
over to a task per object, keyed_tasks.py: Kopf's handler returns at once) and by the resync
schedule (one task for all of them, see due.py); ApiKeyRotations by the look schedule
(rotation_looks.py), fed by raw watch events.

Two lanes (policies.plan_reconcile, policies.rotation_look_in_background): checks of known
state (a resync, the resume of a converged object, an idle rotation look) are background
work: their ZenML requests are paced at the background rate and they take background slots
(ServiceAccount checks are queued to background workers, see background.py). New and
changed objects and due rotations take the reconcile slots and are never paced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Mapping
from typing import Any

import kopf

from zenml_operator import lifecycle
from zenml_operator import policies as pol
from zenml_operator.background import BackgroundChecks
from zenml_operator.config import OperatorConfig
from zenml_operator.due import DueSchedule
from zenml_operator.handlers import deletion
from zenml_operator.handlers import rotation as rot
from zenml_operator.handlers import server_resource as zs
from zenml_operator.handlers import service_account as sa
from zenml_operator.handlers.common import Deps, Outcome, classify
from zenml_operator.keyed_tasks import KeyedTasks
from zenml_operator.kube import KubeError
from zenml_operator.metrics import Metrics
from zenml_operator.models import API_VERSION, ObjectRef
from zenml_operator.peering import PeeringGate
from zenml_operator.rotation_looks import RotationLooks, Tracked
from zenml_operator.runner import Kind, Runner, ready_of, reason_of
from zenml_operator.scheduling import next_look_in
from zenml_operator.servers import PLURALS, ServerKey, key_of_body
from zenml_operator.timestamps import utcnow
from zenml_operator.zenml_api.pacing import background_lane

SERVICE_ACCOUNTS = Kind(
    plural=sa.PLURAL, metric_name="serviceaccount", crash_after_status="sa.after-status"
)
ROTATIONS = Kind(plural=rot.PLURAL, metric_name="apikeyrotation")
SERVERS = {kind: Kind(plural=plural, metric_name=kind.lower()) for kind, plural in PLURALS.items()}
# Background work in progress at once: ServiceAccount checks (workers) and rotation looks
# (slots), each. Their ZenML requests share one rate, so at the default 20/s a check waits
# at most ~0.4 s for its token, which also bounds how long it holds its object's lock.
BACKGROUND_CONCURRENCY = 8

logger = logging.getLogger(__name__)


def first_resync_in(resync_seconds: float) -> float:
    """Seconds from first sight to an object's first resync: spread over the second half of
    the interval, so that objects seen together (an operator start, a bulk apply) do not
    resync together, every interval, in one burst at ZenML."""
    return random.uniform(0.5, 1.0) * resync_seconds


class Controller:
    def __init__(self, config: OperatorConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.slots = asyncio.Semaphore(max(1, config.max_concurrent_reconciles))
        # Background work never takes one of the slots above: it has these.
        self.background_slots = asyncio.Semaphore(BACKGROUND_CONCURRENCY)

    def start(self, memo: Any) -> None:
        """Make this run's shared parts on the operator's memo, before any handler runs.

        Kopf hands each object's handlers a shallow copy of the operator's memo, made when it
        first sees the object: a part first made inside a handler would exist once per
        object (it did: a resync schedule with its task, and up to 8 background workers, per
        ServiceAccount; a look schedule per ApiKeyRotation). Their tasks start at first use,
        from a handler: Kopf's event posting works only in the context it gives handlers."""
        memo.background = BackgroundChecks(
            workers=BACKGROUND_CONCURRENCY, retry_delay=self.config.retry_delay
        )
        memo.reconciles = KeyedTasks(
            retry_delay=self.config.retry_delay, name="zenml-operator reconcile"
        )

        async def resync(ref: ObjectRef) -> None:
            resyncs.set(ref, self.config.resync_seconds)  # the next round, in any case
            # Kopf pauses its own handlers for a peer of higher priority; not this task.
            if await allowed(ref[0]):
                self.queue_service_account_check(memo, *ref)

        async def allowed(namespace: str) -> bool:
            return await self.may_act(memo, namespace)

        memo.resyncs = resyncs = DueSchedule(resync, name="zenml-operator resyncs")

        async def look(tracked: Tracked, woken: bool) -> float | None:
            return await self._look(memo, tracked, woken)

        def forgotten(ref: ObjectRef) -> None:
            lifecycle.deps_of(memo).forget(ref[2])
            self.metrics.forget_rotation(ref[0], ref[1])

        memo.rotation_looks = RotationLooks(
            look=look, allowed=allowed, forgotten=forgotten, retry_delay=self.config.retry_delay
        )

    def connect(self, memo: Any) -> None:
        """The parts that need the Kubernetes client, made once Kopf's first login made it
        (before Kopf watches anything, so before any object's memo is copied)."""
        if getattr(memo, "runner", None) is not None:
            return  # a later login: the client only got new credentials
        deps = lifecycle.deps_of(memo)
        deps.wake_rotation = memo.rotation_looks.wake
        memo.runner = Runner(
            deps=deps, metrics=self.metrics, slots=self.slots, post_event=lifecycle.post_event
        )

    async def may_act(self, memo: Any, namespace: str) -> bool:
        """Whether this operator may act in `namespace` outside Kopf's handlers: Kopf pauses
        its own handlers for a peer of higher priority, not the tasks of the operator's."""
        gate: PeeringGate | None = getattr(memo, "peering", None)
        return gate is None or await gate.allows(lifecycle.deps_of(memo).kube, namespace)

    # The parts `start` and `connect` made (a handler's memo is a copy holding the same).
    def runner(self, memo: Any) -> Runner:
        runner: Runner = memo.runner
        return runner

    def background(self, memo: Any) -> BackgroundChecks:
        """The background ServiceAccount checks (background.py)."""
        checks: BackgroundChecks = memo.background
        return checks

    def reconciles(self, memo: Any) -> KeyedTasks:
        """The ServiceAccount reconciles handed over by Kopf's handlers (keyed_tasks.py)."""
        reconciles: KeyedTasks = memo.reconciles
        return reconciles

    def resyncs(self, memo: Any) -> DueSchedule[ObjectRef]:
        """When each known ServiceAccount is checked next."""
        resyncs: DueSchedule[ObjectRef] = memo.resyncs
        return resyncs

    def rotation_looks(self, memo: Any) -> RotationLooks:
        """The schedule of every rotation's next look (rotation_looks.py)."""
        looks: RotationLooks = memo.rotation_looks
        return looks

    async def aclose(self, memo: Any) -> None:
        for name in ("rotation_looks", "resyncs", "reconciles", "background"):
            part = getattr(memo, name, None)
            if part is not None:
                await part.aclose()

    # --- ServiceAccount ------------------------------------------------------------------

    async def reconcile_service_account(
        self, body: kopf.Body, memo: Any, *, trigger: pol.Trigger
    ) -> None:
        meta, status = body.metadata, body.get("status") or {}
        path = pol.plan_reconcile(
            trigger=trigger,
            generation=meta.get("generation"),
            observed_generation=status.get("observedGeneration"),
            ready=ready_of(status)[0],
        )
        namespace, name, uid = meta.namespace, meta.name, meta.uid
        self.resyncs(memo).setdefault(
            (namespace, name, uid), first_resync_in(self.config.resync_seconds)
        )
        server = key_of_body(body)
        if path.background:
            # Queued, not awaited: Kopf would hold this object's next change behind it.
            self.queue_service_account_check(memo, namespace, name, uid)
            return
        # Handed over, not awaited: a handler waiting for a slot holds Kopf's per-object
        # machinery meanwhile (keyed_tasks.py). A server's ServiceAccounts take that server's
        # slots: the ones of a hanging server cannot fill the slots the others need.
        deps = lifecycle.deps_of(memo)
        slots = deps.servers.slots_for(server) if server else None

        async def reconcile() -> bool:
            if not await self.may_act(memo, namespace):  # a retry comes later than Kopf's call
                return False
            outcome = await self._run_service_account(
                memo, namespace, name, uid, one_read=path.one_read, slots=slots
            )
            return outcome is not None and outcome.problem is not None and outcome.problem.retry

        self.reconciles(memo).submit(uid, reconcile)

    async def _run_service_account(
        self,
        memo: Any,
        namespace: str,
        name: str,
        uid: str,
        *,
        one_read: bool,
        slots: asyncio.Semaphore | None = None,
    ) -> Outcome | None:
        runner = self.runner(memo)

        async def reconcile(fresh: dict[str, Any]) -> Outcome:
            return await sa.ServiceAccountReconciler(fresh, runner.deps).run(one_read=one_read)

        outcome = await runner.run(
            SERVICE_ACCOUNTS,
            namespace,
            name,
            uid,
            reconcile,
            observe=self._observe_service_account,
            slots=slots,
        )
        if outcome is None:  # gone, or being deleted: its finalizer is on its way
            self.metrics.forget_service_account(namespace, name)
            self.resyncs(memo).discard((namespace, name, uid))
        return outcome

    def _observe_service_account(
        self, obj: Mapping[str, Any], before: Mapping[str, Any], after: Mapping[str, Any]
    ) -> None:
        meta = obj["metadata"]
        self.metrics.set_api_keys(meta["namespace"], meta["name"], after.get("apiKeys"))

    async def finalize_service_account(self, body: kopf.Body, memo: Any) -> None:
        deps = lifecycle.deps_of(memo)
        meta = body.metadata
        with self.metrics.track("serviceaccount", reason_of=reason_of) as tracked:
            async with deps.lock_for(meta.uid):
                try:
                    fresh = await deps.kube.get_object(
                        API_VERSION, sa.PLURAL, meta.namespace, meta.name
                    )
                    released = await deletion.finalize(fresh or body, deps)
                except Exception as exc:
                    problem = classify(exc)
                    if problem is None:
                        raise
                    tracked.failed(problem.reason)
                    raise kopf.TemporaryError(
                        problem.message, delay=self.config.retry_delay
                    ) from None
            tracked.ok("Finalized")
        self.metrics.forget_service_account(meta.namespace, meta.name)
        self.resyncs(memo).discard((meta.namespace, meta.name, meta.uid))
        deps.forget(meta.uid, secrets=[(meta.namespace, name) for name in released])

    # --- ZenMLServer / ClusterZenMLServer --------------------------------------------------

    async def check_server(self, body: kopf.Body, memo: Any, *, retry: bool) -> None:
        """Check a server resource and write its status; `retry`: a failure that may heal
        is retried after the retry delay (the timer checks again anyway).

        A check of a new generation (its URL, CA or Pro API URL may have changed, or it was
        just created) also queues a check of every ServiceAccount that uses it, so their
        Secrets follow at once, not at their next resync."""
        runner = self.runner(memo)
        servers = runner.deps.servers
        meta = body.metadata
        observed = (body.get("status") or {}).get("observedGeneration")

        async def reconcile(fresh: dict[str, Any]) -> Outcome:
            return await zs.check_server(
                fresh, servers, check_every=self.config.server_check_seconds
            )

        outcome = await runner.run(
            SERVERS[body["kind"]], meta.namespace, meta.name, meta.uid, reconcile
        )
        if outcome is not None and outcome.problem is None and observed != meta.get("generation"):
            key = ServerKey(body["kind"], meta.namespace, meta.name)
            for namespace, name, uid in await self.server_users(runner.deps, key):
                self.queue_service_account_check(memo, namespace, name, uid)
        if retry and outcome is not None and outcome.problem is not None and outcome.problem.retry:
            raise kopf.TemporaryError(outcome.problem.message, delay=self.config.retry_delay)

    def queue_service_account_check(self, memo: Any, namespace: str, name: str, uid: str) -> None:
        """A background check of one ServiceAccount (paced, on background workers)."""

        async def check() -> bool:
            outcome = await self._run_service_account(
                memo, namespace, name, uid, one_read=True, slots=self.background_slots
            )
            return outcome is not None and outcome.problem is not None and outcome.problem.retry

        self.background(memo).submit(uid, check)

    async def finalize_server(self, body: kopf.Body, memo: Any) -> None:
        """Held while ServiceAccounts use the server (they need it to delete their keys)."""
        deps = lifecycle.deps_of(memo)
        meta = body.metadata
        key = ServerKey(body["kind"], meta.namespace, meta.name)
        using = sorted(f"{ns}/{name}" for ns, name, _ in await self.server_users(deps, key))
        if not using:
            if deps.servers is not None:
                await deps.servers.drop(key)
            return
        message = zs.users_message(key.kind, key.name, using)
        status = body.get("status") or {}
        before = next(
            (c for c in status.get("conditions") or [] if c.get("type") == zs.DELETION_BLOCKED),
            None,
        )
        if before is None or before.get("message") != message:
            lifecycle.post_event(body, type="Warning", reason="InUse", message=message)
            conditions = zs.blocked_conditions(status, message, meta.get("generation"))
            with contextlib.suppress(KubeError):  # a courtesy: the finalizer is what holds
                await deps.kube.patch_status(
                    API_VERSION, key.plural, key.namespace, key.name, {"conditions": conditions}
                )
        raise kopf.TemporaryError(message, delay=self.config.retry_delay)

    async def server_users(self, deps: Deps, key: ServerKey) -> list[tuple[str, str, str]]:
        """(namespace, name, uid) of the ServiceAccounts that name this server.

        A scan of the ServiceAccounts (a page at a time), not a Kopf index: it is needed only
        when a server changes or goes, and an index would make every operator start wait
        until all ServiceAccounts are indexed before any handler runs."""
        namespaces: list[str | None] = (
            [key.namespace] if key.namespace else [*self.config.namespaces] or [None]
        )
        found = []
        for namespace in namespaces:
            async for obj in deps.kube.iter_objects(API_VERSION, sa.PLURAL, namespace):
                if key_of_body(obj) == key:
                    meta = obj["metadata"]
                    found.append((meta["namespace"], meta["name"], meta["uid"]))
        return found

    # --- ApiKeyRotation ------------------------------------------------------------------

    def rotation_seen(
        self, memo: Any, body: kopf.Body, event_type: str | None, claims: kopf.Index[Any, Any]
    ) -> None:
        """Every watch event of an ApiKeyRotation: track it, wake its look on a change."""
        deps = lifecycle.deps_of(memo)
        deps.rotation_claims = lambda ns, account, key: list(claims.get((ns, account, key), ()))
        self.rotation_looks(memo).seen(body, event_type)

    async def _look(self, memo: Any, tracked: Tracked, woken: bool) -> float | None:
        background = pol.rotation_look_in_background(
            woken_by_change=woken,
            now=utcnow(),
            next_rotation=tracked.next_rotation,
            request=tracked.request,
            answered_request=tracked.answered_request,
        )
        try:
            return await self.look_at_rotation(memo, *tracked.ref, background=background)
        except Exception as exc:  # a bug or an unexpected API answer: log and go on
            problem = classify(exc)
            namespace, name, _ = tracked.ref
            if problem is None:
                logger.exception(f"Look at ApiKeyRotation {namespace}/{name} failed; retrying")
            else:
                logger.warning(
                    f"ApiKeyRotation {namespace}/{name}: {problem.reason}: {problem.message}"
                )
            return self.config.retry_delay

    async def look_at_rotation(
        self, memo: Any, namespace: str, name: str, uid: str, *, background: bool = False
    ) -> float | None:
        """One look at a rotation; returns the seconds until it needs the next one, or None
        when it is gone or being deleted."""
        runner = self.runner(memo)

        async def reconcile(fresh: dict[str, Any]) -> Outcome:
            return await rot.RotationReconciler(fresh, runner.deps).run()

        async def look() -> Outcome | None:
            return await runner.run(
                ROTATIONS,
                namespace,
                name,
                uid,
                reconcile,
                observe=self._observe_rotation,
                slots=self.background_slots if background else None,
            )

        if background:
            with background_lane():
                outcome = await look()
        else:
            outcome = await look()
        if outcome is None:
            self.metrics.forget_rotation(namespace, name)
            return None
        return next_look_in(
            outcome,
            now=utcnow(),
            retry_delay=self.config.retry_delay,
            resync_seconds=self.config.resync_seconds,
        )

    def _observe_rotation(
        self, obj: Mapping[str, Any], before: Mapping[str, Any], after: Mapping[str, Any]
    ) -> None:
        """Rotation metrics from the status just written (counted once it is written)."""
        meta, spec = obj["metadata"], obj.get("spec") or {}
        account, key = spec.get("serviceAccountName"), spec.get("apiKeyName")
        self.metrics.set_rotation(
            meta["namespace"],
            meta["name"],
            serviceaccount=account,
            key=key,
            next_rotation=after.get("nextRotationTime"),
        )
        done = int(after.get("rotationCount") or 0) - int(before.get("rotationCount") or 0)
        if done > 0:
            self.metrics.rotated(meta["namespace"], meta["name"], done)
            if account and key:
                self.metrics.key_issued_at(
                    meta["namespace"], account, key, after.get("lastRotationTime")
                )

    @staticmethod
    def rotation_claim(
        namespace: str, name: str, spec: Mapping[str, Any], meta: Mapping[str, Any]
    ) -> dict[tuple[str, Any, Any], tuple[str, str]]:
        """Which key a rotation claims, for the index the duplicate check reads."""
        target = (namespace, spec.get("serviceAccountName"), spec.get("apiKeyName"))
        return {target: (str(meta.get("creationTimestamp") or ""), name)}
