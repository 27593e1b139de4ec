"""Kopf wiring: every decorator of the operator lives here, and only wiring.

`build_registry(config)` returns a fresh registry so that the resync interval comes from
configuration and tests can run several operators (or restart one) in one process. Pass
`metrics=` to share a `Metrics` (the CLI serves it); otherwise each registry gets its own,
exposed as `memo.metrics` from start-up.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import kopf

from zenml_operator import zenml_api as zc
from zenml_operator.config import OperatorConfig
from zenml_operator.handlers import rotation as rot
from zenml_operator.handlers import service_account as sa
from zenml_operator.handlers.common import Deps, classify, status_patch
from zenml_operator.kube import KubeClient, KubeError, kube_login
from zenml_operator.metrics import Metrics
from zenml_operator.models import API_VERSION, GROUP, ROTATE_ANNOTATION, VERSION

PREFIX = "operator.zenml.io"
FINALIZER = "zenml.io/finalizer"


def _post_event(body: Any, *, type: str, reason: str, message: str) -> None:
    kopf.event(body, type=type, reason=reason, message=message)


def _deps(memo: Any) -> Deps:
    if getattr(memo, "deps", None) is None:
        memo.deps = Deps(
            zenml=memo.zenml,
            kube=memo.kube,
            secret_url=memo.config.url_for_secrets,
            events=_post_event,
            resync_seconds=memo.config.resync_seconds,
        )
    return memo.deps


async def sleep_until(stopped: kopf.DaemonStopped, wakeup: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less if the daemon is stopped or woken up."""
    waiters = {
        asyncio.ensure_future(stopped.wait()),  # type: ignore[arg-type]
        asyncio.ensure_future(wakeup.wait()),
    }
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    wakeup.clear()


def _reason_of(exc: BaseException) -> str | None:
    """The Ready reason an exception maps to, for the reconcile metrics."""
    problem = classify(exc)
    return problem.reason if problem is not None else None


def _ready(status: dict[str, Any]) -> tuple[bool, str]:
    """(Ready is True, its reason) from a status about to be written."""
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True", str(cond.get("reason") or "Unknown")
    return False, "Unknown"


