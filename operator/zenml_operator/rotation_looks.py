"""When each ApiKeyRotation is looked at next: one schedule for all of them, fed by Kopf's
watch events (a raw on.event handler), instead of a sleeping Kopf daemon per rotation.

A rotation is tracked from its first event (an operator start lists every object) until it
is deleted or marked for deletion. Its first look comes at once; after a look, the next one
comes when the look says (a rotation or a retention end due, a retry, at the latest one
resync interval). A change of its spec or of its on-demand annotation brings the next look
forward to now; a change during a look makes another one right after it. At most one look
per rotation runs at a time.

What a look needs to decide its lane before reading the object (policies.
rotation_look_in_background) is kept from the last event: the status's next rotation time,
and the on-demand request with the last one answered.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from zenml_operator.due import DueSchedule
from zenml_operator.models import ROTATE_ANNOTATION, ObjectRef
from zenml_operator.timestamps import parse_time

STOP_GRACE = 5.0  # seconds a look in flight may finish at operator stop before it is cancelled

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Tracked:
    """One rotation, as its last watch event showed it."""

    ref: ObjectRef
    seen: tuple[Any, str] = (None, "")  # (generation, on-demand request): a change wakes it
    next_rotation: datetime.datetime | None = None
    answered_request: str = ""
    woken: bool = False  # changed since its last look started
    running: bool = False

    @property
    def request(self) -> str:
        return self.seen[1]


# A look: (the rotation, woken by a change) -> seconds until the next one; None: it is gone
# (deleted while a peer led and this operator's watch was paused: no DELETED event came).
Look = Callable[[Tracked, bool], Awaitable[float | None]]
Allowed = Callable[[str], Awaitable[bool]]  # may this operator act in the namespace (peering)
Forgotten = Callable[[ObjectRef], None]


@dataclass
class RotationLooks:
    look: Look
    allowed: Allowed
    forgotten: Forgotten  # a rotation is no longer tracked: drop what is kept for it
    retry_delay: float
    tracked: dict[str, Tracked] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.schedule: DueSchedule[str] = DueSchedule(self._due, name="zenml-operator rotations")

    # --- from the watch ---------------------------------------------------------------------

    def seen(self, body: Mapping[str, Any], event_type: str | None) -> None:
        """Every watch event of an ApiKeyRotation (no I/O here)."""
        meta = body.get("metadata") or {}
        uid = str(meta.get("uid") or "")
        if event_type == "DELETED" or meta.get("deletionTimestamp"):
            self.forget(uid)
            return
        status = body.get("status") or {}
        request = ((meta.get("annotations") or {}).get(ROTATE_ANNOTATION) or "").strip()
        seen = (meta.get("generation"), request)
        tracked = self.tracked.get(uid)
        first = tracked is None
        if tracked is None:
            ref = (str(meta.get("namespace")), str(meta.get("name")), uid)
            tracked = self.tracked[uid] = Tracked(ref, seen)
        tracked.next_rotation = parse_time(status.get("nextRotationTime"))
        tracked.answered_request = str(status.get("lastRotateRequest") or "")
        if first:
            self.schedule.set(uid, 0)  # the first look: by its status, as the later ones
        elif seen != tracked.seen:
            tracked.seen = seen
            self.wake(uid)

    def wake(self, uid: str) -> None:
        """Look at this rotation now, or right after its look in flight (whose end would
        otherwise schedule the next one later)."""
        tracked = self.tracked.get(uid)
        if tracked is not None:
            tracked.woken = True
            if not tracked.running:
                self.schedule.set(uid, 0)

    def forget(self, uid: str) -> None:
        tracked = self.tracked.pop(uid, None)
        self.schedule.discard(uid)
        if tracked is not None:
            self.forgotten(tracked.ref)

    # --- the looks ---------------------------------------------------------------------------

    async def _due(self, uid: str) -> None:
        tracked = self.tracked.get(uid)
        if tracked is None or tracked.running:
            return
        # Kopf stops its daemons while a peer of higher priority runs; this is no daemon.
        if not await self.allowed(tracked.ref[0]):
            self.schedule.set(uid, self.retry_delay)
            return
        tracked.running = True
        task = asyncio.create_task(self._run(tracked), name=f"zenml-operator look {uid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, tracked: Tracked) -> None:
        woken, tracked.woken = tracked.woken, False
        try:
            delay = await self.look(tracked, woken)
        except Exception:  # the look reports its own problems; this is a bug: look again later
            logger.exception(f"Look at ApiKeyRotation {tracked.ref[0]}/{tracked.ref[1]} failed")
            delay = self.retry_delay
        finally:
            tracked.running = False
        uid = tracked.ref[2]
        if self.tracked.get(uid) is not tracked:
            return  # deleted meanwhile
        if delay is None:
            self.forget(uid)
        else:
            self.schedule.set(uid, 0 if tracked.woken else delay)

    async def aclose(self) -> None:
        await self.schedule.aclose()
        tasks = set(self._tasks)
        if tasks:  # a look in flight may finish (its writes are crash-safe either way)
            _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self.tracked.clear()
