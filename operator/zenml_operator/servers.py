"""The ZenML servers the operator talks to, one client each.

The default server comes from the operator's environment (as before ZenMLServer existed);
every ZenMLServer and ClusterZenMLServer gets a client of its own, with its own connection
pool, key-create slots and login, so that a slow or unreachable server never holds the
requests of another. ServiceAccounts of a server also take reconcile slots of that server
(`slots_for`): the ones of a hanging server cannot fill the slots the others need.

A client is built from the server resource when a ServiceAccount or the server's own check
first needs it, and rebuilt when the resource's generation changes. The credential is read
from its Secret then, again by every check of the server (`ServerChecks`), and again when
ZenML refuses a login: a credential rotated in place is picked up without a restart, and
the operator reads those Secrets by name only (no watch over every Secret).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pydantic

from zenml_operator import zenml_api as zc
from zenml_operator.config import OperatorConfig, validate_api_key
from zenml_operator.handlers.common import Deps, ReconcileProblem, invalid_spec, overlay
from zenml_operator.kube import KubeClient
from zenml_operator.models import (
    API_VERSION,
    CLUSTER_ZENML_SERVERS,
    ZENML_SERVERS,
    ClusterZenMLServerSpec,
    ServerRef,
    ZenMLServerSpec,
)
from zenml_operator.secrets import ServerData

ZENML_SERVER = "ZenMLServer"
CLUSTER_ZENML_SERVER = "ClusterZenMLServer"
PLURALS = {ZENML_SERVER: ZENML_SERVERS, CLUSTER_ZENML_SERVER: CLUSTER_ZENML_SERVERS}
API_KEY = "ZENML_STORE_API_KEY"
USERNAME = "ZENML_STORE_USERNAME"
PASSWORD = "ZENML_STORE_PASSWORD"


@dataclass(frozen=True)
class ServerKey:
    """Which server resource: a ZenMLServer has a namespace, a ClusterZenMLServer none."""

    kind: str
    namespace: str | None
    name: str

    @property
    def plural(self) -> str:
        return PLURALS[self.kind]

    def __str__(self) -> str:
        where = f" in namespace {self.namespace!r}" if self.namespace else ""
        return f"{self.kind} {self.name!r}{where}"


def key_of(ref: ServerRef | Mapping[str, Any] | None, namespace: str) -> ServerKey | None:
    """The server a ServiceAccount of `namespace` names (None: the default server). A
    ZenMLServer is looked up in the ServiceAccount's own namespace, never another."""
    if ref is None:
        return None
    kind, name = (
        (ref.kind, ref.name) if isinstance(ref, ServerRef) else (ref.get("kind"), ref.get("name"))
    )
    if not kind or not name:
        return None
    return ServerKey(str(kind), namespace if kind == ZENML_SERVER else None, str(name))


def key_of_body(body: Mapping[str, Any]) -> ServerKey | None:
    """The server a ServiceAccount object names (spec.serverRef is immutable)."""
    spec = body.get("spec") or {}
    ref = spec.get("serverRef") if isinstance(spec, Mapping) else None
    namespace = (body.get("metadata") or {}).get("namespace") or ""
    return key_of(ref if isinstance(ref, Mapping) else None, namespace)


def server_problem(reason: str, message: str, *, retry: bool = True) -> ReconcileProblem:
    return ReconcileProblem(reason, message, retry=retry)


@dataclass(frozen=True)
class Credential:
    """How to log in: an API key, or a user's password (`username` set)."""

    secret: str = field(repr=False)
    username: str | None = None


def credential_from(data: Mapping[str, str], where: str) -> Credential:
    """The credential in a Secret's `data` (base64); messages name keys, never values."""

    def text(key: str) -> str:
        raw = data.get(key)
        if not raw:
            return ""
        try:
            return base64.b64decode(raw).decode().strip()
        except (binascii.Error, UnicodeDecodeError):
            raise server_problem(
                "CredentialsNotFound", f"{where}: {key} is not valid base64 text"
            ) from None

    if key := text(API_KEY):
        try:
            return Credential(validate_api_key(key, f"{where}: {API_KEY}"))
        except ValueError as exc:
            raise server_problem("CredentialsNotFound", str(exc)) from None
    username, password = text(USERNAME), text(PASSWORD)
    if username and password:
        return Credential(password, username)
    raise server_problem(
        "CredentialsNotFound",
        f"{where} holds neither {API_KEY} nor both {USERNAME} and {PASSWORD}",
    )


