"""DirectTransport: the calls to upstream models, made from the caller's own process.

Used by the Gateway's ``model_calls.ModelCalls`` (chat, streams, embeddings, text completions), and
the TaskRunner's, in place of a bare ``HandleTransport``. Calls: for an upstream (``openai``) model,
that model's provider in this process, served with the worker's conventions (``model_serving.ModelServing``:
errors as values, ``StreamEnd``, bounded ``max_tokens``, the call's log line); for every other
model (llama.cpp), its ``ModelWorker`` through ``HandleTransport``. Owns: one provider per upstream
model (its connection pool, its circuit breaker) and a count of the calls in flight to each.

Why: a call that went Gateway → worker → upstream paid for two Python processes, a handle round
trip and the worker's gRPC server per request, while the worker only relayed the upstream's JSON
(docs/performance.md, issue 22's profile). Everything the worker did for an upstream model is the
provider's (``providers.openai_compat``: retries, timeouts, error translation;
``limits.guard``: the model's shared rpm/tpm budget and 429 pause through the RateLimiter,
the breaker), so it runs unchanged here: the budgets and pauses stay shared by every process on
every node, since they live in the RateLimiter actor; the breaker, as before, is per process.

The upstream concurrency cap: the provider's pool opens at most ``max_concurrency`` connections
(as each worker replica did); beyond it calls wait for a connection, and past
``QUEUE_FACTOR × max_concurrency`` calls in flight to a model (the worker replica's
``max_queued_requests`` was 4 × its ``max_ongoing_requests``) a call is refused with ``Overloaded``
(503, Retry-After, transient: the next fallback model is tried), as a worker's backpressure was.
A background call — a queued run's, or a batch's task line's (``queued_run``, set by the TaskRunner's
executor for ``background`` work) — waits for a place instead, first come first served: a refusal
would cost a run one of its ``max_run_starts`` (a batch line one of its tries), and a burst of runs
on a slow upstream with a small ``max_concurrency`` used them all up in seconds. Its wait is
bounded by the runner's slots (``runner_concurrency``) and the task's ``timeout_s``.

The TaskRunner calls upstream models the same way for task runs (``for_upstreams``): a run went
Gateway → TaskRunner → worker → upstream, three Python processes, and the worker only relayed.
The ``ModelWorker`` of an upstream model keeps serving batch jobs (their ``ModelCalls`` use
``HandleTransport``) and the Gateway's readiness probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any

from ray.serve.handle import DeploymentHandle

from deployments.clients.failures import overloaded
from deployments.config import LogsConfig, ModelConfig, OpenAIModel
from deployments.model_calls import Transport, WorkerStream
from deployments.model_serving import ChatResult, ModelServing, StreamItem
from deployments.providers import build_provider
from deployments.schemas import ModelCall
from deployments.schemas.calls import BodyCall
from deployments.telemetry.recording import Metrics

# Calls in flight to one model allowed per process, as a multiple of its ``max_concurrency``:
# the worker's ``max_ongoing_requests`` plus its ``max_queued_requests`` (``app.worker_defaults``).
QUEUE_FACTOR = 5

# Set (True) in the context of background work (a queued run, a batch's task line): its calls wait
# for a place in a full model.
queued_run: contextvars.ContextVar[bool] = contextvars.ContextVar("queued_run", default=False)


class LocalStream:
    """A stream served in this process, as ``ModelCalls`` reads a worker's (``WorkerStream``)."""

    def __init__(
        self, items: AsyncIterator[StreamItem], release: Callable[[], None], closing: set[asyncio.Task[None]]
    ) -> None:
        self.items = items
        self.release = release
        self.closing = closing
        self.cancelled = False

    def __anext__(self) -> Awaitable[StreamItem]:
        return self.items.__anext__()

    def cancel(self) -> None:
        """Stop the generation (its ``finally`` closes the upstream response and settles the model's
        token booking) and free the call's place; ``ModelCalls`` calls it once the stream is done
        with, however it ended."""
        if self.cancelled:
            return
        self.cancelled = True
        self.release()
        aclose = getattr(self.items, "aclose", None)
        if aclose is not None:
            task = asyncio.get_running_loop().create_task(aclose())
            self.closing.add(task)  # held until done: the loop keeps only weak references to tasks
            task.add_done_callback(self.closing.discard)


