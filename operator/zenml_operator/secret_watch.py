"""The watch of the operator's own Secrets: a change reaches its owner within seconds.

Kopf is not used for Secrets: its label filters are applied in the operator, so it would
stream every Secret of the cluster into memory, and a Kopf create/update handler would copy
the key into its last-handled annotation. Instead one watch per watched namespace (one
cluster-wide with --all-namespaces) asks the API server for the Secrets labelled
`app.kubernetes.io/managed-by: zenml-operator` only (a server-side label selector):

- list once, then watch from the list's resourceVersion with bookmarks; a stream the server
  ends is re-opened from the last resourceVersion seen; 410 Gone (history compacted) lists
  again and reports what changed meanwhile (a resourceVersion per Secret is kept for that,
  nothing else); any other failure is retried with backoff;
- every ADDED/MODIFIED/DELETED goes to `on_change` with the owner it names: the controller
  owner reference to a ServiceAccount, else the `zenml.io/service-account` label. A Secret
  that loses the selected label arrives as DELETED (its last labelled content), so its owner
  is still known; after that it is found through the owner's status, by name.

Key values pass through here (they are in the watched objects) and are never kept or logged.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from zenml_operator.kube import KubeClient, KubeGone
from zenml_operator.models import GROUP
from zenml_operator.secrets import LABEL_ACCOUNT, LABEL_MANAGED_BY, MANAGED_BY

SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
OWNER_KIND = "ServiceAccount"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecretChange:
    """One change of a managed Secret, as the watch saw it (no data: names only)."""

    type: str  # ADDED | MODIFIED | DELETED
    namespace: str
    name: str
    owner: str  # the owning ServiceAccount's name
    owner_uid: str | None  # from the owner reference; None when only the label names it
    version: str  # the Secret's resourceVersion in the event ("" after a re-list)
    uid: str  # the Secret's uid ("" after a re-list)


def owner_of(secret: Mapping[str, Any]) -> tuple[str, str | None] | None:
    """(ServiceAccount name, uid or None) a managed Secret belongs to, if it names one."""
    meta = secret.get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        if (
            ref.get("controller")
            and ref.get("kind") == OWNER_KIND
            and str(ref.get("apiVersion", "")).startswith(f"{GROUP}/")
            and ref.get("name")
        ):
            return str(ref["name"]), ref.get("uid")
    label = (meta.get("labels") or {}).get(LABEL_ACCOUNT)
    return (str(label), None) if label else None


class SecretWatch:
    """One watch task per scope (a namespace, or None for all); see the module docstring."""

    def __init__(
        self,
        kube: KubeClient,
        scopes: Iterable[str | None],
        on_change: Callable[[SecretChange], None],
        *,
        timeout_seconds: int = 300,
        max_backoff: float = 30.0,
    ) -> None:
        self.kube = kube
        self.scopes = tuple(scopes)
        self.on_change = on_change
        self.timeout_seconds = timeout_seconds
        self.max_backoff = max_backoff
        self._tasks: list[asyncio.Task[None]] = []
        # (namespace, name) -> resourceVersion of every managed Secret seen, per scope: what a
        # re-list after 410 Gone compares with.
        self._known: dict[str | None, dict[tuple[str, str], tuple[str, tuple[str, Any] | None]]]
        self._known = {}
        self.listed = asyncio.Event()  # every scope has listed once (for tests, the bench)

    def seen_version(self, namespace: str, name: str) -> str | None:
        """The last resourceVersion of a managed Secret this watch saw (tests, the bench)."""
        for known in self._known.values():
            if (namespace, name) in known:
                return known[namespace, name][0]
        return None

    def start(self) -> None:
        for scope in self.scopes:
            name = f"zenml-operator secret watch {scope or '(all namespaces)'}"
            self._tasks.append(asyncio.create_task(self._follow(scope), name=name))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # already logged by the task; stopping must not fail
                logger.debug("Secret watch ended with an error", exc_info=True)
        self._tasks.clear()

    # --- one scope -------------------------------------------------------------------------

    async def _follow(self, scope: str | None) -> None:
        version = ""  # "" : list first
        failures = 0
        while True:
            try:
                if not version:
                    version = await self._list(scope)
                async for event in self.kube.watch_secrets(
                    scope,
                    label_selector=SELECTOR,
                    resource_version=version,
                    timeout_seconds=self.timeout_seconds,
                ):
                    version = self._handle(scope, event) or version
                    failures = 0
                failures = 0  # the server ended the stream: re-open from `version`
            except asyncio.CancelledError:
                raise
            except KubeGone:
                logger.info(f"Secret watch {scope or '(all)'}: history compacted; listing again")
                version = ""
            except Exception as exc:  # the API server away, a dropped stream, a 5xx
                failures += 1
                delay = min(self.max_backoff, 0.5 * 2 ** min(failures, 8))
                delay *= random.uniform(0.5, 1.0)
                logger.warning(
                    f"Secret watch {scope or '(all)'} failed ({type(exc).__name__}: {exc});"
                    f" retrying in {delay:.1f}s"
                )
                await asyncio.sleep(delay)

    async def _list(self, scope: str | None) -> str:
        items, version = await self.kube.list_secrets(scope, label_selector=SELECTOR)
        fresh = {
            (item["metadata"]["namespace"], item["metadata"]["name"]): (
                str(item["metadata"].get("resourceVersion")),
                owner_of(item),
            )
            for item in items
        }
        before = self._known.get(scope)
        self._known[scope] = fresh
        if before is not None:
            # A re-list: report what changed while no watch was open (the first list is the
            # state at start-up, which Kopf's resume handlers reconcile anyway).
            for key, (rv, owner) in fresh.items():
                if key not in before or before[key][0] != rv:
                    self._report("MODIFIED", key, owner)
            for key, (_, owner) in before.items():
                if key not in fresh:
                    self._report("DELETED", key, owner)
        if all(s in self._known for s in self.scopes):
            self.listed.set()
        return version

    def _handle(self, scope: str | None, event: Mapping[str, Any]) -> str | None:
        """Record and report one watch event; returns the resourceVersion to resume from."""
        kind = str(event.get("type"))
        obj = event.get("object") or {}
        meta = obj.get("metadata") or {}
        version = meta.get("resourceVersion")
        if kind == "BOOKMARK" or not meta.get("name") or not meta.get("namespace"):
            return str(version) if version else None
        key = (str(meta["namespace"]), str(meta["name"]))
        known = self._known.setdefault(scope, {})
        owner = owner_of(obj)
        if kind == "DELETED":
            known.pop(key, None)
        else:
            known[key] = (str(version), owner)
        self._report(kind, key, owner, version=str(version or ""), uid=str(meta.get("uid") or ""))
        return str(version) if version else None

    def _report(
        self,
        kind: str,
        key: tuple[str, str],
        owner: tuple[str, Any] | None,
        *,
        version: str = "",
        uid: str = "",
    ) -> None:
        if owner is None:
            return  # labelled as ours but naming no ServiceAccount: nothing to reconcile
        change = SecretChange(
            type=kind,
            namespace=key[0],
            name=key[1],
            owner=owner[0],
            owner_uid=owner[1],
            version=version,
            uid=uid,
        )
        try:
            self.on_change(change)
        except Exception:  # a bug in the receiver must not end the watch
            logger.exception(f"Handling a change of Secret {key[0]}/{key[1]} failed")
