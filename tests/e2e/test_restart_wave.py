"""An operator restart over converged ServiceAccounts (issue 14): one ZenML read per object,
at the background rate, and a ServiceAccount created during that wave is not queued behind
it. Emulated Kubernetes API, real Kopf, real ZenML server."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import kopf

from e2e.conftest import SA_PATH, wait_ready
from zenml_operator.config import OperatorConfig
from zenml_operator.main import build_registry
from zenml_operator.metrics import Metrics

N = 16
RATE = 2.0  # background requests per second: the wave over N objects lasts (N-1)/RATE s
KEY_LIST = ("GET", "/api/v1/service_accounts/{id}/api_keys")


class RecordingMetrics(Metrics):
    """The operator's own metrics, plus when each ZenML request (attempt) was sent."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[float, str, str]] = []

    def observe_zenml_request(
        self, method: str, endpoint: str, status: int | None, seconds: float
    ) -> None:
        self.requests.append((time.monotonic() - seconds, method, endpoint))
        super().observe_zenml_request(method, endpoint, status, seconds)


def sa_body(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "zenml.io/v1alpha1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"apiKeys": [{"name": "k"}]},
    }


def requests_total(metrics: Metrics, method: str | None = None, endpoint: str | None = None) -> int:
    """From `zenml_operator_zenml_requests_total`, as a scrape would read it."""
    (family,) = metrics.zenml_requests_total.collect()
    return int(
        sum(
            s.value
            for s in family.samples
            if s.name.endswith("_total")
            and (method is None or s.labels["method"] == method)
            and (endpoint is None or s.labels["endpoint"] == endpoint)
        )
    )


def reconciles(metrics: Metrics) -> int:
    labels = {"resource": "serviceaccount", "result": "success", "reason": "Reconciled"}
    return int(metrics.registry.get_sample_value("zenml_operator_reconcile_total", labels) or 0)


async def test_restart_reads_each_converged_object_once_at_the_background_rate(
    cluster, zenml_server, operator_api_key, kopf_operator
) -> None:
    async def start(metrics: Metrics, rate: float) -> Any:
        config = OperatorConfig(
            zenml_url=zenml_server.url,
            zenml_api_key=lambda: operator_api_key,
            kube_api_url=cluster.url,
            retry_delay=0.5,
            zenml_retries=1,
            background_rate=rate,
        )
        registry = build_registry(config, metrics=metrics)
        return await kopf_operator(registry, login=False, memo=kopf.Memo())

    tag = uuid.uuid4().hex[:6]
    names = [f"wave-{tag}-{i}" for i in range(N)]
    first = await start(Metrics(), 20.0)
    await asyncio.gather(*(cluster.create(SA_PATH.format(ns="default"), sa_body(n)) for n in names))
    for name in names:
        await wait_ready(cluster, "default", name, timeout=60)
    await first.stop()

    # The restart: every object is converged (Ready at its generation, Secret in place).
    written_before = cluster.emulator.resource_version
    metrics = RecordingMetrics()
    await start(metrics, RATE)
    started = time.monotonic()
    # A new object during the wave: created at once, not after N / RATE seconds.
    fresh = f"wave-{tag}-new"
    await cluster.create(SA_PATH.format(ns="default"), sa_body(fresh))
    await wait_ready(cluster, "default", fresh, timeout=30)
    fresh_ready = time.monotonic() - started
    reads_when_fresh_ready = sum(1 for _, m, e in metrics.requests if (m, e) == KEY_LIST)

    # The wave ends when every converged object was checked once (the new one: once more).
    await cluster.wait_for(
        lambda: reconciles(metrics) >= N + 1, timeout=N / RATE + 30, message="the wave"
    )
    await asyncio.sleep(2 / RATE)  # nothing else is on its way (it would show below)
    wave = [t for t, m, e in metrics.requests if (m, e) == KEY_LIST]

    # At most one ZenML request per converged object: the key list (it names the account).
    assert len(wave) == N, metrics.requests
    other = requests_total(metrics) - len(wave)
    # ... the rest is the start-up login and identity check, and the new object's two calls.
    assert requests_total(metrics, "GET", "/api/v1/service_accounts/{id}") == 0
    assert requests_total(metrics, "POST", "/api/v1/service_accounts") == 1
    assert requests_total(metrics, "POST", "/api/v1/service_accounts/{id}/api_keys") == 1
    assert other == 4, metrics.requests  # login, current-user, create account, create key

    # Paced: the wave took (N - 1) / RATE seconds, and no one-second window held more than
    # RATE + 1 requests (+1 more for a waiter that woke late on a loaded machine: the
    # limiter spaces the reservations exactly, tests/unit/test_pacing.py).
    timeline = "\n".join(f"{t - started:.2f} {m} {e}" for t, m, e in metrics.requests)
    assert wave[-1] - wave[0] >= (N - 1) / RATE * 0.95, timeline
    assert max(sum(1 for t in wave if s <= t < s + 1.0) for s in wave) <= RATE + 2, timeline

    # Not queued behind the wave: Ready with at least 2 s of the wave still to come
    # (unpaced, or queued behind it, all N reads would come first).
    assert reads_when_fresh_ready <= N - 2 * RATE, (fresh_ready, timeline)

    # The wave wrote nothing: only the new object and its Secret changed.
    changed = {
        (c.resource.plural, c.name)
        for c in cluster.emulator._history
        if c.rv > written_before and c.resource.plural in ("serviceaccounts", "secrets")
    }
    assert changed <= {("serviceaccounts", fresh), ("secrets", f"{fresh}-k")}, changed
