"""Prometheus metrics and the readiness probe of the operator.

Everything lives in one `Metrics` object with its own `CollectorRegistry` (never the global
one), so that tests can run several operators in one process. `main.build_registry` fills
it from the handlers; `ZenMLClient` reports each HTTP attempt through
`Metrics.observe_zenml_request` (the client itself knows nothing of Prometheus).

`/metrics` and `/readyz` are served by a small aiohttp app on the operator's own event loop
(`Metrics.serve`), like Kopf's `/healthz`: no extra thread, no lock around the per-key
tables (they are only touched from the loop), and a blocked loop shows up as failed
probes instead of stale but cheerful answers.

Labels never hold a key value, a token, or a ZenML path as sent: ZenML endpoints are route
templates (`zenml_api.routes.route_template`), resources are named by their Kubernetes
namespace/name and key names only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

PREFIX = "zenml_operator"
LOGIN_ROUTE = "/api/v1/login"
RECONCILE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Minimum seconds between two login attempts triggered by /readyz (see Readiness).
RELOGIN_INTERVAL = 5.0


def error_kind(status: int | None) -> str | None:
    """The `kind` of zenml_errors_total for an HTTP status (None: no response); None if OK."""
    if status is None or status >= 500:
        return "unavailable"
    if status < 400:
        return None
    return {
        400: "bad_request",
        401: "unauthorized",
        403: "forbidden",
        404: "not_found",
        409: "conflict",
        422: "bad_request",
    }.get(status, "client_error")


def _timestamp(value: Any) -> float | None:
    """Epoch seconds of an RFC 3339 status timestamp; None if absent or unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.timestamp()


class Readiness:
    """Ready once the startup finished and the last ZenML login succeeded.

    A failed login is retried from `/readyz` itself (at most every RELOGIN_INTERVAL seconds,
    in the background) when `relogin` is set: without it, an operator with no resources
    would never log in again and would stay unready after a ZenML outage at start-up.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.started = False
        self.stopping = False
        self.login_ok: bool | None = None
        self.login_problem = "no ZenML login yet"
        self.relogin: Callable[[], Awaitable[Any]] | None = None
        self._relogin_task: asyncio.Task[Any] | None = None
        self._relogin_at = float("-inf")

    def login_succeeded(self) -> None:
        self.login_ok = True
        self.login_problem = ""

    def login_failed(self, problem: str) -> None:
        self.login_ok = False
        self.login_problem = " ".join(problem.split())[:300] or "ZenML login failed"

    def problem(self) -> str | None:
        """None when ready, else a one-line reason."""
        if self.stopping:
            return "the operator is shutting down"
        if not self.started:
            return "the operator is starting"
        if not self.login_ok:
            return f"not logged in to ZenML: {self.login_problem}"
        return None

    def maybe_relogin(self) -> None:
        if self.relogin is None or self.login_ok or not self.started or self.stopping:
            return
        if self._relogin_task is not None and not self._relogin_task.done():
            return
        now = self._clock()
        if now - self._relogin_at < RELOGIN_INTERVAL:
            return
        self._relogin_at = now
        self._relogin_task = asyncio.ensure_future(self._relogin(self.relogin))

    async def _relogin(self, relogin: Callable[[], Awaitable[Any]]) -> None:
        # The outcome reaches us through the request observer (the login request).
        try:
            await relogin()
        except Exception as exc:
            logger.debug(f"Login check from /readyz failed: {exc}")

    async def aclose(self) -> None:
        task, self._relogin_task = self._relogin_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


class _KeyCollector(Collector):
    """Per-key gauges computed at scrape time from the tables `Metrics` keeps."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return list(self._families(now=0.0, empty=True))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(now=self._metrics.clock(), empty=False))

    def _families(self, *, now: float, empty: bool) -> Iterator[Metric]:
        age = GaugeMetricFamily(
            f"{PREFIX}_api_key_age_seconds",
            "Seconds since the value now in the API key's Secret was issued.",
            labels=["namespace", "serviceaccount", "key"],
        )
        nxt = GaugeMetricFamily(
            f"{PREFIX}_api_key_next_rotation_timestamp_seconds",
            "When the ApiKeyRotation next rotates its key (status.nextRotationTime), as Unix time.",
            labels=["namespace", "rotation", "serviceaccount", "key"],
        )
        if not empty:
            for (namespace, account), keys in sorted(self._metrics.key_issued.items()):
                for key, issued in sorted(keys.items()):
                    age.add_metric([namespace, account, key], max(0.0, now - issued))
            for (namespace, rotation), (account, key, when) in sorted(
                self._metrics.next_rotation.items()
            ):
                nxt.add_metric([namespace, rotation, account, key], when)
        yield age
        yield nxt


