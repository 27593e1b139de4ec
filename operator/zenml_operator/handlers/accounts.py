"""The ZenML account of a ServiceAccount resource: find it, judge whose it is, create it
(crash safe, with a recorded intent), keep its description and active flag in sync.

Crash safety: before asking ZenML to create the account, `status.createRequestedAt` is
written; after a crash, an account of that name created since then is ours (not a
NameConflict). A create answered 409 is judged by an earlier attempt's intent only, and a
create that never reached ZenML leaves no intent: two resources racing for one spec.name
never both take the account. The operator's own identity is never taken (adopt or intent).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

import httpx

from zenml_operator import policies as pol
from zenml_operator import zenml_api as zc
from zenml_operator.crashpoints import crashpoint
from zenml_operator.handlers.common import Deps, ReconcileProblem
from zenml_operator.models import API_VERSION, ServiceAccountSpec
from zenml_operator.timestamps import now_iso, parse_time

PLURAL = "serviceaccounts"
# How far ZenML's and our clocks may disagree when matching a create intent to an account.
CLOCK_SKEW = datetime.timedelta(minutes=2)
# A create that failed with one of these never reached ZenML (it cannot have landed).
_NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class AccountSteps:
    """The state of one reconcile run and its account steps (the key steps build on it)."""

    def __init__(self, body: Mapping[str, Any], deps: Deps) -> None:
        self.body = body
        self.deps = deps
        meta = body["metadata"]
        self.name: str = meta["name"]
        self.namespace: str = meta["namespace"]
        self.uid: str = meta["uid"]
        self.generation: int | None = meta.get("generation")
        self.status: dict[str, Any] = dict(body.get("status") or {})
        self.created_account = False  # this run created the account: it has no keys yet
        # Status fields this run wrote before its end (the create intent), for the runner.
        self.recorded: dict[str, Any] = {}

    def event(self, type: str, reason: str, message: str) -> None:
        self.deps.events(self.body, type=type, reason=reason, message=message)

    async def bind_server(self, spec: ServiceAccountSpec) -> None:
        """From here on, talk to the server spec.serverRef names (ServerNotReady when it
        cannot be used now); without one, the operator's default server."""
        if self.deps.servers is not None and spec.server_ref is not None:
            self.deps = await self.deps.servers.bind(self.deps, spec.server_ref, self.namespace)

    # --- account -------------------------------------------------------------------

    async def find_owned_account(self, spec: ServiceAccountSpec) -> zc.ServiceAccountInfo | None:
        """The ZenML account this resource owns, or None if there is none (yet).

        Raises NameConflict when the name is taken by an account that is not ours.
        """
        account_name = spec.account_name_for(self.name)
        known_id = self.status.get("accountId")
        if known_id:
            try:
                account = await self.deps.zenml.get_service_account(known_id)
            except zc.NotFoundError:
                account = None  # deleted by hand: re-create below, if the name is free
            else:
                if account.name == account_name:
                    return account
        try:
            account = await self.deps.zenml.get_service_account(account_name)
        except zc.NotFoundError:
            return None
        claimable = account.id != known_id and (
            spec.adopt or self._created_after_our_intent(account)
        )
        verdict = pol.judge_account(
            known_id=known_id,
            found_id=account.id,
            adopt=spec.adopt,
            created_after_intent=self._created_after_our_intent(account),
            # Asked only when the account would be claimed (one ZenML read).
            is_operator_identity=claimable
            and account.name == await self.deps.zenml.current_user_name(),
        )
        if verdict is pol.AccountVerdict.OPERATOR_IDENTITY:
            raise ReconcileProblem(
                "NameConflict",
                f"ZenML service account {account_name!r} is the operator's own identity;"
                " it cannot be managed by a resource. Choose another spec.name.",
            )
        if verdict is pol.AccountVerdict.OURS:
            if spec.adopt and account.id != known_id:
                self.event(
                    "Normal", "Adopted", f"Adopted the existing ZenML account {account_name!r}"
                )
            return account
        raise ReconcileProblem(
            "NameConflict",
            f"A ZenML service account named {account_name!r} already exists and was not"
            " created by this resource; nothing was changed. Set spec.adopt: true to take it"
            " over, or choose another spec.name.",
        )

    def _created_after_our_intent(self, account: zc.ServiceAccountInfo) -> bool:
        intent = parse_time(self.status.get("createRequestedAt"))
        created = account.created
        if intent is None or created is None:
            return False
        if created.tzinfo is None:
            created = created.replace(tzinfo=datetime.UTC)
        return created >= intent - CLOCK_SKEW

    async def _restore_intent(self, earlier: str | None) -> None:
        """Take back this run's intent record, in the cluster too: the status written at the
        end of the run is a diff against the status read before the run, which never had it."""
        await self.deps.kube.patch_status(
            API_VERSION, PLURAL, self.namespace, self.name, {"createRequestedAt": earlier}
        )
        self.recorded["createRequestedAt"] = earlier
        if earlier:
            self.status["createRequestedAt"] = earlier
        else:
            self.status.pop("createRequestedAt", None)

    def _never_looked(self, spec: ServiceAccountSpec) -> bool:
        """A first run (no account id, no create intent, no adopt): the create itself is the
        look-up. A name already taken answers 409 and is judged then, as after a race."""
        return not (
            self.status.get("accountId") or self.status.get("createRequestedAt") or spec.adopt
        )

    async def ensure_account(self, spec: ServiceAccountSpec) -> zc.ServiceAccountInfo:
        account = None if self._never_looked(spec) else await self.find_owned_account(spec)
        account_name = spec.account_name_for(self.name)
        if account is None:
            # Intent first: a crash after ZenML's create must not look like a NameConflict.
            earlier = self.status.get("createRequestedAt")  # of an attempt that may have landed
            intent = now_iso()
            await self.deps.kube.patch_status(
                API_VERSION, PLURAL, self.namespace, self.name, {"createRequestedAt": intent}
            )
            self.recorded["createRequestedAt"] = intent
            self.status["createRequestedAt"] = intent
            await crashpoint("sa.create.after-intent")
            try:
                account = await self.deps.zenml.create_service_account(
                    account_name, description=spec.description, active=spec.active
                )
            except zc.ConflictError:
                # Created since our look-up, so not by this attempt: by another resource with
                # the same spec.name, a script, or an earlier attempt of ours whose create
                # landed late. Judge it by that earlier intent alone (none: not ours), so that
                # two resources racing for one name never both take the account.
                await self._restore_intent(earlier)
                account = await self.find_owned_account(spec)
                if account is None:
                    raise
            except zc.UnavailableError as exc:
                if isinstance(exc.__cause__, _NEVER_SENT):
                    await self._restore_intent(earlier)  # this attempt created nothing
                raise
            else:
                self.created_account = True
                await crashpoint("sa.create.after-account")
                recreated = " (it was deleted in ZenML)" if self.status.get("accountId") else ""
                self.event(
                    "Normal",
                    "AccountCreated",
                    f"Created ZenML service account {account_name!r}{recreated}",
                )
            return account
        return await self.ensure_account_fields(spec, account)

    async def ensure_account_fields(
        self, spec: ServiceAccountSpec, account: zc.ServiceAccountInfo
    ) -> zc.ServiceAccountInfo:
        account_name = spec.account_name_for(self.name)
        if account.description != spec.description or account.active != spec.active:
            account = await self.deps.zenml.update_service_account(
                account.id, description=spec.description, active=spec.active
            )
            await crashpoint("sa.update.after-account")
            self.event(
                "Normal",
                "AccountUpdated",
                f"Updated ZenML service account {account_name!r} (active={spec.active})",
            )
        return account

    async def light_look(
        self, spec: ServiceAccountSpec
    ) -> tuple[zc.ServiceAccountInfo, list[zc.ApiKeyInfo]] | None:
        """A check of a converged resource (a resync, or the resume at an operator start) in
        ONE ZenML read: the key list, whose items nest the owning account (id, name,
        active). None when that cannot tell: spec changed since the last run, no account
        yet, or no key to carry the account.

        The nested account has no description, so a description edited by hand in ZenML
        is put back on the next spec change, not by a resync or a restart.
        """
        known_id = self.status.get("accountId")
        account_name = spec.account_name_for(self.name)
        if (
            not known_id
            or not spec.api_keys
            or self.status.get("accountName") != account_name
            or self.status.get("observedGeneration") != self.generation
        ):
            return None
        try:
            keys = await self.deps.zenml.list_api_keys(known_id)
        except zc.NotFoundError:
            return None  # the account is gone: the full path re-creates it
        owner = next((k.account for k in keys if k.account is not None), None)
        if owner is None or owner.id != known_id or owner.name != account_name:
            return None
        account = zc.ServiceAccountInfo(
            id=owner.id,
            name=owner.name,
            active=owner.active,
            description=spec.description,
            created=None,
        )
        return await self.ensure_account_fields(spec, account), keys
