"""Which ZenML account a ServiceAccount may take as its own, decided without a cluster.

The create intent (`status.createRequestedAt`) makes a crash between ZenML's create and the
status write recoverable; it must not let a resource take an account that someone else
created (another resource racing for the same spec.name), nor the operator's own identity.
"""

from __future__ import annotations

import datetime
from typing import Any

import httpx
import pytest

from zenml_operator import zenml_api as zc
from zenml_operator.handlers.common import Deps, ReconcileProblem
from zenml_operator.handlers.service_account import ServiceAccountReconciler, parse_spec
from zenml_operator.secrets import ServerData

NOW = datetime.datetime.now(datetime.UTC)
OPERATOR = "zenml-operator"


def iso(moment: datetime.datetime) -> str:
    return moment.replace(microsecond=0).isoformat().replace("+00:00", "Z")


class FakeZenML:
    """An account that appears between the look-up and the create (someone else's, or ours)."""

    def __init__(self, *, create_error: Exception | None = None, created: Any = NOW) -> None:
        self.accounts: dict[str, zc.ServiceAccountInfo] = {}
        self.create_error = create_error
        self.created = created

    async def current_user_name(self) -> str:
        return OPERATOR

    async def get_service_account(self, name_or_id: str) -> zc.ServiceAccountInfo:
        for account in self.accounts.values():
            if name_or_id in (account.id, account.name):
                return account
        raise zc.NotFoundError("404")

    async def create_service_account(self, name: str, **_: Any) -> zc.ServiceAccountInfo:
        if isinstance(self.create_error, zc.ConflictError):
            self.accounts[name] = zc.ServiceAccountInfo("raced", name, True, "", self.created)
        if self.create_error is not None:
            raise self.create_error
        self.accounts[name] = zc.ServiceAccountInfo("ours", name, True, "", NOW)
        return self.accounts[name]


class FakeKube:
    def __init__(self) -> None:
        self.status: dict[str, Any] = {}  # the status as the cluster holds it

    async def patch_status(self, *args: Any) -> dict[str, Any]:
        for key, value in args[-1].items():
            if value is None:
                self.status.pop(key, None)
            else:
                self.status[key] = value
        return {}


def reconciler(zenml: FakeZenML, spec: dict[str, Any], status: dict[str, Any] | None = None):
    kube = FakeKube()
    kube.status.update(status or {})
    deps = Deps(
        zenml=zenml, kube=kube, server_data=ServerData("http://z"), events=lambda *a, **k: None
    )  # type: ignore[arg-type]
    body = {
        "metadata": {"name": "ml", "namespace": "default", "uid": "u1", "generation": 1},
        "spec": spec,
        "status": status or {},
    }
    return ServiceAccountReconciler(body, deps), parse_spec(body)


def unsent() -> zc.UnavailableError:
    try:
        raise zc.UnavailableError("down") from httpx.ConnectError("refused")
    except zc.UnavailableError as exc:
        return exc


def maybe_landed() -> zc.UnavailableError:
    try:
        raise zc.UnavailableError("slow") from httpx.ReadTimeout("no answer")
    except zc.UnavailableError as exc:
        return exc


async def test_a_create_that_lost_a_race_is_not_ours() -> None:
    rec, spec = reconciler(FakeZenML(create_error=zc.ConflictError("409")), {})
    with pytest.raises(ReconcileProblem) as problem:
        await rec.ensure_account(spec)
    assert problem.value.reason == "NameConflict"
    assert "createRequestedAt" not in rec.status
    assert "createRequestedAt" not in rec.deps.kube.status  # nor on the next run


async def test_a_late_landing_earlier_attempt_is_ours() -> None:
    earlier = iso(NOW - datetime.timedelta(minutes=1))
    zenml = FakeZenML(create_error=zc.ConflictError("409"))
    rec, spec = reconciler(zenml, {}, {"createRequestedAt": earlier})
    account = await rec.ensure_account(spec)
    assert account.id == "raced"
    assert rec.status["createRequestedAt"] == earlier
    assert rec.deps.kube.status["createRequestedAt"] == earlier


async def test_a_create_that_never_left_leaves_no_intent() -> None:
    rec, spec = reconciler(FakeZenML(create_error=unsent()), {})
    with pytest.raises(zc.UnavailableError):
        await rec.ensure_account(spec)
    assert "createRequestedAt" not in rec.status
    assert "createRequestedAt" not in rec.deps.kube.status


async def test_a_create_that_may_have_landed_keeps_its_intent() -> None:
    rec, spec = reconciler(FakeZenML(create_error=maybe_landed()), {})
    with pytest.raises(zc.UnavailableError):
        await rec.ensure_account(spec)
    assert "createRequestedAt" in rec.status
    assert "createRequestedAt" in rec.deps.kube.status


@pytest.mark.parametrize(("name", "taken"), [(OPERATOR, False), ("someone", True)])
async def test_adopt_never_takes_the_operators_own_identity(name: str, taken: bool) -> None:
    zenml = FakeZenML()
    zenml.accounts[name] = zc.ServiceAccountInfo("existing", name, True, "", NOW)
    rec, spec = reconciler(zenml, {"name": name, "adopt": True})
    if taken:
        assert (await rec.ensure_account(spec)).id == "existing"
    else:
        with pytest.raises(ReconcileProblem) as problem:
            await rec.ensure_account(spec)
        assert problem.value.reason == "NameConflict"
        assert "own identity" in problem.value.message
