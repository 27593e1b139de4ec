"""Repair a managed Secret within seconds: reconcile its owner when the Secret watch sees it
change (deleted, value replaced or removed, labels or owner reference stripped).

`SecretRepairs` receives every change from `secret_watch.SecretWatch` and, per owning
ServiceAccount:
- waits a short settle time, so that a burst of changes (an edit touching several fields,
  a Secret deleted and re-created) makes one reconcile;
- drops the echoes of the operator's own writes (the resourceVersion its create/patch left,
  the uid it deleted): a converged operator writes nothing, so its writes cause no further
  reconcile, and even a missed echo only costs one reconcile that writes nothing;
- runs the ordinary ServiceAccount reconcile through the one runner (the same per-object
  lock, fresh read and single status write as Kopf's handlers), on slots of its own and with
  a small ZenML client of its own, so that a repair never waits behind a burst of creates
  for a reconcile slot or for one of the few key-create slots (the ZenML server's CPU is
  still shared: a re-issue is one bcrypt among those of the creates);
- then wakes the rotations of that ServiceAccount, whose next look reads the repaired
  Secret (a re-issue moves its schedule; a rotation waiting for a missing Secret goes on);
- retries after the retry delay while the problem may heal itself (ZenML away).

It acts outside Kopf's handlers, which Kopf pauses when a peer of higher priority runs
(`--peering`): it then asks Kopf's peering object whether this operator leads
(policies.peering_allows) and leaves the Secret to the leader if not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

from zenml_operator import lifecycle
from zenml_operator import zenml_api as zc
from zenml_operator.config import OperatorConfig
from zenml_operator.controller import SERVICE_ACCOUNTS
from zenml_operator.handlers import service_account as sa
from zenml_operator.handlers.common import Deps, Outcome, overlay
from zenml_operator.kube import KubeError
from zenml_operator.metrics import Metrics
from zenml_operator.models import API_VERSION
from zenml_operator.peering import PeeringGate
from zenml_operator.runner import Runner
from zenml_operator.secret_watch import SecretChange, SecretWatch
from zenml_operator.timestamps import utcnow

WRITE_SETTLE_TIMEOUT = 15.0  # seconds: at most one Kubernetes request timeout

logger = logging.getLogger(__name__)


class SecretRepairs:
    def __init__(
        self,
        *,
        deps: Deps,
        metrics: Metrics,
        peering: PeeringGate | None = None,  # None: act always (no Kopf peering)
        reporting_component: str = "kopf",
        reporting_instance: str = "kopf",
        retry_delay: float = 15.0,
        settle: float = 0.25,
        concurrency: int = 8,
        zenml: zc.ZenMLClient | None = None,
    ) -> None:
        # Kopf's kopf.event() works only inside its handlers' tasks: these runs post their
        # Events themselves (same shape, same component). Locks, wake-ups and clients are
        # the handlers' own (a copy of Deps shares them).
        self.events = EventPoster(
            deps.kube, component=reporting_component, instance=reporting_instance
        )
        # A ZenML client of its own (`zenml`): a re-issue never waits for one of the few
        # key-create slots behind a wave of creates in the handlers' client.
        self.own_zenml = zenml
        self.deps = overlay(deps, events=self.events, zenml=zenml or deps.zenml)
        self.metrics = metrics
        self.peering = peering
        self.retry_delay = retry_delay
        self.settle = settle
        # Slots of its own: a repair never queues behind a burst of creates for a slot.
        self.runner = Runner(
            deps=self.deps,
            metrics=metrics,
            slots=asyncio.Semaphore(max(1, concurrency)),
            post_event=self.events,
        )
        self._pending: dict[tuple[str, str], list[SecretChange]] = {}
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.runs = 0  # reconciles started by Secret changes (tests, the benchmark)

    # --- from the watch --------------------------------------------------------------------

    def secret_changed(self, change: SecretChange) -> None:
        """Called by the watch for every change of a managed Secret (no I/O here)."""
        owner = (change.namespace, change.owner)
        self._pending.setdefault(owner, []).append(change)
        if owner not in self._tasks:
            name = f"zenml-operator repair {change.namespace}/{change.owner}"
            self._tasks[owner] = asyncio.create_task(self._drain(owner), name=name)

    @property
    def idle(self) -> bool:
        """No change waiting and no repair running (tests, the benchmark)."""
        return not self._pending and not self._tasks

    async def aclose(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._pending.clear()
        await self.events.aclose()
        if self.own_zenml is not None:
            await self.own_zenml.aclose()

    # --- per owner --------------------------------------------------------------------------

    async def _drain(self, owner: tuple[str, str]) -> None:
        try:
            while owner in self._pending:
                await asyncio.sleep(self.settle)  # let a burst of changes settle into one run
                changes = self._pending.pop(owner, [])
                # An echo can come before the answer of the write that caused it (a busy
                # loop): wait for that answer, or the echo looks like someone else's change.
                await self.deps.kube.secret_writes_settled(
                    owner[0], {c.name for c in changes}, timeout=WRITE_SETTLE_TIMEOUT
                )
                external = [c for c in changes if not self._own(c)]
                if not external:
                    continue  # only echoes of the operator's own writes
                gate = self.peering
                if gate is not None and not await gate.allows(self.deps.kube, owner[0]):
                    logger.debug(f"Secret change of {owner}: left to the leading peer")
                    continue
                uid = next((c.owner_uid for c in reversed(external) if c.owner_uid), None)
                names = sorted({c.name for c in external})
                if await self._repair(owner, uid, names):
                    await asyncio.sleep(self.retry_delay)
                    self._pending.setdefault(owner, []).extend(external)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug: the next resync repairs the Secret anyway
            logger.exception(f"Repairing the Secrets of {owner[0]}/{owner[1]} failed")
        finally:
            self._tasks.pop(owner, None)

    def _own(self, change: SecretChange) -> bool:
        kube = self.deps.kube
        own = kube.is_own_change(
            change.type, change.namespace, change.name, version=change.version, uid=change.uid
        )
        if change.type == "DELETED":
            kube.forget_secret(change.namespace, change.name)
        return own

    async def _repair(self, owner: tuple[str, str], uid: str | None, secrets: list[str]) -> bool:
        """One reconcile of the owner; True when it should be tried again later."""
        namespace, name = owner
        if uid is None:  # only the label names the owner: its uid from the object
            try:
                obj = await self.deps.kube.get_object(API_VERSION, sa.PLURAL, namespace, name)
            except KubeError as exc:
                logger.warning(f"Secret change of {namespace}/{name}: cannot read it: {exc}")
                return True
            if obj is None:
                return False
            uid = str(obj["metadata"]["uid"])
        logger.info(
            f"Secret {', '.join(secrets)} of ServiceAccount {namespace}/{name} changed;"
            " reconciling it now"
        )
        self.runs += 1
        declared: list[str] = []

        async def reconcile(fresh: dict[str, Any]) -> Outcome:
            keys = (fresh.get("spec") or {}).get("apiKeys") or []
            declared.extend(str(k.get("name")) for k in keys if isinstance(k, Mapping))
            # One ZenML read (the key list) when the resource is converged, as a resync.
            return await sa.ServiceAccountReconciler(fresh, self.deps).run(one_read=True)

        started = time.monotonic()
        outcome = await self.runner.run(
            SERVICE_ACCOUNTS, namespace, name, uid, reconcile, observe=self._observe
        )
        if outcome is None:
            return False  # gone or being deleted
        logger.info(
            f"ServiceAccount {namespace}/{name} reconciled after a Secret change in"
            f" {time.monotonic() - started:.2f}s"
            + (f" ({outcome.problem.reason})" if outcome.problem is not None else "")
        )
        await self._wake_rotations(namespace, name, declared)
        return outcome.problem is not None and outcome.problem.retry

    def _observe(
        self, obj: Mapping[str, Any], before: Mapping[str, Any], after: Mapping[str, Any]
    ) -> None:
        meta = obj["metadata"]
        self.metrics.set_api_keys(meta["namespace"], meta["name"], after.get("apiKeys"))

    async def _wake_rotations(self, namespace: str, account: str, keys: list[str]) -> None:
        """Bring the next looks of the rotations of this account's keys forward to now
        (Kopf's index names them; the look schedule knows them by uid)."""
        claims = self.deps.rotation_claims
        names = {name for key in keys for _, name in claims(namespace, account, key)}
        for name in sorted(names):
            try:
                rotation = await self.deps.kube.get_object(
                    API_VERSION, "apikeyrotations", namespace, name
                )
            except KubeError:
                continue
            uid = (rotation or {}).get("metadata", {}).get("uid")
            if uid:
                self.deps.wake_rotation(uid)


class EventPoster:
    """Posts core v1 Events as Kopf does (fire and forget; a failure is only logged)."""

    def __init__(self, kube: Any, *, component: str, instance: str) -> None:
        self.kube = kube
        self.component = component
        self.instance = instance
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, body: Mapping[str, Any], *, type: str, reason: str, message: str) -> None:
        meta = body.get("metadata") or {}
        now = utcnow().isoformat()
        event = {
            "metadata": {"namespace": meta.get("namespace"), "generateName": "kopf-event-"},
            "type": type,
            "reason": reason,
            "message": message[:1024],
            "action": "Repair",
            "reportingComponent": self.component,
            "reportingInstance": self.instance,
            "source": {"component": self.component},
            "involvedObject": {
                "apiVersion": body.get("apiVersion"),
                "kind": body.get("kind"),
                "name": meta.get("name"),
                "uid": meta.get("uid"),
                "namespace": meta.get("namespace"),
            },
            "firstTimestamp": now,
            "lastTimestamp": now,
            "eventTime": now,
        }
        task = asyncio.create_task(self._post(str(meta.get("namespace")), event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, namespace: str, event: Mapping[str, Any]) -> None:
        try:
            await self.kube.create_event(namespace, event)
        except Exception as exc:  # Events are auxiliary: never fail the repair
            logger.warning(f"Failed to post an event ({exc}): {event['reason']}")

    async def aclose(self) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)


