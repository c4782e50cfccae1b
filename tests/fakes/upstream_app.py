"""The fake upstream's raw ASGI application: routing, authorization and fault injection per call.

Routes ``/v1`` model calls to the answers of ``tests.fakes.openai_routes`` under the fault config of
``tests.fakes.upstream_faults``, and serves the ``/_control`` endpoints that read and set it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

from tests.fakes import responses_api
from tests.fakes.asgi import Message, Receive, Send, header_value, read_body, respond, respond_error
from tests.fakes.openai_routes import (
    chat_complete,
    chat_stream,
    embeddings,
    last_user_text,
    prompt_text,
    responses,
    text_complete,
    text_stream,
)
from tests.fakes.upstream_faults import Control, FaultConfig

# The model routes: each one answers in its own shape, with the same fault modes.
_ROUTES = {"/v1/chat/completions": "chat", "/v1/embeddings": "embeddings", "/v1/completions": "completions",
           "/v1/responses": "responses"}


class FakeUpstreamApp:
    """The raw ASGI application (routing by hand: no framework on the hot path)."""

    def __init__(self, control: Control) -> None:
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
            authorization = header_value(scope, b"authorization")
            key = self.control.config.api_key
            authorized = key is None or authorization == f"Bearer {key}"
            if method == "POST" and path in _ROUTES:
                await self._chat(receive, send, authorization, authorized, _ROUTES[path],
                                 header_value(scope, b"x-request-id"))
            elif not authorized:
                await respond_error(send, 401, "Incorrect API key provided.", "invalid_request_error",
                                    "invalid_api_key")
            elif method == "GET" and path == "/v1/models":
                await respond(send, 200, {"object": "list", "data": [_model("fake-model")]})
            elif method == "GET" and path.startswith("/v1/models/"):
                await respond(send, 200, _model(path.removeprefix("/v1/models/")))
            else:
                await respond_error(send, 404, f"No route {method} {path}", "invalid_request_error",
                                    "not_found")
        elif method == "POST" and path in ("/_control/config", "/_control/reset"):
            try:
                if path == "/_control/reset":
                    self.control.reset()
                else:
                    params = json.loads(await read_body(receive) or b"{}")
                    self.control.configure(FaultConfig(**params))
            except (ValueError, TypeError) as exc:  # our own validation messages
                await respond_error(send, 400, str(exc), "invalid_request_error", "invalid_config")
                return
            await respond(send, 200, dataclasses.asdict(self.control.config))
        elif method == "GET" and path == "/_control/stats":
            await respond(send, 200, self.control.snapshot())
        else:
            await respond_error(send, 404, f"No route {method} {path}", "invalid_request_error",
                                "not_found")

    async def _chat(
        self, receive: Receive, send: Send, authorization: str | None, authorized: bool, kind: str = "chat",
        request_id: str | None = None,
    ) -> None:
        body = await read_body(receive)
        config = self.control.begin_call(authorization, authorized, kind, request_id)
        try:
            if not authorized:
                await respond_error(send, 401, "Incorrect API key provided.", "invalid_request_error",
                                    "invalid_api_key")
                return
            try:
                request = json.loads(body)
            except ValueError:
                request = None
            if not isinstance(request, dict):
                await respond_error(send, 400, "The body is not a JSON object.", "invalid_request_error",
                                    "invalid_json")
                return
            self.control.record_prompt(
                last_user_text(request) if kind == "chat" else
                last_user_text(responses_api.as_chat(request)) if kind == "responses" else prompt_text(request),
                kind, request)
            stream, mode = bool(request.get("stream")), config.mode
            if mode == "rate_limit":
                await respond_error(send, 429, "Rate limit reached (injected by the fake upstream).",
                                    "rate_limit_error", "rate_limit_exceeded",
                                    [(b"retry-after", str(config.retry_after).encode())])
            elif mode == "error" or (mode in ("drop_stream", "stall_stream") and not stream):
                await respond_error(send, 500, "The server had an error (injected by the fake upstream).",
                                    "server_error", "internal_error")
            elif mode in ("hang", "slow") and await self._wait(
                    receive, None if mode == "hang" else config.delay_s):
                await respond_error(send, 503, "The fake upstream is stopping.", "server_error",
                                    "shutting_down")
            else:
                if mode == "ok" and config.latency_ms > 0:
                    await asyncio.sleep(config.latency_ms / 1000)
                if kind == "embeddings":
                    await embeddings(send, request)
                elif kind == "responses":
                    await responses(send, request, stream, drop=mode in ("drop_stream", "stall_stream"))
                    if stream and mode == "stall_stream":
                        await self._wait(receive, None)
                elif stream:
                    drop = mode in ("drop_stream", "stall_stream")
                    if kind == "chat":
                        await chat_stream(send, request, drop, config.stream_chunks,
                                          config.chunk_interval_ms / 1000)
                    else:
                        await text_stream(send, request, drop)
                    if mode == "stall_stream":
                        # Two chunks, then nothing until the client hangs up (counted in in_flight).
                        await self._wait(receive, None)
                else:
                    await (chat_complete if kind == "chat" else text_complete)(send, request)
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


def _model(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "promptfleet-fake"}
