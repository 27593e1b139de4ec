"""Several ZenML servers (#13) end to end: emulated Kubernetes API, real Kopf, two real ZenML
servers (the session's server A over HTTP, the operator's default; server B over HTTPS with
a private CA, reached through ZenMLServer/ClusterZenMLServer resources)."""

from __future__ import annotations

import asyncio
import base64
import uuid
from typing import Any

from control_plane import free_port
from e2e.conftest import SA_PATH, SECRET_PATH, logs_in_as, wait_ready
from e2e.test_rotation import ROT_PATH, rotation_body, wait_count
from tls_ca import make_tls_files
from zenml_devstack.demo import run_real_client
from zenml_devstack.kube_emulator import add_namespace
from zenml_devstack.zenml_server import create_service_account_with_key, find_zenml_python
from zenml_login import login_with_api_key
from zenml_operator import zenml_api as zc

GROUP = "/apis/zenml.io/v1alpha1"
ZS_PATH = GROUP + "/namespaces/{ns}/zenmlservers"
CZS_PATH = GROUP + "/clusterzenmlservers"
SECRETS = "/api/v1/namespaces/{ns}/secrets"
PRO_API_URL = "https://cloudapi.example.com"
NOT_READY = ("ServerNotReady", "ZenMLUnavailable")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def sa_body(
    resource: str, ns: str, *, server: tuple[str, str] | None = None, **spec: Any
) -> dict[str, Any]:
    """A ServiceAccount `resource` with one key `k`; `server`: (kind, name) of its serverRef;
    `spec`: more spec fields (`name`: the ZenML account's)."""
    spec = {"apiKeys": [{"name": "k"}], **spec}
    if server is not None:
        spec["serverRef"] = {"kind": server[0], "name": server[1]}
    return {
        "apiVersion": "zenml.io/v1alpha1",
        "kind": "ServiceAccount",
        "metadata": {"name": resource, "namespace": ns},
        "spec": spec,
    }


def server_body(
    kind: str,
    name: str,
    url: str,
    secret: str,
    *,
    secret_ns: str | None = None,
    ca: str | None = None,
    **spec: Any,
) -> dict[str, Any]:
    credentials = {"secretName": secret}
    if secret_ns is not None:
        credentials["namespace"] = secret_ns
    body_spec: dict[str, Any] = {"url": url, "credentials": credentials, **spec}
    if ca is not None:
        body_spec["caBundle"] = ca
    return {
        "apiVersion": "zenml.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name},
        "spec": body_spec,
    }


def server_path(kind: str, name: str, ns: str | None = None) -> str:
    if kind == "ClusterZenMLServer":
        return f"{CZS_PATH}/{name}"
    return f"{ZS_PATH.format(ns=ns)}/{name}"


async def create_credentials(cluster, ns: str, name: str, **data: str) -> None:
    """A credentials Secret: api_key=... or username=..., password=..."""
    keys = {
        "api_key": "ZENML_STORE_API_KEY",
        "username": "ZENML_STORE_USERNAME",
        "password": "ZENML_STORE_PASSWORD",
    }
    await cluster.create(
        SECRETS.format(ns=ns),
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": name},
            "stringData": {keys[k]: v for k, v in data.items()},
        },
    )


async def create_server(
    cluster,
    kind: str,
    name: str,
    url: str,
    secret: str,
    *,
    ns: str | None = None,
    **options: Any,
) -> str:
    """Create a ZenMLServer (in `ns`) or a ClusterZenMLServer; return its path."""
    body = server_body(kind, name, url, secret, **options)
    collection = CZS_PATH if kind == "ClusterZenMLServer" else ZS_PATH.format(ns=ns)
    await cluster.create(collection, body)
    return server_path(kind, name, ns)


def server_ready(obj: dict[str, Any] | None) -> dict[str, Any] | None:
    """The Ready condition of a server resource, once its status is of the current generation."""
    if not obj:
        return None
    status = obj.get("status") or {}
    generation = obj["metadata"].get("generation")
    for cond in status.get("conditions") or []:
        if cond["type"] != "Ready":
            continue
        observed = cond.get("observedGeneration", status.get("observedGeneration"))
        if observed == generation:
            return cond
    return None


