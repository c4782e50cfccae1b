"""The fake upstream's Responses API (``POST /v1/responses``): the same answers as its chat route, in
the Responses shape (pure: request dict in, response object or SSE event bytes out).

A request is read as the chat request it amounts to (``as_chat``: ``instructions`` and ``input`` →
messages, ``text.format`` → ``response_format``, flat function tools → chat tools), so the answer
is the chat route's: ``"echo: " + <last user text>``, a JSON instance of a ``json_schema`` format,
or one call of a function tool. Ids start ``resp_fake`` / ``msg_fake`` / ``fc_fake``, so a test can
tell a response this fake made from one promptfleet translated out of a chat completion. Usage
counts whitespace words, as the chat route does, under the Responses names (``input_tokens``,
``output_tokens``). A stream is the documented event sequence, each event with its
``event:`` line and ``sequence_number``; ``response.completed`` carries the usage.
"""

from __future__ import annotations

import json
import time
from typing import Any


def as_chat(request: dict[str, Any]) -> dict[str, Any]:
    """The chat request a Responses request amounts to (what the fake's chat answers are made from)."""
    messages: list[dict[str, Any]] = []
    if request.get("instructions"):
        messages.append({"role": "system", "content": request["instructions"]})
    value = request.get("input")
    for item in [{"role": "user", "content": value}] if isinstance(value, str) else value or []:
        if not isinstance(item, dict):
            continue
        if item.get("type", "message") == "message":
            messages.append({"role": item.get("role", "user"), "content": item.get("content")})
        elif item.get("type") == "function_call_output":
            messages.append({"role": "tool", "content": item.get("output")})
    chat: dict[str, Any] = {"model": request.get("model"), "messages": messages}
    form = (request.get("text") or {}).get("format") or {}
    if form.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {"schema": form.get("schema") or {}}}
    elif form.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    tools = [t for t in request.get("tools") or [] if isinstance(t, dict) and t.get("type") == "function"]
    if tools:
        chat["tools"] = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in tools]
    choice = request.get("tool_choice")
    if isinstance(choice, dict):
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif choice is not None:
        chat["tool_choice"] = choice
    return chat


def usage(chat_usage: dict[str, int]) -> dict[str, Any]:
    prompt, completion = chat_usage["prompt_tokens"], chat_usage["completion_tokens"]
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + completion}


def _stamp() -> str:
    return f"{time.monotonic_ns():x}"


def message_item(text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
    return {"type": "message", "id": f"msg_fake{_stamp()}", "status": status, "role": "assistant", "content": content}


def call_item(call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": f"fc_fake{_stamp()}", "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"] if status == "completed"
            else "", "status": status}


def response_object(request: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    """A ``response`` object without output or usage: what the request set, echoed."""
    return {"id": f"resp_fake{_stamp()}", "object": "response", "created_at": int(time.time()), "status": status,
            "model": request.get("model", "fake-model"), "output": [], "error": None, "incomplete_details": None,
            "instructions": request.get("instructions"), "max_output_tokens": request.get("max_output_tokens"),
            "temperature": request.get("temperature"), "top_p": request.get("top_p"),
            "tools": request.get("tools") or [], "tool_choice": request.get("tool_choice") or "auto",
            "parallel_tool_calls": True, "text": request.get("text") or {"format": {"type": "text"}},
            "store": request.get("store", True), "metadata": request.get("metadata") or {}, "usage": None}


def complete(request: dict[str, Any], text: str, call: dict[str, Any] | None,
             chat_usage: dict[str, int]) -> dict[str, Any]:
    """The JSON answer: a completed ``response`` with one output item and its usage."""
    response = response_object(request)
    response["output"] = [message_item(text) if call is None else call_item(call)]
    response["usage"] = usage(chat_usage)
    return response


def _sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


def events(request: dict[str, Any], text: str, call: dict[str, Any] | None,
           chat_usage: dict[str, int]) -> list[bytes]:
    """The streamed answer: the documented event sequence (text in up to 4 deltas, or a call's arguments
    in 2), ``response.completed`` last with the usage."""
    response = response_object(request, status="in_progress")
    sequence: list[dict[str, Any]] = []

    def add(kind: str, **fields: Any) -> None:
        sequence.append({"type": kind, "sequence_number": len(sequence), **fields})

    add("response.created", response=dict(response))
    add("response.in_progress", response=dict(response))
    if call is None:
        item, done = message_item("", status="in_progress"), message_item(text)
        done["id"] = item["id"]
        where = {"item_id": item["id"], "output_index": 0, "content_index": 0}
        add("response.output_item.added", output_index=0, item=item)
        add("response.content_part.added", **where, part={"type": "output_text", "text": "", "annotations": []})
        step = max(1, -(-len(text) // 4))
        for i in range(0, len(text), step):
            add("response.output_text.delta", **where, delta=text[i:i + step], logprobs=[])
        add("response.output_text.done", **where, text=text, logprobs=[])
        add("response.content_part.done", **where, part=done["content"][0])
    else:
        item, done = call_item(call, status="in_progress"), call_item(call)
        done["id"] = item["id"]
        add("response.output_item.added", output_index=0, item=item)
        arguments = call["function"]["arguments"]
        half = len(arguments) // 2
        for piece in (arguments[:half], arguments[half:]):
            if piece:
                add("response.function_call_arguments.delta", item_id=item["id"], output_index=0, delta=piece)
        add("response.function_call_arguments.done", item_id=item["id"], output_index=0, name=done["name"],
            arguments=arguments)
    add("response.output_item.done", output_index=0, item=done)
    add("response.completed", response={**response, "status": "completed", "output": [done],
                                        "usage": usage(chat_usage)})
    return [_sse(event) for event in sequence]
