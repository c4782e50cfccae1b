"""Gateway: the FastAPI ingress of promptfleet.

Serves: the OpenAI-compatible routes (``chat_routes``, ``embedding_routes``,
``completion_routes``), tasks and runs
(``task_routes``), task management for prompt owners (``prompt_routes``), keys and
usage (``admin_routes``), ``/healthz`` and ``/readyz`` (``health``), the OpenAPI page at
``/docs`` (its Swagger UI files served from the ``fastapi-swagger`` package: no CDN) and the
web console at ``/console`` (``deployments.console``) — on its own listener (``listener``) and through
Serve's proxy.
Calls: upstream (OpenAI-compatible) models from its own process
(``deployments.direct_transport``); ``ModelWorker`` deployments of local models (by model name),
``TaskRunner``, ``TaskStore``, ``BatchService`` and ``RateLimiter``, through their typed clients
(``deployments.clients``, built here from the handles ``app.py`` binds) and, for model calls,
``model_calls.HandleTransport``.
Owns: an index of the active API keys and unflushed usage counts
(``auth.Authenticator``, ``metering.Meter``), its copy of the task catalogue
(``deployments.catalogue``), and a provider per upstream model (connection pool, breaker); any
number of replicas can run.

Every error leaves through ``render_error`` in the OpenAI shape; the status
comes from the exception class, never from exception text; the body names the
request's id. Three ASGI layers run before any route: ``access.RequestIds`` (the
request's id, ``X-Request-ID`` on every response, the access line), ``AuthGate``
(the key, from the headers, before the body is read) and ``BodySizeLimit`` (413
for a body over the limit, declared or chunked); around them all, ``RequestMetrics``
counts and times every request (``deployments.telemetry``). Inside them, ``fast_chat``
answers valid chat requests without FastAPI (the hot route; the rest goes on to FastAPI).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.util import get_node_ip_address
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments import request_ids
from deployments.catalogue import CatalogueFollower
from deployments.clients.batches import BatchClient
from deployments.clients.keys import KeysClient
from deployments.clients.limiter import LimiterClient
from deployments.clients.runner import RunnerClient
from deployments.clients.runs import RunsClient
from deployments.clients.sessions import SessionsClient
from deployments.clients.task_versions import TaskVersionsClient
from deployments.clients.workers import WorkerClient
from deployments.collector import raise_first_generation
from deployments.config import AppArgs
from deployments.console.app import build_console
from deployments.console.cluster import Deployments
from deployments.console.overview import Overview
from deployments.console.pages import Pages
from deployments.console.prometheus import PROMETHEUS_ENV
from deployments.direct_transport import DirectTransport
from deployments.errors import (
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PromptfleetError,
    RequestTooLarge,
    field_path,
)
from deployments.gateway.access import RequestIds
from deployments.gateway.admin_routes import KeyAdmin, build_admin_router
from deployments.gateway.auth import Authenticator
from deployments.gateway.batch_routes import FILES_PATH, build_batch_router
from deployments.gateway.chat_routes import ChatRoutes
from deployments.gateway.completion_routes import build_completion_router
from deployments.gateway.embedding_routes import build_embedding_router
from deployments.gateway.fast_chat import FastChat
from deployments.gateway.files import FORM_OVERHEAD_BYTES
from deployments.gateway.health import HealthCheck
from deployments.gateway.listener import Listener
from deployments.gateway.prompt_routes import build_prompt_router
from deployments.gateway.protocol import ListenerLimits
from deployments.gateway.request_metrics import RequestMetrics
from deployments.gateway.responses_routes import ResponsesRoutes
from deployments.gateway.scopes import route_path
from deployments.gateway.task_routes import build_task_router
from deployments.limits.metering import Meter
from deployments.logs import watch_serve_log
from deployments.model_calls import HandleTransport, ModelCalls
from deployments.schemas import CatalogueStatus, Liveness, Readiness
from deployments.store.keys import ANONYMOUS_OWNER
from deployments.telemetry import GATEWAY_METRICS, UPSTREAM_WORKER_METRICS, metrics_for

logger = logging.getLogger("ray.serve")


def render_error(error: PromptfleetError, status_code: int | None = None) -> JSONResponse:
    """The OpenAI error body, naming the id of the request it answers (``access.RequestIds`` set it)."""
    return JSONResponse(error.to_body(request_ids.current()), status_code=status_code or error.status_code,
                        headers=error.headers())


def http_error(request: Request, exc: StarletteHTTPException) -> PromptfleetError:
    """Starlette's and FastAPI's own HTTP errors as ours (the status stays the one they chose)."""
    if exc.status_code == 404:
        return NotFound(f"No route {request.method} {route_path(request.scope)[:200]}.", param=None)
    if exc.status_code == 405:
        return MethodNotAllowed(f"{request.method} is not allowed on {route_path(request.scope)[:200]}.")
    detail = exc.detail if isinstance(exc.detail, str) else "Invalid request."
    if exc.status_code < 500:
        return InvalidRequest(detail[:500])
    return PromptfleetError("Internal error.")


def validation_error(exc: RequestValidationError, content_type: str | None = None) -> InvalidRequest:
    """The first pydantic error as a 400 whose ``param`` is the dotted field path (``content_type``: the
    request's, named when a body that is not JSON was refused)."""
    first = exc.errors()[0] if exc.errors() else {}
    # FastAPI prefixes the location ("body", "query", …); the param is the field itself.
    loc = [str(part) for part in first.get("loc", ())]
    # The body as a whole: none at all, or not a JSON object (a list, a form). (A model validator's
    # error sits at ["body"] too: it keeps its own message.)
    if loc == ["body"] and first.get("type") in ("missing", "model_attributes_type", "dict_type", "model_type"):
        if first.get("type") == "missing":
            what = "is missing"
        elif isinstance(exc.body, (bytes, bytearray)):  # FastAPI reads JSON only when the content type says so
            what = f"was sent as {(content_type or 'no content type')[:100]}, not JSON"
        else:
            what = "is not a JSON object"
        return InvalidRequest(f"The request body {what}: send a JSON object with Content-Type: application/json.",
                              param=None)
    if loc and loc[0] in ("body", "query", "path", "header"):
        loc = loc[1:]
    param = field_path(loc) or None
    # pydantic prefixes messages of custom validators with "Value error, "; clients need only the reason.
    message = str(first.get("msg", "Invalid request body.")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error")
        return InvalidRequest(f"The request body is not valid JSON: {str(reason)[:200]}." if reason
                              else "The request body is not valid JSON.", param=None)
    if first.get("type") == "missing":
        message = "Field required"
    return InvalidRequest(f"{param}: {message}" if param else message, param=param)


def has_body(scope: Scope) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"", b"0")):
            return True
    return False


