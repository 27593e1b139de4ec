"""Reconcile a ServiceAccount resource with ZenML and its Secrets (no Kopf in here).

Crash safety, step by step:
- account: before asking ZenML to create it, `status.createRequestedAt` is written; after a
  crash, an account of that name created since then is ours (not a NameConflict). A create
  answered 409 (someone created the name since our look-up) is judged by an earlier
  attempt's intent only, and a create that never reached ZenML leaves no intent: two
  resources racing for one spec.name never both take the account. The operator's own
  identity is never taken (adopt or intent);
- key: keys live under an account we own, so a key of a declared name is ours. The value
  exists only in ZenML's create/rotate response: if the Secret does not hold the current key
  (crash between create and write, or a Secret deleted by hand), the key is rotated with no
  retention (nobody can hold the lost value) and the new value written in one Secret write;
- nothing in status is trusted blindly: every run re-reads ZenML and the Secrets.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from collections.abc import Mapping
from typing import Any

import httpx
import pydantic

from zenml_operator import keyfamily as kf
from zenml_operator import policies as pol
from zenml_operator import secrets as sec
from zenml_operator import zenml_api as zc
from zenml_operator.conditions import set_condition
from zenml_operator.crashpoints import crashpoint
from zenml_operator.handlers.common import (
    Deps,
    Outcome,
    ReconcileProblem,
    classify,
    invalid_spec,
    retire_keys,
    secret_lock,
)
from zenml_operator.kube import KubeConflict
from zenml_operator.models import API_VERSION, ApiKeySpec, ServiceAccountSpec
from zenml_operator.secret_record import ANN_ISSUED_AT, SecretRecord, annotations
from zenml_operator.timestamps import now_iso, parse_time, utcnow

PLURAL = "serviceaccounts"
KIND = "ServiceAccount"
# How far ZenML's and our clocks may disagree when matching a create intent to an account.
CLOCK_SKEW = datetime.timedelta(minutes=2)

logger = logging.getLogger(__name__)


def parse_spec(body: Mapping[str, Any]) -> ServiceAccountSpec:
    try:
        return ServiceAccountSpec.model_validate(dict(body.get("spec") or {}))
    except pydantic.ValidationError as exc:
        raise invalid_spec(exc) from None


# Secret annotations the operator keeps its own record in (key ids, issue time, retention,
# rotation count, ...): a template must not write them.
RESERVED_ANNOTATION_PREFIX = "zenml.io/"
MAX_SECRET_NAME = 253
# A create that failed with one of these never reached ZenML (it cannot have landed).
_NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def check_spec(spec: ServiceAccountSpec, resource_name: str) -> None:
    """What the CRD schema cannot check because it needs metadata.name: the effective Secret
    names (a default `<metadata.name>-<key>` may equal another key's explicit secretName, or
    exceed a Secret name's length), and template annotations that would overwrite the
    operator's record in the Secret. Not part of parse_spec: finalize must still apply the
    deletion policy of a resource that fails these."""
    problems = []
    owners: dict[str, str] = {}
    for key in spec.api_keys:
        name = key.secret_name_for(resource_name)
        if name in owners:
            problems.append(
                f"apiKeys {owners[name]!r} and {key.name!r} both write Secret {name!r}"
                " (set a distinct secretName)"
            )
        owners.setdefault(name, key.name)
        if len(name) > MAX_SECRET_NAME:
            problems.append(
                f"apiKeys {key.name!r}: Secret name {name[:40]}... is {len(name)} characters"
                f" (at most {MAX_SECRET_NAME}); set a shorter secretName"
            )
        reserved = sorted(
            a for a in key.secret_template.annotations if a.startswith(RESERVED_ANNOTATION_PREFIX)
        )
        if reserved:
            problems.append(
                f"apiKeys {key.name!r}: secretTemplate.annotations {reserved} use the"
                f" operator's own prefix {RESERVED_ANNOTATION_PREFIX!r}"
            )
    if problems:
        raise ReconcileProblem("InvalidSpec", "spec is invalid: " + "; ".join(problems))


class ServiceAccountReconciler:
    """One run of the reconcile for one resource body."""

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
        """A resync of a converged resource in ONE ZenML read: the key list, whose items
        nest the owning account (id, name, active). None when that cannot tell: spec
        changed since the last run, no account yet, or no key to carry the account.

        The nested account has no description, so a description edited by hand in ZenML
        is put back on the next spec change or operator start, not within a resync.
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

    async def load(
        self, spec: ServiceAccountSpec, *, resync: bool
    ) -> tuple[zc.ServiceAccountInfo, list[zc.ApiKeyInfo]]:
        """The owned account (created or updated as the spec says) and all of its keys."""
        if resync and (looked := await self.light_look(spec)) is not None:
            return looked
        account = await self.ensure_account(spec)
        if self.created_account or not (spec.api_keys or self.status.get("apiKeys")):
            return account, []  # a new account has no keys; nothing to remove or ensure
        return account, await self.deps.zenml.list_api_keys(account.id)

    # --- keys ----------------------------------------------------------------------

    async def ensure_key(
        self,
        account: zc.ServiceAccountInfo,
        key: ApiKeySpec,
        members: list[zc.ApiKeyInfo],
    ) -> dict[str, Any]:
        secret_name = key.secret_name_for(self.name)
        # Rotations write the same Secret and create keys of the same family.
        async with self.deps.lock_for(secret_lock(self.namespace, secret_name)):
            return await self._ensure_key(account, key, members, secret_name)

    async def _ensure_key(
        self,
        account: zc.ServiceAccountInfo,
        key: ApiKeySpec,
        members: list[zc.ApiKeyInfo],
        secret_name: str,
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": key.name, "secretName": secret_name}
        secret = await self.deps.kube.get_secret(self.namespace, secret_name)
        held = SecretRecord.of(secret).key_id
        if held and held not in {m.id for m in members}:
            # The list was read before this Secret's lock: a rotation may have switched the
            # Secret to a new key since. Re-read, or the newest-member fallback below would
            # re-issue (and kill) a key inside its retention.
            members = kf.family(await self.deps.zenml.list_api_keys(account.id), key.name)
        existing = kf.current_key(members, secret)

        def plan() -> pol.KeyAction:
            return pol.plan_key(
                secret_exists=secret is not None,
                secret_owned=secret is not None and sec.is_owned_by(secret, self.uid),
                key_exists=existing is not None,
                secret_holds_key=existing is not None
                and secret is not None
                and sec.secret_holds_key(secret, existing.id),
            )

        action = plan()
        if action is pol.KeyAction.CONFLICT:
            entry.update(state="SecretConflict", id=existing.id if existing else None)
            entry["message"] = (
                f"Secret {secret_name!r} exists and {sec.owner_description(secret)}; it was"
                " left untouched. Delete it or set apiKeys[].secretName to another name."
            )
            return entry

        issued_at: str | None = None
        if action is pol.KeyAction.CREATE:
            try:
                issued = await self.deps.zenml.create_api_key(
                    account.id, key.name, description=key.description
                )
            except zc.ConflictError:
                # Created by a run that crashed before its Secret write: it is ours.
                existing = await self.deps.zenml.get_api_key(account.id, key.name)
                action = plan()
            else:
                await crashpoint("sa.key.after-create")
                issued_at = await self.write_value(key, secret, secret_name, issued)
                await crashpoint("sa.key.after-secret-write")
                self.event(
                    "Normal",
                    "ApiKeyCreated",
                    f"Created API key {key.name!r} into Secret {secret_name!r}",
                )
                existing = issued.info
        if existing.description != key.description or existing.active != key.active:
            existing = await self.deps.zenml.update_api_key(
                account.id, existing.id, description=key.description, active=key.active
            )
            await crashpoint("sa.key.after-update")
        # Older generations: crash leftovers of a rotation, or a previous key whose
        # retention (recorded in the Secret) is over. One still inside it is kept.
        retention = SecretRecord.of(secret).retention
        await retire_keys(
            self.deps,
            account.id,
            kf.retire(members, existing, retention, utcnow()),
            self.event,
            "sa.key.after-retire-deactivate",
            "sa.key.after-retire-delete",
        )
        if issued_at is None:
            if action is pol.KeyAction.REISSUE:
                # ZenML never shows a key's value again: the only way to fill the Secret is
                # a new value. No retention: nobody can hold the value that was lost.
                issued = await self.deps.zenml.rotate_api_key(
                    account.id, existing.id, retain_period_minutes=0
                )
                await crashpoint("sa.key.after-reissue")
                issued_at = await self.write_value(key, secret, secret_name, issued)
                await crashpoint("sa.key.after-reissue-write")
                what = "was missing" if secret is None else "did not hold the current key"
                self.event(
                    "Warning",
                    "ApiKeyReissued",
                    f"Secret {secret_name!r} {what}; ZenML cannot show an existing key's value"
                    f" again, so API key {key.name!r} was rotated and the new value written",
                )
            else:
                issued_at = annotations(secret).get(ANN_ISSUED_AT)
                patch = sec.metadata_patch(
                    secret=secret, owner=self.body, key=key, zenml_url=self.deps.secret_url
                )
                if patch is not None:
                    patch.setdefault("metadata", {})["resourceVersion"] = secret["metadata"][
                        "resourceVersion"
                    ]
                    await self.deps.kube.patch_secret(self.namespace, secret_name, patch)
                    await crashpoint("sa.key.after-metadata-patch")
        entry.update(
            id=existing.id,
            active=existing.active,
            issuedAt=issued_at,
            state="Ready" if existing.active else "Deactivated",
        )
        return entry

    async def write_value(
        self,
        key: ApiKeySpec,
        secret: Mapping[str, Any] | None,
        secret_name: str,
        issued: zc.IssuedApiKey,
    ) -> str:
        """Put a freshly issued value into the Secret in one write; returns the issue time."""
        issued_at = now_iso()
        if secret is None:
            body = sec.new_secret(
                owner=self.body,
                key=key,
                secret_name=secret_name,
                zenml_url=self.deps.secret_url,
                key_id=issued.info.id,
                key_value=issued.value.reveal(),
                issued_at=issued_at,
            )
            await self.deps.kube.create_secret(self.namespace, body)
            return issued_at
        for _ in range(3):
            patch = sec.value_patch(
                secret=secret,
                owner=self.body,
                key=key,
                zenml_url=self.deps.secret_url,
                key_id=issued.info.id,
                key_value=issued.value.reveal(),
                issued_at=issued_at,
            )
            try:
                await self.deps.kube.patch_secret(self.namespace, secret_name, patch)
                return issued_at
            except KubeConflict:
                secret = await self.deps.kube.get_secret(self.namespace, secret_name)
                if secret is None or not sec.is_owned_by(secret, self.uid):
                    raise ReconcileProblem(
                        "SecretConflict",
                        f"Secret {secret_name!r} changed hands while a key was written; retrying.",
                        retry=True,
                    ) from None
        raise ReconcileProblem(
            "KubernetesError", f"Secret {secret_name!r} kept changing; retrying.", retry=True
        )

    async def remove_key(
        self,
        account: zc.ServiceAccountInfo,
        entry: Mapping[str, Any],
        members: list[zc.ApiKeyInfo],
    ) -> None:
        """A key removed from the spec: delete it (all generations) and its Secret (if ours)."""
        for member in members:
            with contextlib.suppress(zc.NotFoundError):
                await self.deps.zenml.delete_api_key(account.id, member.id)
        await crashpoint("sa.remove-key.after-zenml-delete")
        secret_name = entry.get("secretName")
        if secret_name:
            secret = await self.deps.kube.get_secret(self.namespace, secret_name)
            if secret is not None and sec.is_owned_by(secret, self.uid):
                await self.deps.kube.delete_secret(
                    self.namespace, secret_name, uid=secret["metadata"].get("uid")
                )
                await crashpoint("sa.remove-key.after-secret-delete")
        self.event(
            "Normal",
            "ApiKeyDeleted",
            f"Deleted API key {entry.get('name')!r} and Secret {secret_name!r}",
        )

    # --- the whole run ----------------------------------------------------------------

    async def run(self, *, resync: bool = False) -> Outcome:
        """Converge; the Outcome's status is the desired one (the runner writes the diff).

        `resync`: a periodic drift check (may take the one-read path, see light_look).
        """
        status: dict[str, Any] = {k: v for k, v in self.status.items() if k not in ("kopf",)}
        status["observedGeneration"] = self.generation
        status["zenmlUrl"] = self.deps.secret_url
        try:
            spec = parse_spec(self.body)
            check_spec(spec, self.name)
            account, all_keys = await self.load(spec, resync=resync)
            status.update(accountId=account.id, accountName=account.name, active=account.active)
            status.pop("createRequestedAt", None)
            self.status.pop("createRequestedAt", None)
            declared = {k.name for k in spec.api_keys}
            previous = {e["name"]: e for e in self.status.get("apiKeys") or []}
            entries = [
                await self.ensure_key(account, key, kf.family(all_keys, key.name))
                for key in spec.api_keys
            ]
            for name, entry in previous.items():
                if name not in declared:
                    await self.remove_key(account, entry, kf.family(all_keys, name))
        except Exception as exc:
            problem = classify(exc)
            if problem is None:
                raise
            status["conditions"] = set_condition(
                self.status.get("conditions"),
                type="Ready",
                status=False,
                reason=problem.reason,
                message=problem.message,
                generation=self.generation,
            )
            if "createRequestedAt" in self.status:
                status["createRequestedAt"] = self.status["createRequestedAt"]
            else:
                status.pop("createRequestedAt", None)  # a create that surely did not land
            return Outcome(status, problem, recorded=self.recorded)
        # Every write of this run is done; the caller writes status next.
        await crashpoint("sa.reconcile.before-status")

        conflicts = [e for e in entries if e.get("state") == "SecretConflict"]
        status["apiKeys"] = [
            {k: v for k, v in e.items() if k != "message" and v is not None} for e in entries
        ]
        status["readyKeys"] = sum(1 for e in entries if e["state"] in ("Ready", "Deactivated"))
        if conflicts:
            reason, ok = "SecretConflict", False
            message = " ".join(e["message"] for e in conflicts)
        elif not account.active:
            reason, ok = "AccountDeactivated", True
            message = f"ZenML service account {account.name!r} is deactivated (spec.active)."
        else:
            reason, ok = "Reconciled", True
            message = (
                f"ZenML service account {account.name!r} and {len(entries)} API key(s) are in sync."
            )
        status["conditions"] = set_condition(
            self.status.get("conditions"),
            type="Ready",
            status=ok,
            reason=reason,
            message=message,
            generation=self.generation,
        )
        return Outcome(status, recorded=self.recorded)


async def finalize(body: Mapping[str, Any], deps: Deps) -> list[str]:
    """The resource is being deleted: apply spec.deletionPolicy, remove our Secrets.

    Returns the names of the Secrets it handled (their locks can go). When the policy
    cannot be applied (an invalid spec, an account that was never ours) a Warning Event
    says what was left in ZenML, instead of a silent Retain."""
    rec = ServiceAccountReconciler(body, deps)
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
