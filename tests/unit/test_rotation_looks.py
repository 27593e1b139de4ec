"""The rotations' look schedule: first look, wake on change, one look at a time, deletion,
peering. The look itself is a stand-in that records its calls (the e2e tests run real ones)."""

from __future__ import annotations

import asyncio
from typing import Any

from waiting import until
from zenml_operator.models import ROTATE_ANNOTATION
from zenml_operator.rotation_looks import RotationLooks, Tracked

HOUR = 3600.0


def body(uid: str = "u1", *, generation: int = 1, request: str = "", **status: Any) -> dict:
    annotations = {ROTATE_ANNOTATION: request} if request else {}
    meta = {"namespace": "ns", "name": f"rot-{uid}", "uid": uid, "generation": generation}
    return {"metadata": {**meta, "annotations": annotations}, "status": status}


class Harness:
    def __init__(self, *, allowed: bool = True, delay: float = HOUR) -> None:
        self.looks: list[tuple[str, bool]] = []
        self.forgotten: list[tuple[str, str, str]] = []
        self.allowed = allowed
        self.delay = delay
        self.hold: asyncio.Event | None = None  # set: looks wait for it
        self.gone = False  # the look finds the object gone
        self.looks_obj = RotationLooks(
            look=self.look, allowed=self.allow, forgotten=self.forgotten.append, retry_delay=HOUR
        )

    async def look(self, tracked: Tracked, woken: bool) -> float | None:
        self.looks.append((tracked.ref[2], woken))
        if self.hold is not None:
            await self.hold.wait()
        return None if self.gone else self.delay

    async def allow(self, namespace: str) -> bool:
        return self.allowed


async def test_the_first_event_brings_a_look_by_status_and_the_next_waits_its_time() -> None:
    h = Harness()
    h.looks_obj.seen(body(nextRotationTime="2030-01-01T00:00:00Z"), None)
    await until(lambda: h.looks == [("u1", False)], "the first look")
    tracked = h.looks_obj.tracked["u1"]
    assert tracked.next_rotation is not None and tracked.next_rotation.year == 2030
    due = h.looks_obj.schedule.due_in("u1")
    assert due is not None and due > HOUR - 5  # the look's answer: an hour
    await h.looks_obj.aclose()


async def test_a_status_event_does_not_wake_and_a_spec_or_request_change_does() -> None:
    h = Harness()
    looks = h.looks_obj
    looks.seen(body(), None)
    await until(lambda: len(h.looks) == 1, "the first look")
    looks.seen(body(rotationCount=1), "MODIFIED")  # the operator's own status write
    assert looks.schedule.due_in("u1") > HOUR - 5
    looks.seen(body(generation=2), "MODIFIED")
    await until(lambda: h.looks[-1:] == [("u1", True)], "a look after the spec change")
    looks.seen(body(generation=2, request="now"), "MODIFIED")
    await until(lambda: len(h.looks) == 3, "a look after the request")
    assert looks.tracked["u1"].request == "now"
    await looks.aclose()


async def test_a_change_during_a_look_makes_one_more_look_after_it() -> None:
    h = Harness()
    h.hold = asyncio.Event()
    looks = h.looks_obj
    looks.seen(body(), None)
    await until(lambda: len(h.looks) == 1, "the first look")
    looks.seen(body(generation=2), "MODIFIED")
    looks.seen(body(generation=3), "MODIFIED")
    await asyncio.sleep(0.05)  # give a wrong second look the chance to start
    assert len(h.looks) == 1  # never two looks of one rotation at once
    h.hold.set()
    await until(lambda: len(h.looks) == 2, "the look after the changes")
    assert h.looks[1] == ("u1", True)
    await looks.aclose()


async def test_deletion_stops_the_looks_and_drops_what_was_kept() -> None:
    h = Harness(delay=0.05)
    looks = h.looks_obj
    looks.seen(body(), None)
    await until(lambda: len(h.looks) >= 2, "looks every 50 ms")
    marked = body()
    marked["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    looks.seen(marked, "MODIFIED")
    assert h.forgotten == [("ns", "rot-u1", "u1")]
    assert "u1" not in looks.tracked and "u1" not in looks.schedule
    count = len(h.looks)
    looks.seen(body(), "DELETED")  # the last event: nothing new is tracked
    assert "u1" not in looks.tracked
    await asyncio.sleep(0.15)
    assert len(h.looks) <= count + 1  # at most the look in flight at the marking
    await looks.aclose()


async def test_no_look_while_a_peer_leads() -> None:
    h = Harness(allowed=False)
    looks = h.looks_obj
    looks.seen(body(), None)
    await until(lambda: (looks.schedule.due_in("u1") or 0) > HOUR - 5, "the retry scheduled")
    assert h.looks == []
    await looks.aclose()


async def test_wake_by_uid_and_an_unknown_uid_is_ignored() -> None:
    h = Harness()
    looks = h.looks_obj
    looks.seen(body(), None)
    await until(lambda: len(h.looks) == 1, "the first look")
    looks.wake("unknown")
    looks.wake("u1")  # what a Secret repair does for the rotations of its account
    await until(lambda: h.looks[-1:] == [("u1", True)], "the woken look")
    assert "unknown" not in looks.tracked
    await looks.aclose()


async def test_a_look_that_finds_the_object_gone_forgets_it() -> None:
    h = Harness()
    h.gone = True  # deleted while the watch was paused (a peer led): no DELETED event
    h.looks_obj.seen(body(), None)
    await until(lambda: h.forgotten == [("ns", "rot-u1", "u1")], "forgotten")
    assert "u1" not in h.looks_obj.tracked and "u1" not in h.looks_obj.schedule
    await h.looks_obj.aclose()
