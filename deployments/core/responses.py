"""The Responses API over chat completions (pure): request in, response object and events out.

``to_chat(body)`` turns a ``ResponseCreate`` into the ``ChatCompletionRequest`` the one model-call
path runs (so a response meets the same keys, limits, budgets, fallbacks and metering as chat):
``instructions`` → a first system message, ``input`` → messages, ``text.format`` →
``response_format``, ``max_output_tokens`` → ``max_tokens``, function tools → chat tools,
``function_call`` / ``function_call_output`` items → an assistant ``tool_calls`` message / a
``tool`` message. A field it has no translation for is a 400 naming it.

``from_chat`` turns the ``chat.completion`` back into a ``response`` object; ``ResponseEvents``
turns ``chat.completion.chunk``s into the documented event sequence (``response.created``,
``response.in_progress``, ``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta``…, ``response.output_text.done``, ``response.content_part.done``,
``response.output_item.done``, ``response.completed``; a call streams
``response.function_call_arguments.delta``/``.done`` instead of the text events), each with its
``sequence_number``.

``param_of`` maps a chat field named in an error back to the Responses field the client sent.

``forwarded(body)`` is the body sent instead to an upstream that speaks the Responses API itself
(``upstream_api: responses``): as the client sent it, with ``store: false``.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

from pydantic import ValidationError

from deployments.errors import InvalidRequest, field_path
from deployments.schemas import ChatCompletionRequest
from deployments.schemas.responses import ResponseCreate

_TEXT_PARTS = ("input_text", "output_text")
_MESSAGE_KEYS = frozenset({"type", "role", "content", "id", "status"})
_ROLES = ("user", "system", "developer", "assistant")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


# -- request ----------------------------------------------------------------------------------------

def to_chat(body: ResponseCreate) -> ChatCompletionRequest:
    """The chat request a response is made with; 400 naming a field that has no translation."""
    for name, value in (body.model_extra or {}).items():
        if value is not None:
            raise InvalidRequest(f"'{name}' is not supported on /v1/responses here.", param=name)
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        messages.append({"role": "user", "content": body.input})
    else:
        for index, item in enumerate(body.input):
            _add_item(messages, item, f"input[{index}]")
    if not messages:
        raise InvalidRequest("input has no messages.", param="input")
    chat: dict[str, Any] = {"model": body.model, "messages": messages, "stream": body.stream}
    if body.stream:
        chat["stream_options"] = {"include_usage": True}
    for ours, theirs in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                         ("parallel_tool_calls", "parallel_tool_calls"), ("user", "user")):
        if getattr(body, ours) is not None:
            chat[theirs] = getattr(body, ours)
    form = body.text.format if body.text is not None else None
    if form is not None and form.type != "text":
        chat["response_format"] = (
            {"type": "json_object"} if form.type == "json_object" else
            {"type": "json_schema", "json_schema": {k: v for k, v in (
                ("name", form.name or "output"), ("schema", form.schema_), ("strict", form.strict),
                ("description", form.description)) if v is not None}})
    if body.tools:
        chat["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                         for t in body.tools]
    if body.tool_choice is not None:
        choice = body.tool_choice
        chat["tool_choice"] = choice if isinstance(choice, str) else {
            "type": "function", "function": {"name": choice.name}}
    try:
        return ChatCompletionRequest.model_validate(chat)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = field_path(error["loc"])
        raise InvalidRequest(f"{param_of(where)}: {error['msg']}", param=param_of(where)) from None


# Fields that would have an upstream keep or read state (a stored response, a conversation, a response
# run in the background): nothing is stored here, and every tenant's call reaches the upstream under the
# one account the operator configured, so one tenant could read what another's call left there.
STATEFUL = ("previous_response_id", "conversation", "background")


def forwarded(body: ResponseCreate) -> dict[str, Any]:
    """The body for an upstream's own ``/responses``: the fields the client set (unknown ones too), with
    ``store: false``; a 400 naming a field that would keep or read state there (``STATEFUL``)."""
    extra = body.model_extra or {}
    for name in STATEFUL:
        if extra.get(name):  # `background: false` and nulls are what not sending them means
            raise InvalidRequest(f"'{name}' is not supported: responses are not stored here.", param=name)
    sent = body.model_dump(exclude_unset=True, exclude_none=True, by_alias=True)
    sent["store"] = False
    return sent


def _add_item(messages: list[dict[str, Any]], item: dict[str, Any], where: str) -> None:
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in _ROLES:
            raise InvalidRequest(f"role must be one of {', '.join(_ROLES)}.", param=f"{where}.role")
        for key in item.keys() - _MESSAGE_KEYS:
            raise InvalidRequest(f"'{key}' is not supported in an input message.", param=f"{where}.{key}")
        messages.append({"role": role, "content": _text(item.get("content"), f"{where}.content")})
    elif kind == "function_call":
        call_id, name = item.get("call_id"), item.get("name")
        if not isinstance(call_id, str) or not isinstance(name, str) or not isinstance(item.get("arguments"), str):
            raise InvalidRequest("A function_call item needs call_id, name and arguments (a JSON string).",
                                 param=where)
        call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": item["arguments"]}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
            last["tool_calls"].append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        call_id, output = item.get("call_id"), item.get("output")
        if not isinstance(call_id, str) or not isinstance(output, str):
            raise InvalidRequest("A function_call_output item needs call_id and output (a string).", param=where)
        messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
    else:
        raise InvalidRequest(f"Input items of type '{kind}' are not supported.", param=f"{where}.type")


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest("content must be a string or a list of text parts.", param=where)
    texts = []
    for index, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else None
            raise InvalidRequest(f"Only input_text parts are supported (got {kind!r}).", param=f"{where}[{index}]")
        texts.append(part["text"])
    return "".join(texts)


_PARAMS = (
    (re.compile(r"^max_tokens$"), "max_output_tokens"),
    (re.compile(r"^messages(\[\d+\])?.*"), "input"),
    (re.compile(r"^response_format\.json_schema\.schema"), "text.format.schema"),
    (re.compile(r"^response_format"), "text.format"),
    (re.compile(r"^tools\.?\[?(\d+)\]?\.function\."), r"tools[\1]."),
    (re.compile(r"^tool_choice.*"), "tool_choice"),
)


def param_of(chat_param: str | None) -> str | None:
    """The Responses field a chat field named in an error came from."""
    if chat_param is None:
        return None
    for pattern, replacement in _PARAMS:
        if pattern.match(chat_param):
            return pattern.sub(replacement, chat_param, count=1)
    return chat_param


# -- response ---------------------------------------------------------------------------------------

def usage_of(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if not usage:
        return None
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


def shell(body: ResponseCreate, response_id: str, created: int, status: str) -> dict[str, Any]:
    """A ``response`` object without output: what the request set, echoed."""
    form = body.text.format if body.text is not None and body.text.format is not None else None
    return {
        "id": response_id, "object": "response", "created_at": created, "status": status,
        "model": body.model, "output": [], "error": None, "incomplete_details": None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "temperature": body.temperature, "top_p": body.top_p,
        "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
        "tool_choice": (body.tool_choice if isinstance(body.tool_choice, str) or body.tool_choice is None
                        else body.tool_choice.model_dump()) or "auto",
        "parallel_tool_calls": body.parallel_tool_calls if body.parallel_tool_calls is not None else True,
        "text": {"format": form.model_dump(by_alias=True, exclude_none=True) if form else {"type": "text"}},
        "store": False, "metadata": body.metadata or {}, "user": body.user, "usage": None,
    }


def message_item(text: str, status: str = "completed", item_id: str | None = None) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
    return {"type": "message", "id": item_id or new_id("msg"), "status": status, "role": "assistant",
            "content": content}


def call_item(call: dict[str, Any], status: str = "completed", item_id: str | None = None) -> dict[str, Any]:
    function = call.get("function") or {}
    return {"type": "function_call", "id": item_id or new_id("fc"), "call_id": call.get("id") or new_id("call"),
            "name": function.get("name"), "arguments": function.get("arguments") or "", "status": status}


def _finish(response: dict[str, Any], finish_reason: str | None) -> None:
    if finish_reason == "length":
        response["status"] = "incomplete"
        response["incomplete_details"] = {"reason": "max_output_tokens"}
    elif finish_reason == "content_filter":
        response["status"] = "incomplete"
        response["incomplete_details"] = {"reason": "content_filter"}
    else:
        response["status"] = "completed"


def from_chat(body: ResponseCreate, completion: dict[str, Any]) -> dict[str, Any]:
    """The ``response`` object of a ``chat.completion``."""
    response = shell(body, new_id("resp"), int(completion.get("created") or time.time()), "completed")
    response["model"] = completion.get("model") or body.model
    choice = (completion.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    if message.get("content"):
        response["output"].append(message_item(message["content"]))
    for call in message.get("tool_calls") or []:
        response["output"].append(call_item(call))
    _finish(response, choice.get("finish_reason"))
    response["usage"] = usage_of(completion.get("usage"))
    return response


class ResponseEvents:
    """The Responses event sequence of one streamed chat completion (call ``start``, ``chunk`` for
    each chunk, ``end`` once)."""

    def __init__(self, body: ResponseCreate) -> None:
        self.body = body
        self.response = shell(body, new_id("resp"), int(time.time()), "in_progress")
        self.sequence = 0
        self.text: dict[str, Any] | None = None  # the open message item: {index, id, parts}
        self.calls: dict[int, dict[str, Any]] = {}  # chat tool-call index → open call item
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def _snapshot(self) -> dict[str, Any]:
        return {**self.response, "output": list(self.response["output"])}

    def start(self) -> list[dict[str, Any]]:
        return [self._event("response.created", response=self._snapshot()),
                self._event("response.in_progress", response=self._snapshot())]

    def chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        if chunk.get("model"):
            self.response["model"] = chunk["model"]
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                events += self._text_delta(delta["content"])
            for call in delta.get("tool_calls") or []:
                events += self._call_delta(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return events

    def _text_delta(self, text: str) -> list[dict[str, Any]]:
        events = []
        if self.text is None:
            item = message_item("", status="in_progress")
            self.text = {"index": len(self.response["output"]), "id": item["id"], "parts": []}
            self.response["output"].append(item)
            events.append(self._event("response.output_item.added", output_index=self.text["index"], item=item))
            events.append(self._event("response.content_part.added", item_id=item["id"],
                                      output_index=self.text["index"], content_index=0,
                                      part={"type": "output_text", "text": "", "annotations": []}))
        self.text["parts"].append(text)
        events.append(self._event("response.output_text.delta", item_id=self.text["id"],
                                  output_index=self.text["index"], content_index=0, delta=text, logprobs=[]))
        return events

    def _call_delta(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        events = []
        index = int(call.get("index") or 0)
        function = call.get("function") or {}
        item = self.calls.get(index)
        if item is None:
            item = call_item({"id": call.get("id"), "function": {"name": function.get("name"), "arguments": ""}},
                             status="in_progress")
            item["output_index"] = len(self.response["output"])
            self.calls[index] = item
            self.response["output"].append(None)  # its place; filled when done
            shown = {k: v for k, v in item.items() if k != "output_index"}
            events.append(self._event("response.output_item.added", output_index=item["output_index"], item=shown))
        piece = function.get("arguments") or ""
        if piece:
            item["arguments"] += piece
            events.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                      output_index=item["output_index"], delta=piece))
        return events

    def end(self) -> list[dict[str, Any]]:
        events = []
        if self.text is not None:
            text = "".join(self.text["parts"])
            done = message_item(text, item_id=self.text["id"])
            self.response["output"][self.text["index"]] = done
            where = {"item_id": done["id"], "output_index": self.text["index"], "content_index": 0}
            events.append(self._event("response.output_text.done", **where, text=text, logprobs=[]))
            events.append(self._event("response.content_part.done", **where, part=done["content"][0]))
            events.append(self._event("response.output_item.done", output_index=self.text["index"], item=done))
        for item in self.calls.values():
            index = item.pop("output_index")
            item["status"] = "completed"
            self.response["output"][index] = item
            events.append(self._event("response.function_call_arguments.done", item_id=item["id"],
                                      output_index=index, name=item["name"], arguments=item["arguments"]))
            events.append(self._event("response.output_item.done", output_index=index, item=item))
        _finish(self.response, self.finish_reason)
        self.response["usage"] = usage_of(self.usage)
        kind = "response.completed" if self.response["status"] == "completed" else "response.incomplete"
        events.append(self._event(kind, response=self._snapshot()))
        return events
