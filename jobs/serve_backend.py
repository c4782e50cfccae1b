"""Where a batch job's lines go: the ``Backend`` protocol, and ``ServeBackend``, the handles of the
running application (tests use a fake backend instead).

Chat, embeddings, completions and responses lines go through the same model call path as HTTP
calls (``deployments.model_calls``) to the models' ``ModelWorker`` deployments; task lines to the
``TaskRunner`` through the client the task route uses (``deployments.clients.runner``). Each line is
metered to the batch's key like an HTTP request of it (``deployments.limits.metering``); a line
waits up to ``LINE_WAIT_S`` for its slot under the key's rpm/tpm.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol

from deployments import names
from deployments.errors import PromptfleetError
from deployments.schemas import ChatCompletionRequest
from deployments.schemas.completions import CompletionRequest
from deployments.schemas.embeddings import EmbeddingRequest
from deployments.schemas.responses import ResponseCreate
from deployments.telemetry import NULL, Metrics

if TYPE_CHECKING:
    from deployments.clients.runner import RunnerClient
    from deployments.limits.metering import Meter
    from deployments.model_calls import ModelCalls

LINE_WAIT_S = 30.0  # how long a line may wait for its slot under the key's rpm/tpm

Result = dict[str, Any] | PromptfleetError
ModelRequest = ChatCompletionRequest | EmbeddingRequest | CompletionRequest | ResponseCreate


class SetupError(RuntimeError):
    """The batch cannot start (no input file, no such app); the message says why."""


class Backend(Protocol):
    """Where requests go: the Serve app's handles (``ServeBackend``), or a fake in tests."""

    def has_model(self, model: str) -> bool: ...

    def chat(self, request: ModelRequest, request_id: str) -> Awaitable[Result]:
        """A model line's request: chat, embeddings or text completion (by its type)."""
        ...

    def run_task(self, task: str, task_input: dict[str, Any], request_id: str) -> Awaitable[Result]: ...

    async def check_payer(self) -> None:
        """Raise ``SetupError`` if the key the lines are billed to cannot pay for any (unknown,
        revoked, budget spent): the job fails at once instead of writing an error line per line."""

    async def close(self) -> None:
        """Write what is still unwritten (the usage of the last lines)."""


class ServeBackend:
    """Handles of the running application ``app_name``: chat lines through ``ModelCalls``, task
    lines through the TaskRunner, metered to ``key_id`` (None: unmetered)."""

    def __init__(self, app_name: str, key_id: str | None = None, wait_s: float = 30.0,
                 metrics: Metrics = NULL) -> None:
        from ray import serve

        # serve.status() answers "no applications" while the controller cannot be reached
        # (seen on a loaded 2-core machine right after the driver connects): look again a while.
        deadline = time.monotonic() + wait_s
        while (app := serve.status().applications.get(app_name)) is None:
            if time.monotonic() > deadline:
                raise SetupError(f"no Serve application named {app_name!r} is running on this cluster")
            time.sleep(1.0)
        self.app_name = app_name
        self.key_id = key_id
        self.metrics = metrics
        self.models = {
            name.removeprefix(names.WORKER_PREFIX) for name in app.deployments if name.startswith(names.WORKER_PREFIX)
        }
        # Getting a handle is fine here; using it (even `handle.method`) must wait for the event loop.
        from deployments.clients.runner import RunnerClient

        self.runner: RunnerClient = RunnerClient(serve.get_deployment_handle(names.TASK_RUNNER, app_name))
        self.calls: ModelCalls | None = None
        self.meter: Meter | None = None
        self.connecting = asyncio.Lock()

    async def _calls(self) -> ModelCalls:
        """The model call path, built on first use: handles may only be used inside the event loop
        (with RAY_SERVE_THROUGHPUT_OPTIMIZED their router runs on the caller's loop)."""
        from ray import serve

        from deployments.clients.keys import KeysClient
        from deployments.clients.workers import WorkerClient
        from deployments.limits.metering import Meter
        from deployments.model_calls import HandleTransport, ModelCalls

        async with self.connecting:
            if self.calls is None:
                workers = {m: serve.get_deployment_handle(names.worker(m), self.app_name) for m in self.models}
                # The models' configs (fallbacks, output limits) from the workers themselves: this
                # driver has no copy of the app's arguments.
                models = await asyncio.gather(*(WorkerClient(handle, m).describe() for m, handle in workers.items()))
                # Lines without a key are recorded as the app records keyless calls: under `anonymous`
                # with its authentication off, else not at all (the operator's own job). The TaskRunner
                # knows which (it records keyless task lines the same way).
                keyless = None if self.key_id is not None else await self.runner.keyless_owner()
                if self.key_id is not None or keyless is not None:
                    self.meter = Meter(KeysClient(serve.get_deployment_handle(names.TASK_STORE, self.app_name)),
                                       serve.get_deployment_handle(names.RATE_LIMITER, self.app_name),
                                       anonymous=keyless)
                self.calls = ModelCalls(models, HandleTransport(workers), self.meter, self.metrics)
            return self.calls

    def has_model(self, model: str) -> bool:
        return model in self.models

    async def chat(self, request: ModelRequest, request_id: str) -> Result:
        try:
            calls = await self._calls()
            payer = await self.meter.account(self.key_id) if self.meter is not None else None
            if isinstance(request, EmbeddingRequest):
                return await calls.embed(request, payer, wait_s=LINE_WAIT_S, request_id=request_id, background=True)
            if isinstance(request, ResponseCreate):  # forwarded, or made with a chat call (response_calls)
                from deployments.response_calls import ResponseCalls

                return await ResponseCalls(calls).create(request, payer, wait_s=LINE_WAIT_S, request_id=request_id,
                                                         background=True)
            if isinstance(request, CompletionRequest):
                return await calls.text_complete(request, payer, wait_s=LINE_WAIT_S, request_id=request_id,
                                                 background=True)
            return await calls.complete(request, payer, wait_s=LINE_WAIT_S, request_id=request_id, background=True)
        except PromptfleetError as exc:
            return exc

    async def check_payer(self) -> None:
        if self.key_id is None:
            return
        await self._calls()
        assert self.meter is not None
        try:
            self.meter.check_token_budget(await self.meter.account(self.key_id))
        except PromptfleetError as exc:
            raise SetupError(f"--key-id {self.key_id}: {exc.message}") from None

    async def run_task(self, task: str, task_input: dict[str, Any], request_id: str) -> Result:
        # A runner at capacity or one that died mid-run is the client's 503 (the route's answer too);
        # the line tries again on a live replica (``before_upstream``).
        try:
            return await self.runner.run(task, task_input, payer=self.key_id, background=True,
                                         request_id=request_id)
        except PromptfleetError as exc:
            return exc

    async def close(self) -> None:
        if self.meter is not None:
            await self.meter.close()
