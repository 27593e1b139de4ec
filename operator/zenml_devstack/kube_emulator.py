"""An emulated Kubernetes API server for the end-to-end tests and the demo.

`ClusterEmulator` is a small subclass of kmock's `KubernetesEmulator` that makes the in-memory
API behave the way Kopf and ordinary Kubernetes clients expect from a real cluster:

* create fills ``uid``, ``resourceVersion``, ``generation``, ``creationTimestamp``, honours
  ``generateName`` and takes the namespace from the URL;
* one cluster-wide, monotonically increasing ``resourceVersion`` (like etcd's revision), bumped
  on every change and carried by the stored object, the response and the watch event alike;
  no-op writes change nothing and emit no event, as on a real cluster;
* ``generation`` is bumped when anything but ``metadata``/``status`` changes, and when the
  deletion of an object with finalizers begins;
* status subresource separation for resources declared with ``subresources={'status'}``;
* optimistic concurrency: a stale ``metadata.resourceVersion`` in a merge patch or a PUT is a
  409 Conflict, a failed JSON-patch ``test`` op is a 422;
* watches replay only events newer than ``?resourceVersion=`` (from a bounded event history,
  answering 410 Gone when it is too old), honour ``timeoutSeconds``, ``sendInitialEvents``,
  label and field selectors (an object that starts or stops matching a selector is sent as
  ADDED or DELETED, as a real API server does); lists report the real current
  ``resourceVersion``;
* ``PUT`` (replace) is routed, which kmock does not do;
* expected API errors (404, 409, 422, ...) are answered as Kubernetes ``Status`` responses and
  are NOT recorded in ``emulator.errors``, so that list only holds real emulator failures.

Not emulated (see the README of the tests): controllers (Deployments never roll out), garbage
collection by ownerReferences, admission, CRD schema/CEL validation, strategic-merge list
semantics (treated as a JSON merge patch), server-side apply, list pagination (``limit`` is
ignored), RBAC.

Mutations happen in the fallback reactions, i.e. only when no test-defined kmock reaction
intercepted the request: injecting ``emulator[...] << 500`` therefore leaves the state unchanged,
as a failed request does on a real cluster.

All state changes are synchronous code with no ``await`` inside, so they are atomic on the event
loop without locks; a watch takes its snapshot and subscribes in one such step, so no event can
slip between the replay and the live stream.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import copy
import dataclasses
import datetime
import json
import logging
import re
import secrets
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
from kmock._internal import apps, enums, parsing, rendering

logger = logging.getLogger(__name__)

ALL_VERBS = frozenset(
    {"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"}
)

# Kubernetes' own alphabet for generateName suffixes (no vowels, no look-alike characters).
_GENERATE_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"

# DNS-1123 subdomain: what most object names must be; a real API server rejects others with 422.
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")

# kmock's URL parser reads "/api/v1/namespaces/NAME" as "namespace NAME, no resource" and fails
# outright on "/api/v1/namespaces"; these are the URLs of the Namespace objects themselves.
_NAMESPACE_OBJECT_PATH = re.compile(r"/api/v1/namespaces(?:/([^/]+)(?:/(status|finalize))?)?/?")
NAMESPACES = kmock.resource("", "v1", "namespaces")

# Server-managed metadata that clients cannot change with a patch or a replace.
_SERVER_MANAGED_METADATA = (
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
    "selfLink",
)
# Go's `omitempty`: the API server never stores these as empty lists/maps; Kopf relies on that.
_OMIT_WHEN_EMPTY_METADATA = ("finalizers", "labels", "annotations", "ownerReferences")


class ApiError(Exception):
    """An expected Kubernetes API failure, rendered as a `Status` response (never a 500)."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message

    def as_status(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Status",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": {},
            "code": self.code,
        }


@dataclasses.dataclass(frozen=True)
class _Change:
    """One committed change: the unit of the watch history and of the live watch streams."""

    rv: int
    resource: kmock.resource
    namespace: str | None
    name: str
    event: dict[str, Any]  # {'type': ADDED|MODIFIED|DELETED, 'object': {...}}, never mutated
    # The object before this change (None for a create): a selector-filtered watch sees an
    # object that starts or stops matching as ADDED or DELETED, as a real API server sends it.
    previous: dict[str, Any] | None = None


