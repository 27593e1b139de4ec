"""Background checks of ServiceAccounts: a de-duplicated queue drained by a few workers.

Kopf runs the handlers of one object one after the other. A resume handler that waited for
its turn in a paced wave would hold back that object's next change, so the resume of a
converged object (and every resync) only puts the object here and returns. A few workers
run the checks in `pacing.background_lane()`: their ZenML requests are paced, and no check
takes a reconcile slot that new or changed objects need. An object already waiting is not
queued twice; a check that ends in a problem that may heal itself is queued again after the
retry delay (what Kopf's retry did for the handler).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from zenml_operator.zenml_api.pacing import background_lane

# A check returns True when it should run again after the retry delay.
Check = Callable[[], Awaitable[bool]]

logger = logging.getLogger(__name__)


class BackgroundChecks:
    def __init__(self, *, workers: int, retry_delay: float) -> None:
        self.workers = max(1, workers)
        self.retry_delay = retry_delay
        self._queue: asyncio.Queue[tuple[str, Check]] = asyncio.Queue()
        self._pending: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._retries: set[asyncio.TimerHandle] = set()
        self._closed = False

    @property
    def waiting(self) -> int:
        """Checks queued and not started yet."""
        return self._queue.qsize()

    def submit(self, key: str, check: Check) -> None:
        """Queue a check of `key` (an object uid) unless one is already waiting."""
        if self._closed or key in self._pending:
            return
        self._pending.add(key)
        self._queue.put_nowait((key, check))
        self._ensure_workers()

    def _ensure_workers(self) -> None:
        # Started lazily (in the operator's context, from its first handler); a worker that
        # died of something other than an Exception (a simulated crash in tests) is replaced.
        self._tasks = {t for t in self._tasks if not t.done()}
        while len(self._tasks) < self.workers:
            self._tasks.add(asyncio.create_task(self._work(), name="zenml-operator background"))

    async def _work(self) -> None:
        while True:
            key, check = await self._queue.get()
            self._pending.discard(key)
            try:
                with background_lane():
                    again = await check()
            except Exception:  # a bug: log it, keep the worker, look again later
                logger.exception(f"Background check of {key} failed unexpectedly; retrying")
                again = True
            if again and not self._closed:
                self._later(key, check)

    def _later(self, key: str, check: Check) -> None:
        loop = asyncio.get_running_loop()

        def resubmit() -> None:
            self._retries.discard(handle)
            self.submit(key, check)

        handle = loop.call_later(self.retry_delay, resubmit)
        self._retries.add(handle)

    async def aclose(self) -> None:
        self._closed = True
        for handle in self._retries:
            handle.cancel()
        self._retries.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
