"""A ServiceAccount resource is deleted: apply its deletion policy in ZenML, remove the
Secrets it owns. Runs under the finalizer; every step is safe to repeat after a crash."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zenml_operator import secrets as sec
from zenml_operator import zenml_api as zc
from zenml_operator.crashpoints import crashpoint
from zenml_operator.handlers.accounts import AccountSteps
from zenml_operator.handlers.common import Deps, ReconcileProblem
from zenml_operator.handlers.service_account import parse_spec
from zenml_operator.models import ServiceAccountSpec


async def finalize(body: Mapping[str, Any], deps: Deps) -> list[str]:
    """The resource is being deleted: apply spec.deletionPolicy, remove our Secrets.

    Returns the names of the Secrets it handled (their locks can go). When the policy
    cannot be applied (an invalid spec, an account that was never ours) a Warning Event
    says what was left in ZenML, instead of a silent Retain."""
    rec = AccountSteps(body, deps)
    try:
        spec: ServiceAccountSpec | None = parse_spec(body)
    except ReconcileProblem as problem:
        spec = None
        rec.event(
            "Warning",
            "DeletionPolicyNotApplied",
            f"{problem.message}; the deletion policy cannot be read, so the ZenML account (if"
            " any) was left as it is. Delete or deactivate it in ZenML if it should go.",
        )
    account = None
    if spec is not None:
        # The account's server (held by its own finalizer while this resource exists).
        await rec.bind_server(spec)
        deps = rec.deps
        try:
            account = await rec.find_owned_account(spec)
        except ReconcileProblem as problem:
            # NameConflict: that account was never ours; leave it alone, and say so.
            rec.event(
                "Warning",
                "DeletionPolicyNotApplied",
                f"{problem.reason}: {problem.message} The ZenML account was not touched.",
            )
    policy = spec.deletion_policy if spec else "Retain"
    if account is not None and policy == "Delete":
        try:
            await deps.zenml.delete_service_account(account.id)
            await crashpoint("sa.finalize.after-delete")
            rec.event("Normal", "AccountDeleted", f"Deleted ZenML service account {account.name!r}")
        except zc.NotFoundError:
            pass
        except zc.ForbiddenError:
            await deps.zenml.update_service_account(account.id, active=False)
            rec.event(
                "Warning",
                "DeleteFellBackToDeactivate",
                f"ZenML refused to delete service account {account.name!r} (it owns resources);"
                " it was deactivated instead, which disables all of its keys.",
            )
    elif account is not None and policy == "Deactivate" and account.active:
        await deps.zenml.update_service_account(account.id, active=False)
        await crashpoint("sa.finalize.after-deactivate")
        rec.event(
            "Normal", "AccountDeactivated", f"Deactivated ZenML service account {account.name!r}"
        )
    elif account is not None:
        rec.event(
            "Normal",
            "AccountRetained",
            f"Left ZenML service account {account.name!r} as it is (Retain)",
        )
    # Owner references let a real cluster collect the Secrets; delete them now anyway so
    # that no key value outlives its resource (and so emulated clusters behave the same).
    names = {e.get("secretName") for e in rec.status.get("apiKeys") or []}
    if spec is not None:
        names |= {k.secret_name_for(rec.name) for k in spec.api_keys}
    released = sorted(n for n in names if n)
    for name in released:
        secret = await deps.kube.get_secret(rec.namespace, name)
        if secret is not None and sec.is_owned_by(secret, rec.uid):
            await deps.kube.delete_secret(rec.namespace, name, uid=secret["metadata"].get("uid"))
            await crashpoint("sa.finalize.after-secret-delete")
    return released
