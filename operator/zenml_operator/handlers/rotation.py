"""Reconcile an ApiKeyRotation: rotate one key on schedule or on demand (no Kopf here).

Design (see keyfamily.py): a rotation creates a NEW ZenML key of the declared key's family,
switches the Secret to it in one write (value + key id + previous key id and the time it
stays valid + rotation count + the on-demand request it answers), restarts the targets,
and deletes the previous key when its retention ends. The Secret is the record, so every
decision after a crash is taken from it:
- crash after the create, before the Secret write: the new key is referenced by nothing
  and is deleted; the Secret and the key workloads hold are untouched; the rotation
  simply happens again;
- crash after the Secret write: the rotation is done (count, time, request are in the
  Secret); restarts still due are made once (each target records the key id it was
  restarted for); nothing rotates twice.
ZenML's native rotate is NOT used: the server keeps one previous key, so recovering a
value lost in a crash would need a second rotate, which kills the key workloads hold.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from typing import Any

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
    patch_new_value,
    retire_keys,
    secret_lock,
)
from zenml_operator.handlers.restarts import restart_targets
from zenml_operator.models import (
    API_VERSION,
    ROTATE_ANNOTATION,
    ApiKeyRotationSpec,
    ApiKeySpec,
    ServiceAccountSpec,
)
from zenml_operator.secret_record import Retention, SecretRecord, rotation_annotations
from zenml_operator.timestamps import iso, parse_duration, utcnow
from zenml_operator.zenml_api import pacing

PLURAL = "apikeyrotations"

logger = logging.getLogger(__name__)


class RotationReconciler:
    def __init__(self, body: Mapping[str, Any], deps: Deps) -> None:
        self.body = body
        self.deps = deps
        meta = body["metadata"]
        self.name: str = meta["name"]
        self.namespace: str = meta["namespace"]
        self.generation: int | None = meta.get("generation")
        self.status: dict[str, Any] = dict(body.get("status") or {})
        self.request: str = ((meta.get("annotations") or {}).get(ROTATE_ANNOTATION) or "").strip()

    def event(self, type: str, reason: str, message: str) -> None:
        self.deps.events(self.body, type=type, reason=reason, message=message)

    def conditions(
        self, *, ready: tuple[bool, str, str], rotating: tuple[bool, str, str]
    ) -> list[dict[str, Any]]:
        conds = set_condition(
            self.status.get("conditions"),
            type="Ready",
            status=ready[0],
            reason=ready[1],
            message=ready[2],
            generation=self.generation,
        )
        return set_condition(
            conds,
            type="Rotating",
            status=rotating[0],
            reason=rotating[1],
            message=rotating[2],
            generation=self.generation,
        )

    # --- what the rotation points at ----------------------------------------------------

    def parse_spec(self) -> tuple[ApiKeyRotationSpec, datetime.timedelta]:
        try:
            spec = ApiKeyRotationSpec.model_validate(dict(self.body.get("spec") or {}))
            period = parse_duration(spec.period)
        except (pydantic.ValidationError, ValueError) as exc:
            raise invalid_spec(exc) from None
        if period <= datetime.timedelta(minutes=spec.retain_period_minutes):
            raise ReconcileProblem(
                "InvalidSpec",
                f"period {spec.period} must be longer than retainPeriodMinutes"
                f" ({spec.retain_period_minutes}): ZenML keeps one previous key, and a rotation"
                " inside the retention window would cut off the key workloads still hold.",
            )
        return spec, period

    async def target(
        self, spec: ApiKeyRotationSpec
    ) -> tuple[Mapping[str, Any], ApiKeySpec, str, str]:
        """(ServiceAccount object, key spec, account id, Secret name) or a problem."""
        sa = await self.deps.kube.get_object(
            API_VERSION, "serviceaccounts", self.namespace, spec.service_account_name
        )
        if sa is None:
            raise ReconcileProblem(
                "ServiceAccountNotFound",
                f"ServiceAccount {spec.service_account_name!r} does not exist in namespace"
                f" {self.namespace!r}; create it or fix spec.serviceAccountName.",
                retry=True,
            )
        try:
            sa_spec = ServiceAccountSpec.model_validate(dict(sa.get("spec") or {}))
        except pydantic.ValidationError:
            raise ReconcileProblem(
                "ServiceAccountNotReady",
                f"ServiceAccount {spec.service_account_name!r} has an invalid spec.",
                retry=True,
            ) from None
        if self.deps.servers is not None and sa_spec.server_ref is not None:
            # A rotation follows its ServiceAccount's server.
            self.deps = await self.deps.servers.bind(self.deps, sa_spec.server_ref, self.namespace)
        key = next((k for k in sa_spec.api_keys if k.name == spec.api_key_name), None)
        if key is None:
            names = ", ".join(k.name for k in sa_spec.api_keys) or "none"
            raise ReconcileProblem(
                "ApiKeyNotFound",
                f"ServiceAccount {spec.service_account_name!r} declares no API key"
                f" {spec.api_key_name!r} (it declares: {names}); fix spec.apiKeyName.",
                retry=True,
            )
        sa_status = sa.get("status") or {}
        entry = next((e for e in sa_status.get("apiKeys") or [] if e.get("name") == key.name), None)
        if not sa_status.get("accountId") or not entry or entry.get("state") != "Ready":
            raise ReconcileProblem(
                "ServiceAccountNotReady",
                f"API key {key.name!r} of ServiceAccount {spec.service_account_name!r} is not"
                " Ready yet; rotation waits for it.",
                retry=True,
            )
        return sa, key, sa_status["accountId"], key.secret_name_for(sa["metadata"]["name"])

    def check_unique(self, spec: ApiKeyRotationSpec) -> None:
        """Two rotations of one key would rotate it twice: the oldest one wins."""
        claims = sorted(
            self.deps.rotation_claims(self.namespace, spec.service_account_name, spec.api_key_name)
        )
        if claims and claims[0][1] != self.name:
            raise ReconcileProblem(
                "DuplicateRotation",
                f"ApiKeyRotation {claims[0][1]!r} already rotates key"
                f" {spec.api_key_name!r} of {spec.service_account_name!r}; delete one of them.",
            )

    # --- the run -------------------------------------------------------------------------

    async def run(self, now: datetime.datetime | None = None) -> Outcome:
        now = now or utcnow()
        status: dict[str, Any] = {"observedGeneration": self.generation}
        # What the last rotation recorded stays in status when this look ends early (e.g. the
        # Secret is missing while it is repaired): a Secret rebuilt from this status must get
        # the answered request back, or that on-demand request would rotate a second time.
        for keep in (
            "lastRotationTime",
            "rotationCount",
            "currentKeyId",
            "lastRotateRequest",
            "previousKeyId",
            "previousKeyValidUntil",
            "restartedForKeyId",
        ):
            if keep in self.status:
                status[keep] = self.status[keep]
        try:
            spec, period = self.parse_spec()
            self.check_unique(spec)
            sa, key, account_id, secret_name = await self.target(spec)
            async with self.deps.lock_for(secret_lock(self.namespace, secret_name)):
                return await self._run_locked(
                    status, spec, period, sa, key, account_id, secret_name, now
                )
        except Exception as exc:
            problem = classify(exc)
            if problem is None:
                raise
            status["conditions"] = self.conditions(
                ready=(False, problem.reason, problem.message),
                rotating=(False, problem.reason, "No rotation can run: see Ready."),
            )
            return Outcome(status, problem)

    async def _run_locked(
        self,
        status: dict[str, Any],
        spec: ApiKeyRotationSpec,
        period: datetime.timedelta,
        sa: Mapping[str, Any],
        key: ApiKeySpec,
        account_id: str,
        secret_name: str,
        now: datetime.datetime,
    ) -> Outcome:
        secret = await self.deps.kube.get_secret(self.namespace, secret_name)
        if secret is None or not sec.is_owned_by(secret, sa["metadata"]["uid"]):
            raise ReconcileProblem(
                "SecretNotReady",
                f"Secret {secret_name!r} of key {key.name!r} is missing or not managed by"
                f" ServiceAccount {spec.service_account_name!r}; waiting for it.",
                retry=True,
            )
        record = SecretRecord.of(secret)
        retention = record.retention
        # 1. Whether a rotation is due, from the times recorded in the Secret only.
        count = record.rotation_count
        issued = record.issued_at or now
        handled_request = record.answered_request
        due = pol.rotation_due(
            now=now,
            next_due=issued + period,
            request=self.request,
            answered_request=handled_request,
        )
        if due:
            pacing.promote()  # a look that started as background work: this one cannot wait

        members: list[zc.ApiKeyInfo] | None = None  # None: the family was not read
        if self._trust_record(record, now):
            # The last look saw the key the Secret holds and no retention just ended: no
            # ZenML read (the ServiceAccount's resync reads this family anyway, and enforces
            # retention and crash leftovers too). A credential ZenML refused still shows
            # here when nothing is due: no rotation could run with it.
            refused = self.deps.zenml.login_refused
            if refused is not None and not due:
                raise refused
            current_id = str(record.key_id)
        else:
            members, current_id = await self._read_family(account_id, key, secret, retention, now)
        # Without a read, the Secret's record stands for the family.
        known = [m.id for m in members] if members is not None else [str(retention.key_id)]
        plan = pol.plan_rotation(
            now=now,
            period=period,
            suspend=spec.suspend,
            issued_at=issued,
            request=self.request,
            answered_request=handled_request,
            previous_valid_until=retention.valid_until,
            previous_protected=retention.key_id is not None
            and any(retention.protects(i, now) for i in known),
        )
        next_due = plan.next_due
        rotating: tuple[bool, str, str] = (False, "Idle", f"Next rotation at {iso(next_due)}.")
        wake_at = plan.wake_at

        if plan.action is pol.RotationAction.SUSPENDED:
            rotating = (False, "Suspended", "spec.suspend is true: no rotation runs.")
        elif plan.action is pol.RotationAction.WAIT_FOR_RETENTION:
            rotating = (
                True,
                "WaitingForRetention",
                f"A rotation is due but the previous key stays valid until"
                f" {iso(retention.valid_until)}; rotating now would cut it off (ZenML keeps one"
                " previous key). The rotation runs then.",
            )
        elif plan.action is pol.RotationAction.ROTATE:
            secret, current, count, members = await self._rotate_now(
                spec, sa, key, account_id, secret_name, secret, current_id, members,
                retention, count, now,
            )  # fmt: skip
            handled_request = self.request if plan.requested else handled_request
            issued = now
            next_due = now + period
            retention = SecretRecord.of(secret).retention
            # The key that was previous until now is superseded: delete it right away.
            current_id = current.id
            members = [*members, current]
            await retire_keys(
                self.deps,
                account_id,
                kf.retire(members, current, retention, now),
                self.event,
                "rotation.after-superseded-deactivate",
                "rotation.after-superseded-delete",
            )
            wake_at = pol.wake_time(now, next_due, retention.valid_until)
            rotating = (False, "Rotated", f"Rotated at {iso(now)}; next at {iso(next_due)}.")

        # 3. Restarts owed for the key now in the Secret (made once per key).
        restart_problem = None
        if pol.restart_owed(
            rotation_count=count,
            restarted_for=self.status.get("restartedForKeyId"),
            current_key_id=current_id,
        ):
            restart_problem = await restart_targets(
                self.deps, self.namespace, spec.rollout_restart_targets, current_id, now, self.event
            )
        status["restartedForKeyId"] = (
            current_id
            if count > 0 and restart_problem is None
            else self.status.get("restartedForKeyId")
        )
        if status["restartedForKeyId"] is None:
            status.pop("restartedForKeyId")

        status.update(
            currentKeyId=current_id,
            rotationCount=count,
            nextRotationTime=iso(next_due),
        )
        if count > 0:
            status["lastRotationTime"] = iso(issued)
        if retention.key_id:
            status["previousKeyId"] = retention.key_id
            status["previousKeyValidUntil"] = (
                iso(retention.valid_until) if (retention.valid_until) else None
            )
        if handled_request:
            status["lastRotateRequest"] = handled_request
        if restart_problem:
            ready = (False, "RestartFailed", restart_problem)
        elif spec.suspend:
            ready = (True, "Suspended", "Rotation is suspended (spec.suspend).")
        else:
            ready = (
                True,
                "Scheduled",
                f"Key {key.name!r} rotates every {spec.period}; next at {iso(next_due)}.",
            )
        status["conditions"] = self.conditions(ready=ready, rotating=rotating)
        status = {k: v for k, v in status.items() if v is not None}
        return Outcome(status, wake_at=wake_at)

    async def _rotate_now(
        self,
        spec: ApiKeyRotationSpec,
        sa: Mapping[str, Any],
        key: ApiKeySpec,
        account_id: str,
        secret_name: str,
        secret: Mapping[str, Any],
        current_id: str,
        members: list[zc.ApiKeyInfo] | None,
        retention: Retention,
        count: int,
        now: datetime.datetime,
    ) -> tuple[Mapping[str, Any], zc.ApiKeyInfo, int, list[zc.ApiKeyInfo]]:
        """Rotate; returns the Secret written, the new key, the count and the family known
        before the rotation (what the superseded-key retirement then looks at)."""
        if members is None:
            # Name the new generation from the recorded count; a key of that name (a
            # leftover of a crash after a create) answers 409: read the family then.
            name = f"{key.name}.r{count + 1}"
            try:
                rotated = await self.rotate(
                    spec, sa, key, account_id, secret_name, secret, current_id, name, count, now
                )
            except zc.ConflictError:
                members, current_id = await self._read_family(
                    account_id, key, secret, retention, now
                )
            else:
                # The family as the Secret records it: the key now previous (deactivated
                # at once if its retention is 0) and the one it supersedes.
                ids = sorted({current_id, retention.key_id} - {None})
                return *rotated, [kf.recorded_key(str(i), key.name) for i in ids]
        name = kf.next_name(members, key.name)
        rotated = await self.rotate(
            spec, sa, key, account_id, secret_name, secret, current_id, name, count, now
        )
        return *rotated, members

    async def _read_family(
        self,
        account_id: str,
        key: ApiKeySpec,
        secret: Mapping[str, Any],
        retention: Retention,
        now: datetime.datetime,
    ) -> tuple[list[zc.ApiKeyInfo], str]:
        """The key family from ZenML, leftovers retired; and the id of the current key."""
        members = kf.family(await self.deps.zenml.list_api_keys(account_id), key.name)
        current = kf.current_key(members, secret)
        if current is None:
            raise ReconcileProblem(
                "ServiceAccountNotReady",
                f"API key {key.name!r} has no key in ZenML yet.",
                retry=True,
            )
        # Its ServiceAccount re-issues the current key into a Secret put back from an older
        # copy (its Secret watch saw the change), with the record rebuilt from this status;
        # until then nothing here acts on the stale record (it would rotate or retire again).
        if kf.restored_from_older_copy(members, current, self.status.get("currentKeyId"), key.name):
            raise ReconcileProblem(
                "SecretNotReady",
                f"Secret {secret['metadata']['name']!r} records an older key of"
                f" {key.name!r} than this rotation's current one (put back from an older"
                " copy?); waiting for its ServiceAccount to write the current key again.",
                retry=True,
            )
        # Leftovers: keys no Secret references (crash after create), expired previous.
        plan = kf.retire(members, current, retention, now)
        await retire_keys(
            self.deps,
            account_id,
            plan,
            self.event,
            "rotation.after-retire-deactivate",
            "rotation.after-retire-delete",
        )
        gone = {k.id for k in plan.delete}
        return [m for m in members if m.id not in gone], current.id

    def _trust_record(self, record: SecretRecord, now: datetime.datetime) -> bool:
        """True when this look may act on the Secret's record without reading ZenML: the
        last look saw the key the Secret holds, and no retention ended lately (the look at
        its end, and any within one resync interval after it, deactivate the previous key)."""
        held = record.key_id
        retention = record.retention
        if not held or self.status.get("currentKeyId") != held:
            return False
        until = retention.valid_until
        window = datetime.timedelta(seconds=self.deps.resync_seconds)
        return not (retention.key_id and until is not None and until <= now < until + window)

    async def _write_rotated(
        self,
        sa: Mapping[str, Any],
        key: ApiKeySpec,
        secret_name: str,
        secret: Mapping[str, Any],
        current_id: str,
        issued: zc.IssuedApiKey,
        issued_at: str,
        extra: Mapping[str, str],
    ) -> Mapping[str, Any]:
        """The new value and the rotation record in ONE write, conditional on the Secret's
        resourceVersion. Someone else's edit in between (a label, another value) answers 409:
        the Secret is read again and, while it still records the key this rotation replaces,
        written again, so the new key is not abandoned for a Secret edit."""

        def patch_for(current: Mapping[str, Any]) -> dict[str, Any]:
            return sec.value_patch(
                secret=current,
                owner=sa,
                key=key,
                server=self.deps.server_data,
                key_id=issued.info.id,
                key_value=issued.value.reveal(),
                issued_at=issued_at,
                extra_annotations=extra,
            )

        def still_ours(fresh: Mapping[str, Any]) -> bool:
            # Deleted, taken, or switched to another key: the look starts over.
            return (
                sec.is_owned_by(fresh, sa["metadata"]["uid"])
                and SecretRecord.of(fresh).key_id == current_id
            )

        return await patch_new_value(
            self.deps.kube,
            self.namespace,
            secret_name,
            secret,
            patch_for,
            still_ours=still_ours,
            lost=lambda conflict: conflict,
        )

    async def rotate(
        self,
        spec: ApiKeyRotationSpec,
        sa: Mapping[str, Any],
        key: ApiKeySpec,
        account_id: str,
        secret_name: str,
        secret: Mapping[str, Any],
        current_id: str,
        name: str,
        count: int,
        now: datetime.datetime,
    ) -> tuple[Mapping[str, Any], zc.ApiKeyInfo, int]:
        await crashpoint("rotation.before-create")
        issued = await self.deps.zenml.create_api_key(account_id, name, description=key.description)
        await crashpoint("rotation.after-create")
        if not key.active:
            await self.deps.zenml.update_api_key(account_id, issued.info.id, active=False)
        valid_until = now + datetime.timedelta(minutes=spec.retain_period_minutes)
        extra = rotation_annotations(
            previous_key_id=current_id,
            previous_valid_until=valid_until,
            count=count + 1,
            request=self.request,
        )
        written = await self._write_rotated(
            sa, key, secret_name, secret, current_id, issued, iso(now), extra
        )
        await crashpoint("rotation.after-secret-write")
        self.event(
            "Normal",
            "Rotated",
            f"Rotated API key {key.name!r}: Secret {secret_name!r} now holds"
            f" {issued.info.name!r}; the previous key works until {iso(valid_until)}",
        )
        return written, issued.info, count + 1
