"""A real, fast, fault-injectable fake of an OpenAI-compatible upstream.

Serves, over real HTTP (raw ASGI under uvicorn; httptools + uvloop when installed):

    POST /v1/chat/completions  OpenAI chat completion; ``"stream": true`` answers SSE chunks and
                               ``stream_options.include_usage`` adds a usage chunk before [DONE]
    POST /v1/embeddings        deterministic unit vectors (``fake_vector``; ``dimensions`` long,
                               default 8; ``encoding_format: base64`` as OpenAI encodes it)
    POST /v1/completions       ``"echo: " + <prompt>`` per prompt, JSON or SSE ``text_completion``
    POST /v1/responses         the chat answer in the Responses shape: a ``response`` object, or SSE
                               events in the documented order (``tests.fakes.responses_api``)
    GET  /v1/models[/<id>]     ``fake-model`` (a requested id is echoed back)
    POST /_control/config      ``{"mode": ..., **params}`` replaces the fault config (400 if bad)
    POST /_control/reset       back to the start-up config (mode ``ok``), zeroed stats
    GET  /_control/stats       ``{"calls", "calls_by_mode", "calls_by_route", "in_flight",
                                 "max_in_flight", "call_times", "last_authorization", "prompts",
                                 "last_bodies", "request_ids"}`` (``prompts``: the last user message
                                 of recent chat calls, oldest first; ``calls_by_route``: calls per
                                 model route, ``chat``, ``embeddings``, ``completions``,
                                 ``responses``; ``last_bodies``: the last request body of each route;
                                 ``request_ids``: the calls' ``X-Request-ID`` headers, None where
                                 there was none)

Answers are deterministic: ``"echo: " + <last user message>`` cut to 200 characters, or with
``response_format`` ``json_object`` / ``json_schema`` a JSON document (for a schema, the instance
built by :func:`minimal_instance`). With ``tools`` (and ``tool_choice`` not ``none``; for ``auto``,
unless the last message is a tool result) the answer is one call of the named or first function,
its arguments the minimal instance of its parameters (streamed as OpenAI streams tool calls).
A chat stream carries the answer in at most 4 content chunks, or with ``stream_chunks`` N (config,
``--stream-chunks``) in exactly N one-character chunks, the answer repeated to fill them.

Fault modes (:class:`FaultConfig`): ``ok`` (optional ``latency_ms``), ``rate_limit`` (429 with
``Retry-After``), ``error`` (500), ``slow`` (``delay_s``, then normal), ``hang`` (no answer until
the client leaves or the server stops), ``drop_stream`` (two SSE chunks, then the connection is
closed; a non-streaming call gets the 500 of ``error``), ``stall_stream`` (two SSE chunks, then
silence until the client hangs up). ``fail_first_n`` limits the fault to the
first N model calls after configuring. ``api_key`` makes ``/v1`` calls without
``Authorization: Bearer <api_key>`` answer 401. Error bodies have the OpenAI shape. Every chat
call, 401s included, is counted in the stats (401s under the mode ``unauthorized``).

State: one :class:`_Control` (fault config + stats) per server, touched by the server's event loop
and by the controlling thread, behind a lock that is never held across an ``await``.

In-process: :class:`FakeUpstream` serves from a daemon thread (the uvicorn-in-a-thread pattern of
encode/httpx's ``tests/conftest.py``). As a program: ``python -m tests.fakes.upstream --port 9100``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import dataclasses
import hashlib
import http.client
import json
import logging
import signal
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from types import FrameType, TracebackType
from typing import Any

import uvicorn

from tests.fakes import responses_api
from tests.fakes.json_instances import minimal_instance

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

MODES = ("ok", "rate_limit", "error", "slow", "hang", "drop_stream", "stall_stream")
MAX_CALL_TIMES = 100_000
MAX_PROMPTS = 500
_JSON: Headers = [(b"content-type", b"application/json")]
_SSE: Headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


@dataclasses.dataclass(frozen=True)
class FaultConfig:
    """The whole fault configuration: each ``configure`` replaces it, unset fields default."""

    mode: str = "ok"
    latency_ms: float = 0.0  # sleep before answering (mode "ok")
    retry_after: float = 2  # Retry-After header, seconds (mode "rate_limit")
    delay_s: float = 1.0  # sleep before answering normally (mode "slow")
    fail_first_n: int | None = None  # only the first N model calls get the fault, then "ok"
    api_key: str | None = None  # if set, /v1 calls need "Authorization: Bearer <api_key>"
    # Content chunks of a chat stream: 0 cuts the answer into at most 4 pieces; N > 0 sends exactly
    # N one-character chunks (the answer repeated), so a bench can price a long stream per chunk.
    stream_chunks: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {', '.join(MODES)}")
        for name in ("latency_ms", "retry_after", "delay_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0")
        chunks = self.stream_chunks
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 0:
            raise ValueError("stream_chunks must be an integer >= 0")
        n = self.fail_first_n
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError("fail_first_n must be an integer >= 0")
        if self.api_key is not None and not isinstance(self.api_key, str):
            raise ValueError("api_key must be a string")


class _Control:
    """Fault config and call statistics, shared by the server loop and other threads."""

    def __init__(self, config: FaultConfig) -> None:
        self._lock = threading.Lock()
        self._initial = config
        self.config = config  # replaced, never mutated: reading it needs no lock
        self._faults_left = config.fail_first_n
        self._zero()

    def _zero(self) -> None:
        self.calls = self.in_flight = self.max_in_flight = 0
        self.calls_by_mode: collections.Counter[str] = collections.Counter()
        self.calls_by_route: collections.Counter[str] = collections.Counter()
        self.last_bodies: dict[str, Any] = {}
        self.call_times: collections.deque[float] = collections.deque(maxlen=MAX_CALL_TIMES)
        self.last_authorization: str | None = None
        self.prompts: collections.deque[str] = collections.deque(maxlen=MAX_PROMPTS)
        self.request_ids: collections.deque[str | None] = collections.deque(maxlen=MAX_PROMPTS)

    def record_prompt(self, prompt: str, route: str = "chat", body: Any = None) -> None:
        with self._lock:
            self.prompts.append(prompt)
            self.last_bodies[route] = body

    def configure(self, config: FaultConfig) -> None:
        with self._lock:
            self.config, self._faults_left = config, config.fail_first_n

    def reset(self) -> None:
        with self._lock:
            self.config, self._faults_left = self._initial, self._initial.fail_first_n
            in_flight = self.in_flight  # calls still running are still in flight after a reset
            self._zero()
            self.in_flight = self.max_in_flight = in_flight

    def begin_call(self, authorization: str | None, authorized: bool, route: str = "chat",
                   request_id: str | None = None) -> FaultConfig:
        """Count a model call; return the config it runs under ("ok" once faults ran out)."""
        with self._lock:
            self.request_ids.append(request_id)
            config = self.config
            if config.mode != "ok" and self._faults_left is not None:
                if self._faults_left > 0:
                    self._faults_left -= 1
                else:
                    config = dataclasses.replace(config, mode="ok")
            self.calls += 1
            self.calls_by_route[route] += 1
            self.calls_by_mode[config.mode if authorized else "unauthorized"] += 1
            self.call_times.append(time.time())
            self.last_authorization = authorization
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return config

    def end_call(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"calls": self.calls, "calls_by_mode": dict(self.calls_by_mode),
                    "calls_by_route": dict(self.calls_by_route),
                    "in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
                    "call_times": list(self.call_times),
                    "last_authorization": self.last_authorization, "prompts": list(self.prompts),
                    "last_bodies": dict(self.last_bodies), "request_ids": list(self.request_ids)}


class FakeUpstreamApp:
    """The raw ASGI application (routing by hand: no framework on the hot path)."""

    def __init__(self, control: _Control) -> None:
        self.control = control
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: asyncio.Event | None = None

    def begin_close(self) -> None:
        """Make ``hang``/``slow`` calls answer 503 now, so the server can stop; any thread."""
        if self._loop is not None and self._closing is not None:
            self._loop.call_soon_threadsafe(self._closing.set)

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                self._loop, self._closing = asyncio.get_running_loop(), asyncio.Event()
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"].rstrip("/")
        if path.startswith("/v1/"):
            authorization = _header(scope, b"authorization")
            key = self.control.config.api_key
            authorized = key is None or authorization == f"Bearer {key}"
            if method == "POST" and path in _ROUTES:
                await self._chat(receive, send, authorization, authorized, _ROUTES[path],
                                 _header(scope, b"x-request-id"))
            elif not authorized:
                await _error(send, 401, "Incorrect API key provided.", "invalid_request_error",
                             "invalid_api_key")
            elif method == "GET" and path == "/v1/models":
                await _respond(send, 200, {"object": "list", "data": [_model("fake-model")]})
            elif method == "GET" and path.startswith("/v1/models/"):
                await _respond(send, 200, _model(path.removeprefix("/v1/models/")))
            else:
                await _error(send, 404, f"No route {method} {path}", "invalid_request_error",
                             "not_found")
        elif method == "POST" and path in ("/_control/config", "/_control/reset"):
            try:
                if path == "/_control/reset":
                    self.control.reset()
                else:
                    params = json.loads(await _read_body(receive) or b"{}")
                    self.control.configure(FaultConfig(**params))
            except (ValueError, TypeError) as exc:  # our own validation messages
                await _error(send, 400, str(exc), "invalid_request_error", "invalid_config")
                return
            await _respond(send, 200, dataclasses.asdict(self.control.config))
        elif method == "GET" and path == "/_control/stats":
            await _respond(send, 200, self.control.snapshot())
        else:
            await _error(send, 404, f"No route {method} {path}", "invalid_request_error",
                         "not_found")

    async def _chat(
        self, receive: Receive, send: Send, authorization: str | None, authorized: bool, kind: str = "chat",
        request_id: str | None = None,
    ) -> None:
        body = await _read_body(receive)
        config = self.control.begin_call(authorization, authorized, kind, request_id)
        try:
            if not authorized:
                await _error(send, 401, "Incorrect API key provided.", "invalid_request_error",
                             "invalid_api_key")
                return
            try:
                request = json.loads(body)
            except ValueError:
                request = None
            if not isinstance(request, dict):
                await _error(send, 400, "The body is not a JSON object.", "invalid_request_error",
                             "invalid_json")
                return
            self.control.record_prompt(
                _last_user_text(request) if kind == "chat" else
                _last_user_text(responses_api.as_chat(request)) if kind == "responses" else _prompt_text(request),
                kind, request)
            stream, mode = bool(request.get("stream")), config.mode
            if mode == "rate_limit":
                await _error(send, 429, "Rate limit reached (injected by the fake upstream).",
                             "rate_limit_error", "rate_limit_exceeded",
                             [(b"retry-after", str(config.retry_after).encode())])
            elif mode == "error" or (mode in ("drop_stream", "stall_stream") and not stream):
                await _error(send, 500, "The server had an error (injected by the fake upstream).",
                             "server_error", "internal_error")
            elif mode in ("hang", "slow") and await self._wait(
                    receive, None if mode == "hang" else config.delay_s):
                await _error(send, 503, "The fake upstream is stopping.", "server_error",
                             "shutting_down")
            else:
                if mode == "ok" and config.latency_ms > 0:
                    await asyncio.sleep(config.latency_ms / 1000)
                if kind == "embeddings":
                    await _embeddings(send, request)
                elif kind == "responses":
                    await _responses(send, request, stream, drop=mode in ("drop_stream", "stall_stream"))
                    if stream and mode == "stall_stream":
                        await self._wait(receive, None)
                elif stream:
                    drop = mode in ("drop_stream", "stall_stream")
                    if kind == "chat":
                        await _stream(send, request, drop, config.stream_chunks)
                    else:
                        await _text_stream(send, request, drop)
                    if mode == "stall_stream":
                        # Two chunks, then nothing until the client hangs up (counted in in_flight).
                        await self._wait(receive, None)
                else:
                    await (_complete if kind == "chat" else _text_complete)(send, request)
        finally:
            self.control.end_call()

    async def _wait(self, receive: Receive, seconds: float | None) -> bool:
        """Sleep ``seconds`` (None: forever); True if cut short by a disconnect or by stopping."""
        assert self._closing is not None, "lifespan startup has run"
        # Once the body is read, uvicorn's receive() only returns on client disconnect.
        waiters = {asyncio.ensure_future(receive()), asyncio.ensure_future(self._closing.wait())}
        try:
            done, _ = await asyncio.wait(waiters, timeout=seconds,
                                         return_when=asyncio.FIRST_COMPLETED)
            return bool(done)
        finally:
            for waiter in waiters:
                waiter.cancel()


def _header(scope: Message, name: bytes) -> str | None:
    return next((v.decode("latin-1") for k, v in scope["headers"] if k == name), None)


def _model(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "promptfleet-fake"}


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _respond(send: Send, status: int, body: Any, headers: Headers | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": _JSON + headers if headers else _JSON})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


async def _error(send: Send, status: int, message: str, type_: str, code: str,
                 headers: Headers | None = None) -> None:
    error = {"message": message, "type": type_, "param": None, "code": code}
    await _respond(send, status, {"error": error}, headers)


def _last_user_text(request: dict[str, Any]) -> str:
    for message in reversed(request.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            return str(content or "")
    return ""


def _answer(request: dict[str, Any]) -> str:
    text = _last_user_text(request)
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


async def _complete(send: Send, request: dict[str, Any]) -> None:
    call = _tool_call(request)
    content = _answer(request) if call is None else ""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    if call is not None:
        message.update(content=None, tool_calls=[call])
        choice["finish_reason"] = "tool_calls"
    await _respond(send, 200, {**_head(request, "chat.completion"), "choices": [choice],
                               "usage": _usage(request, content)})


async def _stream(send: Send, request: dict[str, Any], drop: bool, chunks: int = 0) -> None:
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
    await _send_events(send, events, drop)


async def _send_events(send: Send, events: list[bytes], drop: bool) -> None:
    """An SSE answer; with ``drop``, its first two events and then a truncated body."""
    await send({"type": "http.response.start", "status": 200, "headers": _SSE})
    for data in events[:2] if drop else events:
        await send({"type": "http.response.body", "body": data, "more_body": True})
    if not drop:  # returning mid-body makes uvicorn close the connection: a truncated stream
        await send({"type": "http.response.body", "body": b""})


# The model routes: each one answers in its own shape, with the same fault modes.
_ROUTES = {"/v1/chat/completions": "chat", "/v1/embeddings": "embeddings", "/v1/completions": "completions",
           "/v1/responses": "responses"}
FAKE_DIMENSIONS = 8  # length of the fake's embedding vectors unless a request sets `dimensions`


def _prompt_text(request: dict[str, Any]) -> str:
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


async def _embeddings(send: Send, request: dict[str, Any]) -> None:
    items = _items(request.get("input"))
    dimensions = request.get("dimensions") or FAKE_DIMENSIONS
    data = []
    for index, item in enumerate(items):
        vector: Any = fake_vector(item, dimensions)
        if request.get("encoding_format") == "base64":
            vector = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    tokens = sum(len(i) if isinstance(i, list) else len(str(i).split()) for i in items)
    await _respond(send, 200, {"object": "list", "data": data, "model": request.get("model", "fake-model"),
                               "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _text_answer(prompt: Any) -> str:
    return ("echo: " + (prompt if isinstance(prompt, str) else json.dumps(prompt)))[:200]


def _text_usage(prompts: list[Any], texts: list[str]) -> dict[str, int]:
    prompt = sum(len(p) if isinstance(p, list) else len(str(p).split()) for p in prompts)
    completion = sum(len(t.split()) for t in texts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _text_complete(send: Send, request: dict[str, Any]) -> None:
    prompts = _items(request.get("prompt"))
    texts = [_text_answer(p) for p in prompts]
    choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": "stop"} for i, t in enumerate(texts)]
    head = {**_head(request, "text_completion"), "id": f"cmpl-fake{time.monotonic_ns():x}"}
    await _respond(send, 200, {**head, "choices": choices, "usage": _text_usage(prompts, texts)})


async def _text_stream(send: Send, request: dict[str, Any], drop: bool) -> None:
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
    await _send_events(send, events, drop)


async def _responses(send: Send, request: dict[str, Any], stream: bool, drop: bool) -> None:
    """/v1/responses: the chat route's answer (text, JSON, or a tool call) in the Responses shape."""
    chat = responses_api.as_chat(request)
    call = _tool_call(chat)
    text = _answer(chat) if call is None else ""
    usage = _usage(chat, text if call is None else call["function"]["arguments"])
    if not stream:
        await _respond(send, 200, responses_api.complete(request, text, call, usage))
        return
    events = responses_api.events(request, text, call, usage)
    await _send_events(send, events, drop)