def build_registry(
    config: OperatorConfig, *, metrics: Metrics | None = None
) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    metrics = metrics if metrics is not None else Metrics()
    # Taken before any per-object or per-Secret lock, never while holding one: no deadlock.
    reconcile_slots = asyncio.Semaphore(max(1, config.max_concurrent_reconciles))

    @kopf.on.startup(registry=registry)
    async def startup(
        settings: kopf.OperatorSettings, memo: Any, logger: logging.Logger, **_: Any
    ) -> None:
        # Kopf's own bookkeeping goes to annotations: status fields outside our schema
        # would be pruned by the API server.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=PREFIX, key="last-handled-configuration"
        )
        settings.persistence.finalizer = FINALIZER
        settings.posting.level = logging.INFO
        # Events are posted by a few workers, not one task per event (a burst of thousands).
        if settings.posting.worker_limit is None:
            settings.posting.worker_limit = 8
        # A resync in flight when the resource is deleted must not hold the finalizer for
        # Kopf's default 60 s polling period.
        settings.background.instant_exit_timeout = 0.5
        settings.background.cancellation_polling = 1.0
        settings.watching.server_timeout = 600
        settings.watching.client_timeout = 660
        memo.config = config
        memo.metrics = metrics
        metrics.readiness.started = metrics.readiness.stopping = False
        memo.zenml = zc.ZenMLClient(
            config.zenml_url,
            config.zenml_api_key,
            timeout=config.zenml_timeout,
            max_retries=config.zenml_retries,
            username=config.zenml_username,
            max_connections=config.zenml_max_connections,
            heavy_concurrency=config.zenml_heavy_concurrency,
            observer=metrics.observe_zenml_request,
        )
        zenml = memo.zenml

        async def check_login() -> str:
            # The login request itself reports to readiness (the client's observer); this
            # adds the reason when no request was made (e.g. an unreadable key file).
            try:
                return str(await zenml.current_user_name())
            except zc.ZenMLError as exc:
                if metrics.readiness.login_ok is not True:
                    metrics.readiness.login_failed(str(exc))
                raise

        try:
            who = await check_login()
            logger.info(f"Logged in to ZenML at {config.zenml_url} as {who!r}")
        except zc.ZenMLError as exc:
            # Not fatal: every resource reports it and the operator retries with backoff.
            logger.error(f"Cannot log in to ZenML at {config.zenml_url}: {exc}")
        # /readyz retries a failed login itself (an operator with no resources would not).
        metrics.readiness.relogin = check_login
        metrics.readiness.started = True

    @kopf.on.login(registry=registry)
    def login(
        memo: Any, logger: logging.Logger, settings: kopf.OperatorSettings, **kwargs: Any
    ) -> kopf.ConnectionInfo | None:
        if config.kube_api_url:
            info = kopf.ConnectionInfo(server=config.kube_api_url, default_namespace="default")
        else:
            info = kube_login(logger=logger, settings=settings, **kwargs)
        if info is None:
            return None
        if getattr(memo, "kube", None) is None:
            memo.kube = KubeClient(info)
        else:
            memo.kube.update_credentials(info)
        return info

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: Any, **_: Any) -> None:
        metrics.readiness.stopping = True
        metrics.readiness.relogin = None
        await metrics.readiness.aclose()
        for name in ("zenml", "kube"):
            client = getattr(memo, name, None)
            if client is not None:
                await client.aclose()

    async def reconcile_service_account(
        body: kopf.Body, memo: Any, logger: logging.Logger, resync: bool = False, **_: Any
    ) -> None:
        async with reconcile_slots:
            with metrics.track("serviceaccount", reason_of=_reason_of) as tracked:
                try:
                    await _reconcile_service_account(body, memo, logger, tracked, resync)
                except KubeError as exc:
                    # The fresh read or the status write failed: the status cannot say so,
                    # but the retry must come after retry_delay, not Kopf's default minute.
                    raise kopf.TemporaryError(
                        f"Kubernetes API error: {exc}; retrying", delay=config.retry_delay
                    ) from None

    async def resync_service_account(
        body: kopf.Body, memo: Any, logger: logging.Logger, **_: Any
    ) -> None:
        await reconcile_service_account(body, memo, logger, resync=True)

    async def _reconcile_service_account(
        body: kopf.Body, memo: Any, logger: logging.Logger, tracked: Any, resync: bool
    ) -> None:
        deps = _deps(memo)
        meta = body.metadata
        async with deps.lock_for(meta.uid):
            # Re-read under the lock: the body Kopf hands a timer may predate the status
            # the previous handler wrote, and deciding on stale status is how duplicates and
            # false NameConflicts happen.
            fresh = await deps.kube.get_object(API_VERSION, sa.PLURAL, meta.namespace, meta.name)
            if fresh is None:
                metrics.forget_service_account(meta.namespace, meta.name)
                return
            if fresh["metadata"].get("uid") != meta.uid:
                return
            if fresh["metadata"].get("deletionTimestamp"):
                return  # the deletion handler owns it now
            problem = None
            try:
                desired = await sa.ServiceAccountReconciler(fresh, deps).run(resync=resync)
            except sa.ReconcileFailed as failed:
                desired, problem = failed.status, failed.problem
            # Status is written here, under the lock, not by Kopf after the handler.
            changes = status_patch(fresh.get("status"), desired)
            if changes:
                await deps.kube.patch_status(
                    API_VERSION, sa.PLURAL, meta.namespace, meta.name, changes
                )
            metrics.set_api_keys(meta.namespace, meta.name, desired.get("apiKeys"))
        if problem is None:
            tracked.outcome(*_ready(desired))
            return
        tracked.failed(problem.reason)
        previous = (fresh.get("status") or {}).get("conditions") or []
        if not any(c.get("reason") == problem.reason for c in previous):
            kopf.event(fresh, type="Warning", reason=problem.reason, message=problem.message)
        if problem.retry:
            raise kopf.TemporaryError(problem.message, delay=config.retry_delay)
        logger.warning(f"{problem.reason}: {problem.message}")

    async def rotate_once(body: kopf.Body, deps: Deps, logger: logging.Logger) -> float:
        """One look at a rotation; returns how many seconds until it needs the next one."""
        async with reconcile_slots:
            with metrics.track("apikeyrotation", reason_of=_reason_of) as tracked:
                return await _rotate_once(body, deps, logger, tracked)

    async def _rotate_once(
        body: kopf.Body, deps: Deps, logger: logging.Logger, tracked: Any
    ) -> float:
        meta = body.metadata
        async with deps.lock_for(meta.uid):
            fresh = await deps.kube.get_object(API_VERSION, rot.PLURAL, meta.namespace, meta.name)
            if fresh is None or fresh["metadata"].get("uid") != meta.uid:
                metrics.forget_rotation(meta.namespace, meta.name)
                return config.resync_seconds
            if fresh["metadata"].get("deletionTimestamp"):
                metrics.forget_rotation(meta.namespace, meta.name)
                return config.resync_seconds
            outcome = await rot.RotationReconciler(fresh, deps).run()
            before = fresh.get("status") or {}
            changes = status_patch(before, outcome.status)
            if changes:
                await deps.kube.patch_status(
                    API_VERSION, rot.PLURAL, meta.namespace, meta.name, changes
                )
            _observe_rotation(fresh, before, outcome.status)
        problem = outcome.problem
        if problem is None:
            tracked.outcome(*_ready(outcome.status))
        else:
            tracked.failed(problem.reason)
        if problem is not None:
            previous = (fresh.get("status") or {}).get("conditions") or []
            if not any(c.get("reason") == problem.reason for c in previous):
                kopf.event(fresh, type="Warning", reason=problem.reason, message=problem.message)
                logger.warning(f"{problem.reason}: {problem.message}")
            return config.retry_delay if problem.retry else config.resync_seconds
        if outcome.wake_at is None:
            return config.resync_seconds
        seconds = (outcome.wake_at - rot.utcnow()).total_seconds()
        return min(max(seconds, 0.05), config.resync_seconds)

    def _observe_rotation(
        fresh: dict[str, Any], before: dict[str, Any], after: dict[str, Any]
    ) -> None:
        """Rotation metrics from the status just written (counted once it is written)."""
        meta, spec = fresh["metadata"], fresh.get("spec") or {}
        account, key = spec.get("serviceAccountName"), spec.get("apiKeyName")
        metrics.set_rotation(
            meta["namespace"],
            meta["name"],
            serviceaccount=account,
            key=key,
            next_rotation=after.get("nextRotationTime"),
        )
        done = int(after.get("rotationCount") or 0) - int(before.get("rotationCount") or 0)
        if done > 0:
            metrics.rotated(meta["namespace"], meta["name"], done)
            if account and key:
                metrics.key_issued_at(
                    meta["namespace"], account, key, after.get("lastRotationTime")
                )

    rotation_resource = (GROUP, VERSION, rot.PLURAL)

    # Which rotations claim which key, kept by Kopf from the watch stream (no LIST per look).
    @kopf.index(*rotation_resource, registry=registry, id="rotation_claims")
    def rotation_claims(
        namespace: str, name: str, spec: kopf.Spec, meta: kopf.Meta, **_: Any
    ) -> dict[tuple[str, Any, Any], tuple[str, str]]:
        target = (namespace, spec.get("serviceAccountName"), spec.get("apiKeyName"))
        return {target: (str(meta.get("creationTimestamp") or ""), name)}

    def _use_claims(deps: Deps, index: kopf.Index[Any, Any]) -> Deps:
        deps.rotation_claims = lambda ns, account, key: list(index.get((ns, account, key), ()))
        return deps

    # One sleeping daemon per rotation: it wakes at the next due time (a rotation or the
    # end of a retention), on a spec/annotation change, or every resync interval.
    @kopf.daemon(*rotation_resource, registry=registry, id="rotation", cancellation_timeout=5.0)
    async def rotation_daemon(
        body: kopf.Body,
        memo: Any,
        stopped: kopf.DaemonStopped,
        logger: logging.Logger,
        rotation_claims: kopf.Index[Any, Any],
        **_: Any,
    ) -> None:
        deps = _use_claims(_deps(memo), rotation_claims)
        wakeup = deps.wakeup_for(body.metadata.uid)
        while not stopped:
            try:
                delay = await rotate_once(body, deps, logger)
            except Exception as exc:  # a bug or an unexpected API answer: log and go on
                problem = classify(exc)
                if problem is None:
                    logger.exception("Rotation check failed unexpectedly; retrying")
                else:
                    logger.warning(f"{problem.reason}: {problem.message}")
                delay = config.retry_delay
            await sleep_until(stopped, wakeup, delay)
        deps.forget(body.metadata.uid)
        # The daemon stops when the object goes (or the operator stops): drop its series.
        metrics.forget_rotation(body.metadata.namespace, body.metadata.name)

    # A raw watch-event handler, not on.update: Kopf writes nothing back for it (on.update
    # costs two patches of the object per change, to record what it handled).
    @kopf.on.event(*rotation_resource, registry=registry, id="wake")
    def rotation_event(body: kopf.Body, memo: Any, type: str | None, **_: Any) -> None:
        deps = _deps(memo)
        uid = body.metadata.uid
        if type == "DELETED":
            deps.forget(uid)
            return
        # What a look depends on besides time: the spec and the on-demand request.
        seen = (body.metadata.get("generation"), body.metadata.annotations.get(ROTATE_ANNOTATION))
        if deps.looked_at.setdefault(uid, seen) != seen:
            deps.looked_at[uid] = seen
            deps.wakeup_for(uid).set()

    sa_resource = (GROUP, VERSION, sa.PLURAL)
    for decorator in (kopf.on.create, kopf.on.update, kopf.on.resume):
        decorator(*sa_resource, registry=registry, id="reconcile")(reconcile_service_account)
    # Drift: re-read ZenML and the Secrets every resync interval; writes only on a difference.
    kopf.timer(
        *sa_resource,
        registry=registry,
        id="resync",
        interval=config.resync_seconds,
        # Spread over the interval: objects seen together (an operator start, a bulk apply)
        # would otherwise resync together, every interval, in one burst at ZenML.
        initial_delay=lambda **_: random.uniform(0.5, 1.0) * config.resync_seconds,
    )(resync_service_account)

    @kopf.on.delete(*sa_resource, registry=registry, id="finalize")
    async def finalize_service_account(body: kopf.Body, memo: Any, **_: Any) -> None:
        deps = _deps(memo)
        meta = body.metadata
        with metrics.track("serviceaccount", reason_of=_reason_of) as tracked:
            async with deps.lock_for(meta.uid):
                try:
                    fresh = await deps.kube.get_object(
                        API_VERSION, sa.PLURAL, meta.namespace, meta.name
                    )
                    await sa.finalize(fresh or body, deps)
                except Exception as exc:
                    problem = classify(exc)
                    if problem is None:
                        raise
                    tracked.failed(problem.reason)
                    raise kopf.TemporaryError(problem.message, delay=config.retry_delay) from None
            tracked.ok("Finalized")
        metrics.forget_service_account(meta.namespace, meta.name)
        deps.locks.pop(body.metadata.uid, None)

    return registry
