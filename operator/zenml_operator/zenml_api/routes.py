"""The ZenML REST routes the client calls: their prefix, safe path segments, and the route
templates that label the metrics.

A metric label never holds a name, an id or a path as sent, and the number of label values
stays bounded: only the routes below are recognised, anything else is `OTHER_ROUTE`.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

API_PREFIX = "/api/v1"
OTHER_ROUTE = f"{API_PREFIX}/other"

_VAR = None  # a variable segment in _ROUTES
_ROUTES: tuple[tuple[str | None, ...], ...] = (
    ("login",),
    ("current-user",),
    ("service_accounts",),
    ("service_accounts", _VAR),
    ("service_accounts", _VAR, "api_keys"),
    ("service_accounts", _VAR, "api_keys", _VAR),
    ("service_accounts", _VAR, "api_keys", _VAR, "rotate"),
)
_UUID = re.compile(r"^[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}$")


def segment(value: str) -> str:
    """Quote one path segment so names with '/' or '?' cannot change the route."""
    return quote(value, safe="")


def route_template(path: str) -> str:
    """The route of a request path with its variable parts collapsed, for metric labels.

    Only the routes this client calls are recognised, by position (an account named
    "rotate" stays a variable); a UUID becomes ``{id}`` and any other value ``{name}``, so
    a label never holds a name or an id and the number of label values stays bounded.
    Any other path is ``/api/v1/other``: a path is never echoed.
    """
    path = path.split("?", 1)[0]
    if not path.startswith(API_PREFIX + "/"):
        return OTHER_ROUTE
    segments = path[len(API_PREFIX) + 1 :].rstrip("/").split("/")
    for route in _ROUTES:
        if len(route) != len(segments):
            continue
        parts = []
        for expected, actual in zip(route, segments, strict=True):
            if expected is _VAR:
                if not actual:
                    break
                parts.append("{id}" if _UUID.match(unquote(actual)) else "{name}")
            elif expected == actual:
                parts.append(expected)
            else:
                break
        else:
            return "/".join((API_PREFIX, *parts))
    return OTHER_ROUTE