async def server_b_logged_in(
    cluster,
    server_b: Any,
    api_key: str,
    *,
    kind: str = "ZenMLServer",
    ns: str = "default",
    secret: str = "creds",
    **options: Any,
) -> tuple[str, dict[str, Any]]:
    """Server B's credentials Secret in `ns`, a server resource `b` on it (trusting B's CA),
    waited for until LoggedIn: its path and the object."""
    await create_credentials(cluster, ns, secret, api_key=api_key)
    where = {"secret_ns": ns} if kind == "ClusterZenMLServer" else {"ns": ns}
    path = await create_server(
        cluster, kind, "b", server_b.url, secret, **where, ca=server_b.ca_pem, **options
    )
    return path, await wait_server(cluster, path, reason="LoggedIn")


async def wait_server(
    cluster, path: str, *, status: str = "True", reason: str | None = None, timeout: float = 30
) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        obj = await cluster.get(path)
        cond = server_ready(obj)
        if cond and cond["status"] == status and (reason is None or cond["reason"] == reason):
            return obj
        return None

    return await cluster.wait_for(
        check, timeout=timeout, interval=0.05, message=f"{path} Ready={status} {reason or ''}"
    )


async def wait_sa_reason(
    cluster, ns: str, name: str, reasons: tuple[str, ...], *, timeout: float = 30
) -> dict[str, Any]:
    """Wait until the ServiceAccount is Ready=False with one of `reasons`; return the condition."""
    path = f"{SA_PATH.format(ns=ns)}/{name}"

    async def check() -> dict[str, Any] | None:
        obj = await cluster.get(path)
        for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
            if cond["type"] == "Ready" and cond["status"] == "False" and cond["reason"] in reasons:
                return cond
        return None

    return await cluster.wait_for(
        check, timeout=timeout, interval=0.05, message=f"{name} Ready=False {reasons}"
    )


async def sa_secret(cluster, ns: str, name: str, key: str = "k") -> dict[str, Any] | None:
    return await cluster.get(SECRET_PATH.format(ns=ns, name=f"{name}-{key}"))


class SecretData(dict[str, str]):
    """A Secret's decoded data whose repr names the keys only: an assertion that fails on
    it never prints a key value (tests/hygiene.py would flag it)."""

    def __repr__(self) -> str:
        return f"<Secret data, keys {sorted(self)}>"


