"""A small async Kubernetes client for the objects the operator writes.

Kopf watches the custom resources with its own client. The operator's own writes
(Secrets, status intent records, workload restarts) and the watch of its own Secrets
(secret_watch.py, on a client of its own) go through this one, built from
the same `kopf.ConnectionInfo` that Kopf's login handler returned, so there is one
source of credentials for both. It is httpx-based so that it never blocks the event
loop (a sync client in an async handler would) and reuses connections.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import logging
import ssl
import tempfile
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any
from urllib.parse import urlencode

import aiohttp
import httpx
import kopf

logger = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"


class KubeError(Exception):
    """A failed Kubernetes API call; the message carries the API's own reason."""

    def __init__(self, status_code: int, method: str, path: str, reason: str, message: str):
        self.status_code = status_code
        self.reason = reason
        super().__init__(f"{method} {path} -> {status_code} {reason}: {message}")


class KubeConflict(KubeError):
    """409: the object exists already, or it changed since it was read."""


class KubeNotFound(KubeError):
    """404."""


class KubeGone(KubeError):
    """410: a watch's resourceVersion is older than the server's history; list again."""


def _error_class(status_code: int) -> type[KubeError]:
    return {404: KubeNotFound, 409: KubeConflict, 410: KubeGone}.get(status_code, KubeError)


def _reason_of(status: Mapping[str, Any], default: str) -> tuple[str, str]:
    """(reason, message) of a Kubernetes `Status`; the message cut short for logs."""
    return str(status.get("reason") or default), str(status.get("message") or "")[:300]


def _error_of(response: httpx.Response, method: str, path: str) -> KubeError:
    """The error an answer >= 400 stands for, with the API's own reason and message."""
    try:
        payload = response.json()
    except ValueError:
        payload = {}
    if not isinstance(payload, dict):
        payload = {}
    code = response.status_code
    return _error_class(code)(code, method, path, *_reason_of(payload, response.reason_phrase))


def _materialise(data: str | bytes, suffix: str) -> str:
    """httpx/ssl want files for client certificates; Kopf may hand us inline data."""
    raw = data.encode() if isinstance(data, str) else data
    with contextlib.suppress(ValueError):  # already PEM
        raw = base64.b64decode(raw, validate=True)
    handle = tempfile.NamedTemporaryFile(suffix=suffix, delete=False)  # noqa: SIM115
    handle.write(raw)
    handle.close()
    return handle.name


