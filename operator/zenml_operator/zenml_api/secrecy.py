"""Key values and tokens never leak: a masked value type and the redaction of text.

An API key value exists only in ZenML's create/rotate response; from there it travels
inside `ApiKeyValue`, whose repr/str are masked, until it is written into a Secret. Any
text that may come back from the server (error details) goes through `redact` first.
"""

from __future__ import annotations

import re

# Every ZenML API key value starts with this.
API_KEY_PREFIX = "ZENKEY_"

_SECRET_PATTERNS = (
    re.compile(re.escape(API_KEY_PREFIX) + r"[A-Za-z0-9+/=_\-]*"),
    re.compile(r"eyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*"),  # JWTs
)


class ApiKeyValue:
    """An API key value that does not leak through repr(), str(), logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<ApiKeyValue ***>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ApiKeyValue) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def redact(text: str) -> str:
    """`text` with every API key value and access token (JWT) replaced by ***."""
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub("***", text)
    return text