def decoded(secret: dict[str, Any] | None) -> SecretData:
    assert secret is not None, "no Secret"
    return SecretData(
        {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    )


async def login_name(server: Any, key: str) -> str | None:
    """The account `key` logs in to `server` as (None: refused). Call it apart from the
    assertion, so that a failure never shows the key as an argument."""
    return await logs_in_as(server.url, key, verify=server.verify())


async def zenml_account(client: zc.ZenMLClient, name: str) -> Any:
    """ZenML's service account of that name on the client's server, or None."""
    try:
        return await client.get_service_account(name)
    except zc.NotFoundError:
        return None


async def new_admin_on_b(server_b, account: str, key_name: str = "default") -> str:
    """An admin service account on server B (or a new key of it): the key value."""
    key = await asyncio.to_thread(
        create_service_account_with_key,
        server_b.url,
        server_b.admin_password,
        account,
        key_name,
        verify=server_b.verify(),
    )
    await asyncio.to_thread(server_b.grant_admin, account)
    return key


# --- accounts on two servers ----------------------------------------------------------------


async def test_accounts_on_two_servers_each_key_logs_in_only_to_its_own(
    cluster,
    start_zenml_operator,
    zenml_server,
    zenml_server_b,
    operator_api_key,
    operator_api_key_b,
    zenml_client,
    zenml_client_b,
) -> None:
    await start_zenml_operator()
    _, server = await server_b_logged_in(
        cluster, zenml_server_b, operator_api_key_b, secret="zenml-b-creds", proApiUrl=PRO_API_URL
    )
    status = server["status"]
    assert status["identity"] == "zenml-operator"
    assert status["serverVersion"].startswith("0.98"), status
    assert status["deploymentType"], status
    assert status["url"] == zenml_server_b.url
    assert status["observedGeneration"] == server["metadata"]["generation"]

    # The same ZenML account name on both servers: one on A (no serverRef), one on B.
    account = unique("twin")
    await cluster.create(SA_PATH.format(ns="default"), sa_body("on-a", "default", name=account))
    await cluster.create(
        SA_PATH.format(ns="default"),
        sa_body("on-b", "default", server=("ZenMLServer", "b"), name=account),
    )
    on_a = await wait_ready(cluster, "default", "on-a")
    on_b = await wait_ready(cluster, "default", "on-b")
    assert on_a["status"]["accountId"] == (await zenml_client.get_service_account(account)).id
    assert on_b["status"]["accountId"] == (await zenml_client_b.get_service_account(account)).id
    assert on_a["status"]["accountId"] != on_b["status"]["accountId"]

    data_a = decoded(await sa_secret(cluster, "default", "on-a"))
    data_b = decoded(await sa_secret(cluster, "default", "on-b"))
    assert set(data_a) == {"ZENML_STORE_URL", "ZENML_STORE_API_KEY"}
    assert data_a["ZENML_STORE_URL"] == zenml_server.url
    assert set(data_b) == {
        "ZENML_STORE_URL",
        "ZENML_STORE_API_KEY",
        "ZENML_STORE_VERIFY_SSL",
        "ZENML_PRO_API_URL",
    }
    assert data_b["ZENML_STORE_URL"] == zenml_server_b.url
    assert data_b["ZENML_STORE_VERIFY_SSL"] == zenml_server_b.ca_pem
    assert data_b["ZENML_PRO_API_URL"] == PRO_API_URL

    # Each key logs in to its own server only.
    key_a, key_b = data_a["ZENML_STORE_API_KEY"], data_b["ZENML_STORE_API_KEY"]
    logins = {
        ("A", "key on A"): await login_name(zenml_server, key_a),
        ("B", "key on B"): await login_name(zenml_server_b, key_b),
        ("A", "key on B"): await login_name(zenml_server, key_b),
        ("B", "key on A"): await login_name(zenml_server_b, key_a),
    }
    assert logins == {
        ("A", "key on A"): account,
        ("B", "key on B"): account,
        ("A", "key on B"): None,
        ("B", "key on A"): None,
    }

    # The real zenml client, with nothing but the Secret as its environment, trusts B's CA
    # through ZENML_STORE_VERIFY_SSL (the PEM text) and logs in as the account.
    code, output = await run_real_client(find_zenml_python(), data_b)
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    assert code == 0 and lines and lines[-1] == account, output[-1500:]

    # An ApiKeyRotation follows its ServiceAccount's server: B's key is rotated on B.
    await cluster.create(
        ROT_PATH, rotation_body("rot-b", "on-b", apiKeyName="k", period="1h", retainPeriodMinutes=0)
    )
    await cluster.patch(
        f"{ROT_PATH}/rot-b", {"metadata": {"annotations": {"zenml.io/rotate": "now"}}}
    )
    await wait_count(cluster, "rot-b", 1)
    rotated = decoded(await sa_secret(cluster, "default", "on-b"))["ZENML_STORE_API_KEY"]
    logins = {
        "rotated on B": await login_name(zenml_server_b, rotated),
        "rotated on A": await login_name(zenml_server, rotated),
        "before the rotation on B": await login_name(zenml_server_b, key_b),
        "A's key on A": await login_name(zenml_server, key_a),
    }
    assert logins == {
        "rotated on B": account,
        "rotated on A": None,
        "before the rotation on B": None,  # retainPeriodMinutes: 0
        "A's key on A": account,  # the other server's account is untouched
    }


async def test_secrets_follow_a_change_of_their_server(
    cluster, start_zenml_operator, zenml_server_b, operator_api_key_b
) -> None:
    """The server's secretUrl changes and it stops setting proApiUrl: its Secrets follow
    soon (long before a resync), with the same key."""
    await start_zenml_operator()
    path, _ = await server_b_logged_in(
        cluster,
        zenml_server_b,
        operator_api_key_b,
        proApiUrl=PRO_API_URL,
        secretUrl="https://zenml-b.example.com",
    )
    await cluster.create(
        SA_PATH.format(ns="default"),
        sa_body("app", "default", server=("ZenMLServer", "b"), name=unique("follow")),
    )
    await wait_ready(cluster, "default", "app")
    before = decoded(await sa_secret(cluster, "default", "app"))
    assert before["ZENML_PRO_API_URL"] == PRO_API_URL

    moved = "https://zenml-b.internal.example.com"
    await cluster.patch(path, {"spec": {"proApiUrl": None, "secretUrl": moved}})
    await wait_server(cluster, path, reason="LoggedIn")

    async def followed() -> bool:
        data = decoded(await sa_secret(cluster, "default", "app"))
        return "ZENML_PRO_API_URL" not in data and data["ZENML_STORE_URL"] == moved

    await cluster.wait_for(followed, timeout=10, interval=0.05, message="the Secret follows")
    after = decoded(await sa_secret(cluster, "default", "app"))
    same_key = after["ZENML_STORE_API_KEY"] == before["ZENML_STORE_API_KEY"]
    assert same_key, "the key was reissued"
    assert after["ZENML_STORE_VERIFY_SSL"] == zenml_server_b.ca_pem


async def test_cluster_server_credentials_from_allowed_namespaces_only(
    cluster, start_zenml_operator, zenml_server_b, zenml_client_b
) -> None:
    """A ClusterZenMLServer logs in with a username/password Secret from a namespace the
    operator allows; its ServiceAccounts (any namespace) get its secretUrl; a Secret in
    another namespace is refused even though it exists and holds valid credentials."""
    add_namespace(cluster.emulator, "elsewhere")
    await start_zenml_operator(operator_namespace="team-a", credential_namespaces=("default",))
    admin = {"username": "default", "password": zenml_server_b.admin_password}
    await create_credentials(cluster, "default", "b-admin", **admin)
    await create_credentials(cluster, "elsewhere", "b-admin", **admin)
    secret_url = "https://zenml-b.example.com"
    shared = await create_server(
        cluster,
        "ClusterZenMLServer",
        "shared-b",
        zenml_server_b.url,
        "b-admin",
        secret_ns="default",
        ca=zenml_server_b.ca_pem,
        secretUrl=secret_url,
    )
    forbidden = await create_server(
        cluster,
        "ClusterZenMLServer",
        "forbidden-b",
        zenml_server_b.url,
        "b-admin",
        secret_ns="elsewhere",
        ca=zenml_server_b.ca_pem,
    )
    server = await wait_server(cluster, shared, reason="LoggedIn")
    assert server["status"]["identity"] == "default"
    refused = server_ready(await wait_server(cluster, forbidden, status="False"))
    assert refused["reason"] == "InvalidSpec", refused
    assert "elsewhere" in refused["message"], refused

    account = unique("cl")
    await cluster.create(
        SA_PATH.format(ns="team-a"),
        sa_body("app", "team-a", server=("ClusterZenMLServer", "shared-b"), name=account),
    )
    on_forbidden = unique("nope")
    await cluster.create(
        SA_PATH.format(ns="team-a"),
        sa_body("other", "team-a", server=("ClusterZenMLServer", "forbidden-b"), name=on_forbidden),
    )
    await wait_ready(cluster, "team-a", "app")
    data = decoded(await sa_secret(cluster, "team-a", "app"))
    assert data["ZENML_STORE_URL"] == secret_url
    assert data["ZENML_STORE_VERIFY_SSL"] == zenml_server_b.ca_pem
    assert "ZENML_PRO_API_URL" not in data
    who = await login_name(zenml_server_b, data["ZENML_STORE_API_KEY"])
    assert who == account

    await wait_sa_reason(cluster, "team-a", "other", ("ServerNotReady",))
    assert await zenml_account(zenml_client_b, on_forbidden) is None
    assert await sa_secret(cluster, "team-a", "other") is None


# --- references ---------------------------------------------------------------------------


async def test_reference_to_another_namespaces_server_waits_until_its_own_exists(
    cluster, start_zenml_operator, zenml_server_b, operator_api_key_b, zenml_client_b
) -> None:
    """A ZenMLServer serves its own namespace only: team-a's reference to `b` (which exists
    in `default`) is ServerNotReady, nothing is created; once team-a has its own `b`, the
    same ServiceAccount becomes Ready with no change to it."""
    await start_zenml_operator()
    await server_b_logged_in(cluster, zenml_server_b, operator_api_key_b)

    account = unique("xns")
    await cluster.create(
        SA_PATH.format(ns="team-a"),
        sa_body("app", "team-a", server=("ZenMLServer", "b"), name=account),
    )
    cond = await wait_sa_reason(cluster, "team-a", "app", ("ServerNotReady",))
    assert "b" in cond["message"], cond
    assert await zenml_account(zenml_client_b, account) is None
    assert await sa_secret(cluster, "team-a", "app") is None

    # team-a's own server `b` (its own Secret: it cannot use default's).
    await server_b_logged_in(cluster, zenml_server_b, operator_api_key_b, ns="team-a")
    await wait_ready(cluster, "team-a", "app", timeout=30)
    data = decoded(await sa_secret(cluster, "team-a", "app"))
    who = await login_name(zenml_server_b, data["ZENML_STORE_API_KEY"])
    assert who == account


# --- the server's own credential ----------------------------------------------------------


async def test_server_credential_rotated_in_place_without_restart(
    cluster, start_zenml_operator, zenml_server_b, zenml_client_b
) -> None:
    """The credentials Secret gets a new key in place and the old key is deleted in ZenML:
    the operator picks the new one up by itself (no restart) and keeps working."""
    await start_zenml_operator()
    identity = unique("op-rotated")
    first = await new_admin_on_b(zenml_server_b, identity, "first")
    await create_credentials(cluster, "default", "creds", api_key=first)
    path = await create_server(
        cluster,
        "ZenMLServer",
        "b",
        zenml_server_b.url,
        "creds",
        ns="default",
        ca=zenml_server_b.ca_pem,
    )
    server = await wait_server(cluster, path, reason="LoggedIn")
    assert server["status"]["identity"] == identity
    before = unique("before")
    await cluster.create(
        SA_PATH.format(ns="default"),
        sa_body("before", "default", server=("ZenMLServer", "b"), name=before),
    )
    await wait_ready(cluster, "default", "before")

    # Rotate by hand: a second key of the same account, written into the same Secret, then
    # the first key deleted on the server. A token obtained with it stops working too, so
    # an operator that kept its old login could not do anything on B any more.
    verify = zenml_server_b.verify()
    old_token = await login_with_api_key(zenml_server_b.url, first, verify=verify)
    second = await new_admin_on_b(zenml_server_b, identity, "second")
    await cluster.patch(
        SECRET_PATH.format(ns="default", name="creds"),
        {"stringData": {"ZENML_STORE_API_KEY": second}},
    )
    account = await zenml_client_b.get_service_account(identity)
    await zenml_client_b.delete_api_key(account.id, "first")
    first_still_logs_in = await login_name(zenml_server_b, first)
    assert first_still_logs_in is None
    old_token_works = await token_works(zenml_server_b, old_token)
    assert not old_token_works

    after = unique("after")
    await cluster.create(
        SA_PATH.format(ns="default"),
        sa_body("after", "default", server=("ZenMLServer", "b"), name=after),
    )
    await wait_ready(cluster, "default", "after", timeout=30)
    data = decoded(await sa_secret(cluster, "default", "after"))
    who = await login_name(zenml_server_b, data["ZENML_STORE_API_KEY"])
    assert who == after
    await wait_server(cluster, path, reason="LoggedIn")


async def token_works(server, token: str) -> bool:
    import httpx

    async with httpx.AsyncClient(base_url=server.url, verify=server.verify(), timeout=10) as http:
        response = await http.get(
            "/api/v1/current-user", headers={"Authorization": f"Bearer {token}"}
        )
    return response.status_code == 200


# --- a server that hangs --------------------------------------------------------------------


async def test_a_hung_server_only_affects_its_own_service_accounts(
    cluster, start_zenml_operator, zenml_server_b, operator_api_key_b, zenml_client
) -> None:
    """Server B stops answering (SIGSTOP: connections are accepted, never answered, the
    worst kind of outage for a client). Only B's ServiceAccounts notice; the default server's
    keep converging meanwhile. When B answers again, its ServiceAccounts converge."""
    # A short timeout makes a hung server fail fast; not so short that a login on a busy
    # machine (one bcrypt) times out.
    await start_zenml_operator(zenml_timeout=4.0, server_check_seconds=1.0)
    b_path, _ = await server_b_logged_in(cluster, zenml_server_b, operator_api_key_b)
    on_a = unique("steady-a")
    await cluster.create(SA_PATH.format(ns="default"), sa_body("steady-a", "default", name=on_a))
    await wait_ready(cluster, "default", "steady-a")

    zenml_server_b.pause()
    try:
        late_b, late_a = unique("late-b"), unique("late-a")
        await cluster.create(
            SA_PATH.format(ns="default"),
            sa_body("late-b", "default", server=("ZenMLServer", "b"), name=late_b),
        )
        await cluster.create(
            SA_PATH.format(ns="default"), sa_body("late-a", "default", name=late_a)
        )
        await cluster.patch(
            f"{SA_PATH.format(ns='default')}/steady-a",
            {"spec": {"apiKeys": [{"name": "k"}, {"name": "k2"}]}},
        )
        # The default server's ServiceAccounts converge while B hangs.
        await wait_ready(cluster, "default", "late-a", timeout=20)
        steady = await wait_ready(cluster, "default", "steady-a", timeout=20)
        assert steady["status"]["readyKeys"] == 2
        secret = await sa_secret(cluster, "default", "steady-a", "k2")
        who = await logs_in_as(zenml_client.url, decoded(secret)["ZENML_STORE_API_KEY"])
        assert who == on_a
        # B's own say why they wait.
        cond = await wait_sa_reason(cluster, "default", "late-b", NOT_READY, timeout=30)
        assert cond["reason"] in NOT_READY
        unreachable = await wait_server(cluster, b_path, status="False", timeout=30)
        assert server_ready(unreachable)["reason"] == "Unreachable"
        assert await sa_secret(cluster, "default", "late-b") is None
    finally:
        zenml_server_b.resume()

    await wait_server(cluster, b_path, reason="LoggedIn", timeout=30)
    await wait_ready(cluster, "default", "late-b", timeout=30)
    data = decoded(await sa_secret(cluster, "default", "late-b"))
    who = await login_name(zenml_server_b, data["ZENML_STORE_API_KEY"])
    assert who == late_b


# --- deleting a server in use -------------------------------------------------------------


async def test_deleting_a_server_in_use_waits_for_its_service_accounts(
    cluster, start_zenml_operator, zenml_server_b, operator_api_key_b, zenml_client_b
) -> None:
    await start_zenml_operator()
    path, _ = await server_b_logged_in(
        cluster, zenml_server_b, operator_api_key_b, kind="ClusterZenMLServer"
    )
    account = unique("user")
    sa_path = f"{SA_PATH.format(ns='team-a')}/user"
    await cluster.create(
        SA_PATH.format(ns="team-a"),
        sa_body("user", "team-a", server=("ClusterZenMLServer", "b"), name=account),
    )
    await wait_ready(cluster, "team-a", "user")
    key = decoded(await sa_secret(cluster, "team-a", "user"))["ZENML_STORE_API_KEY"]

    await cluster.delete(path)

    async def blocked() -> dict[str, Any] | None:
        obj = await cluster.get(path)
        for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
            if cond["type"] == "DeletionBlocked" and cond["status"] == "True":
                return cond
        return None

    cond = await cluster.wait_for(blocked, timeout=20, interval=0.05, message="DeletionBlocked")
    assert cond["reason"] == "InUse" and "user" in cond["message"], cond
    held = await cluster.get(path)
    assert held is not None and held["metadata"].get("deletionTimestamp")

    async def warning() -> list[dict[str, Any]]:
        events = (await cluster.get("/api/v1/events")) or {}
        return [
            e
            for e in events.get("items", [])
            if e.get("type") == "Warning"
            and (e.get("involvedObject") or {}).get("name") == "b"
            and (e.get("involvedObject") or {}).get("kind") == "ClusterZenMLServer"
            and "user" in (e.get("message") or "")
        ]

    await cluster.wait_for(warning, timeout=10, interval=0.05, message="a Warning Event")
    assert (await cluster.get(sa_path)) is not None  # the ServiceAccount is untouched
    assert await zenml_account(zenml_client_b, account) is not None

    # The ServiceAccount goes (policy Delete, through the server being deleted), then the
    # server does: no key is left behind on B.
    await cluster.delete(sa_path)
    await cluster.wait_for(lambda: _gone(cluster, sa_path), timeout=30, message="SA deleted")
    await cluster.wait_for(lambda: _gone(cluster, path), timeout=30, message="server deleted")
    assert await zenml_account(zenml_client_b, account) is None
    who = await login_name(zenml_server_b, key)
    assert who is None


async def _gone(cluster, path: str) -> bool:
    return await cluster.get(path) is None


# --- bad specs that pass the schema -------------------------------------------------------


async def test_bad_server_specs_get_a_clear_condition(
    cluster, start_zenml_operator, zenml_server_b, operator_api_key, operator_api_key_b, tmp_path
) -> None:
    """Each mistake the schema cannot catch ends in Ready=False with its own reason, and
    ServiceAccounts on such a server wait (ServerNotReady)."""
    await start_zenml_operator(zenml_timeout=3.0)
    url, ca = zenml_server_b.url, zenml_server_b.ca_pem
    await create_credentials(cluster, "default", "good", api_key=operator_api_key_b)
    # A valid key, but of server A: B answers 401.
    await create_credentials(cluster, "default", "other-servers-key", api_key=operator_api_key)
    garbage_pem = (
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
    )
    cases = {
        "no-secret": (dict(url=url, secret="missing", ca=ca), "CredentialsNotFound"),
        "wrong-key": (dict(url=url, secret="other-servers-key", ca=ca), "Unauthorized"),
        "nobody-home": (
            dict(url=f"http://127.0.0.1:{free_port()}", secret="good"),
            "Unreachable",
        ),
        "bad-pem": (dict(url=url, secret="good", ca=garbage_pem), "InvalidCA"),
        # A well-formed certificate, of another CA than the one that signed B's.
        "wrong-ca": (dict(url=url, secret="good", ca=make_tls_files(tmp_path).ca_pem), "InvalidCA"),
        # No caBundle: the system's CAs, which do not know B's private CA.
        "no-ca": (dict(url=url, secret="good"), "InvalidCA"),
        # The CRD refuses credentials.namespace on a ZenMLServer (CEL); the emulator has no
        # CEL, so this reaches the operator, which refuses it too.
        "own-ns-only": (dict(url=url, secret="good", ca=ca, secret_ns="team-a"), "InvalidSpec"),
    }
    for name, (options, _) in cases.items():
        options = dict(options)
        await create_server(
            cluster,
            "ZenMLServer",
            name,
            options.pop("url"),
            options.pop("secret"),
            ns="default",
            **options,
        )
    for name, (_, reason) in cases.items():
        obj = await wait_server(
            cluster, server_path("ZenMLServer", name, "default"), status="False"
        )
        cond = server_ready(obj)
        assert cond["reason"] == reason, (name, cond)
        assert cond["message"], (name, cond)

    # A ServiceAccount on a broken server waits, and says on which server.
    await cluster.create(
        SA_PATH.format(ns="default"),
        sa_body("waits", "default", server=("ZenMLServer", "wrong-key"), name=unique("w")),
    )
    cond = await wait_sa_reason(cluster, "default", "waits", ("ServerNotReady",))
    assert "wrong-key" in cond["message"], cond


async def test_server_ref_kind_typo_is_refused(cluster, start_zenml_operator) -> None:
    """The CRD's enum refuses these on a real API server; the operator refuses them too."""
    await start_zenml_operator()
    typos = {"plural": "ZenMLServers", "case": "ClusterZenmlServer"}
    for name, kind in typos.items():
        await cluster.create(
            SA_PATH.format(ns="default"),
            sa_body(name, "default", server=(kind, "b"), name=unique("typo")),
        )
    for name in typos:
        cond = await wait_sa_reason(cluster, "default", name, ("InvalidSpec",))
        assert "serverRef" in cond["message"], cond
        assert await sa_secret(cluster, "default", name) is None
