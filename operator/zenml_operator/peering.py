"""Whether this operator may act outside Kopf's handlers, under Kopf peering (`--peering`).

Kopf pauses its handlers while a peer of higher priority runs. The Secret watch's repairs and
the resync schedule act outside them, so they ask Kopf's peering object themselves
(policies.peering_allows decides). One answer per namespace is kept for a few seconds: a
resync wave asks once, not once per object.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from zenml_operator import policies as pol
from zenml_operator.kube import KubeClient, KubeError
from zenml_operator.timestamps import parse_time, utcnow

PEERING_API = "kopf.dev/v1"
ANSWER_KEPT = 5.0  # seconds; Kopf's own peers keep their entries alive every ~60 s

logger = logging.getLogger(__name__)


class PeeringGate:
    def __init__(self, peering: Any, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.peering = peering  # kopf.OperatorSettings.peering, not standalone
        self.clock = clock
        self._answers: dict[str | None, tuple[float, bool]] = {}

    @classmethod
    def of(cls, peering: Any) -> PeeringGate | None:
        """The gate for Kopf's peering settings; None when standalone (always allowed)."""
        return None if peering is None or peering.standalone else cls(peering)

    async def allows(self, kube: KubeClient, namespace: str | None) -> bool:
        scope = None if self.peering.clusterwide else namespace
        kept = self._answers.get(scope)
        if kept is not None and self.clock() - kept[0] < ANSWER_KEPT:
            return kept[1]
        answer = await self._ask(kube, scope)
        self._answers[scope] = (self.clock(), answer)
        return answer

    async def _ask(self, kube: KubeClient, namespace: str | None) -> bool:
        peering = self.peering
        try:
            if namespace is None:
                items = await kube.list_objects(PEERING_API, "clusterkopfpeerings", None)
            else:
                items = await kube.list_objects(PEERING_API, "kopfpeerings", namespace)
        except KubeError as exc:
            logger.warning(f"Cannot read Kopf's peering object ({exc}); leaving it to resync")
            return False
        found = next((i for i in items if i["metadata"]["name"] == peering.name), None)
        if found is None:
            return not peering.mandatory
        return pol.peering_allows(
            peers=peers_of(found), own_priority=peering.priority, now=utcnow()
        )


def peers_of(peering: Mapping[str, Any]) -> list[pol.Peer]:
    """The entries of a Kopf peering object's status (identity -> priority/lifetime/lastseen)."""
    peers = []
    for info in (peering.get("status") or {}).values():
        if not isinstance(info, Mapping):
            continue
        seen = parse_time(info.get("lastseen")) or utcnow()
        lifetime = int(info.get("lifetime") or 60)
        alive_until = seen + datetime.timedelta(seconds=lifetime)
        peers.append(pol.Peer(int(info.get("priority") or 0), alive_until))
    return peers