def ssl_context_for(ca_bundle: str | None) -> ssl.SSLContext | bool:
    """What the client verifies the server with: the bundle alone when one is given."""
    if not ca_bundle:
        return True
    try:
        return ssl.create_default_context(cadata=ca_bundle)
    except (ssl.SSLError, ValueError) as exc:
        detail = getattr(exc, "reason", None) or type(exc).__name__
        raise server_problem(
            "InvalidCA",
            f"spec.caBundle holds no valid PEM certificate ({detail}); paste the CA"
            " certificate(s) that signed the server's certificate",
            retry=False,
        ) from None


class Server:
    """One server's client and what its Secrets say about it."""

    def __init__(
        self,
        key: ServerKey | None,
        client: zc.ZenMLClient,
        data: ServerData,
        *,
        uid: str | None = None,
        generation: int | None = None,
        credential: Credential | None = None,
        slots: asyncio.Semaphore | None = None,
    ) -> None:
        self.key = key
        self.client = client
        self.data = data
        self.uid = uid
        self.generation = generation
        self.credential = credential
        self.slots = slots

    def current_secret(self) -> str:
        """The credential the client logs in with (re-read at every login)."""
        assert self.credential is not None
        return self.credential.secret


def parse_server_spec(obj: Mapping[str, Any]) -> ZenMLServerSpec | ClusterZenMLServerSpec:
    model = ClusterZenMLServerSpec if obj.get("kind") == CLUSTER_ZENML_SERVER else ZenMLServerSpec
    try:
        return model.model_validate(dict(obj.get("spec") or {}))
    except (pydantic.ValidationError, ValueError) as exc:
        raise invalid_spec(exc) from None


