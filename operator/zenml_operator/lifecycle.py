"""Operator start-up, Kubernetes login and clean-up (the bodies of Kopf's activities).

Start-up configures Kopf's persistence, opens the ZenML client and checks the operator's own
ZenML login (not fatal: every resource reports a refused credential, and /readyz retries).
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from zenml_operator import zenml_api as zc
from zenml_operator.config import OperatorConfig
from zenml_operator.handlers.common import Deps
from zenml_operator.kube import KubeClient, kube_login
from zenml_operator.metrics import Metrics
from zenml_operator.secrets import ServerData
from zenml_operator.servers import Server, ServerDirectory

PREFIX = "operator.zenml.io"
FINALIZER = "zenml.io/finalizer"


def post_event(body: Any, *, type: str, reason: str, message: str) -> None:
    kopf.event(body, type=type, reason=reason, message=message)


LIST_PAGE_SIZE = 500  # objects per page of Kopf's listings


def configure(settings: kopf.OperatorSettings) -> None:
    # Kopf's own bookkeeping goes to annotations: status fields outside our schema would be
    # pruned by the API server.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = logging.INFO
    # Events are posted by a few workers, not one task per event (a burst of thousands).
    if settings.posting.worker_limit is None:
        settings.posting.worker_limit = 8
    # Kopf's worker lingers this long after an object's last event, holding one of those
    # few slots: at its default 1 s, 8 workers posted at most ~4 objects' two Events per
    # second, slower than creates go (measured: 949 of 1000 ApiKeyCreated Events posted by
    # the time all 1000 were Ready, and a backlog held in memory). Events of one object
    # usually come together or seconds apart, so a short linger loses nothing.
    settings.posting.idle_timeout = 0.1
    # A resync in flight when the resource is deleted must not hold the finalizer for
    # Kopf's default 60 s polling period.
    settings.background.instant_exit_timeout = 0.5
    settings.background.cancellation_polling = 1.0
    # Kopf lists each kind in one answer by default: all N bodies as bytes, as text and
    # parsed at once at every start. Pages of 500 keep one page of raw text at a time.
    settings.watching.chunk_size = LIST_PAGE_SIZE
    settings.watching.server_timeout = 600
    settings.watching.client_timeout = 660


async def start(
    memo: Any, config: OperatorConfig, metrics: Metrics, logger: logging.Logger
) -> None:
    memo.config = config
    memo.metrics = metrics
    metrics.readiness.started = metrics.readiness.stopping = False
    memo.zenml = zenml = zc.ZenMLClient(
        config.zenml_url,
        config.zenml_api_key,
        username=config.zenml_username,
        observer=metrics.observe_zenml_request,
        **config.connection_options(),
    )

    async def check_login() -> str:
        # The login request itself reports to readiness (the client's observer); this adds
        # the reason when no request was made (e.g. an unreadable key file).
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
        logger.error(f"Cannot log in to ZenML at {config.zenml_url}: {exc}")
    # /readyz retries a failed login itself (an operator with no resources would not).
    metrics.readiness.relogin = check_login
    metrics.readiness.started = True


def login(
    memo: Any,
    config: OperatorConfig,
    logger: logging.Logger,
    settings: kopf.OperatorSettings,
    **kwargs: Any,
) -> kopf.ConnectionInfo | None:
    if config.kube_api_url:
        info = kopf.ConnectionInfo(server=config.kube_api_url, default_namespace="default")
    else:
        info = kube_login(logger=logger, settings=settings, **kwargs)
    if info is None:
        return None
    if getattr(memo, "kube", None) is None:
        memo.kube = KubeClient(info)
        # This runs in a thread (main.login): wake the Secret watch's start-up (repairs.py),
        # which waits on the event loop for the client.
        waiter = getattr(memo, "kube_waiter", None)
        if waiter is not None:
            loop, ready = waiter
            loop.call_soon_threadsafe(ready.set)
    else:
        memo.kube.update_credentials(info)
    return info


async def cleanup(memo: Any, metrics: Metrics) -> None:
    metrics.readiness.stopping = True
    metrics.readiness.relogin = None
    await metrics.readiness.aclose()
    deps = getattr(memo, "deps", None)
    if deps is not None and deps.servers is not None:
        await deps.servers.aclose()
    for name in ("zenml", "kube"):
        client = getattr(memo, name, None)
        if client is not None:
            await client.aclose()


def deps_of(memo: Any) -> Deps:
    """The handlers' shared clients, made once per operator from what start-up opened."""
    if getattr(memo, "deps", None) is None:
        config: OperatorConfig = memo.config
        default = Server(None, memo.zenml, ServerData(config.url_for_secrets))
        memo.deps = Deps(
            zenml=memo.zenml,
            kube=memo.kube,
            server_data=default.data,
            events=post_event,
            resync_seconds=config.resync_seconds,
            servers=ServerDirectory(
                config=config,
                kube=memo.kube,
                default=default,
                observer=memo.metrics.observe_zenml_request,
            ),
        )
    return memo.deps
