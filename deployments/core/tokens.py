"""Token estimates and counts made before (or without) a provider's own count: pure, no I/O.

Used where a budget must be booked before the call (per-key and per-model ``tpm``) and where a
stream ends without the provider's usage (the client hung up first). Estimates are bounded:
the completion part is at most the model's output limit, so no request can book an unbounded
number of tokens on a shared budget. A prompt's estimate counts what the model is shown besides
the messages too: the tools' schemas and a structured output's schema, which a chat template puts
in the prompt (their JSON text, at ``CHARS_PER_TOKEN``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

# Characters per token assumed for text we did not tokenize. English averages about 4; code and
# other scripts use fewer characters per token, so counts made from text also take the number of
# streamed pieces into account (see ``StreamCounter``).
CHARS_PER_TOKEN = 4
# Completion tokens assumed when a request sets no `max_tokens` (settled with real usage later).
DEFAULT_COMPLETION_ESTIMATE = 256
# Per-message overhead of chat formatting (role markers), as OpenAI's cookbook counts it.
TOKENS_PER_MESSAGE = 4


def text_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def _content_text(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content)


def schema_tokens(value: Any) -> int:
    """Estimated tokens of a JSON value shown to the model (tool definitions, an output schema): its
    compact JSON text. Pydantic models count as their dump; None counts 0."""
    if value is None:
        return 0
    if isinstance(value, list | tuple):
        return sum(schema_tokens(item) for item in value)
    if hasattr(value, "model_dump_json"):  # pydantic's compact JSON, made in Rust: ~5x faster than dump + dumps
        return text_tokens(value.model_dump_json(exclude_none=True, by_alias=True))
    return text_tokens(json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str))


def prompt_tokens(messages: Iterable[Any], tools: Any = None, response_format: Any = None) -> int:
    """Estimated prompt tokens of OpenAI messages (dicts or objects with ``content``), with the
    ``tools`` and ``response_format`` of the request (dicts or pydantic models) when it has them."""
    total = schema_tokens(tools) + schema_tokens(response_format)
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else getattr(message, "content", None)
        total += TOKENS_PER_MESSAGE + text_tokens(_content_text(content))
    return total


def chat_prompt_tokens(request: Any) -> int:
    """Estimated prompt tokens of a chat request (a validated ``ChatCompletionRequest`` or its body as a
    dict): its messages, tools and ``response_format``."""
    if isinstance(request, Mapping):
        return prompt_tokens(request.get("messages", ()), request.get("tools"), request.get("response_format"))
    return prompt_tokens(request.messages, request.tools, request.response_format)


def response_prompt_tokens(body: Mapping[str, Any]) -> int:
    """Estimated prompt tokens of a /v1/responses body (a dict as the client sent it): its
    ``instructions``, its ``input`` (a string, or items: a message's text, any other item's JSON),
    its tools and its ``text.format`` schema."""
    total = schema_tokens(body.get("tools"))
    text = body.get("text")
    if isinstance(text, Mapping):
        total += schema_tokens(text.get("format"))
    if body.get("instructions"):
        total += TOKENS_PER_MESSAGE + text_tokens(str(body["instructions"]))
    value = body.get("input")
    for item in [value] if isinstance(value, str) else value if isinstance(value, list) else ():
        if isinstance(item, str):
            total += TOKENS_PER_MESSAGE + text_tokens(item)
        elif isinstance(item, Mapping) and "content" in item:
            total += TOKENS_PER_MESSAGE + text_tokens(_content_text(item["content"]))
        else:  # a function call, a tool's output, or another item: what it carries is its JSON
            total += TOKENS_PER_MESSAGE + schema_tokens(item)
    return total


def completion_budget(requested: int | None, output_limit: int) -> int:
    """The completion tokens to book: what was asked (or a default), never above the model's limit."""
    return max(1, min(requested or DEFAULT_COMPLETION_ESTIMATE, output_limit))


def reply_tokens(completion: dict[str, Any]) -> int:
    """Completion tokens of a ``chat.completion`` body counted from its text (at least 1 per choice)."""
    total = 0
    for choice in completion.get("choices") or ():
        message = choice.get("message") if isinstance(choice, dict) else None
        text = _content_text(message.get("content")) if isinstance(message, dict) else ""
        if not text and isinstance(choice, dict) and isinstance(choice.get("text"), str):
            text = choice["text"]  # a /v1/completions choice
        total += max(1, text_tokens(text))
    return total


class StreamCounter:
    """Counts a stream's output as it passes, for when the stream ends without usage.

    Conservative: completion tokens are the larger of the number of chunks that carried text
    (llama.cpp and most upstreams stream about one token per chunk) and the characters divided
    by ``CHARS_PER_TOKEN``, rounded up — so a stream is never billed less than it plausibly used.
    """

    def __init__(self) -> None:
        self.pieces = 0
        self.chars = 0

    def add(self, chunk: dict[str, Any]) -> None:
        if "type" in chunk:
            # A Responses event (a response forwarded as the upstream streamed it): its text and a
            # call's arguments arrive as ``….delta`` events.
            delta = chunk.get("delta")
            if isinstance(delta, str) and delta and str(chunk["type"]).endswith(".delta"):
                self.pieces += 1
                self.chars += len(delta)
            return
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                # A /v1/completions chunk carries its text on the choice itself.
                piece = choice.get("text") if isinstance(choice, dict) else None
                if isinstance(piece, str) and piece:
                    self.pieces += 1
                    self.chars += len(piece)
                continue
            text = _content_text(delta.get("content"))
            for call in delta.get("tool_calls") or ():
                if isinstance(call, dict):
                    text += str((call.get("function") or {}).get("arguments") or "")
            if text:
                self.pieces += 1
                self.chars += len(text)

    @property
    def completion_tokens(self) -> int:
        return max(self.pieces, math.ceil(self.chars / CHARS_PER_TOKEN))
