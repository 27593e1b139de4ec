"""Apply a generated CRD schema the way the API server would: defaults, OpenAPI checks, CEL.

kmock does not enforce schemas, so the fast tier checks the generated schemas itself; the
real-apiserver tier (tests/realkube) is the judge. Modelled as the API server does it:
unknown fields are pruned, and refused only under `fieldValidation=Strict`; a list-map
refuses duplicate keys; a CEL rule that fails to evaluate is a bug in the rule (the test
fails), not a rejection.
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


_BLOCKING = " (type error)"


class CelEvaluationError(AssertionError):
    """A CEL rule errored instead of answering: the rule is wrong, whatever the input."""


def prune(schema: dict[str, Any], value: Any) -> Any:
    """Drop unknown fields, as the API server does for a non-strict client."""
    if isinstance(value, dict) and schema.get("type") == "object":
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return value
        props = schema.get("properties")
        if props is None and "additionalProperties" in schema:
            return {k: prune(schema["additionalProperties"], v) for k, v in value.items()}
        return {k: prune(props[k], v) for k, v in value.items() if k in (props or {})}
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune(schema["items"], item) for item in value]
    return value


def validate(
    schema: dict[str, Any], value: Any, old: Any = None, path: str = "", *, strict: bool = True
) -> list[str]:
    """Errors as the API server would list them (a subset: what our schemas use).

    `strict`: unknown fields are errors (`fieldValidation=Strict`); otherwise call `prune` first.
    """
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
        return [f"{path}: must be {kind}{_BLOCKING}"]
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
        if schema.get("x-kubernetes-list-type") == "map":
            map_keys = schema.get("x-kubernetes-list-map-keys") or []
            seen: set[tuple[Any, ...]] = set()
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    continue
                ident = tuple(item.get(k) for k in map_keys)
                if ident in seen:
                    errors.append(f"{path}[{i}]: Duplicate value: {ident}")
                seen.add(ident)
        for i, item in enumerate(value):
            errors += validate(schema.get("items", {}), item, None, f"{path}[{i}]", strict=strict)
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
                errors += validate(props[name], sub, old_sub, f"{path}.{name}", strict=strict)
            elif "additionalProperties" in schema:
                errors += validate(
                    schema["additionalProperties"], sub, None, f"{path}.{name}", strict=strict
                )
            elif strict and not schema.get("x-kubernetes-preserve-unknown-fields"):
                errors.append(f"{path}.{name}: unknown field")
    if any(_BLOCKING in e for e in errors):
        # A type error (or a missing required field) below here: the API server does not run
        # the CEL rules of this node (hasBlockingErr), it reports the type error alone.
        return errors
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
        except celpy.CELEvalError as exc:
            raise CelEvaluationError(
                f"{path}: rule {rule['rule']!r} failed to evaluate: {exc.args[0]}"
            ) from None
        if not ok:
            errors.append(f"{path}: {rule['message']}")
    return errors


def admit(
    kind: str,
    spec: dict[str, Any],
    old_spec: dict[str, Any] | None = None,
    *,
    strict: bool = True,
) -> list[str]:
    """Errors for `spec` (after defaulting) as a create, or as an update of `old_spec`.

    `strict=False` is a client without `fieldValidation=Strict`: unknown fields are pruned.
    """
    schema = crd_schema(kind)["properties"]["spec"]
    if not strict:
        spec = prune(schema, spec)
        old_spec = prune(schema, old_spec) if old_spec is not None else None
    new = apply_defaults(schema, spec)
    old = apply_defaults(schema, old_spec) if old_spec is not None else None
    return validate(schema, new, old, "spec", strict=strict)


def default_errors(schema: dict[str, Any], path: str = "") -> list[str]:
    """Every `default` in the schema checked against its own node, as the API server does
    when it accepts a CRD (a default that fails its schema makes the CRD invalid)."""
    errors: list[str] = []
    if "default" in schema:
        value = apply_defaults(schema, copy.deepcopy(schema["default"]))
        errors += [f"default at {path or '.'}: {e}" for e in validate(schema, value, None, path)]
    for name, sub in (schema.get("properties") or {}).items():
        errors += default_errors(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        errors += default_errors(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        errors += default_errors(schema["additionalProperties"], f"{path}{{}}")
    return errors
