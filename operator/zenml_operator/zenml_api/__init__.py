"""Async REST client for the parts of the ZenML server API the operator needs.

The operator never imports `zenml`: it speaks REST with httpx. One module per job:
`client` (the endpoints), `connection` (cookie-less HTTP, login, retries, queues, the
request observer), `errors` (what a failed call raises, with a safe message), `models`
(the accounts and keys returned), `routes` (paths and their metric-label templates),
`secrecy` (key values masked, secrets redacted from text), `pacing` (the background lane
and its rate limit). The names below are what the rest of the operator uses.
"""

from zenml_operator.zenml_api.client import ZenMLClient
from zenml_operator.zenml_api.connection import RequestObserver
from zenml_operator.zenml_api.errors import (
    BadRequestError,
    ConflictError,
    ForbiddenError,
    NotFoundError,
    UnauthorizedError,
    UnavailableError,
    ZenMLError,
)
from zenml_operator.zenml_api.models import (
    AccountRef,
    ApiKeyInfo,
    IssuedApiKey,
    ServiceAccountInfo,
)
from zenml_operator.zenml_api.secrecy import API_KEY_PREFIX, ApiKeyValue

__all__ = [
    "API_KEY_PREFIX",
    "AccountRef",
    "ApiKeyInfo",
    "ApiKeyValue",
    "BadRequestError",
    "ConflictError",
    "ForbiddenError",
    "IssuedApiKey",
    "NotFoundError",
    "RequestObserver",
    "ServiceAccountInfo",
    "UnauthorizedError",
    "UnavailableError",
    "ZenMLClient",
    "ZenMLError",
]
