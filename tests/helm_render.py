"""Render the Helm chart with Helm's own Go SDK (helm-python-sdk), no helm binary.

Shared by the chart tests and the real-apiserver tier (which applies the rendered RBAC).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[1] / "charts" / "zenml-operator"


def render_chart(values: dict[str, Any], *, release: str, namespace: str) -> list[dict[str, Any]]:
    """Every rendered manifest (NOTES.txt left out), in file order."""
    import helm_python as helm  # no linux-arm64 wheel yet: callers skip where it is missing

    helm.disable_logging()
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values, name=release, namespace=namespace, is_install=True)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs
