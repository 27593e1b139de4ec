"""Pure parts of several-server support: what a Secret says about its server, credentials
read from a Secret, CA bundles, and which server a ServiceAccount names."""

from __future__ import annotations

import base64

import pytest

from zenml_devstack.kube_emulator import merge_patch
from zenml_operator import secrets as sec
from zenml_operator.handlers.common import ReconcileProblem
from zenml_operator.models import ApiKeySpec, ServerRef
from zenml_operator.secrets import ServerData
from zenml_operator.servers import (
    Credential,
    ServerKey,
    credential_from,
    key_of,
    key_of_body,
    ssl_context_for,
)

OWNER = {"metadata": {"name": "ci", "namespace": "team-a", "uid": "uid-1"}}
URL = "https://zenml.example"
PRO = "https://cloudapi.zenml.io"
PEM = "-----BEGIN CERTIFICATE-----\nnot really\n-----END CERTIFICATE-----\n"
FAKE_VALUE = "ZENKEY_fake-value-for-unit-tests"


def _secret(key: ApiKeySpec, server: ServerData) -> dict:
    body = sec.new_secret(
        owner=OWNER,
        key=key,
        secret_name="ci-main",
        server=server,
        key_id="kid",
        key_value=FAKE_VALUE,
        issued_at="2026-01-01T00:00:00Z",
    )
    body["metadata"]["resourceVersion"] = "7"
    return body


def _data(secret: dict) -> dict[str, str]:
    return {k: sec.unb64(v) for k, v in secret["data"].items()}


def test_a_secret_carries_the_server_extras_only_when_set() -> None:
    key = ApiKeySpec(name="main")
    plain = _data(_secret(key, ServerData(URL)))
    assert plain == {"ZENML_STORE_URL": URL, "ZENML_STORE_API_KEY": FAKE_VALUE}
    full = _data(_secret(key, ServerData(URL, pro_api_url=PRO, verify_ssl=PEM)))
    assert full["ZENML_PRO_API_URL"] == PRO
    assert full["ZENML_STORE_VERIFY_SSL"] == PEM


@pytest.mark.parametrize(
    ("before", "after", "added", "removed"),
    [
        (ServerData(URL), ServerData(URL, pro_api_url=PRO), {"ZENML_PRO_API_URL"}, set()),
        (ServerData(URL, verify_ssl=PEM), ServerData(URL), set(), {"ZENML_STORE_VERIFY_SSL"}),
        (
            ServerData(URL, pro_api_url=PRO, verify_ssl=PEM),
            ServerData("https://other"),
            {"ZENML_STORE_URL"},
            {"ZENML_PRO_API_URL", "ZENML_STORE_VERIFY_SSL"},
        ),
    ],
)
def test_the_secret_follows_the_server_then_needs_no_patch(
    before: ServerData, after: ServerData, added: set[str], removed: set[str]
) -> None:
    key = ApiKeySpec(name="main")
    secret = _secret(key, before)
    patch = sec.metadata_patch(secret=secret, owner=OWNER, key=key, server=after)
    assert patch is not None
    changed = patch["data"]
    assert {k for k, v in changed.items() if v is not None} == added
    assert {k for k, v in changed.items() if v is None} == removed
    merged = merge_patch(secret, patch)
    assert _data(merged)["ZENML_STORE_API_KEY"] == FAKE_VALUE
    assert sec.metadata_patch(secret=merged, owner=OWNER, key=key, server=after) is None


def test_a_renamed_extra_key_moves() -> None:
    server = ServerData(URL, pro_api_url=PRO)
    old = ApiKeySpec(name="main")
    new = ApiKeySpec(name="main", secret_template={"keys": {"proApiUrl": "PRO_URL"}})
    secret = _secret(old, server)
    merged = merge_patch(
        secret, sec.metadata_patch(secret=secret, owner=OWNER, key=new, server=server)
    )
    data = _data(merged)
    assert data["PRO_URL"] == PRO and "ZENML_PRO_API_URL" not in data
    assert sec.metadata_patch(secret=merged, owner=OWNER, key=new, server=server) is None


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_credentials_from_a_secret() -> None:
    assert credential_from({"ZENML_STORE_API_KEY": _b64(FAKE_VALUE)}, "s") == Credential(FAKE_VALUE)
    user = credential_from(
        {"ZENML_STORE_USERNAME": _b64("admin"), "ZENML_STORE_PASSWORD": _b64("pw")}, "s"
    )
    assert user == Credential("pw", "admin")


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"ZENML_STORE_USERNAME": _b64("admin")},
        {"ZENML_STORE_API_KEY": _b64("not-a-zenml-key")},
        {"ZENML_STORE_API_KEY": "%%%"},
    ],
)
def test_credentials_missing_or_malformed(data: dict[str, str]) -> None:
    with pytest.raises(ReconcileProblem) as caught:
        credential_from(data, "Secret 'creds' in namespace 'ops'")
    assert caught.value.reason == "CredentialsNotFound"
    assert "creds" in caught.value.message
    assert "not-a-zenml-key" not in caught.value.message  # never the value


def test_a_ca_bundle_must_be_a_certificate() -> None:
    assert ssl_context_for(None) is True
    with pytest.raises(ReconcileProblem) as caught:
        ssl_context_for(PEM)
    assert caught.value.reason == "InvalidCA" and not caught.value.retry


def test_which_server_a_service_account_names() -> None:
    assert key_of(None, "team-a") is None
    assert key_of(ServerRef(kind="ZenMLServer", name="dev"), "team-a") == ServerKey(
        "ZenMLServer", "team-a", "dev"
    )
    # A ClusterZenMLServer has no namespace, whoever names it.
    assert key_of({"kind": "ClusterZenMLServer", "name": "prod"}, "team-b") == ServerKey(
        "ClusterZenMLServer", None, "prod"
    )
    body = {
        "metadata": {"namespace": "team-b"},
        "spec": {"serverRef": {"kind": "ZenMLServer", "name": "dev"}},
    }
    assert key_of_body(body) == ServerKey("ZenMLServer", "team-b", "dev")
