"""Gateway: the FastAPI ingress of promptfleet.

Serves: ``/v1/chat/completions`` (JSON and SSE), ``/v1/models``, ``/healthz``,
and the OpenAPI page at ``/docs``.
Calls: one ``ModelWorker`` deployment per model, through ``DeploymentHandle``s
chosen by the request's ``model``.
Owns: no state beyond its handles and config; any number of replicas can run.

Every error leaves through ``render_error`` in the OpenAI shape; the status
comes from the exception class, never from exception text.
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.config import AppArgs
from deployments.errors import (
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    PromptfleetError,
    RequestTooLarge,
)
from deployments.listener import Listener
from deployments.task_routes import build_task_router
from deployments.taskdefs import TaskDefinition
from deployments.schemas import ChatCompletionRequest, Health, ModelCard, ModelList

logger = logging.getLogger("ray.serve")


def render_error(error: PromptfleetError) -> JSONResponse:
    return JSONResponse(error.to_body(), status_code=error.status_code, headers=error.headers())


def validation_error(exc: RequestValidationError) -> InvalidRequest:
    """The first pydantic error as a 400 whose ``param`` is the dotted field path."""
    first = exc.errors()[0] if exc.errors() else {}
    # FastAPI prefixes the location ("body", "query", …); the param is the field itself.
    loc = [str(part) for part in first.get("loc", ())]
    if loc and loc[0] in ("body", "query", "path", "header"):
        loc = loc[1:]
    param = ".".join(loc) or None
    message = str(first.get("msg", "Invalid request body."))
    if first.get("type") == "json_invalid":
        return InvalidRequest("The request body is not valid JSON.", param=None)
    if first.get("type") == "missing":
        message = "Field required"
    return InvalidRequest(f"{param}: {message}" if param else message, param=param)


class BodySizeLimit:
    """ASGI middleware: 413 for bodies over ``limit`` bytes, before they are read whole.

    A declared Content-Length over the limit is refused without reading; a chunked
    body is counted as it arrives and cut off at the limit.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = RequestTooLarge(
            f"The request body is larger than the limit of {self.limit} bytes.", param=None
        )
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await render_error(too_large)(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise too_large
            return message

        try:
            await self.app(scope, limited_receive, send)
        except RequestTooLarge as exc:
            await render_error(exc)(scope, receive, send)


class Gateway:
    def __init__(
        self,
        args: AppArgs,
        workers: dict[str, DeploymentHandle],
        tasks: dict[str, TaskDefinition],
        store: DeploymentHandle,
        runner: DeploymentHandle,
    ) -> None:
        self.args = args
        self.workers = workers
        self.task_router = build_task_router(tasks, store, runner)
        self.stream_workers = {name: h.options(stream=True) for name, h in workers.items()}
        self.started = int(time.time())
        self.asgi_app = BodySizeLimit(self.build_api(), limit=args.gateway.max_body_bytes)
        self.model_cards = ModelList(
            data=[
                ModelCard(id=m.name, created=self.started, owned_by=f"promptfleet:{m.provider}")
                for m in args.models
            ]
        )

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return self.asgi_app

    @asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        """Serve runs the app's lifespan in the replica: start and stop the own listener with it."""
        gateway = self.args.gateway
        listener = None
        if gateway.listen_port is not None:
            listener = Listener(self.asgi_app, gateway.listen_host, gateway.listen_port)
            listener.start()
        try:
            yield
        finally:
            if listener is not None:
                await listener.stop()

    def build_api(self) -> FastAPI:
        api = FastAPI(
            title="promptfleet",
            summary="OpenAI-compatible LLM gateway on Ray Serve.",
            version="0.1.0",
            lifespan=self.lifespan,
        )

        @api.exception_handler(PromptfleetError)
        async def _known(_: Request, exc: PromptfleetError) -> JSONResponse:
            return render_error(exc)

        @api.exception_handler(RequestValidationError)
        async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
            return render_error(validation_error(exc))

        @api.exception_handler(Exception)
        async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
            # The full story goes to the replica log; the client learns nothing internal.
            logger.exception("unhandled error in gateway")
            return render_error(PromptfleetError("Internal error."))

        api.include_router(self.task_router)

        @api.get("/healthz", response_model=Health)
        async def healthz() -> Health:
            return Health(models=sorted(self.workers))

        @api.get("/v1/models", response_model=ModelList)
        async def list_models() -> ModelList:
            return self.model_cards

        @api.get("/v1/models/{model_id}", response_model=ModelCard)
        async def get_model(model_id: str) -> ModelCard:
            for card in self.model_cards.data:
                if card.id == model_id:
                    return card
            raise ModelNotFound(f"The model '{model_id}' does not exist.", param="model")

        @api.post("/v1/chat/completions", response_model=None)
        async def chat_completions(request: ChatCompletionRequest) -> Response:
            handle = self._worker(request.model)
            body = request.model_dump(exclude_unset=True, exclude_none=True)
            if request.stream:
                return await self._stream(request.model, body)
            try:
                result = await handle.chat.remote(body)
            except BackPressureError:
                raise overloaded(request.model) from None
            if isinstance(result, PromptfleetError):
                raise result
            return JSONResponse(result)

        return api

    def _worker(self, model: str) -> DeploymentHandle:
        handle = self.workers.get(model)
        if handle is None:
            raise ModelNotFound(f"The model '{model}' does not exist.", param="model")
        return handle

    async def _stream(self, model: str, body: dict[str, Any]) -> Response:
        chunks = self.stream_workers[model].chat_stream.remote(body)
        # Pull the first item before answering 200, so errors that happen before any
        # token (bad request, upstream 429) still get their proper status code.
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            first = None
        except BackPressureError:
            raise overloaded(model) from None
        if isinstance(first, PromptfleetError):
            raise first

        async def events() -> AsyncIterator[str]:
            try:
                if first is not None:
                    yield sse(first)
                async for chunk in chunks:
                    yield sse(chunk)
                    if isinstance(chunk, PromptfleetError):
                        return  # the error event ends the stream; no [DONE]
                yield "data: [DONE]\n\n"
            finally:
                # Client went away or we finished: cancel the worker's generator, which
                # stops the local generation or closes the upstream stream.
                chunks.cancel()

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )


def sse(item: dict[str, Any] | PromptfleetError) -> str:
    # An error after the 200 went out travels as an SSE event with an `error` object,
    # which openai-python raises as APIError.
    payload = item.to_body() if isinstance(item, PromptfleetError) else item
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def overloaded(model: str) -> Overloaded:
    return Overloaded(f"Model '{model}' is at capacity; retry shortly.", retry_after=1)
