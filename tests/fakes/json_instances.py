"""A small JSON value valid for a JSON Schema: what the fake upstream answers to json_schema requests."""

from __future__ import annotations

from typing import Any

_FORMATS = {"date-time": "1970-01-01T00:00:00Z", "date": "1970-01-01", "email": "x@example.com",
            "uri": "http://example.com", "uuid": "00000000-0000-0000-0000-000000000000"}


def minimal_instance(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """Return a small JSON value valid against ``schema`` when the schema is simple.

    Handles what structured-output schemas use: local ``$ref`` (``#/$defs/...``), ``const``,
    ``enum`` (first value), ``anyOf``/``oneOf`` (first branch), ``allOf`` (merged objects), objects
    (required properties only), strings ("x", a sample for common ``format``s, padded to
    ``minLength``), numbers 0 (moved into ``minimum``/``maximum``), booleans true, arrays of
    ``minItems`` items, null. Not honoured: ``pattern``, ``multipleOf``, ``uniqueItems``, ...
    """
    root = schema if root is None else root
    if not isinstance(schema, dict) or depth > 32:
        return None
    if "$ref" in schema:
        target: Any = root
        for part in str(schema["$ref"]).removeprefix("#").strip("/").split("/"):
            if part and isinstance(target, dict):
                target = target.get(part.replace("~1", "/").replace("~0", "~"), {})
        return minimal_instance(target, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            return minimal_instance(schema[key][0], root, depth + 1)
    if schema.get("allOf"):
        parts = [minimal_instance(s, root, depth + 1) for s in schema["allOf"]]
        if all(isinstance(p, dict) for p in parts):
            return {k: v for p in parts for k, v in p.items()}
        return parts[0]
    kind = schema.get("type", "object" if "properties" in schema else None)
    if isinstance(kind, list):  # e.g. ["string", "null"]: the non-null type says more
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties", {})
        required = schema.get("required", [])
        return {k: minimal_instance(props.get(k, {}), root, depth + 1) for k in required}
    if kind == "array":
        return [minimal_instance(schema.get("items", {}), root, depth + 1)] * int(
            schema.get("minItems", 0))
    if kind == "string":
        text = _FORMATS.get(schema.get("format", ""), "x")
        return text + "x" * max(0, int(schema.get("minLength", 0)) - len(text))
    if kind in ("integer", "number"):
        value: float = 0
        if "minimum" in schema and value < schema["minimum"]:
            value = schema["minimum"]
        elif "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            value = schema["exclusiveMinimum"] + 1
        elif "maximum" in schema and value > schema["maximum"]:
            value = schema["maximum"]
        elif "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
            value = schema["exclusiveMaximum"] - 1
        return int(value) if kind == "integer" else value
    return True if kind == "boolean" else None
