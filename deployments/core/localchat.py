"""A chat body as llama.cpp generations (pure): what a local model honours, and how.

``LocalChat.of(body, config)`` checks every field of an OpenAI chat body against what the local
provider does with it — a field it cannot honour, or does not know, is a 400 naming it (never
dropped silently) — and yields the keyword arguments of each of the ``n`` generations (messages,
sampling fields, ``response_format``, ``seed``, ``top_logprobs``), with the tool plan
(``core.toolcalls``).

- ``n`` choices are ``n`` generations one after another; choice ``i`` samples with seed
  ``seed + i`` (the request's, else the model's), so a request with a seed is reproducible and its
  choices differ.
- ``seed`` is folded into llama.cpp's unsigned 32-bit range.
- ``logprobs: true`` asks for each token's log probability and ``top_logprobs`` (0–20, OpenAI's
  bound, checked by the schema) for that many of the most likely; ``top_logprobs`` without
  ``logprobs: true`` is a 400 naming it, as OpenAI's. ``top_logprobs`` in the kwargs is None when
  no log probabilities are wanted (the provider computes them from the sampled position's logits
  only: ``providers.llamacpp_sampling``).
- ``logit_bias`` is refused: llama-cpp-python applies it through a sampler hook it marks as
  probably broken.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deployments.config import LlamaCppModel
from deployments.core import toolcalls
from deployments.errors import InvalidRequest

# Fields a local model honours. Everything else a client sends is refused by name.
HONOURED = frozenset({
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
    "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty", "response_format", "user",
    "tools", "tool_choice", "parallel_tool_calls", "logprobs", "top_logprobs",
})
_MESSAGE_FIELDS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})
_SAMPLING_FIELDS = ("temperature", "top_p", "stop", "presence_penalty", "frequency_penalty")
_WHY = {
    "logit_bias": "is not available: local models take no logit_bias (use an upstream model)",
}


def text_content(content: Any, param: str = "messages") -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
    if len(parts) != len(content):
        raise InvalidRequest("Only text content parts are supported by local models.", param=param)
    return "".join(parts)


@dataclass
class LocalChat:
    """The generations one chat body asks of a local model."""

    kwargs: list[dict[str, Any]]  # one per choice
    tools: toolcalls.ToolPlan

    @classmethod
    def of(cls, body: dict[str, Any], config: LlamaCppModel) -> LocalChat:
        refuse_unknown(body, config.name)
        tool_plan = toolcalls.plan(body, config.name)
        response_format = body.get("response_format") or {}
        if tool_plan.calls and response_format.get("type") in ("json_object", "json_schema"):
            raise InvalidRequest(f"Model '{config.name}' cannot hold one answer to both a tool call and "
                                 "response_format; set tool_choice to none or drop response_format.",
                                 param="response_format")
        messages = toolcalls.model_messages(
            body["messages"], tool_plan, lambda content: text_content(content))
        base: dict[str, Any] = {
            "messages": messages,
            "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens") or config.default_max_tokens,
        }
        for name in _SAMPLING_FIELDS:
            if body.get(name) is not None:
                base[name] = body[name]
        if response_format.get("type") == "json_object":
            base["response_format"] = {"type": "json_object"}
        elif response_format.get("type") == "json_schema":
            base["response_format"] = {"type": "json_object", "schema": response_format["json_schema"]["schema"]}
        if body.get("top_logprobs") is not None and not body.get("logprobs"):
            raise InvalidRequest("top_logprobs needs logprobs: true.", param="top_logprobs")
        base["top_logprobs"] = (body.get("top_logprobs") or 0) if body.get("logprobs") else None
        seed = body["seed"] if body.get("seed") is not None else config.seed
        n = int(body.get("n") or 1)
        kwargs = [{**base, "seed": (seed + i) % 2**32} for i in range(n)]
        return cls(kwargs=kwargs, tools=tool_plan)


def refuse_unknown(body: dict[str, Any], model: str) -> None:
    """400 naming the first field of ``body`` (or of a message) a local model does not honour."""
    for name in body:
        if name not in HONOURED and body[name] is not None:
            why = _WHY.get(name, "is not supported by local models")
            raise InvalidRequest(f"'{name}' {why} (model '{model}').", param=name)
    for index, message in enumerate(body.get("messages") or []):
        for name in message:
            if name not in _MESSAGE_FIELDS and message[name] is not None:
                raise InvalidRequest(f"Message field '{name}' is not supported by local models (model '{model}').",
                                     param=f"messages[{index}].{name}")
