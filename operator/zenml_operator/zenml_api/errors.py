"""What a failed ZenML call raises, chosen by HTTP status, with a message safe to log.

Callers decide by type (retry, report, give up); the message names the method, the path
and a short, redacted server `detail`, never request bodies, API key values or tokens.
"""

from __future__ import annotations

import re

import httpx

from zenml_operator.zenml_api.secrecy import redact

_MAX_DETAIL = 300
_VALIDATION_ITEM = re.compile(r"'loc': \(([^)]*)\), 'msg': '([^']*)'")


class ZenMLError(Exception):
    """A ZenML call failed. The message never contains request bodies or key values."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        method: str | None = None,
        path: str | None = None,
        detail: str = "",
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.method = method
        self.path = path
        self.detail = detail


class NotFoundError(ZenMLError):
    """404: the service account or API key does not exist."""


class ConflictError(ZenMLError):
    """409: an object with that name already exists."""


class ForbiddenError(ZenMLError):
    """403: the operator's identity may not do this (on ZenML OSS: not an admin), or the
    server refuses the operation (e.g. deleting an account that owns resources)."""


class UnauthorizedError(ZenMLError):
    """401: the operator's credential or token was rejected."""


class UnavailableError(ZenMLError):
    """Connection errors, timeouts or 5xx, after the allowed retries."""


class BadRequestError(ZenMLError):
    """400/422: the server rejected the request as invalid."""


_STATUS_ERRORS: dict[int, type[ZenMLError]] = {
    400: BadRequestError,
    401: UnauthorizedError,
    403: ForbiddenError,
    404: NotFoundError,
    409: ConflictError,
    422: BadRequestError,
}


def detail_text(response: httpx.Response) -> str:
    """A short, safe summary of the server's error detail.

    ZenML answers `{"detail": [<ExceptionType>, <message>]}` for most errors but a bare
    `[<ExceptionType>, <message>]` for validation errors, whose message embeds the
    request body as `'input': {...}`: for those keep only the field locations and
    messages, never the input.
    """
    try:
        payload = response.json()
    except ValueError:
        return ""
    detail = payload.get("detail", payload) if isinstance(payload, dict) else payload
    if isinstance(detail, list) and len(detail) == 2 and all(isinstance(x, str) for x in detail):
        text = detail[1]
    elif isinstance(detail, str):
        text = detail
    elif isinstance(detail, list):  # FastAPI's own validation format
        items = [d for d in detail if isinstance(d, dict)]
        text = "; ".join(
            f"{'.'.join(str(p) for p in d.get('loc', ()))}: {d.get('msg', '')}" for d in items
        )
    else:
        return ""
    fields = _VALIDATION_ITEM.findall(text)
    if fields:
        text = "; ".join(
            f"{'.'.join(p.strip().strip(chr(39)) for p in loc.split(',') if p.strip())}: {msg}"
            for loc, msg in fields
        )
    text = redact(text.strip().splitlines()[0] if text.strip() else "").strip("\"' ")
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


# A create that lost a race for a name inside ZenML (its look-up said free, the insert found
# it taken) answers 500 with the database's unique-constraint error, not 409 (seen with
# sqlite: two resources with one spec.name applied at once). Nothing was created: a conflict.
_DUPLICATE_INSERT = re.compile(r"IntegrityError.*(UNIQUE constraint failed|Duplicate entry)")


def error_for(response: httpx.Response, method: str, path: str) -> ZenMLError:
    """The error for a failed response: its type from the status (5xx: unavailable)."""
    status = response.status_code
    detail = detail_text(response)
    message = f"ZenML {method} {path} failed with HTTP {status}"
    if detail:
        message += f": {detail}"
    if status >= 500 and _DUPLICATE_INSERT.search(detail):
        cls: type[ZenMLError] = ConflictError
    elif status >= 500:
        cls = UnavailableError
    else:
        cls = _STATUS_ERRORS.get(status, ZenMLError)
    return cls(message, status_code=status, method=method, path=path, detail=detail)
