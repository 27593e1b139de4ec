"""Generate the CustomResourceDefinitions in `crds/` from the pydantic models.

Pydantic's JSON schema is close to what Kubernetes wants; this turns it into a
*structural* OpenAPI v3 schema: $refs inlined, `anyOf [T, null]` collapsed to T,
titles dropped, defaults kept, and `x-kubernetes-validations` (CEL) passed through.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from zenml_operator import models
from zenml_operator.models import GROUP, VERSION

_DROP = {"title"}


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        return _inline({**target, **extra}, defs)
    any_of = node.get("anyOf")
    if any_of is not None:
        # Optional[T] is "field may be absent": Kubernetes has no null type for it.
        non_null = [s for s in any_of if s.get("type") != "null"]
        if len(non_null) == 1:
            rest = {k: v for k, v in node.items() if k not in ("anyOf", "default")}
            merged = {**non_null[0], **rest}
            if node.get("default") is not None:
                merged["default"] = node["default"]
            return _inline(merged, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or key == "$defs":
            continue
        if key == "properties":
            out[key] = {name: _inline(prop, defs) for name, prop in value.items()}
        else:
            out[key] = _inline(value, defs)
    if "additionalProperties" in out and (
        out["additionalProperties"] in (True, False) or "properties" in out
    ):
        # Structural schemas forbid both; unknown fields are pruned (or preserved) instead.
        del out["additionalProperties"]
    if "const" in out:  # Literal with one value
        out["enum"] = [out.pop("const")]
    if out.get("default") is None:
        out.pop("default", None)
    if out.get("default") == {} and out.get("type") == "object" and "properties" in out:
        # An empty default object lets the API server fill nested defaults.
        out["default"] = {}
    return out


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return _inline(schema, schema.get("$defs", {}))


def _printer_columns(kind: str) -> list[dict[str, Any]]:
    ready = '.status.conditions[?(@.type=="Ready")]'
    common_head = [
        {"name": "Ready", "type": "string", "jsonPath": f"{ready}.status"},
        {"name": "Reason", "type": "string", "jsonPath": f"{ready}.reason"},
    ]
    age = [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
    if kind in models.SERVER_KINDS:
        return [
            *common_head,
            {"name": "URL", "type": "string", "jsonPath": ".spec.url"},
            {"name": "Identity", "type": "string", "jsonPath": ".status.identity"},
            {"name": "Version", "type": "string", "jsonPath": ".status.serverVersion"},
            {
                "name": "Message",
                "type": "string",
                "jsonPath": f"{ready}.message",
                "priority": 1,
            },
            *age,
        ]
    if kind == "ServiceAccount":
        return [
            *common_head,
            {"name": "Account", "type": "string", "jsonPath": ".status.accountName"},
            {"name": "Keys", "type": "integer", "jsonPath": ".status.readyKeys"},
            {
                "name": "Message",
                "type": "string",
                "jsonPath": f"{ready}.message",
                "priority": 1,
            },
            *age,
        ]
    return [
        *common_head,
        {"name": "Last Rotation", "type": "date", "jsonPath": ".status.lastRotationTime"},
        # A string, not a date: kubectl renders a future date as `<invalid>`.
        {"name": "Next Rotation", "type": "string", "jsonPath": ".status.nextRotationTime"},
        {
            "name": "Rotations",
            "type": "integer",
            "jsonPath": ".status.rotationCount",
            "priority": 1,
        },
        *age,
    ]


def crd(
    *,
    kind: str,
    plural: str,
    short_names: list[str],
    spec_model: type[BaseModel],
    status_model: type[BaseModel],
    description: str,
    scope: str = "Namespaced",
) -> dict[str, Any]:
    status_schema = openapi_schema(status_model)
    # Kopf and future versions may add fields; never let the API server prune them away.
    status_schema["x-kubernetes-preserve-unknown-fields"] = True
    spec_schema = openapi_schema(spec_model)
    top: dict[str, Any] = {}
    if spec_schema.get("required"):
        # A default must pass its own schema: `{}` would lack the required fields.
        top["required"] = ["spec"]
    else:
        spec_schema["default"] = {}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": scope,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short_names,
                "categories": ["zenml"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": _printer_columns(kind),
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": description,
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                            **top,
                        }
                    },
                }
            ],
        },
    }


def all_crds() -> dict[str, dict[str, Any]]:
    """File name in `crds/` -> CRD object."""
    result = {
        "zenml.io_serviceaccounts.yaml": crd(
            kind="ServiceAccount",
            plural="serviceaccounts",
            short_names=["zsa", "zenmlsa"],
            spec_model=models.ServiceAccountSpec,
            status_model=models.ServiceAccountStatus,
            description=(
                "A ZenML service account and its API keys. Each key is written into a Secret"
                " (ZENML_STORE_URL, ZENML_STORE_API_KEY) that pods load with envFrom."
            ),
        ),
    }
    rotation_spec = getattr(models, "ApiKeyRotationSpec", None)
    if rotation_spec is not None:
        result["zenml.io_apikeyrotations.yaml"] = crd(
            kind="ApiKeyRotation",
            plural="apikeyrotations",
            short_names=["zrot", "akr"],
            spec_model=rotation_spec,
            status_model=models.ApiKeyRotationStatus,
            description=(
                "Rotates one API key of a ServiceAccount on a schedule or on demand, keeps"
                " the previous value valid for a retention period and restarts workloads."
            ),
        )
    server_description = (
        "{what}: its URL and the Secret the operator logs in with. ServiceAccounts name it"
        " in spec.serverRef; their Secrets get its URL, ZENML_PRO_API_URL and"
        " ZENML_STORE_VERIFY_SSL (CA bundle) when set."
    )
    result["zenml.io_zenmlservers.yaml"] = crd(
        kind="ZenMLServer",
        plural=models.ZENML_SERVERS,
        short_names=["zsrv"],
        spec_model=models.ZenMLServerSpec,
        status_model=models.ZenMLServerStatus,
        description=server_description.format(
            what="A ZenML server usable by ServiceAccounts of this namespace"
        ),
    )
    result["zenml.io_clusterzenmlservers.yaml"] = crd(
        kind="ClusterZenMLServer",
        plural=models.CLUSTER_ZENML_SERVERS,
        short_names=["czsrv"],
        spec_model=models.ClusterZenMLServerSpec,
        status_model=models.ZenMLServerStatus,
        description=server_description.format(
            what="A ZenML server usable by ServiceAccounts of every namespace"
        ),
        scope="Cluster",
    )
    return result


def render(obj: dict[str, Any]) -> str:
    return "# Generated by `zenml-operator crds` from operator/zenml_operator/models.py.\n" + (
        yaml.safe_dump(obj, sort_keys=False, width=100)
    )


def write_crds(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, obj in all_crds().items():
        path = directory / filename
        path.write_text(render(obj))
        written.append(path)
    return written
