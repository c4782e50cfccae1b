"""The OpenAI-compatible routes of the Gateway: chat completions and models.

    POST /v1/chat/completions    JSON or SSE (`stream: true`), with fallback models
    GET  /v1/models              the configured models
    GET  /v1/models/{id}

Calls go through ``deployments.model_calls.ModelCalls`` (fallbacks, Ray failures, metering
of the caller's key); this module only speaks HTTP. A model's ``fallback_models`` are tried
in order when it fails with an error whose class is transient — before the first byte of the
answer; the answer's ``model`` names the one that served it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import pydantic_core
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute

from deployments.errors import ModelNotFound, PromptfleetError
from deployments.gateway import deadline
from deployments.gateway.caller import get_caller
from deployments.gateway.json_body import v1_router
from deployments.model_calls import ModelCalls
from deployments.schemas import ChatCompletionRequest, Chunks, ModelCard, ModelList

CHAT_PATH = "/v1/chat/completions"


def sse(item: dict[str, Any] | PromptfleetError, request_id: str | None = None) -> bytes:
    # An error after the 200 went out travels as an SSE event with an `error` object,
    # which openai-python raises as APIError.
    payload = item.to_body(request_id) if isinstance(item, PromptfleetError) else item
    # pydantic's serializer: compact JSON as ``json.dumps(…, separators=(",", ":"))`` wrote it
    # (non-ASCII as UTF-8, not \u escapes), ~0.8 µs a chat chunk against ~3.7 µs: the largest
    # per-chunk cost of a relayed stream in the Gateway's profile (docs/performance.md).
    return b"data: " + pydantic_core.to_json(payload) + b"\n\n"


class ChatRoutes:
    def __init__(self, calls: ModelCalls) -> None:
        self.calls = calls
        self.route: BaseRoute | None = None  # the chat route, once ``router()`` made it
        started = int(time.time())
        self.cards = ModelList(
            data=[
                ModelCard(id=m.name, created=started, owned_by=f"promptfleet:{m.provider}",
                          capabilities=list(m.capabilities))
                for m in calls.models.values()
            ]
        )

    def router(self) -> APIRouter:
        router = v1_router("openai")

        @router.get("/models", response_model=ModelList)
        async def list_models() -> ModelList:
            return self.cards

        @router.get("/models/{model_id}", response_model=ModelCard)
        async def get_model(model_id: str) -> ModelCard:
            for card in self.cards.data:
                if card.id == model_id:
                    return card
            raise ModelNotFound(f"The model '{model_id}' does not exist.", param="model")

        @router.post(CHAT_PATH.removeprefix("/v1"), response_model=None, openapi_extra=deadline.OPENAPI)
        async def chat_completions(request: ChatCompletionRequest, http: Request) -> Response:
            # Valid bodies usually take ``gateway.fast_chat`` and never reach this route; it serves the
            # rest (FastAPI's errors for them) and documents the route.
            return await self.respond(request, http)

        # The route object FastAPI puts in the scope for this route (what the request metrics read);
        # ``fast_chat`` puts it there too.
        self.route = router.routes[-1]
        return router

    async def respond(self, request: ChatCompletionRequest, http: Request) -> Response:
        """The answer to a validated chat request. It reads its caller and deadline itself: as FastAPI
        dependencies they cost ~80 µs of the Gateway's ~2 ms CPU per request (dependency solving)."""
        caller = await get_caller(http)
        state = http.scope["state"]
        state["model"] = request.model  # for the access line (``access.RequestIds``)
        wait_s = self.calls.wait_s(request.model, deadline.client_timeout(http.headers))
        if request.stream:
            chunks = await self.calls.stream(request, caller.entry, wait_s=wait_s)
            return StreamingResponse(
                events(chunks, state.get("request_id")), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        return JSONResponse(await self.calls.complete(request, caller.entry, wait_s=wait_s))


async def events(
    chunks: AsyncGenerator[Chunks | PromptfleetError, None], request_id: str | None = None
) -> AsyncIterator[bytes]:
    """SSE events of a stream, those of the chunks that came together in one write (one ASGI ``send``,
    one socket write: under load most of a relayed stream's cost per chunk was paid per write);
    ``[DONE]`` only when it ended without an error (whose body names ``request_id``)."""
    try:
        async for batch in chunks:
            if isinstance(batch, PromptfleetError):
                yield sse(batch, request_id)
                return  # the error event ends the stream; no [DONE]
            yield sse(batch[0]) if len(batch) == 1 else b"".join([sse(chunk) for chunk in batch])
        yield b"data: [DONE]\n\n"
    finally:
        # The client went away or we finished: close the relay now (it stops the worker's
        # generation and bills what was produced), not whenever the generator is collected.
        await chunks.aclose()
