"""Which output schemas a provider's structured-output support can express (pure).

Every task call asks for ``response_format: json_schema`` with ``strict: true``
(``core.prompting.response_format_for``). What the provider then does with the schema differs:

- ``llamacpp``: llama-cpp-python compiles the schema into a GBNF grammar
  (``llama_cpp.llama_grammar.json_schema_to_gbnf``); a schema it cannot compile fails every call,
  and keywords its converter ignores are simply not enforced while decoding. We run the real
  converter, and name the ignored keywords.
- ``openai``: OpenAI's strict mode accepts a subset of JSON Schema and answers 400 otherwise: the
  root is an object, every object has ``additionalProperties: false`` and lists every property in
  ``required`` (an optional field is a union with ``null``), and composition/conditional keywords
  are refused. Other OpenAI-compatible servers (vLLM, Ollama) accept at least this subset.

Numeric bounds the llama.cpp grammar does not enforce are warnings: the output is still validated
and repaired (``core.output``), it only costs attempts. Everything else is an error: the model
would be asked for something it cannot be held to, or the call would be refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from deployments.core import grammar

__all__ = ["schema_problems"]

Found = tuple[tuple[str | int, ...], str, bool]

# Keywords llama-cpp-python's grammar converter does not look at (llama_grammar.SchemaConverter.visit).
_LLAMACPP_IGNORED = {
    "not": "negation", "if": "conditionals", "then": "conditionals", "else": "conditionals",
    "dependentRequired": "dependencies", "dependentSchemas": "dependencies",
    "patternProperties": "property patterns", "propertyNames": "property-name rules",
    "unevaluatedProperties": "unevaluated properties", "unevaluatedItems": "unevaluated items",
    "contains": "array 'contains'", "minContains": "array 'contains'", "maxContains": "array 'contains'",
    "uniqueItems": "unique items", "multipleOf": "multiples", "minProperties": "property counts",
    "maxProperties": "property counts",
}
_LLAMACPP_UNENFORCED = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
# Keywords OpenAI's strict mode refuses (https://platform.openai.com/docs/guides/structured-outputs,
# "Supported schemas").
_OPENAI_REFUSED = (
    "allOf", "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "patternProperties",
    "propertyNames", "unevaluatedProperties", "unevaluatedItems", "contains", "minContains", "maxContains",
    "uniqueItems", "minProperties", "maxProperties",
)
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "dependentSchemas", "patternProperties")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_ONE = ("items", "not", "if", "then", "else", "contains", "additionalProperties", "propertyNames",
                  "unevaluatedProperties", "unevaluatedItems")


def _walk(schema: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], dict[str, Any]]]:
    """Every (sub)schema object with its path from the root."""
    if not isinstance(schema, dict):
        return
    yield path, schema
    for key in _SUBSCHEMA_MAPS:
        for name, sub in (schema.get(key) or {}).items() if isinstance(schema.get(key), dict) else ():
            yield from _walk(sub, (*path, key, name))
    for key in _SUBSCHEMA_LISTS:
        for i, sub in enumerate(schema.get(key) or []) if isinstance(schema.get(key), list) else ():
            yield from _walk(sub, (*path, key, i))
    for key in _SUBSCHEMA_ONE:
        yield from _walk(schema.get(key), (*path, key))


def _is_object(schema: dict[str, Any]) -> bool:
    kind = schema.get("type")
    if isinstance(kind, list):
        return "object" in kind
    return kind == "object" or (kind is None and "properties" in schema)


def _llamacpp(schema: dict[str, Any]) -> list[Found]:
    found: list[Found] = []
    for path, sub in _walk(schema):
        for key in sub.keys() & _LLAMACPP_IGNORED.keys():
            found.append(((*path, key), f"llama.cpp grammars cannot express {_LLAMACPP_IGNORED[key]} ('{key}'); "
                          "use enum, const, anyOf, pattern or length/item bounds instead", False))
        for key in _LLAMACPP_UNENFORCED:
            if key in sub:
                found.append(((*path, key), f"'{key}' is not enforced by the llama.cpp grammar (the output is "
                              "still validated and repaired, at the cost of attempts)", True))
        if "allOf" in sub and not _is_object(sub) and sub.get("type") is not None:
            found.append(((*path, "allOf"), "llama.cpp grammars support allOf only to merge object properties",
                          False))
    if found and any(not w for _, _, w in found):
        return found
    try:
        problem = grammar.schema_problem(schema)  # the converter the worker uses, and its bounds
    except ImportError:
        problem = None  # llama-cpp-python not installed here: the keyword checks above still ran
    if problem is not None:
        found.append(((), problem, False))
    return found


def _openai(schema: dict[str, Any]) -> list[Found]:
    found: list[Found] = []
    if schema.get("type") != "object":
        found.append((("type",), 'OpenAI strict mode needs an object at the root ("type": "object")', False))
    for path, sub in _walk(schema):
        for key in _OPENAI_REFUSED:
            if key in sub:
                found.append(((*path, key), f"OpenAI strict mode does not support '{key}'", False))
        if _is_object(sub):
            if sub.get("additionalProperties") is not False:
                found.append(((*path, "additionalProperties"),
                              "OpenAI strict mode needs \"additionalProperties\": false on every object", False))
            missing = [name for name in (sub.get("properties") or {}) if name not in (sub.get("required") or [])]
            if missing:
                found.append(((*path, "required"), "OpenAI strict mode needs every property in required (make an "
                              f"optional one nullable: \"type\": [..., \"null\"]); missing: {', '.join(missing)}",
                              False))
    return found


def schema_problems(schema: dict[str, Any], provider: str) -> list[Found]:
    """(path under the schema, message, warning) of what ``provider`` cannot express in ``schema``."""
    if provider == "llamacpp":
        return _llamacpp(schema)
    if provider == "openai":
        return _openai(schema)
    return []
