"""The Gateway's Responses route: one model call through the chat path, in the Responses shape.

    POST /v1/responses           JSON or SSE (`stream: true`)
    GET  /v1/responses/{id}      404 (nothing is stored; ``store: true`` is a 400 naming it)

``core.responses`` translates the request into a chat request and the answer back; the call goes
through ``deployments.model_calls.ModelCalls`` exactly as a chat call does (the caller's key,
limits, admission, budget, fallbacks, metering, request id, metrics), so the two cannot drift
apart; the model must declare the ``responses`` capability (else a 400 naming ``model``).
An error naming a chat field is renamed to the Responses field the client sent.

A stream is SSE with one ``event:`` line per event (as OpenAI sends them); an error after the 200
is an ``error`` event, and the stream ends without ``response.completed``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from deployments.core import responses
from deployments.errors import NotFound, PromptfleetError
from deployments.gateway import deadline
from deployments.gateway.caller import get_caller
from deployments.model_calls import ModelCalls
from deployments.schemas.responses import ResponseCreate


def _renamed(exc: PromptfleetError) -> PromptfleetError:
    """``exc`` naming the Responses field for the chat field it names."""
    exc.param = responses.param_of(exc.param)
    return exc


def _sse(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"


class ResponsesRoutes:
    def __init__(self, calls: ModelCalls) -> None:
        self.calls = calls

    def router(self) -> APIRouter:
        router = APIRouter(prefix="/v1", tags=["openai"])

        @router.post("/responses", response_model=None, openapi_extra=deadline.OPENAPI)
        async def create_response(body: ResponseCreate, http: Request) -> Response:
            caller = await get_caller(http)
            state = http.scope["state"]
            state["model"] = body.model  # for the access line and the metrics' model label
            request = responses.to_chat(body)
            wait_s = self.calls.wait_s(body.model, deadline.client_timeout(http.headers))
            try:
                if body.stream:
                    chunks = await self.calls.stream(request, caller.entry, wait_s=wait_s, capability="responses")
                else:
                    completion = await self.calls.complete(request, caller.entry, wait_s=wait_s,
                                                           capability="responses")
            except PromptfleetError as exc:
                raise _renamed(exc) from None
            if body.stream:
                return StreamingResponse(events(body, chunks, state.get("request_id")),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            return JSONResponse(responses.from_chat(body, completion))

        @router.get("/responses/{response_id}")
        async def get_response(response_id: str, http: Request) -> Response:
            await get_caller(http)
            raise NotFound(f"No response '{response_id}': responses are not stored (store: false).",
                           param="response_id")

        return router


async def events(
    body: ResponseCreate, chunks: AsyncGenerator[dict[str, Any] | PromptfleetError, None],
    request_id: str | None = None,
) -> AsyncIterator[str]:
    """The SSE events of a streamed response."""
    sequence = responses.ResponseEvents(body)
    try:
        for event in sequence.start():
            yield _sse(event)
        async for chunk in chunks:
            if isinstance(chunk, PromptfleetError):
                error = _renamed(chunk).to_body(request_id)["error"]
                # OpenAI's error event: its fields at the top level; `error` too, which the client raises.
                yield _sse({**error, "type": "error", "sequence_number": sequence.sequence, "error": error})
                return
            for event in sequence.chunk(chunk):
                yield _sse(event)
        for event in sequence.end():
            yield _sse(event)
    finally:
        await chunks.aclose()  # stops the worker's generation and bills what was produced
