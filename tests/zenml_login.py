"""Log in with an issued API key: the check that a key works (tests and the benchmark).

Not in the product: the operator only logs in as itself (`ZenMLConnection`). This uses a
fresh, cookie-less client per call, so no other identity's session can leak into it.
"""

from __future__ import annotations

import ssl

import httpx

from zenml_operator.zenml_api.connection import no_cookie_jar, token_from
from zenml_operator.zenml_api.errors import (
    UnauthorizedError,
    UnavailableError,
    detail_text,
    error_for,
)
from zenml_operator.zenml_api.routes import API_PREFIX


async def login_with_api_key(
    url: str, api_key: str, *, timeout: float = 10.0, verify: ssl.SSLContext | bool = True
) -> str:
    """Log in with an API key on a fresh, cookie-less client; return the access token.

    `verify`: the TLS trust for an https URL (e.g. `ZenMLServer.verify()` of a server with
    a private CA). Raises UnauthorizedError on 401/403; no message holds the key value.
    """
    path = f"{API_PREFIX}/login"
    async with httpx.AsyncClient(
        base_url=url.rstrip("/"),
        timeout=httpx.Timeout(timeout),
        cookies=no_cookie_jar(),
        verify=verify,
    ) as http:
        try:
            response = await http.post(path, data={"password": api_key})
        except httpx.TransportError as exc:
            raise UnavailableError(
                f"ZenML POST {path} failed: server at {url} unreachable ({type(exc).__name__})",
                method="POST",
                path=path,
            ) from exc
    if response.status_code in (401, 403):
        detail = detail_text(response)
        message = f"ZenML at {url} rejected the API key"
        raise UnauthorizedError(
            f"{message} (server said: {detail})" if detail else message,
            status_code=response.status_code,
            method="POST",
            path=path,
            detail=detail,
        )
    if not response.is_success:
        raise error_for(response, "POST", path)
    return token_from(response, path)
