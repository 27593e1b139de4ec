"""Pure Secret decisions: shape, ownership, and patches that are empty when nothing changed."""

from __future__ import annotations

from zenml_devstack.kube_emulator import merge_patch
from zenml_operator import secrets as sec
from zenml_operator.models import ApiKeySpec
from zenml_operator.secrets import ServerData

OWNER = {"metadata": {"name": "ci", "namespace": "team-a", "uid": "uid-1"}}
URL = "http://zenml.example:8080"
FAKE_VALUE = "ZENKEY_fake-value-for-unit-tests"


def _secret(key: ApiKeySpec) -> dict:
    body = sec.new_secret(
        owner=OWNER,
        key=key,
        secret_name="ci-main",
        server=ServerData(URL),
        key_id="kid",
        key_value=FAKE_VALUE,
        issued_at="2026-01-01T00:00:00Z",
    )
    body["metadata"]["resourceVersion"] = "7"
    return body


def test_new_secret_is_opaque_owned_and_labelled() -> None:
    key = ApiKeySpec(name="main")
    body = _secret(key)
    assert body["type"] == "Opaque"
    assert sec.is_owned_by(body, "uid-1")
    assert not sec.is_owned_by(body, "uid-2")
    assert body["metadata"]["labels"][sec.LABEL_MANAGED_BY] == "zenml-operator"
    assert sec.unb64(body["data"]["ZENML_STORE_URL"]) == URL
    assert sec.unb64(body["data"]["ZENML_STORE_API_KEY"]) == FAKE_VALUE
    assert sec.secret_holds_key(body, "kid")
    assert not sec.secret_holds_key(body, "other-id")


def test_unchanged_secret_needs_no_patch() -> None:
    key = ApiKeySpec(name="main", secret_template={"labels": {"a": "1"}, "annotations": {"b": "2"}})
    assert (
        sec.metadata_patch(secret=_secret(key), owner=OWNER, key=key, server=ServerData(URL))
        is None
    )


def test_renamed_data_keys_move_the_value() -> None:
    old = ApiKeySpec(name="main")
    new = ApiKeySpec(name="main", secret_template={"keys": {"url": "URL", "apiKey": "TOKEN"}})
    secret = _secret(old)
    patch = sec.metadata_patch(secret=secret, owner=OWNER, key=new, server=ServerData(URL))
    merged = merge_patch(secret, patch)
    assert set(merged["data"]) == {"URL", "TOKEN"}
    assert sec.unb64(merged["data"]["TOKEN"]) == FAKE_VALUE
    assert sec.secret_holds_key(merged, "kid")
    assert sec.metadata_patch(secret=merged, owner=OWNER, key=new, server=ServerData(URL)) is None


def test_template_labels_and_annotations_follow_the_spec() -> None:
    old = ApiKeySpec(name="main", secret_template={"labels": {"a": "1"}, "annotations": {"b": "2"}})
    new = ApiKeySpec(name="main", secret_template={"labels": {"c": "3"}})
    secret = _secret(old)
    secret["metadata"]["labels"]["user-added"] = "kept"
    merged = merge_patch(
        secret, sec.metadata_patch(secret=secret, owner=OWNER, key=new, server=ServerData(URL))
    )
    labels = merged["metadata"]["labels"]
    assert "a" not in labels and labels["c"] == "3" and labels["user-added"] == "kept"
    assert "b" not in merged["metadata"]["annotations"]


def test_value_patch_is_one_write_with_a_precondition() -> None:
    key = ApiKeySpec(name="main")
    secret = _secret(key)
    patch = sec.value_patch(
        secret=secret,
        owner=OWNER,
        key=key,
        server=ServerData(URL),
        key_id="kid2",
        key_value="ZENKEY_new",
        issued_at="2026-02-01T00:00:00Z",
    )
    assert patch["metadata"]["resourceVersion"] == "7"
    merged = merge_patch(secret, patch)
    assert sec.secret_holds_key(merged, "kid2")
    assert sec.unb64(merged["data"]["ZENML_STORE_API_KEY"]) == "ZENKEY_new"


def test_foreign_owner_is_described() -> None:
    secret = {
        "metadata": {
            "ownerReferences": [
                {"kind": "ServiceAccount", "name": "other", "uid": "x", "controller": True}
            ]
        }
    }
    assert "ServiceAccount/other" in sec.owner_description(secret)
    assert "not created by this operator" in sec.owner_description({"metadata": {}})
