"""What every handler needs: dependencies, errors that end a reconcile, status writing."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

import pydantic

from zenml_operator import zenml_api as zc
from zenml_operator.kube import KubeClient, KubeConflict, KubeError

if TYPE_CHECKING:
    from zenml_operator.secrets import ServerData
    from zenml_operator.servers import ServerDirectory


class EventSink(Protocol):
    def __call__(
        self, body: Mapping[str, Any], *, type: str, reason: str, message: str
    ) -> None: ...


@dataclass
class Deps:
    """Long-lived clients shared by all handlers (one connection pool each)."""

    zenml: zc.ZenMLClient
    kube: KubeClient
    # What the Secrets of this client's server carry besides the key (URL, CA, Pro API).
    server_data: ServerData
    events: EventSink
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    # Bring a rotation's next look forward to now, by its uid (see rotation_looks.py).
    wake_rotation: Callable[[str], None] = lambda uid: None
    # (creationTimestamp, name) of the ApiKeyRotations of (namespace, account, key), from
    # Kopf's in-memory index: a LIST per look would make every look O(all rotations).
    rotation_claims: Callable[[str, str, str], Iterable[tuple[str, str]]] = lambda *_: ()
    resync_seconds: float = 600.0
    # The ZenMLServer/ClusterZenMLServer clients (servers.py); None: the default server only.
    servers: ServerDirectory | None = None

    def lock_for(self, uid: str) -> asyncio.Lock:
        """Serialises the handlers, checks and looks of one object."""
        lock = self.locks.get(uid)
        if lock is None:
            lock = self.locks[uid] = asyncio.Lock()
        return lock

    def forget(self, uid: str, *, secrets: Iterable[tuple[str, str]] = ()) -> None:
        """Drop what was kept for a gone object: its lock, and the locks of the Secrets it
        owned ((namespace, name)), so that none outlives its object."""
        self.locks.pop(uid, None)
        for namespace, name in secrets:
            self.locks.pop(secret_lock(namespace, name), None)


class _Overlay:
    """Deps with a few fields replaced; everything else read through, also what is set on
    the base later (Kopf's rotation index and the look schedule's wake-up are attached after
    start-up)."""

    def __init__(self, base: Deps, **overrides: Any) -> None:
        self.__dict__.update(overrides)
        self._base = base

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)


def overlay(base: Deps, **overrides: Any) -> Deps:
    """`base` with `overrides` (e.g. another server's client): locks and wake-ups shared."""
    return cast(Deps, _Overlay(base, **overrides))


class ReconcileProblem(Exception):
    """A condition that ends this reconcile with Ready=False, reason and message.

    `retry` says whether waiting and trying again may fix it by itself (an outage)
    or whether a human must act (a name conflict, an invalid spec).
    """

    def __init__(self, reason: str, message: str, *, retry: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry = retry


@dataclass
class Outcome:
    """What one reconcile decided: the full status to converge on (the runner writes only
    what differs), the problem that ended it early if any, and when to look again."""

    status: dict[str, Any]
    problem: ReconcileProblem | None = None
    wake_at: datetime.datetime | None = None  # when the object needs attention again
    # Status fields already written during the run (an intent recorded before a ZenML
    # create; None: removed), so that the final write is a diff against what is really there.
    recorded: dict[str, Any] = field(default_factory=dict)


def invalid_spec(exc: pydantic.ValidationError | ValueError) -> ReconcileProblem:
    """InvalidSpec naming every bad field (`apiKeys.0.name: ...`), never the input values."""
    if isinstance(exc, pydantic.ValidationError):
        detail = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'spec'}: {err['msg']}"
            for err in exc.errors()
        )
    else:
        detail = str(exc)
    return ReconcileProblem("InvalidSpec", f"spec is invalid: {detail}")


