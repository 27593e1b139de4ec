"""/metrics and /readyz of a whole operator: emulated Kubernetes API, real Kopf, real ZenML."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import kopf
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from e2e.conftest import SA_PATH
from e2e.test_rotation import ROT_PATH, make_account, rotation_body, wait_count
from e2e.test_secret_hygiene import issued_values
from e2e.test_service_account import _gone, sa_body, unique
from zenml_operator.config import OperatorConfig
from zenml_operator.main import build_registry
from zenml_operator.metrics import Metrics

FAMILIES = (
    "zenml_operator_reconcile",  # counters are parsed without their _total suffix
    "zenml_operator_reconcile_duration_seconds",
    "zenml_operator_zenml_requests",
    "zenml_operator_zenml_request_duration_seconds",
    "zenml_operator_zenml_errors",
    "zenml_operator_api_key_age_seconds",
    "zenml_operator_api_key_next_rotation_timestamp_seconds",
    "zenml_operator_rotations",
)


@pytest_asyncio.fixture
async def metered_operator(
    cluster, zenml_server, operator_api_key, kopf_operator
) -> AsyncIterator[tuple[Metrics, httpx.AsyncClient]]:
    """The operator as `start_zenml_operator` starts it, with its metrics served on a free port."""
    config = OperatorConfig(
        zenml_url=zenml_server.url,
        zenml_api_key=lambda: operator_api_key,
        kube_api_url=cluster.url,
        retry_delay=0.5,
        zenml_retries=1,
    )
    metrics = Metrics()
    port = await metrics.serve(0, host="127.0.0.1")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            assert (await http.get("/readyz")).status_code == 503  # before the startup
            memo = kopf.Memo()
            await kopf_operator(build_registry(config, metrics=metrics), login=False, memo=memo)
            assert memo.metrics is metrics
            yield metrics, http
    finally:
        await metrics.aclose()


def scrape(text: str) -> dict[str, list[Any]]:
    """Samples by sample name (a counter family `x` has samples `x_total`)."""
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def series(samples: dict[str, list[Any]], family: str, **labels: str) -> list[Any]:
    return [s for s in samples.get(family, []) if labels.items() <= s.labels.items()]


async def test_metrics_families_and_readiness_in_a_rotation_scenario(
    cluster, metered_operator, operator_api_key, zenml_client
) -> None:
    _, http = metered_operator
    response = await http.get("/readyz")
    assert (response.status_code, response.text) == (200, "ok\n")

    name = unique("metrics")
    await make_account(cluster, name)
    await cluster.create(
        ROT_PATH,
        {
            **rotation_body(name, name, period="1h", retainPeriodMinutes=0),
            "metadata": {
                "name": name,
                "namespace": "default",
                "annotations": {"zenml.io/rotate": "now"},
            },
        },
    )
    await wait_count(cluster, name, 1)
    # A rotation whose ServiceAccount does not exist: an error with its reason.
    orphan = unique("orphan")
    await cluster.create(ROT_PATH, rotation_body(orphan, "no-such-account"))
    # A name someone else took in ZenML: the operator's create answers 409 (an error series).
    taken = unique("taken")
    await zenml_client.create_service_account(taken)
    await cluster.create(SA_PATH.format(ns="default"), sa_body(taken, {"apiKeys": []}))

    async def scraped() -> dict[str, list[Any]] | None:
        samples = scrape((await http.get("/metrics")).text)
        done = series(samples, "zenml_operator_rotations_total", rotation=name)
        failed = series(samples, "zenml_operator_reconcile_total", reason="ServiceAccountNotFound")
        nxt = series(
            samples, "zenml_operator_api_key_next_rotation_timestamp_seconds", rotation=name
        )
        conflict = series(samples, "zenml_operator_reconcile_total", reason="NameConflict")
        return samples if done and done[0].value == 1 and failed and nxt and conflict else None

    samples = await cluster.wait_for(scraped, timeout=20, message="rotation metrics")
    response = await http.get("/metrics")
    text = response.text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    print("\n/metrics families (name: samples)")
    for family in FAMILIES:
        print(f"  {family}: {len(families[family].samples) if family in families else 0}")
    for family in FAMILIES:
        assert family in families and families[family].samples, family

    assert series(
        samples,
        "zenml_operator_reconcile_total",
        resource="serviceaccount",
        result="success",
        reason="Reconciled",
    )
    assert series(
        samples, "zenml_operator_reconcile_total", resource="apikeyrotation", result="success"
    )
    (age,) = series(
        samples,
        "zenml_operator_api_key_age_seconds",
        namespace="default",
        serviceaccount=name,
        key="main",
    )
    assert 0 <= age.value < 120
    (nxt,) = series(samples, "zenml_operator_api_key_next_rotation_timestamp_seconds")
    assert nxt.labels == {
        "namespace": "default",
        "rotation": name,
        "serviceaccount": name,
        "key": "main",
    }
    # The create of a taken name: a 409, by route template only.
    assert series(
        samples,
        "zenml_operator_zenml_errors_total",
        endpoint="/api/v1/service_accounts",
        kind="conflict",
    )
    endpoints = {s.labels["endpoint"] for s in samples["zenml_operator_zenml_requests_total"]}
    assert "/api/v1/service_accounts/{id}/api_keys" in endpoints
    assert all(e.startswith("/api/v1/") and name not in e for e in endpoints)

    # No key value (any generation, the operator's own included) and no token in the text.
    values = issued_values(cluster) | {operator_api_key}
    assert len(values) >= 3  # the key, its rotated value, the operator's
    assert not [v for v in values if v in text]
    assert "ZENKEY_" not in text and "eyJ" not in text

    # Deleting the objects removes their series.
    await cluster.delete(f"{ROT_PATH}/{name}")
    await cluster.delete(f"{ROT_PATH}/{orphan}")

    async def rotation_series_gone() -> bool:
        samples = scrape((await http.get("/metrics")).text)
        return not (
            series(samples, "zenml_operator_api_key_next_rotation_timestamp_seconds")
            or series(samples, "zenml_operator_rotations_total")
        )

    await cluster.wait_for(rotation_series_gone, timeout=20, message="rotation series removed")
    sa_path = f"{SA_PATH.format(ns='default')}/{name}"
    await cluster.delete(sa_path)
    await cluster.wait_for(lambda: _gone(cluster, sa_path), timeout=30, message="deleted")
    samples = scrape((await http.get("/metrics")).text)
    assert not series(samples, "zenml_operator_api_key_age_seconds", serviceaccount=name)
    assert series(samples, "zenml_operator_reconcile_total", reason="Finalized")
    assert (await http.get("/readyz")).status_code == 200


async def test_readyz_reports_a_refused_credential(cluster, zenml_server, kopf_operator) -> None:
    config = OperatorConfig(
        zenml_url=zenml_server.url,
        zenml_api_key=lambda: "ZENKEY_" + "x" * 40,
        kube_api_url=cluster.url,
        zenml_retries=0,
    )
    metrics = Metrics()
    port = await metrics.serve(0, host="127.0.0.1")
    try:
        await kopf_operator(build_registry(config, metrics=metrics), login=False, memo=kopf.Memo())
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            response = await http.get("/readyz")
            assert response.status_code == 503
            assert response.text.startswith("not ready: not logged in to ZenML: ")
            assert response.text.count("\n") == 1 and "ZENKEY_" not in response.text
            text = (await http.get("/metrics")).text
        errors = series(scrape(text), "zenml_operator_zenml_errors_total", kind="unauthorized")
        assert errors and errors[0].labels["endpoint"] == "/api/v1/login"
    finally:
        await metrics.aclose()