class Tracker:
    """Times one handler run; `ok()`/`failed()` say how it ended (see `Metrics.track`)."""

    def __init__(
        self,
        metrics: Metrics,
        resource: str,
        reason_of: Callable[[BaseException], str | None] | None,
    ) -> None:
        self._metrics = metrics
        self._resource = resource
        self._reason_of = reason_of
        self._started = 0.0
        self.result: tuple[str, str] | None = None

    def ok(self, reason: str = "Reconciled") -> None:
        self.result = ("success", reason)

    def failed(self, reason: str) -> None:
        self.result = ("error", reason)

    def outcome(self, ready: bool, reason: str) -> None:
        if ready:
            self.ok(reason)
        else:
            self.failed(reason)

    def __enter__(self) -> Tracker:
        self._started = time.monotonic()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and isinstance(exc, asyncio.CancelledError | GeneratorExit):
            return  # the operator stops: not an outcome of the resource
        if self.result is None and exc is not None:
            reason = (self._reason_of(exc) if self._reason_of else None) or "UnexpectedError"
            self.failed(reason)
        if self.result is None:
            return  # nothing to reconcile (object gone): not a run worth counting
        result, reason = self.result
        self._metrics.reconcile_total.labels(self._resource, result, reason).inc()
        self._metrics.reconcile_duration.labels(self._resource).observe(
            time.monotonic() - self._started
        )