def ssl_context_for(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
    if info.ca_path:
        ctx = ssl.create_default_context(cafile=str(info.ca_path))
    elif info.ca_data:
        ctx = ssl.create_default_context(cafile=_materialise(info.ca_data, ".crt"))
    else:
        ctx = ssl.create_default_context()
    cert = info.certificate_path or (
        _materialise(info.certificate_data, ".crt") if info.certificate_data else None
    )
    key = info.private_key_path or (
        _materialise(info.private_key_data, ".key") if info.private_key_data else None
    )
    if cert:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


def kube_login(*, logger: logging.Logger, settings: kopf.OperatorSettings, **kwargs: Any) -> Any:
    """Credentials for the cluster: the pod's service account, else a kubeconfig.

    Kopf's own readers need no Kubernetes client library: the operator does not depend on
    `kubernetes` (importing it costs ~20 MB of RSS, and Kopf imports it whenever it is
    installed). With the `kubeconfig` extra installed, the official client reads the
    kubeconfig instead, which adds exec plugins and auth providers (EKS, GKE, OIDC).
    """
    info = kopf.login_with_service_account(settings=settings, logger=logger, **kwargs)
    if info is not None:
        return info
    try:
        import kubernetes  # noqa: F401
    except ImportError:
        return kopf.login_with_kubeconfig(settings=settings, logger=logger, **kwargs)
    return kopf.login_via_client(settings=settings, logger=logger, **kwargs)


OWN_VERSIONS_KEPT = 4  # resourceVersions of the operator's own writes kept per Secret


def without_managed_fields(data: Any) -> Any:
    """An API answer (one object or a list) without `metadata.managedFields`: server-side
    apply's field ownership, which the operator never reads and which is a third or more of
    each object it lists (every writer of an object adds an entry)."""
    if isinstance(data, dict):
        for obj in (data, *(data.get("items") or ())):
            meta = obj.get("metadata") if isinstance(obj, dict) else None
            if isinstance(meta, dict):
                meta.pop("managedFields", None)
    return data


class _LeanResponse(aiohttp.ClientResponse):
    """Kopf's answers as Kopf reads them (`.json()`), minus managedFields: a listing's
    objects wait in Kopf's per-object queues at an operator start (measured: 12 MB less
    peak RSS over 1000 ServiceAccounts + 1000 ApiKeyRotations). Watch events take another
    path in Kopf (single objects, parsed line by line) and are left as they are."""

    async def json(self, *args: Any, **kwargs: Any) -> Any:
        return without_managed_fields(await super().json(*args, **kwargs))


def kopf_session(info: kopf.ConnectionInfo, *, limit: int) -> kopf.AiohttpSession:
    """Kopf's API session, as Kopf makes it but with a bounded pool. Kopf's own has none
    (aiohttp `limit=0`): a burst of objects handled at once (a bulk apply, the finalizers
    of a first start) opens one TLS connection per object, each with a 128-256 KiB buffer
    in asyncio's SSL transport, and the freed memory stays in the process: about 230 MB
    more peak RSS over 2000 objects (measured; README "Benchmark", memory). Kopf closes it
    when the credentials are replaced. Its answers come without managedFields (above)."""
    session = aiohttp.ClientSession(
        response_class=_LeanResponse,
        connector=aiohttp.TCPConnector(limit=limit, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(),
        proxy=info.proxy_url,
        trust_env=info.trust_env,
    )
    return kopf.AiohttpSession(
        server=info.server,
        default_namespace=info.default_namespace,
        priority=info.priority,
        expiration=info.expiration,
        aiohttp_session=session,
    )


class KubeClient:
    """Namespaced CRUD on the few kinds the operator touches."""

    def __init__(
        self, info: kopf.ConnectionInfo, *, timeout: float = 15.0, max_connections: int = 10
    ) -> None:
        # Few connections: API-server calls are short, and httpcore scans every pooled
        # connection on each request (its largest CPU cost in the benchmark profile).
        self._info = info
        self._verify = ssl_context_for(info)
        self._http = httpx.AsyncClient(
            base_url=info.server.rstrip("/"),
            verify=self._verify,
            timeout=timeout,
            limits=httpx.Limits(max_connections=max_connections),
            trust_env=info.trust_env,
        )
        # Watch streams stay open for minutes: they get a client of their own, so that they
        # never hold one of the few connections (or queue slots) of the short calls above.
        self._watch_http: httpx.AsyncClient | None = None
        # Callers queue here rather than in httpcore's pool (quadratic in its waiters).
        self._in_flight = asyncio.Semaphore(max(1, max_connections))
        self.writes = 0  # Kubernetes writes sent, for the benchmarks' idle-cost figure
        # What the operator's own Secret writes left behind, so that the Secret watch can
        # tell its own changes from anyone else's: (namespace, name) -> the resourceVersion
        # of the last few create/patch answers, and -> the uid of the last delete. A watch
        # event can arrive before the answer of the write that caused it: writes in flight
        # are counted, and `secret_writes_settled` waits for them before the comparison.
        self._own_versions: dict[tuple[str, str], tuple[str, ...]] = {}
        self._own_deletes: dict[tuple[str, str], str] = {}
        self._writing: collections.Counter[tuple[str, str]] = collections.Counter()
        self._write_done = asyncio.Condition()

    def update_credentials(self, info: kopf.ConnectionInfo) -> None:
        """Kopf re-runs the login handler when tokens expire; follow it."""
        self._info = info

    async def aclose(self) -> None:
        await self._http.aclose()
        if self._watch_http is not None:
            await self._watch_http.aclose()

    # --- the operator's own Secret writes ----------------------------------------------

    def _wrote(self, namespace: str, written: Mapping[str, Any]) -> None:
        meta = written.get("metadata") or {}
        if meta.get("name") and meta.get("resourceVersion"):
            key = (namespace, meta["name"])
            # A few: two writes in a row (a value, then its metadata) echo twice.
            recent = (*self._own_versions.get(key, ())[-(OWN_VERSIONS_KEPT - 1) :],)
            self._own_versions[key] = (*recent, str(meta["resourceVersion"]))

    @contextlib.asynccontextmanager
    async def _writing_secret(self, namespace: str, name: str) -> AsyncIterator[None]:
        key = (namespace, name)
        self._writing[key] += 1
        try:
            yield
        finally:
            self._writing[key] -= 1
            if not self._writing[key]:
                del self._writing[key]
            async with self._write_done:
                self._write_done.notify_all()

    async def secret_writes_settled(
        self, namespace: str, names: Iterable[str], *, timeout: float
    ) -> None:
        """Wait (at most `timeout` seconds) until no write of these Secrets is in flight, so
        that the echo of one is known by its resourceVersion."""
        keys = [(namespace, name) for name in names]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout), self._write_done:
                await self._write_done.wait_for(lambda: not any(k in self._writing for k in keys))

    def is_own_change(
        self, event_type: str, namespace: str, name: str, *, version: str, uid: str
    ) -> bool:
        """Whether a watch event of a Secret is the echo of the operator's own write: the
        resourceVersion its create/patch left, or the uid it deleted."""
        key = (namespace, name)
        if event_type == "DELETED":
            return bool(uid) and self._own_deletes.get(key) == uid
        return bool(version) and version in self._own_versions.get(key, ())

    def forget_secret(self, namespace: str, name: str) -> None:
        """Drop the bookkeeping of a Secret that is gone."""
        self._own_versions.pop((namespace, name), None)
        self._own_deletes.pop((namespace, name), None)

    async def _request(
        self, method: str, path: str, *, json: Any = None, content_type: str | None = None
    ) -> dict[str, Any]:
        headers = dict(self._info.as_http_headers())
        if content_type:
            headers["Content-Type"] = content_type
        if method != "GET":
            self.writes += 1
        async with self._in_flight:
            response = await self._http.request(method, path, json=json, headers=headers)
        if response.status_code >= 400:
            raise _error_of(response, method, path)
        return without_managed_fields(response.json()) if response.content else {}

    @staticmethod
    def _collection_path(api_version: str, plural: str, namespace: str | None) -> str:
        """A kind's path in a namespace, or in all of them / a cluster-scoped kind (None)."""
        prefix = "/api" if "/" not in api_version else "/apis"
        where = f"namespaces/{namespace}/" if namespace is not None else ""
        return f"{prefix}/{api_version}/{where}{plural}"

    @classmethod
    def _object_path(cls, api_version: str, plural: str, namespace: str | None, name: str) -> str:
        return f"{cls._collection_path(api_version, plural, namespace)}/{name}"

    # --- Secrets -------------------------------------------------------------------

    async def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._request("GET", self._object_path("v1", "secrets", namespace, name))
        except KubeNotFound:
            return None

    async def create_secret(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        async with self._writing_secret(namespace, str(body["metadata"]["name"])):
            created = await self._request("POST", self._secrets_of(namespace), json=body)
            self._wrote(namespace, created)
        return created

    async def patch_secret(
        self, namespace: str, name: str, patch: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Merge-patch; include metadata.resourceVersion in `patch` for a 409 on races."""
        async with self._writing_secret(namespace, name):
            patched = await self._request(
                "PATCH",
                self._object_path("v1", "secrets", namespace, name),
                json=patch,
                content_type=MERGE_PATCH,
            )
            self._wrote(namespace, patched)
        return patched

    async def delete_secret(self, namespace: str, name: str, *, uid: str | None = None) -> bool:
        """Delete; with `uid`, only that incarnation of the Secret (a precondition)."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if uid:
            body["preconditions"] = {"uid": uid}
            self._own_deletes[namespace, name] = uid
        try:
            await self._request(
                "DELETE", self._object_path("v1", "secrets", namespace, name), json=body
            )
        except KubeNotFound:
            return False
        return True

    @classmethod
    def _secrets_of(cls, namespace: str | None) -> str:
        return cls._collection_path("v1", "secrets", namespace)

    async def list_secrets(
        self, namespace: str | None, *, label_selector: str, page_size: int = 500
    ) -> tuple[list[dict[str, Any]], str]:
        """The Secrets matching a label selector (filtered by the API server), in one
        namespace or all (None), and the list's resourceVersion to watch from. Paged."""
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            query = {"labelSelector": label_selector, "limit": str(page_size)}
            if token:
                query["continue"] = token
            page = await self._request("GET", f"{self._secrets_of(namespace)}?{urlencode(query)}")
            items.extend(page.get("items") or [])
            meta = page.get("metadata") or {}
            token = str(meta.get("continue") or "")
            if not token:
                return items, str(meta.get("resourceVersion") or "")

    async def watch_secrets(
        self,
        namespace: str | None,
        *,
        label_selector: str,
        resource_version: str,
        timeout_seconds: int,
    ) -> AsyncIterator[dict[str, Any]]:
        """The watch events of the Secrets matching a label selector, from a resourceVersion
        on, with bookmarks, until the server ends the stream (after `timeout_seconds`).

        A 410 Gone (history compacted) is raised as `KubeGone`, whether it comes as the
        answer or as an ERROR event in the stream; the caller lists again.
        """
        if self._watch_http is None:
            self._watch_http = httpx.AsyncClient(
                base_url=self._http.base_url, verify=self._verify, trust_env=self._info.trust_env
            )
        params = {
            "watch": "true",
            "labelSelector": label_selector,
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        path = self._secrets_of(namespace)
        # No read timeout shorter than the server's own end of the stream (+ slack).
        timeout = httpx.Timeout(30.0, read=timeout_seconds + 30.0)
        headers = dict(self._info.as_http_headers())
        async with self._watch_http.stream(
            "GET", path, params=params, headers=headers, timeout=timeout
        ) as response:
            if response.status_code >= 400:
                await response.aread()
                raise _error_of(response, "WATCH", path)
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    code = int(status.get("code") or 500)
                    raise _error_class(code)(code, "WATCH", path, *_reason_of(status, "Error"))
                without_managed_fields(event.get("object"))
                yield event

    async def create_event(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST a core v1 Event (work done outside Kopf's handlers posts its own)."""
        return await self._request("POST", f"/api/v1/namespaces/{namespace}/events", json=body)

    # --- Custom resources ------------------------------------------------------------

    async def patch_status(
        self,
        api_version: str,
        plural: str,
        namespace: str | None,
        name: str,
        status: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Write status now, not at the handler's end: used for intent records."""
        path = self._object_path(api_version, plural, namespace, name) + "/status"
        return await self._request("PATCH", path, json={"status": status}, content_type=MERGE_PATCH)

    async def get_object(
        self, api_version: str, plural: str, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        try:
            return await self._request(
                "GET", self._object_path(api_version, plural, namespace, name)
            )
        except KubeNotFound:
            return None

    async def iter_objects(
        self, api_version: str, plural: str, namespace: str | None, *, page_size: int = 500
    ) -> AsyncIterator[dict[str, Any]]:
        """The objects of a namespace (or all, None), a page at a time: a rare scan over
        thousands of objects never holds them all at once."""
        path = self._collection_path(api_version, plural, namespace)
        token = ""
        while True:
            query = {"limit": str(page_size)}
            if token:
                query["continue"] = token
            page = await self._request("GET", f"{path}?{urlencode(query)}")
            for item in page.get("items") or []:
                yield item
            token = str((page.get("metadata") or {}).get("continue") or "")
            if not token:
                return

    async def list_objects(
        self, api_version: str, plural: str, namespace: str | None
    ) -> list[dict[str, Any]]:
        """The objects of a namespace, or of a cluster-scoped kind (namespace None)."""
        result = await self._request("GET", self._collection_path(api_version, plural, namespace))
        return list(result.get("items") or [])

    async def patch_object(
        self,
        api_version: str,
        plural: str,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
    ) -> dict[str, Any]:
        return await self._request(
            "PATCH",
            self._object_path(api_version, plural, namespace, name),
            json=patch,
            content_type=MERGE_PATCH,
        )
