"""Pure decisions about the Secrets that carry API keys: shape, ownership, patches.

Nothing here talks to an API; `handlers` feed it what they read and write what it says.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from zenml_operator import policies as pol
from zenml_operator.models import API_VERSION, ApiKeySpec, SecretKeys
from zenml_operator.secret_record import (
    ANN_VALUE_DIGEST,
    SecretRecord,
    data_digest,
    value_annotations,
)
from zenml_operator.timestamps import parse_time

MANAGED_BY = "zenml-operator"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_ACCOUNT = "zenml.io/service-account"
LABEL_KEY = "zenml.io/api-key"
ANN_KEY_VERSION = "zenml.io/key-version"
ANN_TEMPLATE_LABELS = "zenml.io/template-labels"
ANN_TEMPLATE_ANNOTATIONS = "zenml.io/template-annotations"
ANN_DATA_KEYS = "zenml.io/data-keys"


@dataclass(frozen=True)
class ServerData:
    """What a key's Secret says about the ZenML server the key belongs to (besides the key).

    `verify_ssl` is the server's CA bundle (PEM text): the zenml client takes
    ZENML_STORE_VERIFY_SSL as CA content, so pods trust a private CA with no extra mount.
    """

    url: str
    pro_api_url: str | None = None
    verify_ssl: str | None = None

    def entries(self, keys: SecretKeys) -> dict[str, str]:
        """Data key -> plain value of everything but the API key (unset extras left out)."""
        found = {keys.url: self.url}
        if self.pro_api_url:
            found[keys.pro_api_url] = self.pro_api_url
        if self.verify_ssl:
            found[keys.verify_ssl] = self.verify_ssl
        return found


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def owner_reference(owner: Mapping[str, Any], kind: str) -> dict[str, Any]:
    meta = owner["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def is_owned_by(secret: Mapping[str, Any], owner_uid: str) -> bool:
    """Ours only if the controller reference points at this very resource (by uid)."""
    for ref in secret.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("uid") == owner_uid and ref.get("controller"):
            return True
    return False


def claims_owner(secret: Mapping[str, Any], *, owner_name: str, key_name: str) -> bool:
    """A Secret that lost its owner reference but still says it is this key's: no controller
    reference at all, and the operator's labels naming this ServiceAccount and key. (The
    caller also requires its recorded key id to be one of this key's ZenML keys.)"""
    meta = secret.get("metadata") or {}
    if any(ref.get("controller") for ref in meta.get("ownerReferences") or []):
        return False
    labels = meta.get("labels") or {}
    return (
        labels.get(LABEL_MANAGED_BY) == MANAGED_BY
        and labels.get(LABEL_ACCOUNT) == owner_name
        and labels.get(LABEL_KEY) == key_name
    )


def owner_description(secret: Mapping[str, Any]) -> str:
    refs = secret.get("metadata", {}).get("ownerReferences") or []
    controllers = [r for r in refs if r.get("controller")]
    if controllers:
        ref = controllers[0]
        return f"it is controlled by {ref.get('kind')}/{ref.get('name')}"
    return "it was not created by this operator"


def desired_metadata(
    *, owner: Mapping[str, Any], key: ApiKeySpec, secret_name: str
) -> dict[str, Any]:
    """Labels, annotations and owner of the Secret, without the key-identity annotations."""
    template = key.secret_template
    labels = {
        **template.labels,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_ACCOUNT: owner["metadata"]["name"],
        LABEL_KEY: key.name,
    }
    return {
        "name": secret_name,
        "namespace": owner["metadata"]["namespace"],
        "labels": labels,
        "annotations": {**template.annotations},
        "ownerReferences": [owner_reference(owner, "ServiceAccount")],
    }


def new_secret(
    *,
    owner: Mapping[str, Any],
    key: ApiKeySpec,
    secret_name: str,
    server: ServerData,
    key_id: str,
    key_value: str,
    issued_at: str,
) -> dict[str, Any]:
    meta = desired_metadata(owner=owner, key=key, secret_name=secret_name)
    meta["annotations"].update(
        {**tracking_annotations(key, server), **value_annotations(key_id, issued_at, key_value)}
    )
    keys = key.secret_template.keys
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": meta,
        "data": {
            **{name: b64(value) for name, value in server.entries(keys).items()},
            keys.api_key: b64(key_value),
        },
    }


def tracking_annotations(key: ApiKeySpec, server: ServerData) -> dict[str, str]:
    """What the operator put into the Secret from the template and the server, so it can
    remove it later. Data keys: the URL's, the API key's, then the server's extras."""
    keys = key.secret_template.keys
    extras = [name for name in server.entries(keys) if name != keys.url]
    return {
        ANN_TEMPLATE_LABELS: ",".join(sorted(key.secret_template.labels)),
        ANN_TEMPLATE_ANNOTATIONS: ",".join(sorted(key.secret_template.annotations)),
        ANN_DATA_KEYS: ",".join([keys.url, keys.api_key, *extras]),
    }


def _written_keys(secret: Mapping[str, Any]) -> list[str]:
    raw = (secret.get("metadata", {}).get("annotations") or {}).get(ANN_DATA_KEYS, "")
    return raw.split(",")