class _QuietDrop(logging.Filter):
    """Drops the error uvicorn logs for the truncated responses ``drop_stream`` makes on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "returned without completing response" not in record.getMessage()


_QUIET_DROP = _QuietDrop()


class _Server(uvicorn.Server):
    """A uvicorn server that wakes ``hang``/``slow`` calls on exit and can print its URL.

    No ``install_signal_handlers`` override (encode/httpx's conftest has one): uvicorn >= 0.29
    only captures signals when it runs in the main thread.
    """

    def __init__(self, config: uvicorn.Config, app: FakeUpstreamApp, announce: bool) -> None:
        super().__init__(config)
        self.app, self.announce = app, announce

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.app.begin_close()
        super().handle_exit(sig, frame)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.announce:
            print(f"http://{self.config.host}:{self.config.port}", flush=True)


class FakeUpstream:
    """The fake upstream as an object: ``with FakeUpstream() as fake: use(fake.base_url)``.

    ``port=0`` picks a free port. :meth:`configure`, :meth:`reset` and :meth:`stats` are
    thread-safe and do what the ``/_control`` endpoints do.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, latency_ms: float = 0.0,
                 stream_chunks: int = 0) -> None:
        self.control = _Control(FaultConfig(latency_ms=latency_ms, stream_chunks=stream_chunks))
        self.app = FakeUpstreamApp(self.control)
        self.host, self.port = host, port
        self._server: _Server | None = None
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://HOST:PORT``, the port being the bound one once started."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI client's ``base_url``: :attr:`url` + ``/v1``."""
        return self.url + "/v1"

    def configure(self, mode: str = "ok", **params: Any) -> None:
        """Replace the fault config (see :class:`FaultConfig`); ValueError/TypeError if invalid."""
        self.control.configure(FaultConfig(mode=mode, **params))

    def reset(self) -> None:
        """Back to the config given at construction (mode ``ok``, its ``latency_ms``); zero stats."""
        self.control.reset()

    def stats(self) -> dict[str, Any]:
        """The document ``GET /_control/stats`` answers."""
        return self.control.snapshot()

    def _build(self, announce: bool) -> _Server:
        # Binding here, not in uvicorn, is what makes port 0 usable: we learn the port first.
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((self.host, self.port))
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(self.app, host=self.host, port=self.port, loop="auto", http="auto",
                                lifespan="on", access_log=False, log_level="warning",
                                timeout_graceful_shutdown=2)
        logging.getLogger("uvicorn.error").addFilter(_QUIET_DROP)  # after Config set up logging
        self._server = _Server(config, self.app, announce)
        return self._server

    def serve_forever(self) -> None:
        """Serve from the calling (main) thread until SIGINT/SIGTERM; print the URL when ready."""
        server = self._build(announce=True)
        try:
            server.run(sockets=[self._socket] if self._socket else None)
        finally:
            self._close_socket()

    def start(self, timeout: float = 10.0) -> FakeUpstream:
        """Serve from a daemon thread; return once a real HTTP request has been answered."""
        if self._thread is not None:
            raise RuntimeError("FakeUpstream already started")
        server = self._build(announce=False)
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [self._socket]},
                                        name=f"fake-upstream-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the fake upstream did not start")
            time.sleep(0.005)
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request("GET", "/_control/stats")
            conn.getresponse().read()
        finally:
            conn.close()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving (in-flight ``hang``/``slow`` calls get 503) and join the thread."""
        if self._server is not None:
            self.app.begin_close()
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._server = None
        self._close_socket()

    def _close_socket(self) -> None:
        if self._socket is not None:
            self._socket.close()  # usually closed already by uvicorn; closing twice is harmless
            self._socket = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGINT/SIGTERM; print the URL on one line once listening."""
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.upstream",
                                     description="A fake OpenAI-compatible upstream.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=9100,
                        help="0 picks a free port (default: %(default)s)")
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="latency of mode ok, in ms (default: %(default)s)")
    parser.add_argument("--stream-chunks", type=int, default=0,
                        help="content chunks per chat stream; 0: the answer in at most 4 (default: %(default)s)")
    args = parser.parse_args(argv)
    # uvicorn re-raises the signal it caught once it has shut down, under the handlers that were
    # in place before it ran; with these no-ops the program then returns 0 instead of dying of it.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda _sig, _frame: None)
    FakeUpstream(args.host, args.port, args.latency_ms, args.stream_chunks).serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
