"""Apply a generated CRD schema the way the API server would: defaults, OpenAPI checks, CEL.

kmock does not enforce schemas, so the tests check the generated schemas themselves.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import celpy
from celpy import json_to_cel

from zenml_operator.crdgen import all_crds


def crd_schema(kind: str) -> dict[str, Any]:
    for crd in all_crds().values():
        if crd["spec"]["names"]["kind"] == kind:
            return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    raise KeyError(kind)


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    if isinstance(value, dict) and schema.get("type") == "object":
        value = dict(value)
        for name, sub in (schema.get("properties") or {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
        if "additionalProperties" in schema:
            value = {k: apply_defaults(schema["additionalProperties"], v) for k, v in value.items()}
    elif isinstance(value, list) and "items" in schema:
        value = [apply_defaults(schema["items"], item) for item in value]
    return value


def validate(schema: dict[str, Any], value: Any, old: Any = None, path: str = "") -> list[str]:
    """Errors as the API server would list them (a subset: what our schemas use)."""
    errors: list[str] = []
    kind = schema.get("type")
    type_ok = {
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
    }
    if kind and not type_ok.get(kind, True):
        return [f"{path}: must be {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: must be one of {schema['enum']}")
    if isinstance(value, str):
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path}: longer than {schema['maxLength']}")
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(f"{path}: shorter than {schema['minLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: does not match {schema['pattern']}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: below {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: above {schema['maximum']}")
    if isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{path}: more than {schema['maxItems']} items")
        for i, item in enumerate(value):
            errors += validate(schema.get("items", {}), item, None, f"{path}[{i}]")
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for req in schema.get("required") or []:
            if req not in value:
                errors.append(f"{path}.{req}: required")
        if "maxProperties" in schema and len(value) > schema["maxProperties"]:
            errors.append(f"{path}: more than {schema['maxProperties']} properties")
        for name, sub in value.items():
            if name in props:
                old_sub = old.get(name) if isinstance(old, dict) else None
                errors += validate(props[name], sub, old_sub, f"{path}.{name}")
            elif "additionalProperties" in schema:
                errors += validate(schema["additionalProperties"], sub, None, f"{path}.{name}")
            elif not schema.get("x-kubernetes-preserve-unknown-fields"):
                errors.append(f"{path}.{name}: unknown field")
    for rule in schema.get("x-kubernetes-validations") or []:
        is_transition = "oldSelf" in rule["rule"]
        if is_transition and old is None:
            continue  # transition rules only run on updates
        env = celpy.Environment()
        program = env.program(env.compile(rule["rule"]))
        activation = {"self": json_to_cel(value)}
        if is_transition:
            activation["oldSelf"] = json_to_cel(old)
        try:
            ok = bool(program.evaluate(activation))
        except celpy.CELEvalError as exc:  # the API server reports these as invalid too
            errors.append(f"{path}: {rule['message']} (evaluation error: {exc.args[0]})")
            continue
        if not ok:
            errors.append(f"{path}: {rule['message']}")
    return errors


def admit(kind: str, spec: dict[str, Any], old_spec: dict[str, Any] | None = None) -> list[str]:
    """Errors for `spec` (after defaulting) as a create, or as an update of `old_spec`."""
    schema = crd_schema(kind)["properties"]["spec"]
    new = apply_defaults(schema, spec)
    old = apply_defaults(schema, old_spec) if old_spec is not None else None
    return validate(schema, new, old, "spec")
