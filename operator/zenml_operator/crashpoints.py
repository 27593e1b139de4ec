"""Named step boundaries where tests inject a crash (a no-op in production).

`await crashpoint("rotation.after-create")` costs one dict lookup when nothing is armed.
Tests arm a point with a callable that raises; the error propagates like a process kill
would cut the handler short (nothing after the point runs).
"""

from __future__ import annotations

from collections.abc import Callable

_armed: dict[str, Callable[[str], None]] = {}
# Every point the code passed, for the suites that count coverage of injection points.
seen: set[str] = set()


class SimulatedCrash(BaseException):
    """BaseException, so no `except Exception` in the operator swallows it."""


async def crashpoint(name: str) -> None:
    seen.add(name)
    action = _armed.pop(name, None)
    if action is not None:
        action(name)


def arm(name: str, action: Callable[[str], None] | None = None) -> None:
    """Crash once at `name` (default action: raise SimulatedCrash)."""

    def crash(point: str) -> None:
        raise SimulatedCrash(point)

    _armed[name] = action or crash


def disarm_all() -> None:
    _armed.clear()
