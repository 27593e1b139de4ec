"""Metrics: route templating, the per-key collector, handler tracking, readiness, server."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from zenml_operator import zenml_api as zc
from zenml_operator.metrics import Metrics, error_kind
from zenml_operator.zenml_api.routes import route_template

ID = "3f2b6a1c-9d4e-4c1a-8b7f-0123456789ab"
ID2 = uuid.uuid4().hex  # ZenML also accepts the hex form


# ------------------------------------------------------------------------ route templates


@pytest.mark.parametrize(
    ("path", "template"),
    [
        ("/api/v1/login", "/api/v1/login"),
        ("/api/v1/current-user", "/api/v1/current-user"),
        ("/api/v1/service_accounts", "/api/v1/service_accounts"),
        (f"/api/v1/service_accounts/{ID}", "/api/v1/service_accounts/{id}"),
        (f"/api/v1/service_accounts/{ID2}", "/api/v1/service_accounts/{id}"),
        # Looked up by name: the name is collapsed too (bounded label values).
        ("/api/v1/service_accounts/ml-pipelines", "/api/v1/service_accounts/{name}"),
        (f"/api/v1/service_accounts/{ID}/api_keys", "/api/v1/service_accounts/{id}/api_keys"),
        (
            f"/api/v1/service_accounts/{ID}/api_keys/{ID2}",
            "/api/v1/service_accounts/{id}/api_keys/{id}",
        ),
        (
            f"/api/v1/service_accounts/{ID}/api_keys/training",
            "/api/v1/service_accounts/{id}/api_keys/{name}",
        ),
        (
            f"/api/v1/service_accounts/{ID}/api_keys/{ID2}/rotate",
            "/api/v1/service_accounts/{id}/api_keys/{id}/rotate",
        ),
        # Positional: names that look like route words stay variables.
        ("/api/v1/service_accounts/rotate", "/api/v1/service_accounts/{name}"),
        (
            f"/api/v1/service_accounts/api_keys/api_keys/{ID}",
            "/api/v1/service_accounts/{name}/api_keys/{id}",
        ),
        # A quoted name with '/' is one segment and never leaks.
        ("/api/v1/service_accounts/team%2Fsecret", "/api/v1/service_accounts/{name}"),
        (
            f"/api/v1/service_accounts/{ID}/api_keys?page=2",
            "/api/v1/service_accounts/{id}/api_keys",
        ),
        # Anything else is never echoed.
        ("/api/v1/users/alice", "/api/v1/other"),
        ("/api/v1/service_accounts/x/secrets", "/api/v1/other"),
        ("/api/v1/service_accounts//api_keys", "/api/v1/other"),
        ("/health", "/api/v1/other"),
        ("/api/v1/ZENKEY_abc", "/api/v1/other"),
    ],
)
def test_route_template(path: str, template: str) -> None:
    assert route_template(path) == template


def test_error_kinds() -> None:
    assert error_kind(200) is None and error_kind(204) is None
    assert error_kind(None) == "unavailable"
    assert error_kind(503) == "unavailable"
    assert error_kind(401) == "unauthorized"
    assert error_kind(403) == "forbidden"
    assert error_kind(404) == "not_found"
    assert error_kind(409) == "conflict"
    assert error_kind(422) == "bad_request"
    assert error_kind(418) == "client_error"


# -------------------------------------------------------------------- client observer


async def test_client_reports_every_attempt_with_templates() -> None:
    metrics = Metrics()
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/api/v1/login":
            return httpx.Response(200, json={"access_token": "tok"})
        if len(calls) == 2:  # the first GET: a 503, retried
            return httpx.Response(503, json={"detail": "down"})
        return httpx.Response(
            200, json={"id": ID, "name": "ml", "body": {"active": True}, "metadata": {}}
        )

    client = zc.ZenMLClient(
        "http://zenml.test",
        "ZENKEY_secretvalue",
        backoff=0.001,
        transport=httpx.MockTransport(handler),
        observer=metrics.observe_zenml_request,
    )
    async with client:
        await client.get_service_account("ml-pipelines")
    sample = metrics.registry.get_sample_value
    route = "/api/v1/service_accounts/{name}"
    requests = "zenml_operator_zenml_requests_total"
    assert sample(requests, {"method": "GET", "endpoint": route, "status": "503"}) == 1
    assert sample(requests, {"method": "GET", "endpoint": route, "status": "200"}) == 1
    errors = {"endpoint": route, "kind": "unavailable"}
    assert sample("zenml_operator_zenml_errors_total", errors) == 1
    durations = "zenml_operator_zenml_request_duration_seconds_count"
    assert sample(durations, {"method": "GET", "endpoint": route}) == 2
    login = {"method": "POST", "endpoint": "/api/v1/login", "status": "200"}
    assert sample("zenml_operator_zenml_requests_total", login) == 1
    assert metrics.readiness.login_ok is True
    text = metrics.exposition()[0].decode()
    assert "ml-pipelines" not in text and "ZENKEY" not in text and "tok" not in text.split()


async def test_transport_errors_and_refused_logins_mark_the_operator_unready() -> None:
    metrics = Metrics()
    metrics.readiness.started = True

    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"detail": ["AuthorizationException", "nope"]})

    async with zc.ZenMLClient(
        "http://zenml.test",
        "ZENKEY_x",
        transport=httpx.MockTransport(refuse),
        observer=metrics.observe_zenml_request,
    ) as client:
        with pytest.raises(zc.UnauthorizedError):
            await client.current_user_name()
    assert metrics.readiness.problem() == (
        "not logged in to ZenML: ZenML refused the login (HTTP 401)"
    )
    errors = {"endpoint": "/api/v1/login", "kind": "unauthorized"}
    assert metrics.registry.get_sample_value("zenml_operator_zenml_errors_total", errors) == 1

    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async with zc.ZenMLClient(
        "http://zenml.test",
        "ZENKEY_x",
        max_retries=1,
        backoff=0.001,
        transport=httpx.MockTransport(unreachable),
        observer=metrics.observe_zenml_request,
    ) as client:
        with pytest.raises(zc.UnavailableError):
            await client.current_user_name()
    login = {"method": "POST", "endpoint": "/api/v1/login", "status": "error"}
    assert metrics.registry.get_sample_value("zenml_operator_zenml_requests_total", login) == 2
    assert "unreachable" in (metrics.readiness.problem() or "")


async def test_a_failing_observer_never_breaks_a_request() -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("metrics bug")

    def ok(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/login"):
            return httpx.Response(200, json={"access_token": "t"})
        return httpx.Response(200, json={"name": "me"})

    async with zc.ZenMLClient(
        "http://z", "ZENKEY_x", transport=httpx.MockTransport(ok), observer=broken
    ) as client:
        assert await client.current_user_name() == "me"


# ---------------------------------------------------------------------- per-key series


def _samples(metrics: Metrics, family: str) -> list[dict[str, str]]:
    for fam in metrics.registry.collect():
        if fam.name == family:
            return [s.labels for s in fam.samples]
    raise AssertionError(f"no family {family}")


def test_key_age_follows_status_and_is_removed_with_the_object() -> None:
    now = [1_700_000_100.0]
    metrics = Metrics(clock=lambda: now[0])
    issued = "2023-11-14T22:13:20Z"  # 1_700_000_000
    metrics.set_api_keys(
        "default",
        "ml",
        [
            {"name": "train", "issuedAt": issued},
            {"name": "serve", "issuedAt": issued},
            {"name": "lost"},  # no Secret yet: no series
        ],
    )
    metrics.set_api_keys("team-a", "other", [{"name": "k", "issuedAt": issued}])
    labels = {"namespace": "default", "serviceaccount": "ml", "key": "train"}
    assert metrics.registry.get_sample_value("zenml_operator_api_key_age_seconds", labels) == 100
    now[0] += 50
    assert metrics.registry.get_sample_value("zenml_operator_api_key_age_seconds", labels) == 150
    assert len(_samples(metrics, "zenml_operator_api_key_age_seconds")) == 3

    # A rotation writes a newer value before the ServiceAccount's status says so.
    metrics.key_issued_at("default", "ml", "train", "2023-11-14T22:15:00Z")
    assert metrics.registry.get_sample_value("zenml_operator_api_key_age_seconds", labels) == 50
    metrics.set_api_keys(
        "default",
        "ml",
        [{"name": "train", "issuedAt": issued}],  # stale status: keeps the newer time
    )
    assert metrics.registry.get_sample_value("zenml_operator_api_key_age_seconds", labels) == 50
    # `serve` left the spec: its series is gone.
    assert {s["key"] for s in _samples(metrics, "zenml_operator_api_key_age_seconds")} == {
        "train",
        "k",
    }
    metrics.forget_service_account("default", "ml")
    assert _samples(metrics, "zenml_operator_api_key_age_seconds") == [
        {"namespace": "team-a", "serviceaccount": "other", "key": "k"}
    ]


def test_rotation_series_are_removed_with_the_object() -> None:
    metrics = Metrics()
    metrics.set_rotation(
        "default",
        "rot",
        serviceaccount="ml",
        key="train",
        next_rotation="2023-11-14T22:13:20Z",
    )
    metrics.rotated("default", "rot", 2)
    labels = {"namespace": "default", "rotation": "rot", "serviceaccount": "ml", "key": "train"}
    family = "zenml_operator_api_key_next_rotation_timestamp_seconds"
    assert metrics.registry.get_sample_value(family, labels) == 1_700_000_000
    counter = {"namespace": "default", "rotation": "rot"}
    assert metrics.registry.get_sample_value("zenml_operator_rotations_total", counter) == 2

    # Retargeted: the old labels go, the new ones come.
    metrics.set_rotation(
        "default", "rot", serviceaccount="ml", key="serve", next_rotation="2023-11-14T22:13:21Z"
    )
    assert metrics.registry.get_sample_value(family, labels) is None
    assert len(_samples(metrics, family)) == 1
    # A failing rotation has no nextRotationTime in its status: no series.
    metrics.set_rotation("default", "rot", serviceaccount="ml", key="serve", next_rotation=None)
    assert _samples(metrics, family) == []

    metrics.set_rotation("default", "rot", serviceaccount="ml", key="train", next_rotation="x")
    metrics.forget_rotation("default", "rot")
    metrics.forget_rotation("default", "rot")  # twice is fine
    assert _samples(metrics, family) == []
    assert metrics.registry.get_sample_value("zenml_operator_rotations_total", counter) is None


def test_new_rotations_start_at_zero() -> None:
    metrics = Metrics()
    metrics.set_rotation("ns", "r", serviceaccount="a", key="k", next_rotation=None)
    labels = {"namespace": "ns", "rotation": "r"}
    assert metrics.registry.get_sample_value("zenml_operator_rotations_total", labels) == 0


# ------------------------------------------------------------------------------ tracking


class Boom(Exception):
    pass


def test_tracking_records_result_reason_and_duration() -> None:
    metrics = Metrics()
    with metrics.track("serviceaccount") as t:
        t.outcome(True, "Reconciled")
    with metrics.track("serviceaccount") as t:
        t.outcome(False, "SecretConflict")
    with pytest.raises(Boom), metrics.track("serviceaccount") as t:
        t.failed("ZenMLUnavailable")  # set before the handler raises (kopf.TemporaryError)
        raise Boom
    with pytest.raises(Boom), metrics.track("serviceaccount", reason_of=lambda e: None):
        raise Boom
    with pytest.raises(Boom), metrics.track("apikeyrotation", reason_of=lambda e: "KubeErr"):
        raise Boom
    with metrics.track("serviceaccount"):
        pass  # the object was gone: not counted
    with pytest.raises(asyncio.CancelledError), metrics.track("serviceaccount"):
        raise asyncio.CancelledError  # the operator stops: not counted

    def total(resource: str, result: str, reason: str) -> float | None:
        return metrics.registry.get_sample_value(
            "zenml_operator_reconcile_total",
            {"resource": resource, "result": result, "reason": reason},
        )

    assert total("serviceaccount", "success", "Reconciled") == 1
    assert total("serviceaccount", "error", "SecretConflict") == 1
    assert total("serviceaccount", "error", "ZenMLUnavailable") == 1
    assert total("serviceaccount", "error", "UnexpectedError") == 1
    assert total("apikeyrotation", "error", "KubeErr") == 1
    count = metrics.registry.get_sample_value(
        "zenml_operator_reconcile_duration_seconds_count", {"resource": "serviceaccount"}
    )
    assert count == 4


def test_registries_are_independent() -> None:
    first, second = Metrics(), Metrics()  # the global registry would refuse the second
    first.rotated("ns", "r")
    assert (
        second.registry.get_sample_value(
            "zenml_operator_rotations_total", {"namespace": "ns", "rotation": "r"}
        )
        is None
    )


# ----------------------------------------------------------------- readiness and server


async def test_server_serves_metrics_and_readiness() -> None:
    metrics = Metrics()
    attempts: list[int] = []
    relogged = asyncio.Event()

    async def relogin() -> None:
        attempts.append(1)
        metrics.readiness.login_succeeded()
        relogged.set()

    port = await metrics.serve(0, host="127.0.0.1")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            response = await http.get("/readyz")
            assert response.status_code == 503
            assert response.text == "not ready: the operator is starting\n"

            metrics.readiness.started = True
            metrics.readiness.login_failed("ZenML refused the login (HTTP 401)")
            response = await http.get("/readyz")
            assert response.status_code == 503
            assert "HTTP 401" in response.text and response.text.count("\n") == 1

            # A failed login is retried in the background from /readyz.
            metrics.readiness.relogin = relogin
            assert (await http.get("/readyz")).status_code == 503
            await asyncio.wait_for(relogged.wait(), timeout=5)  # the background login ran
            response = await http.get("/readyz")
            assert (response.status_code, response.text) == (200, "ok\n")
            assert attempts == [1]

            metrics.rotated("default", "r")
            response = await http.get("/metrics")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain")
            assert 'zenml_operator_rotations_total{namespace="default",rotation="r"} 1.0' in (
                response.text
            )
            response = await http.get(
                "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
            )
            assert response.headers["content-type"].startswith("application/openmetrics-text")
            assert response.text.endswith("# EOF\n")

            metrics.readiness.stopping = True
            response = await http.get("/readyz")
            assert response.status_code == 503 and "shutting down" in response.text
    finally:
        await metrics.aclose()
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as http:
            await http.get(f"http://127.0.0.1:{port}/readyz")


def test_relogin_is_rate_limited() -> None:
    now = [100.0]
    metrics = Metrics()
    readiness = metrics.readiness
    readiness._clock = lambda: now[0]
    calls: list[int] = []

    async def relogin() -> None:
        calls.append(1)

    async def scenario() -> None:
        readiness.started = True
        readiness.login_failed("down")
        readiness.relogin = relogin
        readiness.maybe_relogin()
        await asyncio.sleep(0)
        readiness.maybe_relogin()  # too soon
        await asyncio.sleep(0)
        now[0] += 10
        readiness.maybe_relogin()
        await asyncio.sleep(0)
        await readiness.aclose()

    asyncio.run(scenario())
    assert calls == [1, 1]
