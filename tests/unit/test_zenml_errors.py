"""Which error a failed ZenML answer becomes (the callers decide on the type)."""

from __future__ import annotations

import httpx
import pytest

from zenml_operator.zenml_api.errors import ConflictError, UnavailableError, error_for

SQLITE = "(sqlite3.IntegrityError) UNIQUE constraint failed: user.name, user.is_service_account"
MYSQL = "(pymysql.err.IntegrityError) (1062, \"Duplicate entry 'ci' for key 'user.name'\")"


@pytest.mark.parametrize(
    ("status", "detail", "expected"),
    [
        (409, ["EntityExistsError", "exists"], ConflictError),
        # A create that lost a race inside ZenML: the insert was refused, nothing created.
        (500, ["IntegrityError", SQLITE], ConflictError),
        (500, ["IntegrityError", MYSQL], ConflictError),
        (500, ["OperationalError", "database is locked"], UnavailableError),
        (503, None, UnavailableError),
    ],
)
def test_error_type_of_a_failed_answer(status: int, detail: object, expected: type) -> None:
    body = {"detail": detail} if detail is not None else None
    response = httpx.Response(status, json=body)
    error = error_for(response, "POST", "/api/v1/service_accounts")
    assert type(error) is expected
    assert error.status_code == status
