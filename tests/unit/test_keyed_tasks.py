"""Reconciles handed over by Kopf's handlers: one task per key, again after a change, retries."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable

from waiting import until
from zenml_operator.keyed_tasks import KeyedTasks


class Runs:
    """A run that records itself, can be held at its start, and asks for N retries."""

    def __init__(self, *, retries: int = 0) -> None:
        self.started = 0
        self.in_flight = 0
        self.most_at_once = 0
        self.retries = retries
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self) -> bool:
        self.started += 1
        self.in_flight += 1
        self.most_at_once = max(self.most_at_once, self.in_flight)
        try:
            await self.release.wait()
        finally:
            self.in_flight -= 1
        if self.retries:
            self.retries -= 1
            return True
        return False


async def held(tasks: KeyedTasks, run: Runs, key: str = "a") -> None:
    """Hand `run` over for `key` and return once it runs, held until `run.release`."""
    run.release.clear()
    tasks.submit(key, run)
    await until(lambda: run.in_flight >= 1, "a held run")


async def test_a_key_runs_once_and_its_task_ends() -> None:
    tasks, run = KeyedTasks(retry_delay=60, name="test"), Runs()
    tasks.submit("a", run)
    await until(lambda: run.started == 1 and tasks.running == 0, "one run")
    await tasks.aclose()


async def test_a_hand_over_during_a_run_runs_once_more_after_it_never_beside_it() -> None:
    tasks, run = KeyedTasks(retry_delay=60, name="test"), Runs()
    await held(tasks, run)
    for _ in range(3):  # three changes while it runs: one more run covers them all
        tasks.submit("a", run)
    run.release.set()
    await until(lambda: tasks.running == 0, "the runs to end")
    assert run.started == 2 and run.most_at_once == 1
    await tasks.aclose()


async def test_the_run_after_a_hand_over_is_the_latest_one_handed_over() -> None:
    """A change may also change how the object is run (its server's slots, say)."""
    tasks, first = KeyedTasks(retry_delay=60, name="test"), Runs()
    second, third = Runs(), Runs()
    await held(tasks, first)
    tasks.submit("a", second)
    tasks.submit("a", third)
    first.release.set()
    await until(lambda: tasks.running == 0, "the runs to end")
    assert (first.started, second.started, third.started) == (1, 0, 1)
    await tasks.aclose()


async def test_keys_run_side_by_side() -> None:
    tasks, run = KeyedTasks(retry_delay=60, name="test"), Runs()
    run.release.clear()
    for key in "abc":
        tasks.submit(key, run)
    await until(lambda: run.in_flight == 3, "three keys at once")
    run.release.set()
    await until(lambda: tasks.running == 0, "the runs to end")
    await tasks.aclose()


async def test_a_run_that_asks_is_retried_after_the_delay() -> None:
    tasks, run = KeyedTasks(retry_delay=0.05, name="test"), Runs(retries=2)
    tasks.submit("a", run)
    await until(lambda: run.started == 3 and tasks.running == 0, "two retries")
    await asyncio.sleep(0.2)  # no retry is left: nothing more may run
    assert run.started == 3
    await tasks.aclose()


async def test_a_hand_over_while_a_retry_waits_runs_at_once() -> None:
    tasks, run = KeyedTasks(retry_delay=3600, name="test"), Runs(retries=1)
    tasks.submit("a", run)
    await until(lambda: run.started == 1 and tasks.running == 0, "the failed run")
    tasks.submit("a", run)  # a change: not an hour later
    await until(lambda: run.started == 2 and tasks.running == 0, "the run for the change")
    await tasks.aclose()


async def test_a_failing_run_is_logged_and_retried(caplog) -> None:  # type: ignore[no-untyped-def]
    calls = 0

    async def broken() -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug")
        return False

    tasks = KeyedTasks(retry_delay=0.05, name="test")
    tasks.submit("a", broken)
    await until(lambda: calls == 2 and tasks.running == 0, "the retry after the bug")
    assert "failed unexpectedly" in caplog.text
    await tasks.aclose()


async def test_close_cancels_runs_and_retries_and_refuses_new_ones() -> None:
    tasks, run = KeyedTasks(retry_delay=0.05, name="test"), Runs()
    await held(tasks, run)
    await tasks.aclose()
    assert run.in_flight == 0 and tasks.running == 0
    tasks.submit("b", run)
    assert tasks.running == 0


HANDLER_STATE: contextvars.ContextVar[str] = contextvars.ContextVar("handler_state", default="")


async def test_runs_keep_one_context_not_that_of_each_hand_over() -> None:
    """Kopf's context variables hold the handler's cause and body: a waiting run must not
    keep one per object alive. Runs take the context of the first hand-over (which has
    Kopf's event-posting variables), never a later handler's."""
    tasks = KeyedTasks(retry_delay=60, name="test")
    seen: dict[str, str] = {}

    def run_for(key: str) -> Callable[[], Awaitable[bool]]:
        async def run() -> bool:
            seen[key] = HANDLER_STATE.get()
            return False

        return run

    async def handler(key: str) -> None:
        HANDLER_STATE.set(f"the body of {key}")
        tasks.submit(key, run_for(key))

    for key in "abc":
        await asyncio.create_task(handler(key))
    await until(lambda: len(seen) == 3, "the runs")
    assert seen == {key: "the body of a" for key in "abc"}
    await tasks.aclose()
