"""Keys due at times, and one task that hands each key over when its time comes.

The operator's periodic work (a ServiceAccount's resync, a rotation's next look) is one entry
here per object, not one Kopf timer or daemon per object: a Kopf timer is a task with its own
coroutine chain, live body and stop flags, ~12 KB per object; an entry is a heap item and a
dict slot. One task sleeps until the earliest due time and calls `fire(key)` for every key
that is due, in due order.

A key has at most one due time: `set` moves it, `discard` drops it. The heap keeps superseded
items until they surface (a stale item is one whose time is not the key's current one), and
is rebuilt when they outnumber the live ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
Fire = Callable[[K], Awaitable[None]]

logger = logging.getLogger(__name__)


class DueSchedule(Generic[K]):
    def __init__(self, fire: Fire[K], *, name: str, clock: Callable[[], float] = time.monotonic):
        self._fire = fire
        self._name = name
        self._clock = clock
        self._due: dict[K, float] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._order = itertools.count()  # ties: first set, first fired; keys never compared
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, key: object) -> bool:
        return key in self._due

    def due_in(self, key: K) -> float | None:
        """Seconds until `key` is due (negative: overdue), None when not scheduled."""
        due = self._due.get(key)
        return None if due is None else due - self._clock()

    def set(self, key: K, delay: float) -> None:
        """Make `key` due `delay` seconds from now (replacing its earlier time, if any)."""
        due = self._clock() + max(0.0, delay)
        earliest = self._heap[0][0] if self._heap else None
        self._due[key] = due
        heapq.heappush(self._heap, (due, next(self._order), key))
        if len(self._heap) > 2 * len(self._due) + 64:
            self._compact()
        if earliest is None or due < earliest:
            self._changed.set()  # the task sleeps until a later time: wake it
        self._ensure_task()

    def setdefault(self, key: K, delay: float) -> None:
        """`set`, unless the key is already scheduled."""
        if key not in self._due:
            self.set(key, delay)

    def discard(self, key: K) -> None:
        self._due.pop(key, None)  # its heap item goes stale

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._due.clear()
        self._heap.clear()

    def _compact(self) -> None:
        self._heap = [item for item in self._heap if self._due.get(item[2]) == item[0]]
        heapq.heapify(self._heap)

    def _ensure_task(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=self._name)

    async def _run(self) -> None:
        while True:
            self._changed.clear()
            now = self._clock()
            while self._heap and self._heap[0][0] <= now:
                due, _, key = heapq.heappop(self._heap)
                if self._due.get(key) != due:
                    continue  # superseded or discarded
                del self._due[key]
                try:
                    await self._fire(key)
                except Exception:  # a bug: log it and keep the schedule running
                    logger.exception(f"{self._name}: handling {key!r} failed")
            while self._heap and self._due.get(self._heap[0][2]) != self._heap[0][0]:
                heapq.heappop(self._heap)  # stale heads: do not wake up for them
            timeout = self._heap[0][0] - self._clock() if self._heap else None
            if timeout is None or timeout > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout)