def _data_keys(secret: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(url key, api key key) as last written by the operator."""
    written = _written_keys(secret)
    url_key = written[0] if written else ""
    value_key = written[1] if len(written) > 1 else ""
    return (url_key or None, value_key or None)


def _split(raw: str) -> set[str]:
    return set(raw.split(",")) - {""}


def held_value(secret: Mapping[str, Any]) -> str | None:
    """The key value (base64, as in `data`) under the data key the operator last wrote it."""
    _, value_key = _data_keys(secret)
    return (secret.get("data") or {}).get(value_key) if value_key else None


def value_check(
    secret: Mapping[str, Any], key_id: str, *, last_issued_at: str | None = None
) -> pol.ValueCheck:
    """Does this Secret hold the value issued for ZenML key `key_id`? The value cannot be
    read back from ZenML: the evidence is the record written with it (key id, issue time,
    digest of the value). `last_issued_at`: the issue time the owner's status last
    recorded for this key, if it recorded the same key id."""
    record = SecretRecord.of(secret)
    value = held_value(secret)
    return pol.check_value(
        key_id_matches=record.key_id == key_id,
        value_present=bool(value),
        recorded_digest=record.value_digest,
        held_digest=data_digest(value),
        issued_at=record.issued_at,
        last_issued_at=parse_time(last_issued_at),
    )


def secret_holds_key(secret: Mapping[str, Any], key_id: str) -> bool:
    """Does this Secret carry the issued value of ZenML key `key_id`? (see value_check)"""
    return value_check(secret, key_id).holds


def repairs_in(
    *, secret: Mapping[str, Any], owner: Mapping[str, Any], key: ApiKeySpec
) -> list[str]:
    """What the operator puts back that someone removed or changed (for an Event; no value)."""
    labels = (secret.get("metadata") or {}).get("labels") or {}
    found = []
    if not is_owned_by(secret, owner["metadata"]["uid"]):
        found.append("its owner reference")
    want = desired_metadata(owner=owner, key=key, secret_name="")["labels"]
    for label in (LABEL_MANAGED_BY, LABEL_ACCOUNT, LABEL_KEY):
        if labels.get(label) != want[label]:
            found.append(f"label {label}")
    return found


def metadata_patch(
    *, secret: Mapping[str, Any], owner: Mapping[str, Any], key: ApiKeySpec, server: ServerData
) -> dict[str, Any] | None:
    """The merge patch that brings labels, annotations, server data and data key names in line.

    Returns None when the Secret already matches: a no-op reconcile writes nothing.
    """
    meta = secret.get("metadata", {})
    have_labels = meta.get("labels") or {}
    have_ann = meta.get("annotations") or {}
    data = secret.get("data") or {}
    template = key.secret_template
    patch: dict[str, Any] = {}

    want_labels = desired_metadata(owner=owner, key=key, secret_name="")["labels"]
    labels: dict[str, Any] = {k: v for k, v in want_labels.items() if have_labels.get(k) != v}
    for stale in _split(have_ann.get(ANN_TEMPLATE_LABELS, "")) - set(want_labels):
        if stale in have_labels:
            labels[stale] = None  # removed from the template: remove it from the Secret
    if labels:
        patch.setdefault("metadata", {})["labels"] = labels

    want_ann = {**template.annotations, **tracking_annotations(key, server)}
    annotations: dict[str, Any] = {k: v for k, v in want_ann.items() if have_ann.get(k) != v}
    if not have_ann.get(ANN_VALUE_DIGEST) and (digest := data_digest(held_value(secret))):
        # Written before digests were recorded: record the value it holds now (a value the
        # key id and data already vouch for), so that a later replacement is noticed.
        annotations[ANN_VALUE_DIGEST] = digest
    for stale in _split(have_ann.get(ANN_TEMPLATE_ANNOTATIONS, "")) - set(template.annotations):
        if stale in have_ann:
            annotations[stale] = None
    if annotations:
        patch.setdefault("metadata", {})["annotations"] = annotations

    changes: dict[str, Any] = {}
    old_value_key = _data_keys(secret)[1]
    if old_value_key and old_value_key != template.keys.api_key and old_value_key in data:
        changes[template.keys.api_key] = data[old_value_key]  # renamed: move the value
        changes[old_value_key] = None
    wanted = server.entries(template.keys)
    for name, value in wanted.items():
        if data.get(name) != b64(value):
            changes[name] = b64(value)
    # Server data written before and wanted no more (renamed, or the server stopped
    # setting it): removed, unless it is where the key value goes now.
    written = [name for i, name in enumerate(_written_keys(secret)) if i != 1 and name]
    for stale in set(written) - set(wanted) - {template.keys.api_key}:
        if stale in data:
            changes[stale] = None
    if changes:
        patch["data"] = changes
    if not is_owned_by(secret, owner["metadata"]["uid"]):
        # Claimed back (claims_owner): restore the controller reference, keep the others.
        refs = [r for r in meta.get("ownerReferences") or [] if not r.get("controller")]
        patch.setdefault("metadata", {})["ownerReferences"] = [
            *refs,
            owner_reference(owner, "ServiceAccount"),
        ]
    return patch or None


def value_patch(
    *,
    secret: Mapping[str, Any],
    owner: Mapping[str, Any],
    key: ApiKeySpec,
    server: ServerData,
    key_id: str,
    key_value: str,
    issued_at: str,
    extra_annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A merge patch that puts a new key value into an existing (owned) Secret, in one write.

    It carries the Secret's resourceVersion: a concurrent change gives 409, not a lost write.
    """
    patch = metadata_patch(secret=secret, owner=owner, key=key, server=server) or {}
    meta = patch.setdefault("metadata", {})
    meta["resourceVersion"] = secret["metadata"]["resourceVersion"]
    meta.setdefault("annotations", {}).update(
        {**value_annotations(key_id, issued_at, key_value), **(extra_annotations or {})}
    )
    patch.setdefault("data", {})[key.secret_template.keys.api_key] = b64(key_value)
    return patch
