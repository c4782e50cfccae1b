"""Token estimates and counts made before (or without) a provider's own count: pure, no I/O.

Used where a budget must be booked before the call (per-key and per-model ``tpm``) and where a
stream ends without the provider's usage (the client hung up first). Estimates are bounded:
the completion part is at most the model's output limit, so no request can book an unbounded
number of tokens on a shared budget.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
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


def prompt_tokens(messages: Iterable[Any]) -> int:
    """Estimated prompt tokens of OpenAI messages (dicts or objects with ``content``)."""
    total = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else getattr(message, "content", None)
        total += TOKENS_PER_MESSAGE + text_tokens(_content_text(content))
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
