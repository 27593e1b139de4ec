"""Kopf wiring: every decorator of the operator, and nothing else.

`build_registry(config)` returns a fresh registry so that the resync interval comes from
configuration and tests can run several operators (or restart one) in one process. Pass
`metrics=` to share a `Metrics` (the CLI serves it); otherwise each registry gets its own,
exposed as `memo.metrics` from start-up. The work is in `controller.py` and `lifecycle.py`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from zenml_operator import lifecycle, repairs
from zenml_operator.config import OperatorConfig
from zenml_operator.controller import Controller
from zenml_operator.handlers import rotation as rot
from zenml_operator.handlers import service_account as sa
from zenml_operator.kube import kopf_session
from zenml_operator.metrics import Metrics
from zenml_operator.models import CLUSTER_ZENML_SERVERS, GROUP, VERSION, ZENML_SERVERS
from zenml_operator.peering import PeeringGate
from zenml_operator.policies import Trigger

FINALIZER = lifecycle.FINALIZER
TRIGGERS = {t.value for t in Trigger}


def build_registry(
    config: OperatorConfig, *, metrics: Metrics | None = None
) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    metrics = metrics if metrics is not None else Metrics()
    controller = Controller(config, metrics)
    sa_resource = (GROUP, VERSION, sa.PLURAL)
    rotation_resource = (GROUP, VERSION, rot.PLURAL)

    @kopf.on.startup(registry=registry)
    async def startup(
        settings: kopf.OperatorSettings, memo: Any, logger: logging.Logger, **_: Any
    ) -> None:
        lifecycle.configure(settings)
        memo.peering = PeeringGate.of(settings.peering)
        await lifecycle.start(memo, config, metrics, logger)
        controller.start(memo)  # before any handler: each object's memo is a copy of this
        repairs.start(memo, config, metrics, settings)  # the watch of the operator's Secrets

    # Kopf's session gets a bounded connection pool (see kube.kopf_session). The login
    # itself may run a kubeconfig exec plugin: off the event loop.
    @kopf.on.login(registry=registry)
    async def login(memo: Any, **kwargs: Any) -> kopf.AiohttpSession | None:
        info = await asyncio.to_thread(lifecycle.login, memo, config, **kwargs)
        if info is None:
            return None
        controller.connect(memo)
        return kopf_session(info, limit=config.kopf_connections())

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: Any, **_: Any) -> None:
        await repairs.stop(memo)
        await controller.aclose(memo)
        await lifecycle.cleanup(memo, metrics)

    # `reason` says create, update or resume (an operator start): a resume of a converged
    # object is a background check (see controller.py), the others are not.
    async def reconcile(body: kopf.Body, memo: Any, reason: kopf.Reason, **_: Any) -> None:
        trigger = Trigger(reason.value) if reason.value in TRIGGERS else Trigger.UPDATE
        await controller.reconcile_service_account(body, memo, trigger=trigger)

    for decorator in (kopf.on.create, kopf.on.update, kopf.on.resume):
        decorator(*sa_resource, registry=registry, id="reconcile")(reconcile)

    # Drift: every known ServiceAccount is checked again every resync interval by one
    # schedule of the controller (not a Kopf timer per object: see due.py).

    @kopf.on.delete(*sa_resource, registry=registry, id="finalize")
    async def finalize(body: kopf.Body, memo: Any, **_: Any) -> None:
        await controller.finalize_service_account(body, memo)

    # ZenMLServer / ClusterZenMLServer: checked on every change and by a timer (a credential
    # rotated in place, a server that came back); deletion held while ServiceAccounts use it.
    async def check_server(body: kopf.Body, memo: Any, **_: Any) -> None:
        await controller.check_server(body, memo, retry=True)

    async def recheck_server(body: kopf.Body, memo: Any, **_: Any) -> None:
        await controller.check_server(body, memo, retry=False)

    async def finalize_server(body: kopf.Body, memo: Any, **_: Any) -> None:
        await controller.finalize_server(body, memo)

    for plural in (ZENML_SERVERS, CLUSTER_ZENML_SERVERS):
        server_resource = (GROUP, VERSION, plural)
        for decorator in (kopf.on.create, kopf.on.update, kopf.on.resume):
            decorator(*server_resource, registry=registry, id="check")(check_server)
        kopf.timer(
            *server_resource,
            registry=registry,
            id="recheck",
            interval=config.server_check_seconds,
            initial_delay=config.server_check_seconds,  # the resume handler checks at start
        )(recheck_server)
        kopf.on.delete(*server_resource, registry=registry, id="finalize")(finalize_server)

    # Which rotations claim which key, kept by Kopf from the watch stream (no LIST per look).
    @kopf.index(*rotation_resource, registry=registry, id="rotation_claims")
    async def rotation_claims(
        namespace: str, name: str, spec: kopf.Spec, meta: kopf.Meta, **_: Any
    ) -> dict[tuple[str, Any, Any], tuple[str, str]]:
        return controller.rotation_claim(namespace, name, spec, meta)

    # Every rotation's next look is in one schedule of the controller (rotation_looks.py),
    # fed by this raw watch-event handler: due times, and a look at once on a change of the
    # spec or the on-demand annotation. Not a Kopf daemon per rotation (memory), and not
    # on.update (Kopf would write its bookkeeping to the object twice per change).
    @kopf.on.event(*rotation_resource, registry=registry, id="track")
    async def rotation_event(
        body: kopf.Body,
        memo: Any,
        type: str | None,
        rotation_claims: kopf.Index[Any, Any],
        **_: Any,
    ) -> None:
        controller.rotation_seen(memo, body, type, rotation_claims)

    return registry
