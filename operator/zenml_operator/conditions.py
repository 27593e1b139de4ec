"""Status conditions following the Kubernetes API conventions (metav1.Condition)."""

from __future__ import annotations

from typing import Any

from zenml_operator.timestamps import now_iso


def set_condition(
    conditions: list[dict[str, Any]] | None,
    *,
    type: str,
    status: bool | str,
    reason: str,
    message: str,
    generation: int | None,
    now: str | None = None,
) -> list[dict[str, Any]]:
    """Return a new list with `type` set; lastTransitionTime moves only when status flips.

    Keeping the timestamp stable when nothing changed is what makes a no-op reconcile
    write nothing (no status churn for GitOps controllers).
    """
    status_str = status if isinstance(status, str) else ("True" if status else "False")
    result: list[dict[str, Any]] = []
    previous: dict[str, Any] | None = None
    for cond in conditions or []:
        if cond.get("type") == type:
            previous = cond
        else:
            result.append(dict(cond))
    transition = (
        previous["lastTransitionTime"]
        if previous and previous.get("status") == status_str and previous.get("lastTransitionTime")
        else (now or now_iso())
    )
    new = {
        "type": type,
        "status": status_str,
        "reason": reason,
        "message": message,
        "lastTransitionTime": transition,
    }
    if generation is not None:
        new["observedGeneration"] = generation
    result.append(new)
    result.sort(key=lambda c: c["type"] != "Ready")  # Ready first, for humans
    return result


def get_condition(conditions: list[dict[str, Any]] | None, type: str) -> dict[str, Any] | None:
    for cond in conditions or []:
        if cond.get("type") == type:
            return cond
    return None
