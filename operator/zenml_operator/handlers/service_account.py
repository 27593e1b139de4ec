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
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pydantic

from zenml_operator import keyfamily as kf
from zenml_operator import policies as pol
from zenml_operator import secrets as sec
from zenml_operator import zenml_api as zc
from zenml_operator.conditions import set_condition
from zenml_operator.crashpoints import crashpoint
from zenml_operator.handlers.accounts import PLURAL as PLURAL  # re-exported for the wiring
from zenml_operator.handlers.accounts import AccountSteps
from zenml_operator.handlers.common import (
    Outcome,
    ReconcileProblem,
    classify,
    invalid_spec,
    patch_new_value,
    retire_keys,
    secret_lock,
)
from zenml_operator.kube import KubeConflict
from zenml_operator.models import API_VERSION, ApiKeySpec, ServiceAccountSpec
from zenml_operator.secret_record import (
    ANN_ISSUED_AT,
    SecretRecord,
    annotations,
    record_from_rotation_status,
)
from zenml_operator.timestamps import now_iso, parse_time, utcnow

KIND = "ServiceAccount"
ROTATIONS_PLURAL = "apikeyrotations"


@dataclass
class Rotations:
    """What the ApiKeyRotations of one key say in their status (written after the Secret)."""

    vouched: set[str] = field(default_factory=set)  # current, and previous inside retention
    current: list[zc.ApiKeyInfo] = field(default_factory=list)  # their current keys
    record: dict[str, str] = field(default_factory=dict)  # the rotation record, as annotations


logger = logging.getLogger(__name__)


def parse_spec(body: Mapping[str, Any]) -> ServiceAccountSpec:
    try:
        return ServiceAccountSpec.model_validate(dict(body.get("spec") or {}))
    except pydantic.ValidationError as exc:
        raise invalid_spec(exc) from None


# Why a Secret that exists was re-issued (the Warning Event; never the value).
REISSUE_REASONS = {
    pol.ValueCheck.OTHER_KEY: "did not hold the current key",
    pol.ValueCheck.MISSING: "had no key value under its data key",
    pol.ValueCheck.REPLACED: (
        "held a value that is not the issued key (its SHA-256 differs from the digest"
        " recorded when the operator wrote it)"
    ),
    pol.ValueCheck.OUTDATED: "held an older value of the key than the last one issued",
}

# Secret annotations the operator keeps its own record in (key ids, issue time, retention,
# rotation count, ...): a template must not write them.
RESERVED_ANNOTATION_PREFIX = "zenml.io/"
MAX_SECRET_NAME = 253


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


