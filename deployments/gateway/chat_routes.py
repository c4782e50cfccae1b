"""The OpenAI-compatible routes of the Gateway: chat completions and models.

    POST /v1/chat/completions    JSON or SSE (`stream: true`), with fallback models
    GET  /v1/models              the configured models
    GET  /v1/models/{id}

A model's ``fallback_models`` are tried in order when it fails with a rate
limit, an upstream error or timeout, an open circuit or overload — before the
first byte of the answer; the answer's ``model`` names the one that served it.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from deployments.config import ModelConfig
from deployments.errors import (
    ModelNotFound,
    Overloaded,
    PromptfleetError,
    RateLimited,
    UpstreamError,
    UpstreamTimeout,
)
from deployments.gateway.caller import Caller, get_caller
from deployments.gateway.deadline import client_timeout
from deployments.gateway.metering import Meter
from deployments.providers.admission import estimate_tokens
from deployments.schemas import ChatCompletionRequest, ModelCard, ModelList, Share

# Failures of one model that another model may not share.
FALLBACK_ON = (RateLimited, UpstreamError, UpstreamTimeout, Overloaded)


def sse(item: dict[str, Any] | PromptfleetError) -> str:
    # An error after the 200 went out travels as an SSE event with an `error` object,
    # which openai-python raises as APIError.
    payload = item.to_body() if isinstance(item, PromptfleetError) else item
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def overloaded(model: str) -> Overloaded:
    return Overloaded(f"Model '{model}' is at capacity; retry shortly.", retry_after=1)


def unavailable(model: str) -> Overloaded:
    return Overloaded(f"Model '{model}' is temporarily unavailable; retry shortly.", retry_after=1)


WORKER_GONE = (RayActorError, WorkerCrashedError, NodeDiedError)


class ChatRoutes:
    def __init__(
        self, models: list[ModelConfig], workers: dict[str, DeploymentHandle], meter: Meter
    ) -> None:
        self.models = {m.name: m for m in models}
        self.workers = workers
        self.stream_workers = {name: h.options(stream=True) for name, h in workers.items()}
        self.meter = meter
        started = int(time.time())
        self.cards = ModelList(
            data=[ModelCard(id=m.name, created=started, owned_by=f"promptfleet:{m.provider}") for m in models]
        )

    def chain(self, model: str) -> list[str]:
        config = self.models.get(model)
        if config is None:
            raise ModelNotFound(f"The model '{model}' does not exist.", param="model")
        return [model, *config.fallback_models]

    def router(self) -> APIRouter:
        router = APIRouter(prefix="/v1", tags=["openai"])

        @router.get("/models", response_model=ModelList)
        async def list_models() -> ModelList:
            return self.cards

        @router.get("/models/{model_id}", response_model=ModelCard)
        async def get_model(model_id: str) -> ModelCard:
            for card in self.cards.data:
                if card.id == model_id:
                    return card
            raise ModelNotFound(f"The model '{model_id}' does not exist.", param="model")

        @router.post("/chat/completions", response_model=None)
        async def chat_completions(
            request: ChatCompletionRequest,
            caller: Annotated[Caller, Depends(get_caller)],
            client_timeout_s: Annotated[float | None, Depends(client_timeout)],
        ) -> Response:
            chain = self.chain(request.model)
            body = request.model_dump(exclude_unset=True, exclude_none=True)
            estimated = estimate_tokens(body)
            deadline = self.meter.deadline(client_timeout_s, self.models[request.model].admission_wait_s)
            await self.meter.admit(caller, estimated, deadline)
            share = self.meter.share(caller)
            if request.stream:
                return await self.stream(chain, body, caller, estimated, share)
            result = await self.complete(chain, body, share)
            self.meter.record(caller, result.get("model", request.model), result.get("usage"), estimated)
            return JSONResponse(result)

        return router

    async def complete(self, chain: list[str], body: dict[str, Any], share: Share | None) -> dict[str, Any]:
        for index, model in enumerate(chain):
            try:
                result = await self.workers[model].chat.remote(body, share)
            except BackPressureError:
                result = overloaded(model)
            except WORKER_GONE:
                # The replica (or its node) died with the call in flight; Serve replaces it.
                result = unavailable(model)
            if not isinstance(result, PromptfleetError):
                return dict(result)
            if index == len(chain) - 1 or not isinstance(result, FALLBACK_ON):
                raise result
        raise AssertionError("unreachable")

    async def stream(
        self, chain: list[str], body: dict[str, Any], caller: Caller, estimated: int, share: Share | None
    ) -> Response:
        chunks, first = await self.open_stream(chain, body, share)

        async def events() -> AsyncIterator[str]:
            usage: dict[str, Any] | None = None
            model = chain[0]
            try:
                if first is not None:
                    model = first.get("model", model)
                    yield sse(first)
                async for chunk in chunks:
                    yield sse(chunk)
                    if isinstance(chunk, PromptfleetError):
                        return  # the error event ends the stream; no [DONE]
                    usage = chunk.get("usage") or usage
                yield "data: [DONE]\n\n"
            finally:
                # Client went away or we finished: cancel the worker's generator, which
                # stops the local generation or closes the upstream stream.
                chunks.cancel()
                self.meter.record(caller, model, usage, estimated)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def open_stream(
        self, chain: list[str], body: dict[str, Any], share: Share | None
    ) -> tuple[DeploymentResponseGenerator, dict[str, Any] | None]:
        """Start the stream on the first model of ``chain`` that yields a first chunk.

        The first item is pulled before answering 200, so errors that happen before any
        token (bad request, upstream 429) get their proper status code — or a fallback.
        """
        for index, model in enumerate(chain):
            chunks = self.stream_workers[model].chat_stream.remote(body, share)
            try:
                first: Any = await chunks.__anext__()
            except StopAsyncIteration:
                return chunks, None
            except BackPressureError:
                first = overloaded(model)
            except WORKER_GONE:
                first = unavailable(model)
            if not isinstance(first, PromptfleetError):
                return chunks, first
            chunks.cancel()
            if index == len(chain) - 1 or not isinstance(first, FALLBACK_ON):
                raise first
        raise AssertionError("unreachable")
