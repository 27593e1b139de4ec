"""Runs last in the tier: every request the operator made, as the real API server's audit log
recorded it, was allowed by the chart's RBAC (the operator runs as the chart's ServiceAccount).
"""

from __future__ import annotations

from realkube.conftest import Installed

DECISION = "authorization.k8s.io/decision"


def _rule(event: dict) -> str:
    ref = event.get("objectRef") or {}
    resource = ref.get("resource", event.get("requestURI", "?"))
    if ref.get("subresource"):
        resource += "/" + ref["subresource"]
    return f"{ref.get('apiGroup', '')}/{resource}:{event['verb']}"


def test_the_chart_rbac_allows_every_request_of_the_operator(installed: Installed) -> None:
    requests = installed.operator_requests()
    assert requests, "the audit log holds none of the operator's requests"
    denied = sorted(
        {_rule(e) for e in requests if (e.get("annotations") or {}).get(DECISION) == "forbid"}
    )
    assert denied == [], f"RBAC denied the operator: {denied}"
    used = sorted({_rule(e) for e in requests})
    print(f"\nreal-apiserver RBAC: {len(requests)} requests of the operator, 0 denied; {used}")
