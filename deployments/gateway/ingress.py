"""Gateway: the FastAPI ingress of promptfleet.

Serves: the OpenAI-compatible routes (``chat_routes``), tasks and runs
(``task_routes``), keys and usage (``admin_routes``), ``/healthz`` (``health``) and the
OpenAPI page at ``/docs`` — on its own listener (``listener``) and through
Serve's proxy.
Calls: ``ModelWorker`` deployments (by model name), ``TaskRunner``,
``TaskStore`` and ``RateLimiter``, through ``DeploymentHandle``s.
Owns: an index of the active API keys and unflushed usage counts
(``auth.Authenticator``, ``metering.Meter``); any number of replicas can run.

Every error leaves through ``render_error`` in the OpenAI shape; the status
comes from the exception class, never from exception text.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.serve.handle import DeploymentHandle
from ray.util import get_node_ip_address
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.config import AppArgs
from deployments.core.taskdefs import TaskDefinition
from deployments.errors import InvalidRequest, PromptfleetError, RequestTooLarge
from deployments.gateway.admin_routes import build_admin_router
from deployments.gateway.auth import Authenticator
from deployments.gateway.batch_routes import FILES_PATH, build_batch_router
from deployments.gateway.chat_routes import ChatRoutes
from deployments.gateway.health import HealthCheck
from deployments.gateway.listener import Listener
from deployments.gateway.metering import Meter
from deployments.gateway.task_routes import build_task_router
from deployments.model_calls import HandleTransport, ModelCalls
from deployments.schemas import Health
from deployments.store.batches import MAX_FILE_BYTES

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
    # pydantic prefixes messages of custom validators with "Value error, "; clients need only the reason.
    message = str(first.get("msg", "Invalid request body.")).removeprefix("Value error, ")
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

    def __init__(self, app: ASGIApp, limit: int, path_limits: dict[str, int] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.path_limits = path_limits or {}  # exact paths with a limit of their own (file uploads)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.path_limits.get(scope.get("path", ""), self.limit)
        too_large = RequestTooLarge(
            f"The request body is larger than the limit of {limit} bytes.", param=None
        )
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await render_error(too_large)(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
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
        limiter: DeploymentHandle,
        batches: DeploymentHandle | None = None,
    ) -> None:
        self.args = args
        self.workers = workers
        # The admin key is read once, here, from the variable the config names.
        admin_key = os.environ.get(args.auth.admin_key_env) or None
        if args.auth.enabled and admin_key is None:
            logger.warning("auth is enabled but $%s is not set: no admin key", args.auth.admin_key_env)
        self.auth = Authenticator(args.auth, store, admin_key)
        self.meter = Meter(store, limiter, args.admission)
        self.health = HealthCheck(
            store=store.check_health.remote,
            models={name: handle.check_health.remote for name, handle in workers.items()},
            node=get_node_ip_address(),
        )
        self.routers = [
            ChatRoutes(ModelCalls(args.models, HandleTransport(workers), self.meter)).router(),
            build_task_router(tasks, store, runner, self.meter),
            build_admin_router(store, self.auth, self.meter),
            *([build_batch_router(batches)] if batches is not None else []),
        ]
        self.asgi_app = BodySizeLimit(
            self.build_api(), limit=args.gateway.max_body_bytes, path_limits={FILES_PATH: MAX_FILE_BYTES}
        )

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return self.asgi_app

    @asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        """Serve runs the app's lifespan in the replica: start and stop the own listener with it."""
        gateway = self.args.gateway
        listener = None
        if gateway.listen_port is not None:
            listener = Listener(self.asgi_app, gateway.bind_host(get_node_ip_address()), gateway.listen_port)
            listener.start()
        try:
            yield
        finally:
            if listener is not None:
                await listener.stop()
            await self.meter.close()

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

        # Every /v1 route runs authentication first; it sets request.state.caller.
        authenticated = [Depends(self.auth.authenticate)]
        for router in self.routers:
            api.include_router(router, dependencies=authenticated)

        @api.get("/healthz", response_model=Health, responses={503: {"model": Health}})
        async def healthz() -> JSONResponse:
            health = await self.health.check()
            return JSONResponse(health.model_dump(), status_code=200 if health.status == "ok" else 503)

        return api
