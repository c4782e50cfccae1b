"""The answers of the fake upstream's model routes: chat, completions, embeddings, responses.

Answers are deterministic: ``"echo: " + <last user message>`` cut to 200 characters, or with
``response_format`` ``json_object`` / ``json_schema`` a JSON document (for a schema, the instance
built by :func:`minimal_instance`). With ``tools`` (and ``tool_choice`` not ``none``; for ``auto``,
unless the last message is a tool result) the answer is one call of the named or first function,
its arguments the minimal instance of its parameters (streamed as OpenAI streams tool calls).
A chat stream carries the answer in at most 4 content chunks, or with ``stream_chunks`` N (config,
``--stream-chunks``) in exactly N one-character chunks, the answer repeated to fill them; with
``chunk_interval_ms`` (``--chunk-interval-ms``) its events are spaced as a model's tokens are.
Embeddings are deterministic unit vectors (:func:`fake_vector`). Usage counts whitespace words.

Each answer is written to an ASGI ``send``; faults are decided before (``tests.fakes.upstream_app``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
from typing import Any

from tests.fakes import responses_api
from tests.fakes.asgi import Send, respond, respond_events
from tests.fakes.json_instances import minimal_instance

FAKE_DIMENSIONS = 8  # length of the fake's embedding vectors unless a request sets `dimensions`


def last_user_text(request: dict[str, Any]) -> str:
    for message in reversed(request.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            return str(content or "")
    return ""


def _answer(request: dict[str, Any]) -> str:
    text = last_user_text(request)
    response_format = request.get("response_format") or {}
    if response_format.get("type") == "json_schema":
        return json.dumps(minimal_instance(
            (response_format.get("json_schema") or {}).get("schema") or {}))
    if response_format.get("type") == "json_object":
        return json.dumps({"echo": text[:200]})
    return ("echo: " + text)[:200]


def _usage(request: dict[str, Any], content: str) -> dict[str, int]:
    # Whitespace words stand in for tokens: deterministic and cheap.
    prompt = sum(len(str(m.get("content", "")).split()) + 4
                 for m in request.get("messages") or [] if isinstance(m, dict))
    completion = len(content.split())
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _head(request: dict[str, Any], obj: str) -> dict[str, Any]:
    return {"id": f"chatcmpl-fake{time.monotonic_ns():x}", "object": obj,
            "created": int(time.time()), "model": request.get("model", "fake-model")}


def _tool_call(request: dict[str, Any]) -> dict[str, Any] | None:
    """The call the fake makes: with tools, unless ``tool_choice`` is ``none`` or (``auto``) the last
    message is a tool result; the named function or the first, arguments built from its schema."""
    tools = [t.get("function") or {} for t in request.get("tools") or [] if isinstance(t, dict)]
    choice = request.get("tool_choice") or "auto"
    messages = request.get("messages") or [{}]
    if not tools or choice == "none" or (choice == "auto" and messages[-1].get("role") == "tool"):
        return None
    if isinstance(choice, dict):
        tools = [t for t in tools if t.get("name") == (choice.get("function") or {}).get("name")] or tools
    function = tools[0]
    arguments = minimal_instance(function.get("parameters") or {"type": "object"})
    return {"id": f"call_fake{time.monotonic_ns():x}", "type": "function",
            "function": {"name": function.get("name"), "arguments": json.dumps(arguments)}}


async def chat_complete(send: Send, request: dict[str, Any]) -> None:
    call = _tool_call(request)
    content = _answer(request) if call is None else ""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    if call is not None:
        message.update(content=None, tool_calls=[call])
        choice["finish_reason"] = "tool_calls"
    await respond(send, 200, {**_head(request, "chat.completion"), "choices": [choice],
                              "usage": _usage(request, content)})


async def chat_stream(send: Send, request: dict[str, Any], drop: bool, chunks: int = 0,
                      interval_s: float = 0.0) -> None:
    content = _answer(request)
    include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
    head = _head(request, "chat.completion.chunk")
    if include_usage:
        head["usage"] = None  # as OpenAI does: null on every chunk but the last

    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return b"data: " + json.dumps({**head, "choices": [choice]}).encode() + b"\n\n"

    call = _tool_call(request)
    events = [event({"role": "assistant", "content": ""})]
    if call is not None:
        content, arguments = "", call["function"]["arguments"]
        events.append(event({"tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                                              "function": {"name": call["function"]["name"], "arguments": ""}}]}))
        half = len(arguments) // 2
        events += [event({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
                   for piece in (arguments[:half], arguments[half:]) if piece]
    if chunks and call is None:
        content = (content * (chunks // max(1, len(content)) + 1))[:chunks] if content else " " * chunks
        events += [event({"content": char}) for char in content]
    else:
        step = max(1, -(-len(content) // 4))  # ceil: at most 4 content pieces
        events += [event({"content": content[i:i + step]}) for i in range(0, len(content), step)]
    events.append(event({}, "stop" if call is None else "tool_calls"))
    if include_usage:
        last = {**head, "choices": [], "usage": _usage(request, content)}
        events.append(b"data: " + json.dumps(last).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    await respond_events(send, events, drop, interval_s)


def prompt_text(request: dict[str, Any]) -> str:
    """The text of an embeddings `input` or a completions `prompt` (strings joined; token ids as numbers)."""
    value = request.get("input", request.get("prompt"))
    if isinstance(value, list):
        return " ".join(v if isinstance(v, str) else json.dumps(v) for v in value)
    return str(value or "")


def _items(value: Any) -> list[Any]:
    if isinstance(value, list) and value and isinstance(value[0], (str, list)):
        return value
    return [value]


def fake_vector(item: Any, dimensions: int = FAKE_DIMENSIONS) -> list[float]:
    """A deterministic unit vector for one input (a string or a token list)."""
    digest = hashlib.sha256(json.dumps(item).encode()).digest()
    raw = [(digest[i % len(digest)] - 127.5) / 127.5 for i in range(dimensions)]
    norm = sum(v * v for v in raw) ** 0.5 or 1.0
    return [v / norm for v in raw]


async def embeddings(send: Send, request: dict[str, Any]) -> None:
    items = _items(request.get("input"))
    dimensions = request.get("dimensions") or FAKE_DIMENSIONS
    data = []
    for index, item in enumerate(items):
        vector: Any = fake_vector(item, dimensions)
        if request.get("encoding_format") == "base64":
            vector = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    tokens = sum(len(i) if isinstance(i, list) else len(str(i).split()) for i in items)
    await respond(send, 200, {"object": "list", "data": data, "model": request.get("model", "fake-model"),
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _text_answer(prompt: Any) -> str:
    return ("echo: " + (prompt if isinstance(prompt, str) else json.dumps(prompt)))[:200]


def _text_usage(prompts: list[Any], texts: list[str]) -> dict[str, int]:
    prompt = sum(len(p) if isinstance(p, list) else len(str(p).split()) for p in prompts)
    completion = sum(len(t.split()) for t in texts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def text_complete(send: Send, request: dict[str, Any]) -> None:
    prompts = _items(request.get("prompt"))
    texts = [_text_answer(p) for p in prompts]
    choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": "stop"} for i, t in enumerate(texts)]
    head = {**_head(request, "text_completion"), "id": f"cmpl-fake{time.monotonic_ns():x}"}
    await respond(send, 200, {**head, "choices": choices, "usage": _text_usage(prompts, texts)})


async def text_stream(send: Send, request: dict[str, Any], drop: bool) -> None:
    prompts = _items(request.get("prompt"))
    texts = [_text_answer(p) for p in prompts]
    head = {**_head(request, "text_completion"), "id": f"cmpl-fake{time.monotonic_ns():x}"}

    def event(index: int, text: str, finish: str | None = None) -> bytes:
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        return b"data: " + json.dumps({**head, "choices": [choice]}).encode() + b"\n\n"

    events = []
    for index, text in enumerate(texts):
        step = max(1, -(-len(text) // 4))
        events += [event(index, text[i:i + step]) for i in range(0, len(text), step)]
        events.append(event(index, "", "stop"))
    if (request.get("stream_options") or {}).get("include_usage"):
        last = {**head, "choices": [], "usage": _text_usage(prompts, texts)}
        events.append(b"data: " + json.dumps(last).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    await respond_events(send, events, drop)


async def responses(send: Send, request: dict[str, Any], stream: bool, drop: bool) -> None:
    """/v1/responses: the chat route's answer (text, JSON, or a tool call) in the Responses shape."""
    chat = responses_api.as_chat(request)
    call = _tool_call(chat)
    text = _answer(chat) if call is None else ""
    usage = _usage(chat, text if call is None else call["function"]["arguments"])
    if not stream:
        await respond(send, 200, responses_api.complete(request, text, call, usage))
        return
    events = responses_api.events(request, text, call, usage)
    await respond_events(send, events, drop)
