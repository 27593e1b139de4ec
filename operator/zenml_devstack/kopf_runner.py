"""Run a Kopf operator in the background of the current event loop (tests and the demo).

Usage::

    registry = kopf.OperatorRegistry()
    add_login_handler(registry, server=emulator_url)   # or your own @kopf.on.login
    ...register handlers with registry=registry...
    operator = await start_operator(registry=registry, namespaces=["default"])
    ...
    await operator.stop()          # a kill: cancellation, no cleanup handlers
    await operator.stop(graceful=True)  # a SIGTERM: Kopf's stop-flag, cleanup handlers run

Why not ``kopf.operator()``: on cancellation Kopf's ``run_tasks()`` cancels every task of the
event loop that it does not know to be foreign ("hung tasks"): the HTTP server of the emulator,
the connections of the test's own client, pytest-asyncio's teardown (trap 5 of DESIGN.md), or a
second operator. Here Kopf gets an ``ignored`` collection that contains every task that was NOT
created from inside this operator, tracked with a context variable and a task factory, so that
stopping one operator touches exactly its own tasks.

Settings applied before the caller's hook: ``scanning.disabled`` (exact namespaces, no
namespace/CRD watching; trap 2), standalone (no peering). Forced after the hook:
``process.ultimate_exiting_timeout = None``, because Kopf otherwise schedules a SIGKILL of the
whole process 10 minutes after an operator is cancelled without its stop-flag.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import signal
import threading
import weakref
from collections.abc import Callable, Collection, Iterator
from types import TracebackType
from typing import Any, Self

import kopf

# NB: private Kopf modules, for objects that spawn_tasks() accepts as arguments: Insights is
# the only way to learn that the initial resource discovery has finished, and owning the Vault
# lets kill() close the HTTP sessions that a skipped cleanup leaves open (as a dead process would).
from kopf._cogs.structs.credentials import Vault
from kopf._cogs.structs.references import Insights

logger = logging.getLogger(__name__)

_OWNER: contextvars.ContextVar[BackgroundOperator | None] = contextvars.ContextVar(
    "zenml_operator_kopf_runner_owner", default=None
)
_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_ACTIVITIES_TASK = "startup/cleanup activities"  # the name kopf.spawn_tasks() gives it


class _TrackingTaskFactory:
    """A task factory that records which tasks are created from inside a BackgroundOperator.

    asyncio copies the creator's context into each new task, so every descendant task of the
    operator's main task sees the operator in `_OWNER`. (Python 3.12 has ``Task.get_context()``;
    3.11 does not, hence the factory.) Tasks created by the HTTP server's accept callbacks carry
    the server's context and so are never counted as the operator's.
    """

    def __init__(self, previous: Any) -> None:
        self._previous = previous

    def __call__(
        self, loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any
    ) -> asyncio.Future[Any]:
        if self._previous is not None:
            task = self._previous(loop, coro, **kwargs)
        else:
            task = asyncio.Task(coro, loop=loop, **kwargs)
        context: contextvars.Context | None = kwargs.get("context")
        owner = context.get(_OWNER) if context is not None else _OWNER.get()
        if owner is not None and isinstance(task, asyncio.Task):
            owner._tasks.add(task)
        return task


def _ensure_task_tracking(loop: asyncio.AbstractEventLoop) -> None:
    current = loop.get_task_factory()
    if not isinstance(current, _TrackingTaskFactory):
        loop.set_task_factory(_TrackingTaskFactory(current))


class _ForeignTasks(Collection[asyncio.Task[Any]]):
    """The `ignored` argument of ``kopf.run_tasks()``: every task the operator did not create.

    Kopf only asks ``task in ignored``; iteration is provided for completeness.
    """

    def __init__(self, own: weakref.WeakSet[asyncio.Task[Any]]) -> None:
        self._own = own

    def __contains__(self, task: object) -> bool:
        return task not in self._own

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter([task for task in asyncio.all_tasks() if task not in self._own])

    def __len__(self) -> int:
        return sum(1 for _ in self)


class BackgroundOperator:
    """A Kopf operator running as a task of the current event loop; see the module docstring.

    Handlers run on the same event loop as the caller (and as an in-process emulator): an
    ``async def`` handler must never block (trap 6); plain ``def`` handlers run in Kopf's
    thread pool.
    """

    def __init__(
        self,
        *,
        registry: kopf.OperatorRegistry,
        namespaces: list[str],
        settings: kopf.OperatorSettings,
        memo: object | None = None,
        handle_signals: bool = False,
    ) -> None:
        self.registry = registry
        self.namespaces = list(namespaces)
        self.settings = settings
        self.memo = memo
        self.handle_signals = handle_signals
        self._tasks: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
        self._ready_flag = asyncio.Event()
        self._stop_flag = asyncio.Event()
        self._insights = Insights()
        self._vault = Vault()
        self._task: asyncio.Task[None] | None = None
        self._root_tasks: list[asyncio.Task[Any]] = []

    async def start(self) -> None:
        """Spawn the operator in the background and return at once (see `wait_ready`)."""
        if self._task is not None:
            raise RuntimeError("The operator has already been started.")
        loop = asyncio.get_running_loop()
        _ensure_task_tracking(loop)
        context = contextvars.copy_context()
        context.run(_OWNER.set, self)
        self._task = loop.create_task(self._run(), name="kopf operator", context=context)

    async def _run(self) -> None:
        saved_signals = _save_signal_handlers()
        try:
            tasks = self._root_tasks = await kopf.spawn_tasks(
                registry=self.registry,
                settings=self.settings,
                # No namespaces: cluster-wide (said explicitly, else Kopf warns and guesses).
                namespaces=self.namespaces,
                clusterwide=not self.namespaces,
                # make_settings() says True; a settings hook may opt into peering (HA tests).
                standalone=self.settings.peering.standalone,
                memo=self.memo,
                ready_flag=self._ready_flag,
                stop_flag=self._stop_flag,
                insights=self._insights,
                vault=self._vault,
            )
            # spawn_tasks() took over SIGINT/SIGTERM of the loop; give them back so that Ctrl+C
            # still reaches pytest or the demo's own handling. With handle_signals, a signal
            # raises our stop-flag instead of Kopf's own signal future: the same graceful exit,
            # but without leaving Kopf's "stop-flag waiter" task hung for 5 s.
            _restore_signal_handlers(saved_signals)
            if self.handle_signals and saved_signals:
                loop = asyncio.get_running_loop()
                for sig in _HANDLED_SIGNALS:
                    loop.add_signal_handler(sig, self._stop_flag.set)
            await kopf.run_tasks(tasks, ignored=_ForeignTasks(self._tasks))
        finally:
            _restore_signal_handlers(saved_signals)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def wait_ready(self, timeout: float | None = 10.0) -> None:
        """Wait until the startup handlers ran and resources and namespaces are discovered.

        Raises the operator's own failure if it exits first, TimeoutError on timeout.
        Objects created before the watch-streams start are not missed: Kopf lists them first.
        """
        if self._task is None:
            raise RuntimeError("The operator is not started.")

        async def all_ready() -> None:
            await self._ready_flag.wait()
            await self._insights.ready_resources.wait()
            await self._insights.ready_namespaces.wait()

        waiter = asyncio.ensure_future(all_ready())
        try:
            done, _ = await asyncio.wait(
                {waiter, self._task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waiter.cancel()
        if waiter in done:
            return
        if self._task in done:
            if not self._task.cancelled() and self._task.exception() is not None:
                raise RuntimeError("The operator exited before it was ready.") from (
                    self._task.exception()
                )
            raise RuntimeError("The operator exited before it was ready.")
        raise TimeoutError(f"The operator was not ready in {timeout} seconds.")

    async def stop(self, *, graceful: bool = False, timeout: float = 10.0) -> None:
        """Stop the operator: cancel it as a kill would, or raise Kopf's stop-flag if graceful.

        Idempotent. Re-raises a failure of the operator (other than its cancellation).
        """
        task = self._task
        if task is None:
            return
        if not task.done():
            if graceful:
                self._stop_flag.set()
            else:
                task.cancel()
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done:
                raise TimeoutError(f"The operator did not stop in {timeout} seconds.")
            if not graceful:
                await self._cancel_leftovers(timeout)
        failure = None if task.cancelled() else task.exception()
        if failure is not None:
            raise failure

    async def _cancel_leftovers(self, timeout: float) -> None:
        """Cancel every task this operator created that is still running, as a killed
        process would leave none: tasks the handlers spawned outside Kopf's knowledge (a
        Secret watch, its repairs, background checks), and Kopf's own when its shutdown was
        cut short (a handler's crash stops Kopf while the cancellation is still on its way)."""
        current = asyncio.current_task()
        leftovers = {t for t in list(self._tasks) if not t.done() and t is not current}
        for leftover in leftovers:
            leftover.cancel()
        if leftovers:
            await asyncio.wait(leftovers, timeout=timeout)

    async def kill(self, *, timeout: float = 10.0) -> None:
        """Stop as a SIGKILL would: in-flight handlers are interrupted, cleanup handlers skipped.

        Kopf's own cancellation (`stop`) still runs the ``@kopf.on.cleanup`` handlers once the
        root tasks are gone; a crashed or killed pod would not. Use this to test restarts after
        a crash in the middle of a handler.
        """
        task = self._task
        if task is not None and not task.done():
            # Kopf's startup/cleanup task swallows its first cancellation (to run the cleanup
            # handlers after the other root tasks); a second one makes it skip them.
            activities = [t for t in self._root_tasks if t.get_name() == _ACTIVITIES_TASK]
            task.cancel()
            for activity in activities:
                activity.cancel()
            await asyncio.sleep(0)  # one loop step: the first cancellation is swallowed
            for activity in activities:
                activity.cancel()
        try:
            await self.stop(timeout=timeout)
        finally:
            await self._vault.close()  # else aiohttp warns of unclosed sessions at exit

    async def wait(self) -> None:
        """Wait until the operator exits on its own (e.g. on a signal with handle_signals)."""
        if self._task is None:
            raise RuntimeError("The operator is not started.")
        await asyncio.wait({self._task})
        await self.stop()  # surfaces a failure, if any

    async def __aenter__(self) -> Self:
        if self._task is None:
            await self.start()
        await self.wait_ready()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()


def make_settings(
    settings_hook: Callable[[kopf.OperatorSettings], None] | None = None,
) -> kopf.OperatorSettings:
    """The operator settings for tests and the demo (see the module docstring)."""
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = True
    settings.peering.standalone = True
    if settings_hook is not None:
        settings_hook(settings)
    settings.process.ultimate_exiting_timeout = None
    return settings


async def start_operator(
    *,
    registry: kopf.OperatorRegistry,
    namespaces: list[str],
    settings_hook: Callable[[kopf.OperatorSettings], None] | None = None,
    memo: object | None = None,
    handle_signals: bool = False,
    ready_timeout: float | None = 10.0,
) -> BackgroundOperator:
    """Start a BackgroundOperator; wait until it is ready unless ``ready_timeout`` is None.

    `namespaces` are exact names (scanning is disabled); an empty list means cluster-wide.

    The registry must contain a ``@kopf.on.login(registry=registry)`` handler (for instance
    from `add_login_handler`): nothing here decides which cluster to talk to.
    """
    operator = BackgroundOperator(
        registry=registry,
        namespaces=namespaces,
        settings=make_settings(settings_hook),
        memo=memo,
        handle_signals=handle_signals,
    )
    await operator.start()
    if ready_timeout is not None:
        try:
            await operator.wait_ready(timeout=ready_timeout)
        except BaseException:
            await operator.stop()
            raise
    return operator


def add_login_handler(
    registry: kopf.OperatorRegistry, *, server: str, default_namespace: str = "default"
) -> None:
    """Register a login handler that points Kopf at `server` (an emulator) with no auth."""

    @kopf.on.login(registry=registry)
    def login_to_emulator(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(
            server=server, insecure=True, default_namespace=default_namespace
        )


def _save_signal_handlers() -> dict[signal.Signals, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in _HANDLED_SIGNALS}


def _restore_signal_handlers(saved: dict[signal.Signals, Any]) -> None:
    if not saved:
        return
    loop = asyncio.get_running_loop()
    for sig, handler in saved.items():
        # Drop the loop-level handler Kopf added (if still there), then put back the previous
        # Python-level one. A loop-level handler that existed before Kopf's is not recoverable.
        loop.remove_signal_handler(sig)
        if handler is not None:
            signal.signal(sig, handler)
