"""The Gateway's Responses route: one model call on the one path, in the Responses shape.

    POST /v1/responses           JSON or SSE (`stream: true`)
    GET  /v1/responses/{id}      404 (nothing is stored; ``store: true`` is a 400 naming it)

``deployments.response_calls.ResponseCalls`` makes the call through ``deployments.model_calls.ModelCalls``
exactly as a chat call is made (the caller's key, limits, admission, budget, fallbacks, metering,
request id, metrics), so the two cannot drift apart; the model must declare the ``responses``
capability (else a 400 naming ``model``). A model whose upstream speaks the Responses API
(``upstream_api: responses``) gets the request forwarded and its answer relayed as it comes; any
other answers a chat call translated both ways (``core.responses``).

A stream is SSE with one ``event:`` line per event (as OpenAI sends them); an error after the 200
is an ``error`` event (numbered after the last event sent), and the stream ends without
``response.completed``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pydantic_core
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from deployments.errors import NotFound, PromptfleetError
from deployments.gateway import deadline
from deployments.gateway.caller import get_caller
from deployments.gateway.json_body import v1_router
from deployments.model_calls import ModelCalls
from deployments.response_calls import Events, ResponseCalls
from deployments.schemas.responses import ResponseCreate


def _sse(event: dict[str, Any]) -> bytes:
    # pydantic's serializer, as chat's ``sse``: the compact JSON ``json.dumps`` wrote (non-ASCII as
    # UTF-8 rather than \u escapes, the same text to a JSON parser).
    kind = event.get("type", "message")
    return b"event: " + (kind if isinstance(kind, str) else str(kind)).encode() + b"\ndata: " + \
        pydantic_core.to_json(event) + b"\n\n"


class ResponsesRoutes:
    def __init__(self, calls: ModelCalls) -> None:
        self.calls = calls
        self.responses = ResponseCalls(calls)

    def router(self) -> APIRouter:
        router = v1_router("openai")

        @router.post("/responses", response_model=None, openapi_extra=deadline.OPENAPI)
        async def create_response(body: ResponseCreate, http: Request) -> Response:
            caller = await get_caller(http)
            state = http.scope["state"]
            state["model"] = body.model  # for the access line and the metrics' model label
            wait_s = self.calls.wait_s(body.model, deadline.client_timeout(http.headers))
            if body.stream:
                stream = await self.responses.stream(body, caller.entry, wait_s=wait_s)
                return StreamingResponse(events(stream, state.get("request_id")),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            return JSONResponse(await self.responses.create(body, caller.entry, wait_s=wait_s))

        @router.get("/responses/{response_id}")
        async def get_response(response_id: str, http: Request) -> Response:
            await get_caller(http)
            raise NotFound(f"No response '{response_id}': responses are not stored (store: false).",
                           param="response_id")

        return router


async def events(stream: Events, request_id: str | None = None) -> AsyncIterator[bytes]:
    """The SSE lines of a streamed response's events, those that came together in one write; an error
    value becomes an ``error`` event."""
    last = -1
    try:
        async for batch in stream:
            if isinstance(batch, PromptfleetError):
                error = batch.to_body(request_id)["error"]
                # OpenAI's error event: its fields at the top level; `error` too, which the client raises.
                yield _sse({**error, "type": "error", "sequence_number": last + 1, "error": error})
                return
            lines = []
            for event in batch:
                number = event.get("sequence_number")
                last = number if isinstance(number, int) else last + 1
                lines.append(_sse(event))
            yield b"".join(lines)
    finally:
        await stream.aclose()  # stops the worker's generation and bills what was produced
