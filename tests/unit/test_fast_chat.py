"""The hot route below FastAPI (``deployments.gateway.fast_chat``), as an ASGI app with fake workers
(no Ray): what it answers itself, and that everything else reaches the app behind it unchanged."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments import errors
from deployments.config import OpenAIModel
from deployments.gateway.caller import Caller
from deployments.gateway.chat_routes import CHAT_PATH, ChatRoutes
from deployments.gateway.fast_chat import FastChat
from deployments.gateway.request_metrics import RequestMetrics
from deployments.model_calls import ModelCalls
from deployments.telemetry import REQUESTS, MemoryBackend
from deployments.telemetry.recording import Metrics
from tests.fakes.workers import FakeWorkers

MODEL = OpenAIModel(provider="openai", name="m", base_url="http://127.0.0.1:1/v1")
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class Behind:
    """The app behind the fast path: records what reached it, answers 299."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(body)
        await JSONResponse({"behind": True}, status_code=299)(scope, receive, send)


def render(error: errors.PromptfleetError) -> JSONResponse:
    return JSONResponse(error.to_body(None), status_code=error.status_code)


def chat_routes(workers: FakeWorkers | None = None) -> ChatRoutes:
    chat = ChatRoutes(ModelCalls([MODEL], workers or FakeWorkers()))
    chat.router()  # makes its route
    return chat


def serve(
    body: bytes | list[bytes], *, method: str = "POST", path: str = CHAT_PATH,
    content_type: bytes | None = b"application/json", workers: FakeWorkers | None = None,
    wrap: Callable[[ASGIApp], ASGIApp] = lambda app: app,
) -> tuple[int, Any, Behind, Scope]:
    """One request through ``FastChat`` (inside ``wrap``); its status, JSON answer (or SSE text), the app
    behind, the scope."""
    behind = Behind()
    chat = chat_routes(workers)
    app = wrap(FastChat(behind, chat, chat.route, render))
    headers = [(b"content-type", content_type)] if content_type is not None else []
    scope: Scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": headers,
                    "query_string": b"", "state": {"caller": Caller(owner="anonymous")}}
    parts = body if isinstance(body, list) else [body]
    messages: list[Message] = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1}
                               for i, p in enumerate(parts)]
    sent: list[Message] = []

    async def receive() -> Message:
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    if not sent:
        return 0, None, behind, scope
    status = sent[0]["status"]
    payload = b"".join(m.get("body", b"") for m in sent[1:])
    text = payload.decode()
    return status, (json.loads(text) if text.startswith("{") else text), behind, scope


def test_a_valid_chat_request_is_answered_without_the_app_behind() -> None:
    status, answer, behind, scope = serve(json.dumps(BODY).encode())
    assert status == 200 and answer["model"] == "m" and behind.bodies == []
    assert scope["route"].path == CHAT_PATH  # the request metrics read the route's template
    assert scope["state"]["model"] == "m"  # the access line's model


def test_the_request_metrics_label_it_with_the_routes_template_and_model() -> None:
    backend = MemoryBackend()
    metrics = Metrics("app", backend=backend)
    api = FastAPI()
    api.include_router(chat_routes().router())
    status, *_ = serve(json.dumps(BODY).encode(), wrap=lambda app: RequestMetrics(app, metrics, ["m"], api.routes))
    assert status == 200
    assert backend.total(REQUESTS, route=CHAT_PATH, model="m", status_class="2xx") == 1


def test_a_body_in_several_parts_and_a_charset_are_taken_too() -> None:
    raw = json.dumps(BODY).encode()
    status, answer, behind, _ = serve([raw[:10], raw[10:]], content_type=b"Application/JSON; charset=utf-8")
    assert status == 200 and answer["model"] == "m" and behind.bodies == []


def test_streams_are_answered_as_sse() -> None:
    status, text, behind, _ = serve(json.dumps({**BODY, "stream": True}).encode())
    assert status == 200 and text.endswith("data: [DONE]\n\n") and behind.bodies == []


def test_a_chunk_is_one_compact_utf8_sse_event() -> None:
    from deployments.errors import Overloaded
    from deployments.gateway.chat_routes import sse

    chunk = {"id": "c", "choices": [{"index": 0, "delta": {"content": "h\u00e9 \u2603"}, "finish_reason": None}]}
    event = sse(chunk)
    assert event == b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"h\xc3\xa9 \xe2\x98\x83"},' \
                    b'"finish_reason":null}]}\n\n'
    assert json.loads(event.removeprefix(b"data: ")) == chunk
    error = json.loads(sse(Overloaded("busy", retry_after=1), "req-1").removeprefix(b"data: "))
    assert error["error"]["code"] == "overloaded" and error["error"]["request_id"] == "req-1"


def test_invalid_bodies_reach_the_app_behind_with_the_bytes_read() -> None:
    for body in (b"{not json", b"[]", json.dumps({"model": "m"}).encode(), b""):
        status, _, behind, _ = serve(body)
        assert status == 299 and behind.bodies == [body], body


def test_other_methods_paths_and_content_types_reach_the_app_behind() -> None:
    raw = json.dumps(BODY).encode()
    for options in ({"method": "GET"}, {"path": "/v1/completions"}, {"content_type": None},
                    {"content_type": b"text/plain"}, {"content_type": b"application/json-seq"}):
        status, _, behind, _ = serve(raw, **options)  # type: ignore[arg-type]
        assert status == 299 and behind.bodies == [raw], options


def test_errors_are_rendered_in_the_openai_shape() -> None:
    status, answer, _, _ = serve(json.dumps({**BODY, "model": "nope"}).encode())
    assert status == 404 and answer["error"]["code"] == "model_not_found" and answer["error"]["param"] == "model"
    workers = FakeWorkers({"m": [RuntimeError("a bug")]})
    status, answer, _, _ = serve(json.dumps(BODY).encode(), workers=workers)
    assert status == 500 and answer["error"]["message"] == "Internal error."


def test_a_client_that_leaves_mid_body_gets_nothing() -> None:
    behind = Behind()
    chat = chat_routes()
    app = FastChat(behind, chat, chat.route, render)
    messages: list[Message] = [{"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return messages.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": CHAT_PATH, "headers": [(b"content-type", b"application/json")]}
    asyncio.run(app(scope, receive, send))
    assert sent == [] and behind.bodies == []
