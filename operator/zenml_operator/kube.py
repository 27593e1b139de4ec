"""A small async Kubernetes client for the objects the operator writes.

Kopf watches the custom resources with its own client. The operator's own writes
(Secrets, status intent records, workload restarts) go through this one, built from
the same `kopf.ConnectionInfo` that Kopf's login handler returned, so there is one
source of credentials for both. It is httpx-based so that it never blocks the event
loop (a sync client in an async handler would) and reuses connections.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import ssl
import tempfile
from collections.abc import Mapping
from typing import Any

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


class KubeClient:
    """Namespaced CRUD on the few kinds the operator touches."""

    def __init__(
        self, info: kopf.ConnectionInfo, *, timeout: float = 15.0, max_connections: int = 10
    ) -> None:
        # Few connections: API-server calls are short, and httpcore scans every pooled
        # connection on each request (its largest CPU cost in the benchmark profile).
        self._info = info
        self._http = httpx.AsyncClient(
            base_url=info.server.rstrip("/"),
            verify=ssl_context_for(info),
            timeout=timeout,
            limits=httpx.Limits(max_connections=max_connections),
            trust_env=info.trust_env,
        )
        # Callers queue here rather than in httpcore's pool (quadratic in its waiters).
        self._in_flight = asyncio.Semaphore(max(1, max_connections))
        self.writes = 0  # Kubernetes writes sent, for the benchmarks' idle-cost figure

    def update_credentials(self, info: kopf.ConnectionInfo) -> None:
        """Kopf re-runs the login handler when tokens expire; follow it."""
        self._info = info

    async def aclose(self) -> None:
        await self._http.aclose()

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
            try:
                payload = response.json()
            except ValueError:
                payload = {}
            reason = str(payload.get("reason") or response.reason_phrase)
            message = str(payload.get("message") or "")[:300]
            cls = {404: KubeNotFound, 409: KubeConflict}.get(response.status_code, KubeError)
            raise cls(response.status_code, method, path, reason, message)
        return response.json() if response.content else {}

    # --- Secrets -------------------------------------------------------------------

    @staticmethod
    def _secrets(namespace: str) -> str:
        return f"/api/v1/namespaces/{namespace}/secrets"

    async def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._request("GET", f"{self._secrets(namespace)}/{name}")
        except KubeNotFound:
            return None

    async def create_secret(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self._request("POST", self._secrets(namespace), json=body)

    async def patch_secret(
        self, namespace: str, name: str, patch: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Merge-patch; include metadata.resourceVersion in `patch` for a 409 on races."""
        return await self._request(
            "PATCH", f"{self._secrets(namespace)}/{name}", json=patch, content_type=MERGE_PATCH
        )

    async def delete_secret(self, namespace: str, name: str, *, uid: str | None = None) -> bool:
        """Delete; with `uid`, only that incarnation of the Secret (a precondition)."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            await self._request("DELETE", f"{self._secrets(namespace)}/{name}", json=body)
        except KubeNotFound:
            return False
        return True

    # --- Custom resources ------------------------------------------------------------

    async def patch_status(
        self, api_version: str, plural: str, namespace: str, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Write status now, not at the handler's end: used for intent records."""
        path = f"/apis/{api_version}/namespaces/{namespace}/{plural}/{name}/status"
        return await self._request("PATCH", path, json={"status": status}, content_type=MERGE_PATCH)

    async def get_object(
        self, api_version: str, plural: str, namespace: str, name: str
    ) -> dict[str, Any] | None:
        prefix = "/api" if "/" not in api_version else "/apis"
        try:
            return await self._request(
                "GET", f"{prefix}/{api_version}/namespaces/{namespace}/{plural}/{name}"
            )
        except KubeNotFound:
            return None

    async def list_objects(
        self, api_version: str, plural: str, namespace: str
    ) -> list[dict[str, Any]]:
        prefix = "/api" if "/" not in api_version else "/apis"
        result = await self._request(
            "GET", f"{prefix}/{api_version}/namespaces/{namespace}/{plural}"
        )
        return list(result.get("items") or [])

    async def patch_object(
        self, api_version: str, plural: str, namespace: str, name: str, patch: Mapping[str, Any]
    ) -> dict[str, Any]:
        prefix = "/api" if "/" not in api_version else "/apis"
        return await self._request(
            "PATCH",
            f"{prefix}/{api_version}/namespaces/{namespace}/{plural}/{name}",
            json=patch,
            content_type=MERGE_PATCH,
        )