def classify(exc: BaseException) -> ReconcileProblem | None:
    """Map client errors to a user-facing reason; None for bugs (let Kopf log them)."""
    if isinstance(exc, ReconcileProblem):
        return exc
    if isinstance(exc, zc.UnauthorizedError):
        return ReconcileProblem(
            "ZenMLUnauthorized",
            f"ZenML rejected the operator's credential: {exc}. Fix the operator's credential"
            " for that server (a valid, active service-account key).",
            retry=True,
        )
    if isinstance(exc, zc.UnavailableError):
        return ReconcileProblem(
            "ZenMLUnavailable",
            f"The ZenML server cannot be reached: {exc}; retrying.",
            retry=True,
        )
    if isinstance(exc, zc.ForbiddenError):
        return ReconcileProblem(
            "ZenMLForbidden", f"ZenML refused the operation: {exc}.", retry=True
        )
    if isinstance(exc, zc.BadRequestError):
        return ReconcileProblem("ZenMLRejected", f"ZenML rejected the request: {exc}.")
    if isinstance(exc, zc.ZenMLError):
        return ReconcileProblem("ZenMLError", f"ZenML error: {exc}; retrying.", retry=True)
    if isinstance(exc, KubeError):
        return ReconcileProblem(
            "KubernetesError", f"Kubernetes API error: {exc}; retrying.", retry=True
        )
    return None


def status_patch(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> dict[str, Any]:
    """Only the top-level status fields that differ; None removes a field.

    An empty result means the reconcile writes nothing at all.
    """
    current = dict(current or {})
    changes = {k: v for k, v in desired.items() if current.get(k) != v}
    for k in current:
        if k not in desired and k != "kopf":
            changes[k] = None
    return changes


async def patch_new_value(
    kube: KubeClient,
    namespace: str,
    secret_name: str,
    secret: Mapping[str, Any],
    patch_for: Callable[[Mapping[str, Any]], dict[str, Any]],
    still_ours: Callable[[Mapping[str, Any] | None], bool],
    lost: Callable[[KubeConflict], Exception],
) -> dict[str, Any]:
    """Write a freshly issued key value into an existing Secret, conditional on its
    resourceVersion (the patch carries it). Someone else's edit in between answers 409: the
    Secret is read again and, while `still_ours` says the write still belongs there, written
    again, so a new key is not abandoned for a label edit. Otherwise `lost(conflict)` is
    raised."""
    for _ in range(3):
        try:
            return await kube.patch_secret(namespace, secret_name, patch_for(secret))
        except KubeConflict as conflict:
            fresh = await kube.get_secret(namespace, secret_name)
            if fresh is None or not still_ours(fresh):
                raise lost(conflict) from None
            secret = fresh
    raise ReconcileProblem(
        "KubernetesError", f"Secret {secret_name!r} kept changing; retrying.", retry=True
    )


def secret_lock(namespace: str, name: str) -> str:
    """The lock key shared by everything that writes one Secret (and its key family)."""
    return f"secret/{namespace}/{name}"


async def retire_keys(
    deps: Deps,
    account_id: str,
    plan: Any,
    event: Callable[[str, str, str], None],
    crash_after_deactivate: str,
    crash_after_delete: str,
) -> None:
    """Carry out a keyfamily.Retirement: deactivate the expired previous key, delete the rest.

    Each branch has a crash point of its own (named by the caller)."""
    from zenml_operator.crashpoints import crashpoint

    for key in plan.deactivate:
        with contextlib.suppress(zc.NotFoundError):
            await deps.zenml.update_api_key(account_id, key.id, active=False)
        await crashpoint(crash_after_deactivate)
        event(
            "Normal",
            "ApiKeyExpired",
            f"Deactivated previous API key {key.name!r}: its retention is over",
        )
    for key in plan.delete:
        with contextlib.suppress(zc.NotFoundError):
            await deps.zenml.delete_api_key(account_id, key.id)
        await crashpoint(crash_after_delete)
        event(
            "Normal",
            "ApiKeyRetired",
            f"Deleted old API key {key.name!r} (superseded, or never used after a crash)",
        )