class ServerDirectory:
    """Every server the operator knows, by key; None is the default server."""

    def __init__(
        self,
        *,
        config: OperatorConfig,
        kube: KubeClient,
        default: Server,
        observer: zc.RequestObserver | None = None,
    ) -> None:
        self.config = config
        self.kube = kube
        self.default = default
        self.observer = observer
        self._servers: dict[ServerKey, Server] = {}
        self._locks: dict[ServerKey, asyncio.Lock] = {}
        self._slots: dict[ServerKey, asyncio.Semaphore] = {}
        self._retired: list[zc.ZenMLClient] = []
        self._closing: set[asyncio.Task[None]] = set()

    # --- for ServiceAccounts and rotations --------------------------------------------------

    def slots_for(self, key: ServerKey | None) -> asyncio.Semaphore | None:
        """The reconcile slots of that server's ServiceAccounts (None: the default's)."""
        if key is None:
            return None
        slots = self._slots.get(key)
        if slots is None:
            slots = self._slots[key] = asyncio.Semaphore(
                max(1, self.config.max_concurrent_reconciles)
            )
        return slots

    async def bind(self, deps: Deps, ref: ServerRef | None, namespace: str) -> Deps:
        """The handlers' dependencies for an account on that server: its client and the data
        its Secrets carry. Raises ServerNotReady when the server cannot be used now."""
        if ref is not None and ref.namespace is not None:
            raise server_problem(
                "ServerNotReady",
                "spec.serverRef.namespace is not allowed: a ZenMLServer can only be used from"
                " its own namespace; use a ClusterZenMLServer to share a server",
                retry=False,
            )
        key = key_of(ref, namespace)
        if key is None:
            return deps
        obj = await self.kube.get_object(API_VERSION, key.plural, key.namespace, key.name)
        if obj is None:
            where = f"namespace {namespace!r}" if key.namespace else "the cluster"
            raise server_problem(
                "ServerNotReady",
                f"{key.kind} {key.name!r} does not exist in {where}; create it or fix"
                " spec.serverRef",
            )
        try:
            server = await self.connect(obj)
            # A credential ZenML refused is not tried again by every ServiceAccount (each try
            # costs the server a bcrypt): the server's own check retries it, and clears this.
            refused = server.client.login_refused
            if refused is not None:
                raise refused
            await server.client.ensure_login()
        except ReconcileProblem as problem:
            raise server_problem(
                "ServerNotReady", f"{key} is not ready: {problem.message}"
            ) from None
        except zc.UnauthorizedError as exc:
            raise server_problem("ServerNotReady", f"{key} is not ready: {exc}") from None
        return overlay(deps, zenml=server.client, server_data=server.data)

    # --- clients ---------------------------------------------------------------------------

    async def connect(self, obj: Mapping[str, Any], *, reread: bool = False) -> Server:
        """The client of a server resource: built once per generation; `reread` also reads
        its credential Secret again (a check), swapping in a credential changed in place."""
        meta = obj.get("metadata") or {}
        key = ServerKey(str(obj.get("kind")), meta.get("namespace"), str(meta.get("name")))
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            known = self._servers.get(key)
            fresh = (
                known is not None
                and known.uid == meta.get("uid")
                and known.generation == meta.get("generation")
            )
            spec = parse_server_spec(obj)
            if fresh and known is not None:
                if reread:
                    await self._refresh(known, spec)
                return known
            server = await self._build(key, obj, spec)
            self._servers[key] = server
            if known is not None:
                self._retire(known.client)
            return server

    async def _build(
        self,
        key: ServerKey,
        obj: Mapping[str, Any],
        spec: ZenMLServerSpec | ClusterZenMLServerSpec,
    ) -> Server:
        verify = ssl_context_for(spec.ca_bundle)
        credential = await self.read_credential(key, spec)
        data = ServerData(
            url=spec.url_for_secrets().rstrip("/"),
            pro_api_url=spec.pro_api_url,
            verify_ssl=spec.ca_bundle,
        )
        meta = obj.get("metadata") or {}
        server = Server(
            key,
            client=None,  # type: ignore[arg-type]  # set below: the client reads the server
            data=data,
            uid=meta.get("uid"),
            generation=meta.get("generation"),
            credential=credential,
            slots=self.slots_for(key),
        )

        async def refresh() -> bool:
            return await self._refresh(server, spec)

        server.client = zc.ZenMLClient(
            spec.url,
            server.current_secret,
            username=credential.username,
            observer=self.observer,
            **self.config.connection_options(),
            verify=verify,
            refresh_secret=refresh,
            credential_source=f"the credentials in {self._secret_where(key, spec)}",
        )
        return server

    async def _refresh(
        self, server: Server, spec: ZenMLServerSpec | ClusterZenMLServerSpec
    ) -> bool:
        """Read the credential Secret again; True when it changed (the next login uses it)."""
        assert server.key is not None
        credential = await self.read_credential(server.key, spec)
        if credential == server.credential:
            return False
        if server.credential is not None and credential.username != server.credential.username:
            # Another kind of login (key vs. user): a new client at the next connect.
            server.generation = None
        server.credential = credential
        server.client.forget_token()
        return True

    def _secret_where(self, key: ServerKey, spec: ZenMLServerSpec | ClusterZenMLServerSpec) -> str:
        namespace = spec.credentials.namespace or key.namespace
        return f"Secret {spec.credentials.secret_name!r} in namespace {namespace!r}"

    def credential_namespace_allowed(self, namespace: str) -> bool:
        own = self.config.operator_namespace
        if own is None:
            return True  # run outside a cluster (local development): nothing to guard
        return namespace == own or namespace in self.config.credential_namespaces

    async def read_credential(
        self, key: ServerKey, spec: ZenMLServerSpec | ClusterZenMLServerSpec
    ) -> Credential:
        namespace = spec.credentials.namespace or key.namespace or ""
        where = self._secret_where(key, spec)
        if key.kind == CLUSTER_ZENML_SERVER and not self.credential_namespace_allowed(namespace):
            allowed = sorted(
                {self.config.operator_namespace or "", *self.config.credential_namespaces}
            )
            raise server_problem(
                "InvalidSpec",
                f"credentials.namespace {namespace!r} is not allowed: the operator reads"
                f" ClusterZenMLServer credentials only from {', '.join(map(repr, allowed))}"
                " (the chart's serverCredentialNamespaces adds more)",
                retry=False,
            )
        secret = await self.kube.get_secret(namespace, spec.credentials.secret_name)
        if secret is None:
            raise server_problem("CredentialsNotFound", f"{where} does not exist")
        return credential_from(secret.get("data") or {}, where)

    def _retire(self, client: zc.ZenMLClient) -> None:
        """Close a replaced client once the requests in flight on it are surely done."""
        self._retired.append(client)
        grace = self.config.zenml_timeout * (self.config.zenml_retries + 1) + 5.0

        async def close_later() -> None:
            await asyncio.sleep(grace)
            if client in self._retired:
                self._retired.remove(client)
                with contextlib.suppress(Exception):
                    await client.aclose()

        task = asyncio.create_task(close_later(), name="zenml-operator retired client")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def drop(self, key: ServerKey) -> None:
        """The server resource is gone: close its client."""
        server = self._servers.pop(key, None)
        self._locks.pop(key, None)
        self._slots.pop(key, None)
        if server is not None:
            with contextlib.suppress(Exception):
                await server.client.aclose()

    async def aclose(self) -> None:
        for task in list(self._closing):
            task.cancel()
        clients = [s.client for s in self._servers.values()] + self._retired
        self._servers.clear()
        self._retired.clear()
        for client in clients:
            with contextlib.suppress(Exception):
                await client.aclose()