async def refuse(error: PromptfleetError, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer ``error`` without reading the request's body; close the connection if a body is coming,
    so the server stops reading it (uvicorn would otherwise read and discard the rest)."""
    response = render_error(error)
    if has_body(scope):
        response.headers["Connection"] = "close"
    await response(scope, receive, send)


class AuthGate:
    """ASGI middleware: every /v1 request is authenticated from its headers before its body is read.

    The caller lands on ``scope["state"]["caller"]`` (``request.state.caller`` for the routes). A
    refused request is answered at once, in the OpenAI error shape, without touching its body —
    a multipart upload included. The lookup is the Authenticator's (cached per replica), so this
    adds no store round trip.
    """

    def __init__(self, app: ASGIApp, auth: Authenticator) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope)
        if scope["type"] != "http" or not (path == "/v1" or path.startswith("/v1/")):
            await self.app(scope, receive, send)
            return
        try:
            await self.auth.authenticate(Request(scope))
        except PromptfleetError as exc:
            await refuse(exc, scope, receive, send)
            return
        except Exception:
            logger.exception("authentication failed unexpectedly")
            await refuse(Overloaded("Authentication is unavailable; retry shortly.", retry_after=1),
                         scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodySizeLimit:
    """ASGI middleware: 413 in the OpenAI shape for bodies over ``limit`` bytes, before they are read whole.

    A declared Content-Length over the limit is refused without reading. A chunked body is counted
    as it arrives: at the limit the 413 goes out at once and the app sees the client disconnect
    (raising inside the app's ``receive`` would reach FastAPI's body parser, which turns any error
    into a 400 of its own).
    """

    def __init__(
        self, app: ASGIApp, limit: int, path_limits: dict[str, tuple[int, RequestTooLarge]] | None = None
    ) -> None:
        self.app = app
        self.limit = limit
        # Exact paths with a limit of their own, and the error naming it (file uploads: `file`).
        self.path_limits = path_limits or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, too_large = self.path_limits.get(route_path(scope)) or (
            self.limit, RequestTooLarge(f"The request body is larger than the limit of {self.limit} bytes.", param=None)
        )
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await refuse(too_large, scope, receive, send)
                return
        received = 0
        started = refused = answered = False

        async def limited_receive() -> Message:
            nonlocal received, refused, answered
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not started:  # else the app is answering already (a stream): only cut the body
                        answered = True
                        await refuse(too_large, scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if answered:
                return  # the 413 went out; whatever the app answers after it is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not answered:
                raise
            # The app saw the disconnect we made up and gave up on the request; it was answered.


class Gateway:
    def __init__(
        self,
        args: AppArgs,
        workers: dict[str, DeploymentHandle],
        store: DeploymentHandle,
        runner: DeploymentHandle,
        limiter: DeploymentHandle,
        batches: DeploymentHandle | None = None,
    ) -> None:
        watch_serve_log()
        raise_first_generation()
        self.args = args
        self.workers = workers
        # The admin key is read once, here, from the variable the config names.
        admin_key = os.environ.get(args.auth.admin_key_env) or None
        if args.auth.enabled and admin_key is None:
            logger.warning("auth is enabled but $%s is not set: no admin key", args.auth.admin_key_env)
        # The TaskStore's surfaces, each named for what it holds (one actor: deployments.task_store).
        runs, keys, versions = RunsClient(store), KeysClient(store), TaskVersionsClient(store)
        batch_client = BatchClient(batches) if batches is not None else None
        self.meter = Meter(keys, limiter, args.admission,
                           anonymous=None if args.auth.enabled else ANONYMOUS_OWNER)
        # A refresh of the key index counts what this replica's meter recorded and has not written.
        self.auth = Authenticator(args.auth, keys, admin_key, usage=self.meter)
        self.metrics = metrics_for(args.metrics)
        self.metrics.declare(*GATEWAY_METRICS, *UPSTREAM_WORKER_METRICS)
        self.tasks = CatalogueFollower(versions.changes, versions.version, args.tasks.catalogue_poll_s,
                                       wait=versions.wait_changed)
        self.health = HealthCheck(
            store=runs.check_health,
            models={name: WorkerClient(handle, name).readiness for name, handle in workers.items()},
            node=get_node_ip_address(),
            catalogue=self.tasks.status,
        )
        self.liveness = Liveness(status="ok", node=self.health.node)
        # Upstream models are called from here; their budgets and pauses stay shared through the limiter.
        self.transport = DirectTransport.for_upstreams(args.models, HandleTransport(workers), limiter, self.metrics,
                                                       args.logs)
        calls = ModelCalls(args.models, self.transport, self.meter, self.metrics)
        self.chat = ChatRoutes(calls)
        key_admin = KeyAdmin(keys, runs, self.auth, batch_client)
        self.routers = [
            self.chat.router(),
            ResponsesRoutes(calls).router(),
            build_embedding_router(calls),
            build_completion_router(calls),
            build_task_router(self.tasks, runs, RunnerClient(runner), self.meter, args.auth.enabled),
            build_prompt_router(args, self.tasks, versions),
            build_admin_router(key_admin, self.meter),
            *([build_batch_router(batch_client, args.tasks.quotas.max_file_bytes)] if batch_client is not None else []),
        ]
        self.console = build_console(
            Pages(
                tasks=self.tasks,
                runs=runs,
                batches=batch_client,
                keys=key_admin,
                meter=self.meter,
                overview=Overview(runs=runs, keys=keys, limiter=LimiterClient(limiter), health=self.health,
                                  meter=self.meter, prometheus_host=os.environ.get(PROMETHEUS_ENV) or None,
                                  deployments=Deployments()),
                owner="admin" if args.auth.enabled else "anonymous",
            ),
            self.auth,
            SessionsClient(store),
        )
        # Outermost first: the metrics, the request's id, who is calling (headers only), the body's size,
        # the hot route below FastAPI, the routes.
        api = self.build_api()
        max_file = args.tasks.quotas.max_file_bytes
        file_too_large = RequestTooLarge(f"file: larger than the limit of {max_file} bytes", param="file")
        limited = BodySizeLimit(FastChat(api, self.chat, self.chat.route, render_error),
                                limit=args.gateway.max_body_bytes,
                                path_limits={FILES_PATH: (max_file + FORM_OVERHEAD_BYTES, file_too_large)})
        app_name = serve.get_replica_context().app_name
        self.asgi_app = RequestMetrics(
            RequestIds(AuthGate(limited, self.auth), app_name, args.logs.access_log),
            # The routers' own routes: FastAPI (0.165) nests an included router's routes in one entry
            # of ``api.routes`` that does not match a scope, which left refused requests "unmatched".
            self.metrics, (m.name for m in args.models), [*(r for rt in self.routers for r in rt.routes), *api.routes],
        )

    async def catalogue_status(self) -> tuple[str, CatalogueStatus]:
        """This replica's id and the task catalogue it holds (operators and tests, through a handle)."""
        return serve.get_replica_context().replica_id.unique_id, self.tasks.status()

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return self.asgi_app

    @asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        """Serve runs the app's lifespan in the replica: start and stop the own listener with it."""
        gateway = self.args.gateway
        self.tasks.start()  # follows the task catalogue from here on (first load before most requests)
        listener = None
        if gateway.listen_port is not None:
            limits = ListenerLimits(
                header_timeout_s=gateway.header_timeout_s, body_timeout_s=gateway.body_timeout_s,
                max_connections=gateway.max_connections, max_connections_per_ip=gateway.max_connections_per_ip,
            )
            listener = Listener(self.asgi_app, gateway.bind_host(get_node_ip_address()), gateway.listen_port, limits)
            listener.start()
        try:
            yield
        finally:
            if listener is not None:
                await listener.stop()
            await self.tasks.stop()
            await self.meter.close()
            await self.transport.close()

    def build_api(self) -> FastAPI:
        api = FastAPI(
            title="promptfleet",
            summary="OpenAI-compatible LLM gateway on Ray Serve.",
            version="0.1.0",
            lifespan=self.lifespan,
            docs_url=None,  # served below, from local files
            redoc_url=None,  # ReDoc loads its script and fonts from CDNs: blank offline; /docs is the page
        )

        @api.exception_handler(PromptfleetError)
        async def _known(_: Request, exc: PromptfleetError) -> JSONResponse:
            return render_error(exc)

        @api.exception_handler(RequestValidationError)
        async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
            return render_error(validation_error(exc, request.headers.get("content-type")))

        @api.exception_handler(StarletteHTTPException)
        async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
            # Routing (404, 405) and FastAPI's own body parsing (400) raise these, with `{"detail"}` bodies.
            return render_error(http_error(request, exc), status_code=exc.status_code)

        @api.exception_handler(Exception)
        async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
            # The full story goes to the replica log; the client learns nothing internal.
            logger.exception("unhandled error in gateway")
            return render_error(PromptfleetError("Internal error."))

        # Every /v1 route was authenticated by AuthGate, which set request.state.caller.
        for router in self.routers:
            api.include_router(router)

        # Swagger UI's files come from the fastapi-swagger package (its resources/ folder): /docs works offline.
        api.mount("/docs/assets", StaticFiles(packages=[("fastapi_swagger", "resources")]), name="docs-assets")

        @api.get("/docs", include_in_schema=False)
        async def docs(request: Request) -> HTMLResponse:
            root = request.scope.get("root_path", "")
            return get_swagger_ui_html(
                openapi_url=f"{root}{api.openapi_url}",
                title="promptfleet API",
                swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js",
                swagger_css_url=f"{root}/docs/assets/swagger-ui.css",
                swagger_favicon_url=f"{root}/docs/assets/favicon-32x32.png",
            )

        api.mount("/console", self.console, name="console")

        @api.get("/healthz", response_model=Liveness)
        async def healthz() -> Liveness:
            return self.liveness

        @api.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
        async def readyz() -> JSONResponse:
            readiness = await self.health.check()
            return JSONResponse(readiness.model_dump(), status_code=200 if readiness.status == "ok" else 503)

        return api
