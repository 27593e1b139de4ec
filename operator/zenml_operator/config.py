"""Operator settings, read from the environment (12-factor, as the Helm chart sets them)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from zenml_operator.zenml_api import API_KEY_PREFIX
from zenml_operator.zenml_api.connection import ConnectionOptions

API_KEY_ENV = "ZENML_STORE_API_KEY"
API_KEY_FILE_ENV = "ZENML_STORE_API_KEY_FILE"


@dataclass(frozen=True)
class OperatorConfig:
    # The operator's own ZenML credential: what the ZenML docs prescribe for automation.
    zenml_url: str
    zenml_api_key: Callable[[], str] = field(repr=False)
    # Set on ZenML OSS, where only admin *users* may manage service accounts: then
    # `zenml_api_key` yields that user's password (see README, "Credentials").
    zenml_username: str | None = None
    # The URL written into Secrets, when pods reach ZenML by another address than the operator.
    secret_zenml_url: str | None = None
    namespaces: tuple[str, ...] = ()  # empty: all namespaces
    resync_seconds: float = 600.0
    zenml_timeout: float = 10.0
    zenml_retries: int = 3
    zenml_max_connections: int = 16
    # Key creates/rotations and logins in flight at once (each costs the server a bcrypt).
    zenml_heavy_concurrency: int = 4
    # Reconciles (ServiceAccount runs, rotation looks) in progress at once; the rest wait
    # their turn. Bounds the memory of a start-up over thousands of objects.
    max_concurrent_reconciles: int = 64
    # ZenML requests per second at most for background work: resyncs, the resume of
    # converged objects after a restart, idle rotation looks (0: not paced). New and
    # changed objects never wait for it. See README "Settings" for the default's reasoning.
    background_rate: float = 20.0
    # Only for the demo and tests: talk to this Kubernetes API URL with no credentials.
    kube_api_url: str | None = None
    # Seconds the operator waits before retrying after a failed reconcile (Kopf backoff).
    retry_delay: float = 15.0
    # The operator's own namespace (the chart sets it): ClusterZenMLServer credentials are
    # read from there and `credential_namespaces` only. None (a local run): from anywhere.
    operator_namespace: str | None = None
    credential_namespaces: tuple[str, ...] = ()
    # How often each ZenMLServer/ClusterZenMLServer is checked (login, version, credential).
    server_check_seconds: float = 60.0
    # Kopf's connections to the API server for requests (its patches, Events), besides one
    # per watch stream. Kopf's own session has no bound: see `kopf_connections`.
    kube_connections: int = 32

    def kopf_connections(self) -> int:
        """The bound of Kopf's connection pool: `kube_connections` plus every watch stream
        (each holds a connection while it runs): per watched namespace ServiceAccounts,
        ApiKeyRotations, ZenMLServers and the peering object; once ClusterZenMLServers,
        cluster peering and namespaces. 0 (no bound, as Kopf's own) when a namespace is a
        pattern: how many streams it opens is not known here, and a stream must never wait
        for a connection."""
        if any(c in ns for ns in self.namespaces for c in "*?[!"):
            return 0
        return self.kube_connections + 4 * max(1, len(self.namespaces)) + 3

    def connection_options(self) -> ConnectionOptions:
        """The ZenML connection settings every client of this operator shares."""
        return ConnectionOptions(
            timeout=self.zenml_timeout,
            max_retries=self.zenml_retries,
            max_connections=self.zenml_max_connections,
            heavy_concurrency=self.zenml_heavy_concurrency,
            background_rate=self.background_rate,
        )

    @property
    def url_for_secrets(self) -> str:
        return (self.secret_zenml_url or self.zenml_url).rstrip("/")


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, got {raw!r}") from exc


def validate_api_key(value: str, source: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError(f"{source} is empty: set it to a ZenML service account API key")
    if not value.startswith(API_KEY_PREFIX) or len(value) <= len(API_KEY_PREFIX):
        raise ValueError(
            f"{source} does not hold a ZenML API key (expected a value starting with "
            f"{API_KEY_PREFIX!r})"
        )
    return value


def api_key_from_env(environ: Mapping[str, str] | None = None) -> str | Callable[[], str]:
    """The operator's own credential from the environment.

    `ZENML_STORE_API_KEY_FILE` wins and yields a callable that re-reads the file on every
    login, so a rotated Secret mounted as a volume is picked up without a restart.
    Otherwise `ZENML_STORE_API_KEY` is returned as a string. Error messages name the
    variable or the file, never the value.
    """
    env = os.environ if environ is None else environ
    file_name = env.get(API_KEY_FILE_ENV, "").strip()
    if file_name:
        path = Path(file_name)
        source = f"{API_KEY_FILE_ENV} ({path})"

        def read_key() -> str:
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(f"cannot read {source}: {exc.strerror}") from None
            return validate_api_key(text, source)

        read_key()  # fail at start-up, not at the first login
        return read_key
    if API_KEY_ENV not in env:
        raise ValueError(f"{API_KEY_ENV} (or {API_KEY_FILE_ENV}) is not set")
    return validate_api_key(env[API_KEY_ENV], API_KEY_ENV)


def config_from_env(namespaces: tuple[str, ...] = ()) -> OperatorConfig:
    url = os.environ.get("ZENML_STORE_URL", "").strip()
    if not url.startswith(("http://", "https://")):
        raise ValueError(
            "ZENML_STORE_URL must be set to the ZenML server URL (http:// or https://),"
            f" got {url!r}"
        )
    username = os.environ.get("ZENML_STORE_USERNAME") or None
    if username:
        password = os.environ.get("ZENML_STORE_PASSWORD", "")
        if not password:
            raise ValueError("ZENML_STORE_USERNAME is set but ZENML_STORE_PASSWORD is empty")
        provider: Callable[[], str] = lambda: password  # noqa: E731
    else:
        key = api_key_from_env()
        provider = key if callable(key) else (lambda: key)
    return OperatorConfig(
        zenml_url=url.rstrip("/"),
        zenml_api_key=provider,
        zenml_username=username,
        secret_zenml_url=os.environ.get("ZENML_OPERATOR_SECRET_URL") or None,
        namespaces=namespaces,
        resync_seconds=_env_float("ZENML_OPERATOR_RESYNC_SECONDS", 600.0),
        zenml_timeout=_env_float("ZENML_OPERATOR_ZENML_TIMEOUT", 10.0),
        zenml_max_connections=int(_env_float("ZENML_OPERATOR_ZENML_MAX_CONNECTIONS", 16)),
        zenml_heavy_concurrency=int(_env_float("ZENML_OPERATOR_ZENML_HEAVY_CONCURRENCY", 4)),
        max_concurrent_reconciles=int(_env_float("ZENML_OPERATOR_MAX_CONCURRENT_RECONCILES", 64)),
        background_rate=_env_float("ZENML_OPERATOR_BACKGROUND_RATE", 20.0),
        retry_delay=_env_float("ZENML_OPERATOR_RETRY_DELAY", 15.0),
        operator_namespace=os.environ.get("ZENML_OPERATOR_NAMESPACE") or None,
        credential_namespaces=tuple(
            n.strip()
            for n in os.environ.get("ZENML_OPERATOR_CREDENTIAL_NAMESPACES", "").split(",")
            if n.strip()
        ),
        server_check_seconds=_env_float("ZENML_OPERATOR_SERVER_CHECK_SECONDS", 60.0),
        kube_connections=int(_env_float("ZENML_OPERATOR_KUBE_CONNECTIONS", 32)),
    )
