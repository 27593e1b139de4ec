"""A ZenMLServer or ClusterZenMLServer: check it (credential, login, server info) and say so
in its status; hold its deletion while ServiceAccounts still use it."""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from typing import Any

from zenml_operator import zenml_api as zc
from zenml_operator.conditions import set_condition
from zenml_operator.handlers.common import Outcome, ReconcileProblem
from zenml_operator.servers import ServerDirectory
from zenml_operator.timestamps import utcnow

DELETION_BLOCKED = "DeletionBlocked"


def problem_of(exc: BaseException) -> ReconcileProblem | None:
    """A server's Ready reason for what its check raised (None: a bug)."""
    if isinstance(exc, ReconcileProblem):
        return exc
    if isinstance(exc, zc.UnauthorizedError):
        return ReconcileProblem("Unauthorized", str(exc), retry=True)
    if isinstance(exc, zc.ForbiddenError):
        return ReconcileProblem(
            "Forbidden",
            f"{exc}: the credential logs in but may not read the server; use a service"
            " account (or user) with admin rights",
            retry=True,
        )
    if isinstance(exc, zc.UnavailableError):
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            return ReconcileProblem(
                "InvalidCA",
                f"{exc}: the server's certificate does not verify against spec.caBundle (or"
                " the system's CAs when caBundle is unset); set caBundle to the CA that"
                " signed it",
                retry=True,
            )
        return ReconcileProblem("Unreachable", str(exc), retry=True)
    if isinstance(exc, zc.ZenMLError):
        return ReconcileProblem("Unreachable", f"ZenML answered an error: {exc}", retry=True)
    return None


async def check_server(
    obj: Mapping[str, Any], servers: ServerDirectory, *, check_every: float
) -> Outcome:
    """Read the credential again, log in, read who we are and the server's version."""
    meta = obj.get("metadata") or {}
    old: Mapping[str, Any] = obj.get("status") or {}
    generation = meta.get("generation")
    status: dict[str, Any] = {
        k: v for k, v in old.items() if k not in ("kopf",) and k != "conditions"
    }
    status["observedGeneration"] = generation
    conditions = [dict(c) for c in old.get("conditions") or [] if c.get("type") != DELETION_BLOCKED]
    wake_at = utcnow() + datetime.timedelta(seconds=check_every)
    try:
        server = await servers.connect(obj, reread=True)
        status["url"] = server.client.url
        identity = await server.client.current_user_name()
        info = await server.client.server_info()
    except Exception as exc:
        problem = problem_of(exc)
        if problem is None:
            raise
        status["conditions"] = set_condition(
            conditions,
            type="Ready",
            status=False,
            reason=problem.reason,
            message=problem.message,
            generation=generation,
        )
        return Outcome(status, problem, wake_at=wake_at)
    status.update(
        identity=identity,
        serverId=info.id,
        serverVersion=info.version,
        deploymentType=info.deployment_type,
    )
    version = f"ZenML {info.version}" if info.version else "ZenML"
    status["conditions"] = set_condition(
        conditions,
        type="Ready",
        status=True,
        reason="LoggedIn",
        message=f"Logged in to {version} at {server.client.url} as {identity!r}",
        generation=generation,
    )
    return Outcome({k: v for k, v in status.items() if v is not None}, wake_at=wake_at)


def users_message(kind: str, name: str, users: Iterable[str]) -> str:
    names = sorted(users)
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    return (
        f"{kind} {name!r} is still used by {len(names)} ServiceAccount(s): {shown}; it is"
        " deleted once they are gone (their keys are deleted through it first)"
    )


def blocked_conditions(
    status: Mapping[str, Any], message: str, generation: int | None
) -> list[dict[str, Any]]:
    return set_condition(
        status.get("conditions"),
        type=DELETION_BLOCKED,
        status=True,
        reason="InUse",
        message=message,
        generation=generation,
    )