class ServiceAccountReconciler(AccountSteps):
    """One run of the reconcile for one resource body: the account (see accounts.py), then
    each declared key and its Secret."""

    async def load(
        self, spec: ServiceAccountSpec, *, one_read: bool
    ) -> tuple[zc.ServiceAccountInfo, list[zc.ApiKeyInfo]]:
        """The owned account (created or updated as the spec says) and all of its keys."""
        if one_read and (looked := await self.light_look(spec)) is not None:
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
        # The rotations of this key vouch for keys too (their status is written after the
        # Secret): a family member newer than the key the Secret records is either a crash
        # leftover, or the rotation's current key in a Secret restored to an older copy
        # (annotations and all). Then that key is the one to re-issue, not to retire.
        rotations: Rotations | None = None
        went_back = False
        newer = kf.newer_than(members, existing, key.name) if existing is not None else []
        if secret is not None and newer:
            rotations = await self._rotations(key.name, members)
            ahead = [m for m in newer if m in rotations.current]
            if ahead:
                existing, went_back = ahead[-1], True
        # A Secret that lost its owner reference is still ours when its labels and the key
        # id it records say so (that key is one of this key's ZenML keys); claimed back.
        owned = secret is not None and (
            sec.is_owned_by(secret, self.uid)
            or (
                sec.claims_owner(secret, owner_name=self.name, key_name=key.name)
                and held in {m.id for m in members}
            )
        )
        last = next((e for e in self.status.get("apiKeys") or [] if e.get("name") == key.name), {})
        check = pol.ValueCheck.MISSING

        def plan() -> pol.KeyAction:
            nonlocal check
            if went_back:
                check = pol.ValueCheck.OUTDATED
            elif existing is not None and secret is not None:
                same_key = last.get("id") == existing.id
                check = sec.value_check(
                    secret, existing.id, last_issued_at=last.get("issuedAt") if same_key else None
                )
            return pol.plan_key(
                secret_exists=secret is not None,
                secret_owned=owned,
                key_exists=existing is not None,
                secret_holds_key=existing is not None and secret is not None and check.holds,
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
                issued_at = await self.write_value(
                    key, secret, secret_name, issued, await self._lost_record(key, secret)
                )
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
        retirement = kf.retire(members, existing, retention, utcnow())
        if (retirement.deactivate or retirement.delete) and rotations is None:
            rotations = await self._rotations(key.name, members)
        await retire_keys(
            self.deps,
            account.id,
            kf.spare(retirement, rotations.vouched if rotations else set()),
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
                lost = await self._lost_record(key, secret, went_back=went_back)
                issued_at = await self.write_value(key, secret, secret_name, issued, lost)
                await crashpoint("sa.key.after-reissue-write")
                what = (
                    "was missing"
                    if secret is None
                    else REISSUE_REASONS.get(check, "did not hold the current key")
                )
                self.event(
                    "Warning",
                    "ApiKeyReissued",
                    f"Secret {secret_name!r} {what}; ZenML cannot show an existing key's value"
                    f" again, so API key {key.name!r} was rotated and the new value written",
                )
            else:
                issued_at = annotations(secret).get(ANN_ISSUED_AT)
                patch = sec.metadata_patch(
                    secret=secret, owner=self.body, key=key, server=self.deps.server_data
                )
                if patch is not None:
                    restored = sec.repairs_in(secret=secret, owner=self.body, key=key)
                    patch.setdefault("metadata", {})["resourceVersion"] = secret["metadata"][
                        "resourceVersion"
                    ]
                    await self.deps.kube.patch_secret(self.namespace, secret_name, patch)
                    await crashpoint("sa.key.after-metadata-patch")
                    if restored:
                        self.event(
                            "Normal",
                            "SecretRepaired",
                            f"Secret {secret_name!r} of API key {key.name!r}: restored"
                            f" {', '.join(restored)}",
                        )
        entry.update(
            id=existing.id,
            active=existing.active,
            issuedAt=issued_at,
            state="Ready" if existing.active else "Deactivated",
        )
        return entry

    async def _rotations(self, key_name: str, members: list[zc.ApiKeyInfo]) -> Rotations:
        """What the ApiKeyRotations of this key say in their status (Kopf's index names
        them, so nothing is read when there is none): see `Rotations`."""
        found = Rotations()
        by_id = {m.id: m for m in members}
        now = utcnow()
        for _, name in sorted(self.deps.rotation_claims(self.namespace, self.name, key_name)):
            rotation = await self.deps.kube.get_object(
                API_VERSION, ROTATIONS_PLURAL, self.namespace, name
            )
            status = (rotation or {}).get("status") or {}
            if not found.record:  # the oldest rotation is the one that rotates (the others
                found.record = record_from_rotation_status(status)  # are DuplicateRotation)
            if status.get("currentKeyId"):
                found.vouched.add(str(status["currentKeyId"]))
                if status["currentKeyId"] in by_id:
                    found.current.append(by_id[status["currentKeyId"]])
            until = parse_time(status.get("previousKeyValidUntil"))
            if status.get("previousKeyId") and until is not None and until > now:
                found.vouched.add(str(status["previousKeyId"]))
        return found

    async def _lost_record(
        self, key: ApiKeySpec, secret: Mapping[str, Any] | None, *, went_back: bool = False
    ) -> dict[str, str]:
        """The rotation record to write with a new value when the Secret lost its own (it is
        new, or restored from a copy older than the last rotation): rebuilt from the
        rotation's status, so that a rotation is not counted again, an answered on-demand
        request does not fire again, and the previous key keeps its retention."""
        if secret is not None and not went_back:
            return {}
        return (await self._rotations(key.name, [])).record

    async def write_value(
        self,
        key: ApiKeySpec,
        secret: Mapping[str, Any] | None,
        secret_name: str,
        issued: zc.IssuedApiKey,
        record: Mapping[str, str] | None = None,
    ) -> str:
        """Put a freshly issued value into the Secret in one write; returns the issue time.
        `record`: rotation record annotations to write with it (see _lost_record)."""
        issued_at = now_iso()
        if secret is None:
            body = sec.new_secret(
                owner=self.body,
                key=key,
                secret_name=secret_name,
                server=self.deps.server_data,
                key_id=issued.info.id,
                key_value=issued.value.reveal(),
                issued_at=issued_at,
            )
            body["metadata"]["annotations"].update(record or {})
            await self.deps.kube.create_secret(self.namespace, body)
            return issued_at

        def patch_for(current: Mapping[str, Any]) -> dict[str, Any]:
            return sec.value_patch(
                secret=current,
                owner=self.body,
                key=key,
                server=self.deps.server_data,
                key_id=issued.info.id,
                key_value=issued.value.reveal(),
                issued_at=issued_at,
                extra_annotations=record,
            )

        def lost(_: KubeConflict) -> Exception:
            return ReconcileProblem(
                "SecretConflict",
                f"Secret {secret_name!r} changed hands while a key was written; retrying.",
                retry=True,
            )

        await patch_new_value(
            self.deps.kube,
            self.namespace,
            secret_name,
            secret,
            patch_for,
            still_ours=lambda fresh: sec.is_owned_by(fresh, self.uid),
            lost=lost,
        )
        return issued_at

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

    async def run(self, *, one_read: bool = False) -> Outcome:
        """Converge; the Outcome's status is the desired one (the runner writes the diff).

        `one_read`: a check of a converged resource (a resync, or a resume at the generation
        the last run converged; policies.plan_reconcile) may take the one-read path, see
        light_look.
        """
        status: dict[str, Any] = {k: v for k, v in self.status.items() if k not in ("kopf",)}
        status["observedGeneration"] = self.generation
        try:
            spec = parse_spec(self.body)
            check_spec(spec, self.name)
            await self.bind_server(spec)
            status["zenmlUrl"] = self.deps.server_data.url
            account, all_keys = await self.load(spec, one_read=one_read)
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
