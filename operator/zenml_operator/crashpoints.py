"""Named step boundaries where tests inject a crash (a no-op in production).

`await crashpoint("rotation.after-create")` costs one dict lookup when nothing is armed.
Tests arm a point with a callable that raises; the error propagates like a process kill
would cut the handler short (nothing after the point runs). An action may also return an
awaitable (e.g. to hold the handler at the point while a test races it); it is awaited.

Every point is a string literal at its call site, named `<area>.<step>`; the reliability
tests find them in the source and fail when one has no crash scenario (or was renamed).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

Action = Callable[[str], Awaitable[None] | None]

_armed: dict[str, Action] = {}
# Every point the code passed, for the suites that count coverage of injection points.
seen: set[str] = set()


class SimulatedCrash(BaseException):
    """BaseException, so no `except Exception` in the operator swallows it."""


async def crashpoint(name: str) -> None:
    seen.add(name)
    action = _armed.pop(name, None)
    if action is not None:
        result = action(name)
        if inspect.isawaitable(result):
            await result


def arm(name: str, action: Action | None = None) -> None:
    """Crash once at `name` (default action: raise SimulatedCrash)."""

    def crash(point: str) -> None:
        raise SimulatedCrash(point)

    _armed[name] = action or crash


def disarm_all() -> None:
    _armed.clear()
