"""Operator settings, read from the environment (12-factor, as the Helm chart sets them)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field


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
    zenml_max_connections: int = 50
    # Key creates/rotations and logins in flight at once (each costs the server a bcrypt).
    zenml_heavy_concurrency: int = 8
    # Reconciles (ServiceAccount runs, rotation looks) in progress at once; the rest wait
    # their turn. Bounds the memory of a start-up over thousands of objects.
    max_concurrent_reconciles: int = 64
    # Only for the demo and tests: talk to this Kubernetes API URL with no credentials.
    kube_api_url: str | None = None
    # Seconds the operator waits before retrying after a failed reconcile (Kopf backoff).
    retry_delay: float = 15.0

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


def config_from_env(namespaces: tuple[str, ...] = ()) -> OperatorConfig:
    from zenml_operator.zenml_client import api_key_from_env

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
        zenml_max_connections=int(_env_float("ZENML_OPERATOR_ZENML_MAX_CONNECTIONS", 50)),
        zenml_heavy_concurrency=int(_env_float("ZENML_OPERATOR_ZENML_HEAVY_CONCURRENCY", 8)),
        max_concurrent_reconciles=int(_env_float("ZENML_OPERATOR_MAX_CONCURRENT_RECONCILES", 64)),
        retry_delay=_env_float("ZENML_OPERATOR_RETRY_DELAY", 15.0),
    )