def api_path(
    resource: str | kmock.resource,
    *,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """The URL path of a collection or an object: ``api_path('v1/secrets', namespace='ns')``."""
    res = _parse_resource(resource)
    parts = ["/api/v1" if res.group == "" else f"/apis/{res.group}/{res.version}"]
    if namespace is not None:
        parts.append(f"namespaces/{namespace}")
    parts.append(str(res.plural))
    if name is not None:
        parts.append(name)
    if subresource is not None:
        parts.append(subresource)
    return "/".join(parts)


@attrs.define(kw_only=True)
class ClusterEmulator(kmock.KubernetesEmulator):
    """kmock's Kubernetes emulator with the semantics Kopf relies on (see the module docstring).

    Sync helpers for seeding and asserting (safe before, during or after serving):
    `create_object`, `get_object`, `list_objects`, `resource_version`. Test-side direct edits of
    ``emulator.objects[...]`` stay possible but bypass resourceVersions and watch events.
    """

    # How many past changes a watch can resume from; older resourceVersions get 410 Gone.
    history_limit: int = 10_000
    # Refuse to create namespaced objects in a namespace that does not exist (as a cluster does).
    strict_namespaces: bool = True

    _rv: int = attrs.field(default=0, init=False)
    _history: collections.deque[_Change] = attrs.field(factory=collections.deque, init=False)
    _compacted_rv: int = attrs.field(default=0, init=False)  # newest rv dropped from history
    _watchers: set[asyncio.Queue[_Change | None]] = attrs.field(factory=set, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # kmock maps no Kubernetes action to PUT; route it to a wholesale replace.
        self.fallback[kmock.method.PUT] << self._serve_replace

    # --- request plumbing ------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # A copy of kmock's RawHandler.__call__ (kmock 0.8) whose only change is the request
        # parser, because kmock cannot parse the URLs of Namespace objects (see _parse_request).
        await raw_request.read()
        raw_response: aiohttp.web.StreamResponse | None = None
        try:
            if self.limit is not None and len(self._requests) >= self.limit:
                raise apps.KMockError("Too many requests have been served so far.")
            request = await _parse_request(raw_request, id=len(self._requests))
            self._requests.append(request)
            try:
                return await self._handle(request)
            except rendering.StreamingError as e:  # unwrap: the stream has started already
                raw_response = e.args[0]
                failure: BaseException = e.__cause__ if e.__cause__ is not None else e
            raise failure
        except Exception as e:
            if not self._errors:
                raise
            self._errors[-1].append(e)
            if raw_response is None or not raw_response.prepared:
                return await self._render_error(e)
            await self._stream_error(e, raw_response)
            await raw_response.write_eof()
            return raw_response

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # Skip KubernetesEmulator._handle: it mutates the state BEFORE the reactions are matched
        # (so an injected failure still changes the object) and without any of the semantics
        # above. Here all mutations happen in the fallback reactions below.
        return await super(kmock.KubernetesEmulator, self)._handle(request)

    # NB: every fallback returns a kmock.Response with an explicit status, never a bare dict:
    # kmock stores the last status on the (shared) reaction and would reuse it for a bare dict.

    async def _serve_fetch(self, request: kmock.Request) -> rendering.Payload:
        try:
            res = self._require_resource(request.resource, request.namespace)
            obj = self.get_object(res, request.namespace, _require_name(request))
            if obj is None:
                raise _not_found(res, request.name)
            if request.subresource not in (None, "status"):
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return kmock.Response(status=200, payload=obj)
        except ApiError as e:
            return _status_response(e)

    async def _serve_list(self, request: kmock.Request) -> rendering.Payload:
        try:
            res = self._require_resource(request.resource, request.namespace)
            selector = _Selector.from_params(request.params)
            items = [
                obj
                for obj in self.list_objects(res, namespace=request.namespace)
                if selector.matches(obj)
            ]
            info = self._info(res)
            kind = info.kind if info is not None and info.kind else str(res.plural).capitalize()
            return kmock.Response(
                status=200,
                payload={
                    "apiVersion": _api_version(res),
                    "kind": f"{kind}List",
                    "metadata": {"resourceVersion": str(self._rv)},
                    "items": items,
                },
            )
        except ApiError as e:
            return _status_response(e)

    async def _serve_watch(self, request: kmock.Request) -> rendering.Payload:
        try:
            res = self._require_resource(request.resource, request.namespace)
            selector = _Selector.from_params(request.params, name=request.name)
            since = _parse_rv(request.params.get("resourceVersion"))
        except ApiError as e:
            return _status_response(e)
        timeout = request.params.get("timeoutSeconds")
        stream = self._watch_stream(
            res,
            request.namespace,
            selector,
            since=since,
            send_initial=request.params.get("sendInitialEvents") == "true",
            timeout=float(timeout) if timeout else None,
        )
        return kmock.Response(status=200, payload=stream)

    async def _serve_create(self, request: kmock.Request) -> rendering.Payload:
        try:
            res = self._require_resource(request.resource, request.namespace)
            obj = self.create_object(res, request.data, namespace=request.namespace, from_url=True)
            return kmock.Response(status=201, payload=obj)
        except ApiError as e:
            return _status_response(e)

    async def _serve_update(self, request: kmock.Request) -> rendering.Payload:
        try:
            res = self._require_resource(request.resource, request.namespace)
            name = _require_name(request)
            old = self.get_object(res, request.namespace, name)
            if old is None:
                raise _not_found(res, name)
            new = _apply_patch(old, request.data, _content_type(request))
            obj = self._commit_update(res, request.namespace, name, old, new, request.subresource)
            return kmock.Response(status=200, payload=obj)
        except ApiError as e:
            return _status_response(e)

    async def _serve_replace(self, request: kmock.Request) -> rendering.Payload:
        if request.resource is None or request.name is None:
            raise NotImplementedError  # not an object URL: let other reactions answer
        try:
            res = self._require_resource(request.resource, request.namespace)
            name = request.name
            old = self.get_object(res, request.namespace, name)
            if old is None:
                raise _not_found(res, name)
            body = request.data
            if not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "the body of a replace must be an object")
            body_name = (body.get("metadata") or {}).get("name")
            if body_name is not None and body_name != name:
                raise ApiError(
                    400,
                    "BadRequest",
                    f"the name of the object ({body_name}) does not match the name on the URL "
                    f"({name})",
                )
            obj = self._commit_update(
                res, request.namespace, name, old, copy.deepcopy(body), request.subresource
            )
            return kmock.Response(status=200, payload=obj)
        except ApiError as e:
            return _status_response(e)

    async def _serve_delete(self, request: kmock.Request) -> rendering.Payload:
        try:
            res = self._require_resource(request.resource, request.namespace)
            name = _require_name(request)
            options = request.data if isinstance(request.data, dict) else {}
            obj = self.delete_object(
                res, request.namespace, name, preconditions=options.get("preconditions")
            )
            return kmock.Response(status=200, payload=obj)
        except ApiError as e:
            return _status_response(e)

    # --- the state machine (synchronous, hence atomic on the event loop) ----------------------

    @property
    def resource_version(self) -> int:
        """The current cluster-wide resourceVersion (the last committed change)."""
        return self._rv

    def get_object(
        self, resource: str | kmock.resource, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        """A deep copy of the current object, or None if absent or deleted."""
        stored = self._stored(_parse_resource(resource), namespace, name)
        return copy.deepcopy(stored) if stored is not None else None

    def list_objects(
        self, resource: str | kmock.resource, *, namespace: str | None = None
    ) -> list[dict[str, Any]]:
        """Deep copies of the live objects of a resource (all namespaces if namespace is None)."""
        res = _parse_resource(resource)
        result = []
        for (key_res, key_ns, _), obj in self._objects.items():
            if key_res == res and not obj.deleted and (namespace is None or key_ns == namespace):
                result.append(copy.deepcopy(obj.raw))
        return result

    def create_object(
        self,
        resource: str | kmock.resource,
        body: Any,
        *,
        namespace: str | None = None,
        from_url: bool = False,
    ) -> dict[str, Any]:
        """Create an object as a POST would (raises ApiError); returns the stored object.

        The namespace comes from the URL for HTTP requests (``from_url=True``); for direct calls
        it may be given here or in ``body['metadata']['namespace']``.
        """
        res = _parse_resource(resource)
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of a create must be a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")

        info = self._info(res)
        namespaced = info.namespaced if info is not None and info.namespaced is not None else None
        body_ns = meta.get("namespace")
        if not from_url and namespace is None:
            namespace = body_ns
        if namespaced is None:
            namespaced = namespace is not None
        if namespaced:
            if namespace is None:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            if body_ns is not None and body_ns != namespace:
                raise ApiError(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on "
                    "the request",
                )
            must_exist = self.strict_namespaces and res != NAMESPACES
            if must_exist and not self._namespace_exists(namespace):
                raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found')
            meta["namespace"] = namespace
        else:
            namespace = None
            meta.pop("namespace", None)

        name = meta.get("name")
        if not name:
            prefix = meta.get("generateName")
            if not prefix:
                raise ApiError(422, "Invalid", "name or generateName is required")
            # Retry on the (unlikely) collision, as the API server's generator effectively does.
            while True:
                suffix = "".join(secrets.choice(_GENERATE_NAME_ALPHABET) for _ in range(5))
                name = f"{prefix}{suffix}"
                if self._stored(res, namespace, name) is None:
                    break
        _validate_name(res, name)
        if self._stored(res, namespace, name) is not None:
            raise ApiError(409, "AlreadyExists", f'{_group_resource(res)} "{name}" already exists')

        # Kubernetes accepts bodies without apiVersion/kind (Kopf's Events have none) and fills
        # them from the URL; clients and Kopf's handlers then rely on them being present.
        obj.setdefault("apiVersion", _api_version(res))
        obj.setdefault("kind", info.kind if info is not None and info.kind else None)
        if obj["kind"] is None:
            del obj["kind"]
        for field in (*_SERVER_MANAGED_METADATA, "resourceVersion"):
            meta.pop(field, None)
        meta["name"] = name
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        if _has_generation(res):
            meta["generation"] = 1
        if res == NAMESPACES:
            obj["status"] = {"phase": "Active"}  # set by the namespace strategy on a real cluster
        elif self._has_status_subresource(res):
            obj.pop("status", None)  # the status of a new object is reset; set it via /status
        _normalise(res, obj)

        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        key = (res, namespace, name)
        try:
            self._objects[key].create(obj)  # re-creation after a deletion keeps the history
        except KeyError:
            self._objects[key] = obj
        self._publish(res, namespace, name, "ADDED", obj)
        return copy.deepcopy(obj)

    def delete_object(
        self,
        resource: str | kmock.resource,
        namespace: str | None,
        name: str,
        *,
        preconditions: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Delete as a DELETE would: mark it if it has finalizers, else remove it at once.

        Returns the marked object, or (as the API server does) a Success `Status` when the
        object is gone at once.
        """
        res = _parse_resource(resource)
        old = self._stored(res, namespace, name)
        if old is None:
            raise _not_found(res, name)
        meta = old.get("metadata", {})
        for field in ("uid", "resourceVersion"):
            wanted = (preconditions or {}).get(field)
            if wanted is not None and wanted != meta.get(field):
                raise ApiError(
                    409,
                    "Conflict",
                    f"Precondition failed: {field} in precondition: {wanted}, "
                    f"{field} in object meta: {meta.get(field)}",
                )
        if meta.get("deletionTimestamp"):
            return copy.deepcopy(old)  # already being deleted: nothing changes
        new = copy.deepcopy(old)
        if meta.get("finalizers"):
            new["metadata"]["deletionTimestamp"] = _now()
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            if "generation" in meta:  # the API server bumps it when a graceful deletion begins
                new["metadata"]["generation"] = meta["generation"] + 1
            return self._store_version(res, namespace, name, new, "MODIFIED")
        self._store_version(res, namespace, name, new, "DELETED")
        return {
            "apiVersion": "v1",
            "kind": "Status",
            "metadata": {},
            "status": "Success",
            "details": {"name": name, "group": res.group, "kind": res.plural, "uid": meta["uid"]},
        }

    def _commit_update(
        self,
        res: kmock.resource,
        namespace: str | None,
        name: str,
        old: dict[str, Any],
        new: Any,
        subresource: str | None,
    ) -> dict[str, Any]:
        """Validate and store the result of a patch or a replace of `old` into `new`."""
        if not isinstance(new, dict):
            raise ApiError(422, "Invalid", "the patched object is not a JSON object")
        if subresource not in (None, "status") or (
            subresource == "status" and not self._has_status_subresource(res)
        ):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        old_meta = old.get("metadata", {})
        new_meta = new.get("metadata")
        if not isinstance(new_meta, dict):
            new_meta = new["metadata"] = {}

        # Optimistic concurrency: a resourceVersion in the body is a precondition, not a value.
        wanted_rv = new_meta.get("resourceVersion")
        if wanted_rv is not None and str(wanted_rv) != old_meta.get("resourceVersion"):
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {_group_resource(res)} "{name}": the object '
                f"has been modified; please apply your changes to the latest version and try "
                f"again",
            )
        for field in ("name", "namespace"):
            if new_meta.get(field) is not None and new_meta.get(field) != old_meta.get(field):
                raise ApiError(400, "BadRequest", f"metadata.{field} cannot be changed")

        if self._has_status_subresource(res):
            if subresource == "status":
                # The status endpoint changes the status and nothing else (metadata included).
                status = new.get("status")
                new = copy.deepcopy(old)
                new_meta = new["metadata"]
                if status is None:
                    new.pop("status", None)
                else:
                    new["status"] = status
            elif "status" in old:
                new["status"] = copy.deepcopy(old["status"])  # the main endpoint ignores status
            else:
                new.pop("status", None)

        # Server-managed fields keep their stored values whatever the client sent.
        for field in ("apiVersion", "kind"):
            if field in old:
                new[field] = old[field]
        for field in (*_SERVER_MANAGED_METADATA, "name", "namespace", "resourceVersion"):
            if field in old_meta:
                new_meta[field] = old_meta[field]
            else:
                new_meta.pop(field, None)
        if old_meta.get("deletionTimestamp"):
            added = set(new_meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
            if added:
                raise ApiError(
                    422,
                    "Invalid",
                    f"Forbidden: no new finalizers can be added if the object is being deleted, "
                    f"found new finalizers {sorted(added)!r}",
                )
        _normalise(res, new)

        if new == old:
            return copy.deepcopy(old)  # a no-op write: no new resourceVersion, no watch event
        if "generation" in old_meta and _content(new) != _content(old):
            new_meta["generation"] = old_meta["generation"] + 1
        if new_meta.get("deletionTimestamp") and not new_meta.get("finalizers"):
            return self._store_version(res, namespace, name, new, "DELETED")
        return self._store_version(res, namespace, name, new, "MODIFIED")

    def _store_version(
        self,
        res: kmock.resource,
        namespace: str | None,
        name: str,
        obj: dict[str, Any],
        event_type: str,
    ) -> dict[str, Any]:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        stored = self._objects[res, namespace, name]
        previous = copy.deepcopy(stored.last.raw) if stored.history else None
        stored.history.append(obj)
        if event_type == "DELETED":
            stored.delete()  # soft deletion: kmock keeps the history for assertions
        self._publish(res, namespace, name, event_type, obj, previous=previous)
        return copy.deepcopy(obj)

    def _publish(
        self,
        res: kmock.resource,
        namespace: str | None,
        name: str,
        event_type: str,
        obj: dict[str, Any],
        *,
        previous: dict[str, Any] | None = None,
    ) -> None:
        change = _Change(
            rv=self._rv,
            resource=res,
            namespace=namespace,
            name=name,
            event={"type": event_type, "object": copy.deepcopy(obj)},
            previous=previous,
        )
        self._history.append(change)
        while len(self._history) > self.history_limit:
            self._compacted_rv = self._history.popleft().rv
        for queue in self._watchers:
            queue.put_nowait(change)

    def close_watches(self) -> None:
        """End all open watch streams now (aiohttp would wait up to 60 s for them on shutdown)."""
        for queue in self._watchers:
            queue.put_nowait(None)

    async def _watch_stream(
        self,
        res: kmock.resource,
        namespace: str | None,
        selector: _Selector,
        *,
        since: int | None,
        send_initial: bool,
        timeout: float | None,
    ) -> AsyncIterator[rendering.Payload]:
        # Snapshot and subscription in one synchronous step: nothing can happen in between.
        queue: asyncio.Queue[_Change | None] = asyncio.Queue()
        self._watchers.add(queue)
        try:
            replay: list[dict[str, Any]] = []
            if since is not None and since < self._compacted_rv:
                replay.append(_gone_event(since))
            elif since is not None:
                for change in self._history:
                    if change.rv <= since:
                        continue
                    if (event := _event_for(change, res, namespace, selector)) is not None:
                        replay.append(event)
            else:
                # No resourceVersion: "get the state and start at the most recent", i.e. a
                # synthetic ADDED for every existing object (what kmock does for every watch).
                for obj in self.list_objects(res, namespace=namespace):
                    if selector.matches(obj):
                        replay.append({"type": "ADDED", "object": obj})
                if send_initial:
                    replay.append(_initial_events_end_bookmark(res, self._rv))

            # Send the headers at once, even with nothing to stream (as kmock does).
            yield b""
            for event in replay:
                yield event
            if replay and replay[0]["type"] == "ERROR":
                return

            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout if timeout is not None else None
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        change = await queue.get()
                except TimeoutError:
                    return  # timeoutSeconds elapsed: the client re-watches from its last rv
                if change is None:
                    return  # the emulator is shutting down
                if event := _event_for(change, res, namespace, selector):
                    yield event
        finally:
            self._watchers.discard(queue)

    # --- small lookups --------------------------------------------------------------------

    def _stored(
        self, res: kmock.resource, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        # NB: `key in kmock.objects` is unreliable (trap 7); look it up and catch KeyError.
        try:
            obj = self._objects[res, namespace, name]
        except KeyError:
            return None
        return None if obj.deleted else obj.last.raw

    def _info(self, res: kmock.resource) -> kmock.ResourceInfo | None:
        # NB: `.get()`/`[res]` on kmock.resources create an empty entry as a side effect.
        return self._resources[res] if res in self._resources else None  # noqa: SIM401

    def _has_status_subresource(self, res: kmock.resource) -> bool:
        info = self._info(res)
        return info is not None and "status" in info.subresources

    def _namespace_exists(self, namespace: str) -> bool:
        return self._stored(NAMESPACES, None, namespace) is not None

    def _require_resource(
        self, resource: kmock.resource | None, namespace: str | None = None
    ) -> kmock.resource:
        if resource is None or resource not in self._get_resources():
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        info = self._info(resource)
        if namespace is not None and info is not None and info.namespaced is False:
            # A cluster-scoped kind has no URLs under /namespaces/NS/ on a real API server.
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return resource


# --- module-level helpers ------------------------------------------------------------------


async def _parse_request(raw_request: aiohttp.web.BaseRequest, *, id: int) -> kmock.Request:
    match = _NAMESPACE_OBJECT_PATH.fullmatch(raw_request.path)
    if match is None:
        return await kmock.Request._parse(raw_request, id=id)
    # The same fields as kmock's Request._parse fills, with the Namespace resource understood.
    body = await raw_request.read()
    text = await raw_request.text()
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = None
    name, subresource = match.groups()
    method = enums.method(raw_request.method)
    path = parsing.ParsedPath("", "v1", "namespaces", None, name, subresource)
    return kmock.Request(
        id=id,
        raw_request=raw_request,
        url=raw_request.url,
        method=method,
        params=dict(raw_request.query),
        headers=dict(raw_request.headers),
        cookies=dict(raw_request.cookies),
        data=data,
        body=body,
        text=text,
        action=parsing.guess_k8s(path, method, dict(raw_request.query)),
        resource=NAMESPACES,
        namespace=None,
        name=name,
        subresource=subresource,
    )


def _parse_resource(resource: str | kmock.resource) -> kmock.resource:
    return resource if isinstance(resource, kmock.resource) else kmock.resource(resource)


def _api_version(res: kmock.resource) -> str:
    return str(res.version) if res.group == "" else f"{res.group}/{res.version}"


def _group_resource(res: kmock.resource) -> str:
    return str(res.plural) if res.group == "" else f"{res.plural}.{res.group}"


def _has_generation(res: kmock.resource) -> bool:
    # Core v1 kinds (Secrets, ConfigMaps, Events, Namespaces) carry no metadata.generation on a
    # real cluster; custom resources and apps/v1 workloads do.
    return res.group != ""


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _require_name(request: kmock.Request) -> str:
    if request.name is None:
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method here")
    return request.name


def _not_found(res: kmock.resource, name: str | None) -> ApiError:
    return ApiError(404, "NotFound", f'{_group_resource(res)} "{name}" not found')


def _status_response(error: ApiError) -> kmock.Response:
    return kmock.Response(status=error.code, payload=error.as_status())


def _validate_name(res: kmock.resource, name: str) -> None:
    limit = 63 if res == NAMESPACES else 253
    if len(name) > limit or not _DNS1123_SUBDOMAIN.fullmatch(name):
        raise ApiError(
            422,
            "Invalid",
            f'{_group_resource(res)} "{name}" is invalid: metadata.name: Invalid value: '
            f'"{name}": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric '
            f"characters, '-' or '.', and must start and end with an alphanumeric character",
        )


def _content(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What the generation tracks: everything but metadata and status."""
    return {key: value for key, value in obj.items() if key not in ("metadata", "status")}


def _normalise(res: kmock.resource, obj: dict[str, Any]) -> None:
    """Apply the storage-side normalisations a real API server does on every write."""
    meta = obj["metadata"]
    for field in _OMIT_WHEN_EMPTY_METADATA:
        if field in meta and not meta[field]:
            del meta[field]
    if res == kmock.resource("", "v1", "secrets"):
        # stringData is write-only: merged into data (base64) and never stored or returned.
        string_data = obj.pop("stringData", None) or {}
        data = obj.get("data") or {}
        for key, value in string_data.items():
            data[key] = base64.b64encode(str(value).encode()).decode()
        for key, value in data.items():
            try:
                base64.b64decode(value, validate=True)
            except (binascii.Error, TypeError, ValueError) as e:
                raise ApiError(400, "BadRequest", f"Secret data[{key!r}] is not base64") from e
        if data:
            obj["data"] = data
        else:
            obj.pop("data", None)


def _content_type(request: kmock.Request) -> str:
    for key, value in request.headers.items():
        if key.lower() == "content-type":
            return value.split(";")[0].strip().lower()
    return ""


def _apply_patch(old: dict[str, Any], patch: Any, content_type: str) -> Any:
    if content_type == "application/json-patch+json":
        if not isinstance(patch, list):
            raise ApiError(400, "BadRequest", "a JSON patch must be a list of operations")
        try:
            return jsonpatch.apply_patch(copy.deepcopy(old), patch)
        except jsonpatch.JsonPatchTestFailed as e:
            # What Kopf's finalizer and progress patches rely on: a test on resourceVersion.
            raise ApiError(422, "Invalid", f"the server rejected our request: {e}") from e
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as e:
            raise ApiError(422, "Invalid", f"the JSON patch cannot be applied: {e}") from e
    if content_type in (
        "application/merge-patch+json",
        # Approximation: list items are replaced, not merged by their patchMergeKey.
        "application/strategic-merge-patch+json",
    ):
        if not isinstance(patch, dict):
            raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
        return merge_patch(old, patch)
    raise ApiError(
        415, "UnsupportedMediaType", f"the patch content type {content_type!r} is not supported"
    )


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (kmock's own merge refuses a dict over a scalar)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _parse_rv(value: str | None) -> int | None:
    # "0" and "" mean "any version": serve the current state first, then the changes.
    if value in (None, "", "0"):
        return None
    try:
        return int(value)
    except ValueError:
        raise ApiError(400, "BadRequest", f"invalid resourceVersion {value!r}") from None


def _gone_event(since: int) -> dict[str, Any]:
    error = ApiError(410, "Expired", f"too old resource version: {since}").as_status()
    return {"type": "ERROR", "object": error}


def _initial_events_end_bookmark(res: kmock.resource, rv: int) -> dict[str, Any]:
    return {
        "type": "BOOKMARK",
        "object": {
            "apiVersion": _api_version(res),
            "metadata": {
                "resourceVersion": str(rv),
                "annotations": {"k8s.io/initial-events-end": "true"},
            },
        },
    }


def _event_for(
    change: _Change, res: kmock.resource, namespace: str | None, selector: _Selector
) -> dict[str, Any] | None:
    """The watch event a watcher of (res, namespace, selector) gets for a change, or None.

    As a real API server's watch cache does: an object that starts matching the selector is
    ADDED, one that stops matching is DELETED (its last matching content, at the change's
    resourceVersion), and one that matches neither before nor after is not sent.
    """
    if change.resource != res or (namespace is not None and change.namespace != namespace):
        return None
    kind, obj = change.event["type"], change.event["object"]
    if kind == "DELETED":
        return copy.deepcopy(change.event) if selector.matches(obj) else None
    now = selector.matches(obj)
    before = change.previous is not None and selector.matches(change.previous)
    if now:
        return {"type": "MODIFIED" if before else "ADDED", "object": copy.deepcopy(obj)}
    if before:
        assert change.previous is not None
        gone = copy.deepcopy(change.previous)
        gone["metadata"]["resourceVersion"] = str(change.rv)
        return {"type": "DELETED", "object": gone}
    return None


@dataclasses.dataclass(frozen=True)
class _Selector:
    """Label and field selectors of list/watch requests (the common syntax subset)."""

    labels: tuple[tuple[str, str, frozenset[str]], ...] = ()  # (key, op, values)
    fields: tuple[tuple[str, str, str], ...] = ()  # (dotted.path, op, value)
    name: str | None = None  # a watch on a named URL

    @classmethod
    def from_params(cls, params: Mapping[str, str], *, name: str | None = None) -> _Selector:
        return cls(
            labels=tuple(_parse_label_selector(params.get("labelSelector", ""))),
            fields=tuple(_parse_field_selector(params.get("fieldSelector", ""))),
            name=name,
        )

    def matches(self, obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        if self.name is not None and meta.get("name") != self.name:
            return False
        labels = meta.get("labels") or {}
        for key, op, values in self.labels:
            present = key in labels
            if op == "exists" and not present:
                return False
            if op == "!exists" and present:
                return False
            if op in ("=", "in") and (not present or labels[key] not in values):
                return False
            if op in ("!=", "notin") and present and labels[key] in values:
                return False
        for path, op, value in self.fields:
            actual: Any = obj
            for part in path.split("."):
                actual = actual.get(part) if isinstance(actual, Mapping) else None
            equal = ("" if actual is None else str(actual)) == value
            if equal != (op == "="):
                return False
        return True


def _split_requirements(selector: str) -> Iterable[str]:
    depth, start = 0, 0
    for index, char in enumerate(selector):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            yield selector[start:index].strip()
            start = index + 1
    yield selector[start:].strip()


_SET_REQUIREMENT = re.compile(r"(\S+)\s+(in|notin)\s+\((.*)\)")
_EQUALITY_REQUIREMENT = re.compile(r"([^=!\s]+)\s*(==|=|!=)\s*(\S*)")


def _parse_label_selector(selector: str) -> Iterable[tuple[str, str, frozenset[str]]]:
    for requirement in _split_requirements(selector):
        if not requirement:
            continue
        if match := _SET_REQUIREMENT.fullmatch(requirement):
            key, op, values = match.groups()
            yield key, op, frozenset(v.strip() for v in values.split(",") if v.strip())
        elif match := _EQUALITY_REQUIREMENT.fullmatch(requirement):
            key, op, value = match.groups()
            yield key, "!=" if op == "!=" else "=", frozenset({value})
        elif requirement.startswith("!"):
            yield requirement[1:].strip(), "!exists", frozenset()
        else:
            yield requirement, "exists", frozenset()


def _parse_field_selector(selector: str) -> Iterable[tuple[str, str, str]]:
    for requirement in _split_requirements(selector):
        if not requirement:
            continue
        match = _EQUALITY_REQUIREMENT.fullmatch(requirement)
        if match is None:
            raise ApiError(400, "BadRequest", f"invalid field selector: {requirement!r}")
        path, op, value = match.groups()
        yield path, "!=" if op == "!=" else "=", value


# --- discovery and seeding -------------------------------------------------------------------

# (resource, kind, namespaced, subresources) served besides the operator's CRDs.
_BUILTIN_RESOURCES: tuple[tuple[str, str, bool, frozenset[str]], ...] = (
    ("v1/namespaces", "Namespace", False, frozenset({"status"})),
    ("v1/secrets", "Secret", True, frozenset()),
    ("v1/configmaps", "ConfigMap", True, frozenset()),
    ("v1/events", "Event", True, frozenset()),
    ("events.k8s.io/v1/events", "Event", True, frozenset()),
    ("apps/v1/deployments", "Deployment", True, frozenset({"status"})),
    ("apps/v1/statefulsets", "StatefulSet", True, frozenset({"status"})),
    ("apps/v1/daemonsets", "DaemonSet", True, frozenset({"status"})),
    (
        "apiextensions.k8s.io/v1/customresourcedefinitions",
        "CustomResourceDefinition",
        False,
        frozenset({"status"}),
    ),
)

# The operator's own resources, used when no parsed CRD manifests are given:
# (resource, kind, singular, namespaced).
_DEFAULT_CRDS: tuple[tuple[str, str, str, bool], ...] = (
    ("zenml.io/v1alpha1/serviceaccounts", "ServiceAccount", "serviceaccount", True),
    ("zenml.io/v1alpha1/apikeyrotations", "ApiKeyRotation", "apikeyrotation", True),
    ("zenml.io/v1alpha1/zenmlservers", "ZenMLServer", "zenmlserver", True),
    ("zenml.io/v1alpha1/clusterzenmlservers", "ClusterZenMLServer", "clusterzenmlserver", False),
)


def declare_resources(
    emulator: ClusterEmulator, *, crds: list[dict[str, Any]] | None = None
) -> None:
    """Register the discovery information Kopf and the operator need (trap 1 of DESIGN.md).

    `crds` are parsed ``apiextensions.k8s.io/v1`` CustomResourceDefinition manifests; their
    served versions are declared and the manifests stored as objects. Without them, the
    ``zenml.io/v1alpha1`` resources are declared as constants: ServiceAccount, ApiKeyRotation
    and ZenMLServer (namespaced) and ClusterZenMLServer (cluster-scoped).
    """
    for path, kind, namespaced, subresources in _BUILTIN_RESOURCES:
        emulator.resources[path] = kmock.ResourceInfo(
            kind=kind,
            singular=kind.lower(),
            namespaced=namespaced,
            verbs=ALL_VERBS,
            subresources=subresources,
        )
    if crds is None:
        for path, kind, singular, namespaced in _DEFAULT_CRDS:
            emulator.resources[path] = kmock.ResourceInfo(
                kind=kind,
                singular=singular,
                namespaced=namespaced,
                verbs=ALL_VERBS,
                subresources={"status"},
            )
        return
    for crd in crds:
        spec = crd["spec"]
        names = spec["names"]
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            emulator.resources[kmock.resource(spec["group"], version["name"], names["plural"])] = (
                kmock.ResourceInfo(
                    kind=names["kind"],
                    singular=names.get("singular", names["kind"].lower()),
                    shortnames=names.get("shortNames", []),
                    categories=names.get("categories", []),
                    namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                    verbs=ALL_VERBS,
                    subresources=set((version.get("subresources") or {}).keys()),
                )
            )
        crd_resource = "apiextensions.k8s.io/v1/customresourcedefinitions"
        if emulator.get_object(crd_resource, None, crd["metadata"]["name"]) is None:
            emulator.create_object(crd_resource, crd)


def add_namespace(emulator: ClusterEmulator, name: str) -> dict[str, Any]:
    """Create the Namespace object `name` if it does not exist yet; return it."""
    existing = emulator.get_object(NAMESPACES, None, name)
    if existing is not None:
        return existing
    return emulator.create_object(NAMESPACES, {"metadata": {"name": name}})


# --- serving outside of pytest ----------------------------------------------------------------


async def serve_emulator(
    emulator: ClusterEmulator, *, host: str = "127.0.0.1", port: int | None = None
) -> tuple[str, Callable[[], Awaitable[None]]]:
    """Serve `emulator` over HTTP the way kmock's pytest fixture does; return (url, stop).

    ``port=None`` picks a free port. `stop()` ends the open watches (else aiohttp waits for them
    on shutdown), logs any internal errors the emulator recorded, and closes the server; it is
    idempotent. Read ``emulator.errors`` BEFORE `stop()` if you want to assert on them.
    NB: kmock.Server patches aiohttp's resolver while it runs; stop servers in reverse order.
    """
    stack = contextlib.AsyncExitStack()
    try:
        await stack.enter_async_context(emulator)
        server = await stack.enter_async_context(kmock.Server(emulator, host=host, port=port))
    except BaseException:
        await stack.aclose()
        raise
    url = str(server.url).rstrip("/")
    stopped = False

    async def stop() -> None:
        nonlocal stopped
        if stopped:
            return
        stopped = True
        emulator.close_watches()
        for error in emulator.errors:
            logger.warning(
                "Kubernetes emulator error: %s",
                "".join(traceback.format_exception(error)).rstrip(),
            )
        await stack.aclose()

    return url, stop


@contextlib.asynccontextmanager
async def running_emulator(
    emulator: ClusterEmulator, *, host: str = "127.0.0.1", port: int | None = None
) -> AsyncIterator[str]:
    """``async with running_emulator(emulator) as url:`` — `serve_emulator` as a context."""
    url, stop = await serve_emulator(emulator, host=host, port=port)
    try:
        yield url
    finally:
        await stop()
