"""The Gateway's /v1/embeddings route.

    POST /v1/embeddings    a string, strings or token arrays → vectors (float or base64), usage

Through the one model-call path (``ModelCalls.embed``): the caller's key, budget and limits, fair
admission, fallbacks (to models that also embed), metering, request ids — as chat. A model without the
``embeddings`` capability is a 400 naming ``model``. This module only speaks HTTP.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from deployments.gateway import deadline
from deployments.gateway.caller import get_caller
from deployments.gateway.json_body import v1_router
from deployments.model_calls import ModelCalls
from deployments.schemas.embeddings import EmbeddingRequest


def build_embedding_router(calls: ModelCalls) -> APIRouter:
    router = v1_router("openai")

    @router.post("/embeddings", response_model=None, openapi_extra=deadline.OPENAPI)
    async def embeddings(request: EmbeddingRequest, http: Request) -> Response:
        caller = await get_caller(http)
        http.scope["state"]["model"] = request.model  # for the access line
        wait_s = calls.wait_s(request.model, deadline.client_timeout(http.headers))
        return JSONResponse(await calls.embed(request, caller.entry, wait_s=wait_s))

    return router
