"""Pytest plugin: secret hygiene for every test that runs an emulated cluster.

Every API key value the operator wrote into a Secret (every version of every Secret in each
test's emulated cluster, values that look like ZenML keys) is collected for the session, and
each test's observable output is searched for every value collected so far (its own and
earlier tests'), by the value's last 16 characters (so a truncated copy counts too), in
everything but Secret data that a user, a log collector or a GitOps tool could see:

- the logs of the test, with the operator's and Kopf's loggers at DEBUG while it runs;
- the test's captured stdout and stderr;
- every version of every object (Events, statuses, annotations, metadata; Secrets without
  their `data`).

A hit fails the test at teardown, naming where (never the value). The session's totals are
printed at the end ("secret hygiene: ..."). Tests without a `cluster` fixture issue no value
here and are not scanned.

Enable with `pytest_plugins = ["hygiene"]` (tests on the Python path).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

# Loggers set to DEBUG while a scanned test runs (what an operator run with --verbose logs).
DEBUG_LOGGERS = ("zenml_operator", "zenml_devstack", "kopf")
KEY_PREFIX = "ZENKEY_"  # how a ZenML API key value starts
TAIL = 16


@dataclass
class Scan:
    """What one test issued and showed."""

    values: set[str] = field(default_factory=set)
    texts: dict[str, list[str]] = field(default_factory=dict)

    def add(self, where: str, text: str) -> None:
        if text:
            self.texts.setdefault(where, []).append(text)

    def hits(self, values: set[str]) -> dict[str, int]:
        """Where (and how often) one of `values` or its tail was seen; empty when clean."""
        found: dict[str, int] = {}
        tails = {v[-TAIL:] for v in values}
        for where, parts in self.texts.items():
            text = "\n".join(parts)
            count = sum(text.count(t) for t in tails)  # a full value holds its tail
            if count:
                found[where] = count
        return found

    def size(self) -> int:
        return sum(len(t) for parts in self.texts.values() for t in parts)


@dataclass
class Totals:
    tests: int = 0
    values: set[str] = field(default_factory=set)  # every value issued in the session
    characters: int = 0
    hits: dict[str, dict[str, int]] = field(default_factory=dict)  # test id -> where -> n


class _Collect(logging.Handler):
    def __init__(self, scan: Scan) -> None:
        super().__init__(logging.DEBUG)
        self.scan = scan

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a bad format string is not ours to judge here
            text = str(record.msg)
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.scan.add("logs", text)


_SCANS = pytest.StashKey[Scan]()
_TOTALS = pytest.StashKey[Totals]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_TOTALS] = Totals()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    if "cluster" not in getattr(item, "fixturenames", ()):
        yield
        return
    scan = item.stash[_SCANS] = Scan()
    handler = _Collect(scan)
    root = logging.getLogger()
    levels = {name: logging.getLogger(name).level for name in DEBUG_LOGGERS}
    root.addHandler(handler)
    for name in DEBUG_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield
    finally:
        root.removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def pytest_fixture_post_finalizer(fixturedef: pytest.FixtureDef[Any], request: Any) -> None:
    """When a test's `cluster` goes away, collect what it issued and what it showed."""
    if fixturedef.argname != "cluster" or fixturedef.cached_result is None:
        return
    scan = request.node.stash.get(_SCANS, None)
    cluster = fixturedef.cached_result[0]
    if scan is None or cluster is None:
        return
    objects = []
    for change in list(cluster.emulator._history):
        obj = change.event["object"]
        if change.resource.plural == "secrets":
            for raw in (obj.get("data") or {}).values():
                text = base64.b64decode(raw).decode(errors="replace")
                if text.startswith(KEY_PREFIX):
                    scan.values.add(text)
            obj = {k: v for k, v in obj.items() if k != "data"}  # metadata is observable
        objects.append(json.dumps(obj))
    scan.add("objects", "\n".join(objects))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    scan = item.stash.get(_SCANS, None)
    if scan is None:
        return
    if call.when != "teardown":
        return
    report: pytest.TestReport = outcome.get_result()
    scan.add("stdout", report.capstdout)  # the teardown report holds every phase's capture
    scan.add("stderr", report.capstderr)
    totals = item.config.stash[_TOTALS]
    totals.tests += 1
    totals.values |= scan.values
    totals.characters += scan.size()
    hits = scan.hits(totals.values) if totals.values else {}
    item.stash[_SCANS] = Scan()  # free the texts
    if hits:
        totals.hits[item.nodeid] = hits
        report.outcome = "failed"
        report.longrepr = (
            f"secret hygiene: API key values issued in this session appear outside Secret data: "
            f"{hits} (hits per place: the value or its last {TAIL} characters)"
        )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    totals = terminalreporter.config.stash.get(_TOTALS, None)
    if totals is None or not totals.tests:
        return
    terminalreporter.write_line(
        f"secret hygiene: {len(totals.values)} API key values issued in {totals.tests} tests"
        f" with an emulated cluster, searched for in {totals.characters} characters of DEBUG"
        f" logs, output and objects: {sum(sum(h.values()) for h in totals.hits.values())} hits"
    )