# --- start-up and clean-up (called by main.py's activities) ---------------------------------


def start(memo: Any, config: OperatorConfig, metrics: Metrics, settings: Any) -> None:
    """Start the Secret watch once Kopf's login has made the Kubernetes client (start-up
    runs before the login; lifecycle.login announces the client)."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    memo.kube_waiter = (loop, ready)
    scopes: tuple[str | None, ...] = tuple(config.namespaces) or (None,)

    async def run() -> None:
        if getattr(memo, "kube", None) is None:
            await ready.wait()
        deps = lifecycle.deps_of(memo)
        # Few connections and key-create slots: repairs are rare, and a burst of them is
        # bounded by the reconcile slots of SecretRepairs anyway.
        zenml = zc.ZenMLClient(
            config.zenml_url,
            config.zenml_api_key,
            timeout=config.zenml_timeout,
            max_retries=config.zenml_retries,
            username=config.zenml_username,
            max_connections=8,
            heavy_concurrency=2,
            observer=metrics.observe_zenml_request,
        )
        memo.secret_repairs = found = SecretRepairs(
            deps=deps,
            zenml=zenml,
            metrics=metrics,
            peering=getattr(memo, "peering", None),  # the start-up handler's, shared
            reporting_component=settings.posting.reporting_component,
            reporting_instance=settings.posting.reporting_instance,
            retry_delay=config.retry_delay,
        )
        memo.secret_watch = watch = SecretWatch(deps.kube, scopes, found.secret_changed)
        watch.start()

    memo.secret_watch_starter = asyncio.create_task(run(), name="zenml-operator secret watch")


async def stop(memo: Any) -> None:
    starter = getattr(memo, "secret_watch_starter", None)
    if starter is not None:
        starter.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await starter
    watch = getattr(memo, "secret_watch", None)
    if watch is not None:
        await watch.stop()
    found = getattr(memo, "secret_repairs", None)
    if found is not None:
        await found.aclose()
    memo.secret_watch_starter = memo.secret_watch = memo.secret_repairs = None
