"""Restart the workloads that read a rotated key, once per key (as `kubectl rollout restart`).

Each restarted pod template records the key id it was restarted for, so a look repeated after
a crash never restarts a workload twice for one key.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable

from zenml_operator.crashpoints import crashpoint
from zenml_operator.handlers.common import Deps
from zenml_operator.models import WorkloadRef
from zenml_operator.timestamps import iso

ANN_RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"  # what `kubectl rollout restart` sets
ANN_RESTARTED_FOR = "zenml.io/restarted-for-api-key-id"
WORKLOAD_PLURALS = {
    "Deployment": "deployments",
    "StatefulSet": "statefulsets",
    "DaemonSet": "daemonsets",
}


async def restart_targets(
    deps: Deps,
    namespace: str,
    targets: Iterable[WorkloadRef],
    key_id: str,
    now: datetime.datetime,
    event: Callable[[str, str, str], None],
) -> str | None:
    """Restart each target once for `key_id`; a message if some could not be."""
    missing = []
    for ref in targets:
        plural = WORKLOAD_PLURALS[ref.kind]
        obj = await deps.kube.get_object("apps/v1", plural, namespace, ref.name)
        if obj is None:
            missing.append(f"{ref.kind}/{ref.name}")
            continue
        template_ann = (((obj.get("spec") or {}).get("template") or {}).get("metadata") or {}).get(
            "annotations"
        ) or {}
        if template_ann.get(ANN_RESTARTED_FOR) == key_id:
            continue  # restarted for this key already (before a crash)
        await deps.kube.patch_object(
            "apps/v1",
            plural,
            namespace,
            ref.name,
            {
                "spec": {
                    "template": {
                        "metadata": {
                            "annotations": {
                                ANN_RESTARTED_AT: iso(now),
                                ANN_RESTARTED_FOR: key_id,
                            }
                        }
                    }
                }
            },
        )
        await crashpoint("rotation.after-restart")
        event(
            "Normal",
            "RestartedWorkload",
            f"Restarted {ref.kind}/{ref.name} to load the rotated key",
        )
    if missing:
        return (
            f"Rotation done, but these restart targets do not exist: "
            f"{', '.join(missing)}; create them or fix spec.rolloutRestartTargets."
        )
    return None