class DirectTransport:
    """Upstream models served here (``served``, by model name); the rest through ``workers``."""

    def __init__(self, served: Mapping[str, ModelServing], workers: Transport) -> None:
        self.served = dict(served)
        self.workers = workers
        self.limits = {name: QUEUE_FACTOR * getattr(s.model, "max_concurrency", 1) for name, s in self.served.items()}
        self.in_flight = dict.fromkeys(self.served, 0)
        # Queued runs waiting for a place, oldest first; a place that frees passes to the first.
        self.waiting: dict[str, deque[asyncio.Future[None]]] = {name: deque() for name in self.served}
        self.closing: set[asyncio.Task[None]] = set()

    def _enter(self, model: str) -> bool:
        if self.in_flight[model] >= self.limits[model]:
            return False
        self.in_flight[model] += 1
        return True

    async def _wait_for_place(self, model: str) -> None:
        place = asyncio.get_running_loop().create_future()
        waiting = self.waiting[model]
        waiting.append(place)
        try:
            await place
        except asyncio.CancelledError:
            if place.done() and not place.cancelled():
                self._leave(model)  # handed a place as it was cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    waiting.remove(place)
            raise

    def _leave(self, model: str) -> None:
        waiting = self.waiting[model]
        while waiting:
            place = waiting.popleft()
            if not place.done():
                place.set_result(None)  # the place passes on: calls in flight stay as many
                return
        self.in_flight[model] -= 1

    def chat(self, model: str, call: ModelCall) -> Awaitable[Any]:
        served = self.served.get(model)
        if served is None:
            return self.workers.chat(model, call)
        return self._call(model, served.chat(call))

    def send(self, model: str, method: str, call: BodyCall) -> Awaitable[Any]:
        served = self.served.get(model)
        if served is None:
            return self.workers.send(model, method, call)
        return self._call(model, getattr(served, method)(call))

    async def _call(self, model: str, answer: Coroutine[Any, Any, ChatResult]) -> ChatResult:
        if not self._enter(model):
            if not queued_run.get():
                answer.close()  # never awaited: close it, or Python warns
                return overloaded(model)
            try:
                await self._wait_for_place(model)
            except BaseException:
                answer.close()
                raise
        try:
            return await answer
        finally:
            self._leave(model)

    def stream(self, model: str, call: ModelCall) -> WorkerStream:
        served = self.served.get(model)
        if served is None:
            return self.workers.stream(model, call)
        return self._open(model, served.chat_stream(call))

    def open(self, model: str, method: str, call: BodyCall) -> WorkerStream:
        served = self.served.get(model)
        if served is None:
            return self.workers.open(model, method, call)
        return self._open(model, getattr(served, method)(call))

    def _open(self, model: str, items: AsyncIterator[StreamItem]) -> WorkerStream:
        if not self._enter(model):
            return LocalStream(_only(overloaded(model)), lambda: None, self.closing)
        return LocalStream(items, lambda: self._leave(model), self.closing)

    async def close(self) -> None:
        for served in self.served.values():
            await served.provider.close()

    @classmethod
    def for_upstreams(
        cls, models: Sequence[ModelConfig], workers: Transport, limiter: DeploymentHandle | None, metrics: Metrics,
        logs: LogsConfig | None,
    ) -> DirectTransport:
        """Every upstream model of ``models`` served in this process (their budgets and pauses shared
        through ``limiter``), every other one through ``workers``."""
        return cls({model.name: ModelServing(model, build_provider(model, limiter=limiter, metrics=metrics), logs)
                    for model in models if isinstance(model, OpenAIModel)}, workers)


async def _only(item: StreamItem) -> AsyncIterator[StreamItem]:
    yield item