class Metrics:
    """The operator's metric families, in a registry of their own, plus readiness."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.clock = clock
        self.readiness = Readiness()
        r = self.registry
        self.reconcile_total = Counter(
            f"{PREFIX}_reconcile",
            "Handler runs per resource kind, by result and Ready reason.",
            ["resource", "result", "reason"],
            registry=r,
        )
        self.reconcile_duration = Histogram(
            f"{PREFIX}_reconcile_duration_seconds",
            "Duration of handler runs (reconcile, resync, finalize, rotation check).",
            ["resource"],
            buckets=RECONCILE_BUCKETS,
            registry=r,
        )
        self.zenml_requests_total = Counter(
            f"{PREFIX}_zenml_requests",
            "HTTP requests to the ZenML server (each retry counts), by route template.",
            ["method", "endpoint", "status"],
            registry=r,
        )
        self.zenml_request_duration = Histogram(
            f"{PREFIX}_zenml_request_duration_seconds",
            "Duration of HTTP requests to the ZenML server, by route template.",
            ["method", "endpoint"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.zenml_errors_total = Counter(
            f"{PREFIX}_zenml_errors",
            "Failed ZenML requests by kind (unauthorized, forbidden, not_found, conflict,"
            " bad_request, client_error, unavailable).",
            ["endpoint", "kind"],
            registry=r,
        )
        self.rotations_total = Counter(
            f"{PREFIX}_rotations",
            "API key rotations made by this operator process, per ApiKeyRotation.",
            ["namespace", "rotation"],
            registry=r,
        )
        # (namespace, ServiceAccount) -> {key name: issue time}
        self.key_issued: dict[tuple[str, str], dict[str, float]] = {}
        # (namespace, ApiKeyRotation) -> (ServiceAccount, key name, next rotation time)
        self.next_rotation: dict[tuple[str, str], tuple[str, str, float]] = {}
        r.register(_KeyCollector(self))
        self._runner: web.AppRunner | None = None

    # ----------------------------------------------------------------- handlers

    def track(
        self,
        resource: str,
        *,
        reason_of: Callable[[BaseException], str | None] | None = None,
    ) -> Tracker:
        """`with metrics.track("serviceaccount") as t: ...; t.outcome(ready, reason)`.

        An exception that escapes without an outcome counts as an error with the reason
        `reason_of(exc)` gives (default "UnexpectedError"); a run that sets no outcome and
        raises nothing (the object was gone) is not counted.
        """
        return Tracker(self, resource, reason_of)

    def set_api_keys(
        self, namespace: str, serviceaccount: str, entries: Iterable[Mapping[str, Any]] | None
    ) -> None:
        """Mirror a ServiceAccount's `status.apiKeys` (name, issuedAt); drops keys not listed.

        An issue time only moves forward: a rotation may have written a newer value into the
        Secret than the ServiceAccount's status (updated at its next reconcile) says.
        """
        known = self.key_issued.get((namespace, serviceaccount), {})
        keys: dict[str, float] = {}
        for entry in entries or []:
            name, issued = entry.get("name"), _timestamp(entry.get("issuedAt"))
            if isinstance(name, str) and issued is not None:
                keys[name] = max(issued, known.get(name, issued))
        if keys:
            self.key_issued[(namespace, serviceaccount)] = keys
        else:
            self.key_issued.pop((namespace, serviceaccount), None)

    def key_issued_at(self, namespace: str, serviceaccount: str, key: str, issued_at: Any) -> None:
        """A key got a new value at `issued_at` (a rotation), if the account is known."""
        keys = self.key_issued.get((namespace, serviceaccount))
        when = _timestamp(issued_at)
        if keys is not None and when is not None and when > keys.get(key, float("-inf")):
            keys[key] = when

    def forget_service_account(self, namespace: str, serviceaccount: str) -> None:
        self.key_issued.pop((namespace, serviceaccount), None)

    def set_rotation(
        self,
        namespace: str,
        rotation: str,
        *,
        serviceaccount: str | None,
        key: str | None,
        next_rotation: Any,
    ) -> None:
        """Mirror an ApiKeyRotation's target and `status.nextRotationTime` (None: no series)."""
        self.rotations_total.labels(namespace, rotation)  # exists at 0 from the first look
        when = _timestamp(next_rotation)
        if serviceaccount and key and when is not None:
            self.next_rotation[(namespace, rotation)] = (serviceaccount, key, when)
        else:
            self.next_rotation.pop((namespace, rotation), None)

    def rotated(self, namespace: str, rotation: str, count: int = 1) -> None:
        if count > 0:
            self.rotations_total.labels(namespace, rotation).inc(count)

    def forget_rotation(self, namespace: str, rotation: str) -> None:
        self.next_rotation.pop((namespace, rotation), None)
        with contextlib.suppress(KeyError):
            self.rotations_total.remove(namespace, rotation)

    # ---------------------------------------------------------------- ZenML client

    def observe_zenml_request(
        self, method: str, endpoint: str, status: int | None, seconds: float
    ) -> None:
        """`ZenMLClient(observer=...)`: called once per HTTP attempt, retries included."""
        self.zenml_requests_total.labels(
            method, endpoint, str(status) if status is not None else "error"
        ).inc()
        self.zenml_request_duration.labels(method, endpoint).observe(seconds)
        kind = error_kind(status)
        if kind is not None:
            self.zenml_errors_total.labels(endpoint, kind).inc()
        if endpoint == LOGIN_ROUTE:
            if status is not None and 200 <= status < 300:
                self.readiness.login_succeeded()
            elif status is None:
                self.readiness.login_failed("the ZenML server is unreachable")
            else:
                self.readiness.login_failed(f"ZenML refused the login (HTTP {status})")

    # ---------------------------------------------------------------------- server

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The /metrics body and its content type (OpenMetrics when the scraper asks)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def app(self) -> web.Application:
        async def metrics(request: web.Request) -> web.Response:
            body, content_type = self.exposition(request.headers.get("Accept", ""))
            response = web.Response(body=body)
            response.headers["Content-Type"] = content_type
            return response

        async def readyz(request: web.Request) -> web.Response:
            problem = self.readiness.problem()
            if problem is None:
                return web.Response(text="ok\n")
            self.readiness.maybe_relogin()
            return web.Response(status=503, text=f"not ready: {problem}\n")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/readyz", readyz)
        return app

    async def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve /metrics and /readyz on the running loop; returns the port (0: any free)."""
        if self._runner is not None:
            raise RuntimeError("the metrics server is already running")
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        addresses = runner.addresses
        return int(addresses[0][1]) if addresses else port

    async def aclose(self) -> None:
        """Stop the server (if any) and the background login check."""
        await self.readiness.aclose()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
