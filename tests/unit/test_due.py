"""The due-time schedule behind resyncs: order, moves, discards, failures, bounded heap."""

from __future__ import annotations

import asyncio

from waiting import until
from zenml_operator.due import DueSchedule


def recorder() -> tuple[list[str], DueSchedule[str]]:
    fired: list[str] = []

    async def fire(key: str) -> None:
        fired.append(key)

    return fired, DueSchedule(fire, name="test")


async def test_keys_fire_once_each_in_due_order() -> None:
    fired, schedule = recorder()
    for key, delay in (("c", 0.15), ("a", 0.05), ("b", 0.1)):
        schedule.set(key, delay)
    assert len(schedule) == 3 and "a" in schedule
    await until(lambda: len(fired) == 3, "three keys")
    assert fired == ["a", "b", "c"]
    assert len(schedule) == 0
    await schedule.aclose()


async def test_moving_a_key_earlier_wakes_the_sleeping_task() -> None:
    fired, schedule = recorder()
    schedule.set("late", 3600)
    await asyncio.sleep(0)  # the task is asleep until the hour
    schedule.set("late", 0.01)
    await until(lambda: fired == ["late"], "the moved key")
    await schedule.aclose()


async def test_setdefault_keeps_the_earlier_time_and_discard_drops_a_key() -> None:
    fired, schedule = recorder()
    schedule.set("kept", 0.05)
    schedule.setdefault("kept", 3600)  # already scheduled: unchanged
    schedule.set("dropped", 0.02)
    schedule.discard("dropped")
    schedule.set("last", 0.1)
    await until(lambda: "last" in fired, "the last key")
    assert fired == ["kept", "last"]
    await schedule.aclose()


async def test_a_failing_key_does_not_stop_the_others() -> None:
    fired: list[str] = []

    async def fire(key: str) -> None:
        if key == "bad":
            raise RuntimeError("a bug")
        fired.append(key)

    schedule: DueSchedule[str] = DueSchedule(fire, name="test")
    schedule.set("bad", 0.01)
    schedule.set("good", 0.05)
    await until(lambda: fired == ["good"], "the key after a failure")
    await schedule.aclose()


async def test_a_key_set_again_from_its_own_fire_comes_back() -> None:
    fired: list[str] = []

    async def fire(key: str) -> None:
        fired.append(key)
        if len(fired) < 3:
            schedule.set(key, 0.01)  # what the resync does: the next round

    schedule: DueSchedule[str] = DueSchedule(fire, name="test")
    schedule.set("round", 0.01)
    await until(lambda: len(fired) == 3, "three rounds")
    await schedule.aclose()


async def test_moved_keys_do_not_pile_up_in_the_heap() -> None:
    _, schedule = recorder()
    for i in range(10_000):
        schedule.set(f"k{i % 10}", 3600 + i)
    assert len(schedule) == 10
    assert len(schedule._heap) <= 2 * 10 + 64 + 1
    await schedule.aclose()
