"""The Gateway's /v1/completions route (legacy text completion).

    POST /v1/completions    JSON, or SSE with `stream: true` (`text_completion` chunks, then [DONE])

Through the one model-call path (``ModelCalls.text_complete`` / ``text_stream``), as chat: the
caller's key and limits, fallbacks before the first byte, metering of every stream however it ends.
A model without the ``completions`` capability is a 400 naming ``model``.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from deployments.gateway import deadline
from deployments.gateway.caller import get_caller
from deployments.gateway.chat_routes import events
from deployments.gateway.json_body import v1_router
from deployments.model_calls import ModelCalls
from deployments.schemas.completions import CompletionRequest


def build_completion_router(calls: ModelCalls) -> APIRouter:
    router = v1_router("openai")

    @router.post("/completions", response_model=None, openapi_extra=deadline.OPENAPI)
    async def completions(request: CompletionRequest, http: Request) -> Response:
        caller = await get_caller(http)
        state = http.scope["state"]
        state["model"] = request.model  # for the access line
        wait_s = calls.wait_s(request.model, deadline.client_timeout(http.headers))
        if request.stream:
            chunks = await calls.text_stream(request, caller.entry, wait_s=wait_s)
            return StreamingResponse(events(chunks, state.get("request_id")), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(await calls.text_complete(request, caller.entry, wait_s=wait_s))

    return router
