"""Times as the operator writes and reads them: RFC 3339 in UTC, to the second, with `Z`
(as Kubernetes writes times). One parser for status fields and Secret annotations."""

from __future__ import annotations

import datetime
import re

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(h|m|s)")


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def now_iso() -> str:
    return iso(utcnow())


def parse_time(text: str | None) -> datetime.datetime | None:
    """A time this module wrote (or any ISO 8601 time; naive ones are taken as UTC)."""
    if not text:
        return None
    value = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)


def parse_duration(text: str) -> datetime.timedelta:
    """Go-style durations as Kubernetes CEL reads them: 720h, 1h30m, 90s."""
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r} (use e.g. 720h, 90m, 45s)")
    unit = {"h": 3600.0, "m": 60.0, "s": 1.0}
    return datetime.timedelta(seconds=sum(float(n) * unit[u] for n, u in parts))
