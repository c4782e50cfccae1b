"""Model output post-processing: parse, validate against the task's schema, repair.

Serves the ModelWorker running a task. ``parse_output`` turns raw model text into a value that
satisfies the output schema; ``run_with_repair`` calls the model (through a callable the worker
supplies), and when the output is invalid, feeds the validation errors back as a new user turn
and asks again, up to the task's ``max_attempts``. Calls nothing itself; owns no state.

Even with a provider that enforces a JSON schema (OpenAI strict mode, llama.cpp grammars), the
text can still be invalid: truncated at ``max_tokens``, wrapped in markdown fences by a model
without grammar support, or violating keywords the provider does not enforce. Hence the loop.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jsonschema import Draft202012Validator

from deployments.errors import TaskFailed

__all__ = ["ModelCall", "OutputInvalid", "RepairResult", "parse_output", "run_with_repair"]

ModelCall = Callable[[list[dict[str, str]]], Awaitable[tuple[str, Mapping[str, Any]]]]
"""``async (messages) -> (text, usage)``; usage has OpenAI's ``*_tokens`` keys."""

_MAX_ERRORS = 10  # more than this only drowns a small model's context
_MAX_ERROR_CHARS = 300  # jsonschema quotes the offending value, which may be long
_MAX_RAW_CHARS = 4000  # raw output kept in error details and fed back to the model
_MAX_CANDIDATES = 32  # embedded JSON values considered
_MAX_STARTS = 512  # '{'/'[' positions tried: bounds the scan of pathological text
_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)
_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


class OutputInvalid(Exception):
    """Model output is not JSON, or not valid for the schema.

    ``raw`` is the text as received; ``errors`` are readable messages such as
    ``$.label: 'maybe' is not one of ['bug', 'feature']``. Survives pickle.
    """

    def __init__(self, raw: str, errors: list[str]) -> None:
        super().__init__(raw, errors)
        self.raw = raw
        self.errors = errors

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.raw, self.errors))

    def __str__(self) -> str:
        return "; ".join(self.errors)


@dataclass(frozen=True)
class RepairResult:
    """A validated output and what it cost."""

    output: Any
    attempts: int
    usage: dict[str, int] = field(default_factory=dict)
    raw: str = ""


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _reject_constant(name: str) -> Any:
    # NaN/Infinity are not JSON; stored results must be readable by any client.
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _whole(text: str) -> list[Any]:
    try:
        return [_DECODER.decode(text)]
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return []


def _embedded(text: str) -> list[Any]:
    """Balanced JSON objects/arrays embedded in prose, in order of appearance."""
    found: list[Any] = []
    for tries, match in enumerate(re.finditer(r"[{\[]", text)):
        if tries >= _MAX_STARTS or len(found) >= _MAX_CANDIDATES:
            break
        try:
            # raw_decode parses one value starting here and ignores whatever follows it.
            value, _end = _DECODER.raw_decode(text, match.start())
        except (ValueError, RecursionError):
            continue
        found.append(value)
    return found


def _candidates(text: str) -> list[Any]:
    """JSON values in ``text``: the whole text, else a fenced block, else embedded values."""
    stripped = text.strip()
    # The whole text first: a valid JSON string value may itself contain ``` fences.
    if whole := _whole(stripped):
        return whole
    fence = _FENCE.search(stripped)
    if fence is not None:
        inner = fence.group(1).strip()
        if found := _whole(inner) or _embedded(inner):
            return found
    return _embedded(stripped)


def _schema_errors(validator: Draft202012Validator, value: Any) -> list[str]:
    errors = sorted(validator.iter_errors(value), key=lambda e: (e.json_path, e.message))
    messages = [_truncate(f"{e.json_path}: {e.message}", _MAX_ERROR_CHARS) for e in errors]
    if len(messages) > _MAX_ERRORS:
        messages = [*messages[:_MAX_ERRORS], f"… and {len(messages) - _MAX_ERRORS} more errors"]
    return messages


def parse_output(text: str, schema: dict[str, Any]) -> Any:
    """Extract the JSON value from model ``text`` and validate it against ``schema``.

    Accepts bare JSON, JSON in a markdown code fence, or JSON embedded in prose (the first
    balanced object/array that validates wins; if none validates, the first one's errors are
    reported). Raises ``OutputInvalid`` if no JSON is found or it does not match.
    """
    validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    candidates = _candidates(text)
    if not candidates:
        detail = "output is empty" if not text.strip() else "no JSON value found in the output"
        raise OutputInvalid(text, [f"$: {detail}"])
    first_errors: list[str] | None = None
    for value in candidates:
        errors = _schema_errors(validator, value)
        if not errors:
            return value
        if first_errors is None:
            first_errors = errors
    assert first_errors is not None
    raise OutputInvalid(text, first_errors)


def _add_usage(total: dict[str, int], usage: Mapping[str, Any]) -> None:
    counts = {k: int(usage.get(k) or 0) for k in _USAGE_KEYS}
    if not counts["total_tokens"]:
        counts["total_tokens"] = counts["prompt_tokens"] + counts["completion_tokens"]
    for key, value in counts.items():
        total[key] += value


def _feedback(errors: Sequence[str], schema: dict[str, Any]) -> str:
    listed = "\n".join(f"- {e}" for e in errors)
    return (
        "Your previous reply is not valid. It must be a JSON value matching this JSON Schema:\n"
        f"{json.dumps(schema, separators=(',', ':'))}\n"
        f"Problems found:\n{listed}\n"
        "Reply with the corrected JSON only: no explanation, no markdown code fences."
    )


async def run_with_repair(
    call: ModelCall,
    messages: Sequence[Mapping[str, str]],
    schema: dict[str, Any],
    max_attempts: int,
) -> RepairResult:
    """Call the model until its output satisfies ``schema``, at most ``max_attempts`` times.

    After an invalid output, the conversation grows by the assistant's raw reply and a user
    turn listing the validation errors. Returns the first valid output with the summed usage
    of all calls. Raises ``TaskFailed`` (details: ``raw_output`` (last, truncated),
    ``validation_errors``, ``attempts``) when every attempt was invalid. Exceptions raised by
    ``call`` propagate unchanged; ``messages`` is not modified.
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    conversation = [dict(m) for m in messages]
    usage = dict.fromkeys(_USAGE_KEYS, 0)
    last: OutputInvalid | None = None
    for attempt in range(1, max_attempts + 1):
        text, call_usage = await call(conversation)
        _add_usage(usage, call_usage)
        try:
            output = parse_output(text, schema)
        except OutputInvalid as exc:
            last = exc
            conversation = [
                *conversation,
                {"role": "assistant", "content": _truncate(text, _MAX_RAW_CHARS)},
                {"role": "user", "content": _feedback(exc.errors, schema)},
            ]
            continue
        return RepairResult(output=output, attempts=attempt, usage=usage, raw=text)
    assert last is not None
    raise TaskFailed(
        f"The model's output did not match the task's output schema after {max_attempts} "
        f"attempt{'s' if max_attempts != 1 else ''}: {last.errors[0]}",
        details={
            "raw_output": _truncate(last.raw, _MAX_RAW_CHARS),
            "validation_errors": last.errors,
            "attempts": max_attempts,
        },
    )
