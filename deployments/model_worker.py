"""ModelWorker: one autoscaling Serve deployment per configured model.

Serves: ``chat(call)`` and ``chat_stream(call)`` (a streaming handle method); ``embed(call)``,
``complete(call)`` and ``complete_stream(call)`` for /v1/embeddings and /v1/completions, and
``respond(call)`` and ``respond_stream(call)`` for /v1/responses forwarded to an upstream that
speaks it (a ``BodyCall``: same conventions, the answer body in a ``ChatReply``); and
``describe()`` (its ``ModelConfig``, for batch drivers that build the model call path
outside the Gateway); called through a ``DeploymentHandle`` by the one model call
path, ``deployments.model_calls.ModelCalls`` (in the Gateway, the TaskRunner and
batch jobs).
Calls: its provider — a loaded llama.cpp model or an AsyncOpenAI client — and,
for upstream models, the RateLimiter (shared budgets and 429 pauses).
Owns: the provider, i.e. the loaded weights or the upstream connection pool.

What crosses the handle is typed (``deployments.schemas``), one convention for
every method:

- in: a ``ModelCall`` — the validated ``ChatCompletionRequest`` and its request id;
- out, JSON: a ``ChatReply`` (the completion and its ``Usage``);
- out, streaming: chunk dicts (the OpenAI ``chat.completion.chunk`` bodies, sent
  to the client as they are), then one ``StreamEnd`` with the generation's usage;
- expected failures (a 429 upstream, a bad request) are *values*: the method
  returns — or, when streaming, yields last — the ``PromptfleetError`` instead of
  raising it. A raised exception would be wrapped in a ``RayTaskError``, carry a
  formatted traceback across processes and be logged as a replica crash; a
  returned one is a cheap pickle and the caller raises it. Anything unexpected
  still raises and becomes a bare 500.

A request's ``max_tokens`` above this model's ``output_limit`` is lowered to it
here (the caller has already refused such requests for the model they named; this
bounds what a fallback model is asked for).

Logs: each call is served under its ``request_id`` (``deployments.request_ids.use``, so every
line of this replica about it carries the id) and, with ``logs.access_log``, ends with one line —
model, stream or not, outcome, latency. The prompt and the output are in that line only with
``logs.content`` (which writes the line whatever ``access_log`` says).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from ray.serve.handle import DeploymentHandle

from deployments import logs as logs_module
from deployments import request_ids
from deployments.config import LogsConfig, MetricsConfig, ModelConfig, OpenAIModel
from deployments.errors import InvalidRequest, PromptfleetError
from deployments.providers import Provider, ResponsesProvider, build_provider
from deployments.schemas import ChatReply, ModelCall, ModelReadiness, StreamEnd
from deployments.schemas.calls import BodyCall
from deployments.telemetry import LOCAL_WORKER_METRICS, UPSTREAM_WORKER_METRICS, metrics_for

logger = logging.getLogger("ray.serve")

ChatResult = ChatReply | PromptfleetError
StreamItem = dict[str, Any] | StreamEnd | PromptfleetError


UPSTREAM_PROBE_TIMEOUT_S = 2.0


async def reachable(base_url: str, timeout_s: float = UPSTREAM_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``base_url``'s host and port opens within ``timeout_s``: no
    request is sent, so the probe costs the upstream no quota and needs no key."""
    url = urlsplit(base_url)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(url.hostname, port), timeout_s)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


class ModelWorker:
    def __init__(
        self,
        model: ModelConfig,
        limiter: DeploymentHandle | None = None,
        provider: Provider | None = None,
        logs: LogsConfig | None = None,
        metrics: MetricsConfig | None = None,
    ) -> None:
        logs_module.watch_serve_log()
        self.model = model
        recorder = metrics_for(metrics)
        recorder.declare(*(UPSTREAM_WORKER_METRICS if isinstance(model, OpenAIModel) else LOCAL_WORKER_METRICS))
        self.provider = provider or build_provider(model, limiter=limiter, metrics=recorder)
        logs = logs or LogsConfig()
        self.log_content = logs.content
        # The call's line goes with the Gateway's access line (or with content, which it carries).
        self.log_calls = logs.access_log or logs.content
        logger.info("worker for model %r ready (provider %s)", model.name, model.provider)

    def _served(self, call: ModelCall, stream: bool, started: float, outcome: str, output: str | None) -> None:
        """The call's one log line (its request id comes from the request context)."""
        if not self.log_calls:
            return
        latency_ms = round((time.perf_counter() - started) * 1000, 1)
        extra: dict[str, object] = {"model": self.model.name, "stream": stream, "outcome": outcome,
                                    "latency_ms": latency_ms}
        if self.log_content:
            extra.update(messages=call.body().get("messages"), output=output)
        logger.info("served %s%s: %s in %.1fms%s", self.model.name, " (stream)" if stream else "", outcome,
                    latency_ms, f" messages={extra['messages']!r} output={output!r}" if self.log_content else "",
                    extra=extra)

    def body(self, call: ModelCall) -> dict[str, Any]:
        body = call.body()
        limit = self.model.output_limit
        for name in ("max_tokens", "max_completion_tokens"):
            if name in body and body[name] > limit:
                body[name] = limit
        return body

    async def chat(self, call: ModelCall) -> ChatResult:
        request_ids.use(call.request_id)
        started = time.perf_counter()
        # ``call.share``: whose call it is (key, weight, priority), for the fair share of a limited model.
        try:
            completion = await self.provider.chat(self.body(call), call.share)
        except PromptfleetError as exc:
            self._served(call, False, started, exc.code, None)
            return exc
        except BaseException as exc:
            self._served(call, False, started, "cancelled" if isinstance(exc, asyncio.CancelledError) else "crashed",
                         None)
            raise
        reply = ChatReply.of(completion)
        self._served(call, False, started, "ok", _text(completion) if self.log_content else None)
        return reply

    async def chat_stream(self, call: ModelCall) -> AsyncIterator[StreamItem]:
        request_ids.use(call.request_id)
        started = time.perf_counter()
        outcome = "cancelled"  # stays if the caller stops reading (client gone, fallback) before the end
        parts: list[str] | None = [] if self.log_content else None
        try:
            async for chunk in self.provider.stream(self.body(call), call.share):
                if parts is not None and isinstance(chunk, dict):
                    parts.append(_delta(chunk))
                yield chunk
            outcome = "ok"
        except PromptfleetError as exc:
            outcome = exc.code
            yield exc
        finally:
            self._served(call, True, started, outcome, "".join(parts) if parts is not None else None)

    # -- embeddings and text completions: the same conventions as chat -------------------------

    def _capped(self, call: BodyCall, field: str = "max_tokens") -> dict[str, Any]:
        body = dict(call.body)
        if body.get(field, 0) > self.model.output_limit:
            body[field] = self.model.output_limit
        return body

    async def _reply(self, call: BodyCall, what: str, answer: Awaitable[dict[str, Any]]) -> ChatResult:
        request_ids.use(call.request_id)
        started = time.perf_counter()
        try:
            body = await answer
        except PromptfleetError as exc:
            self._served_body(what, False, started, exc.code)
            return exc
        except BaseException as exc:
            self._served_body(what, False, started,
                              "cancelled" if isinstance(exc, asyncio.CancelledError) else "crashed")
            raise
        self._served_body(what, False, started, "ok")
        return ChatReply.of(body)

    def _served_body(self, what: str, stream: bool, started: float, outcome: str) -> None:
        """The call's log line (no content: inputs and vectors are not logged)."""
        if self.log_calls:
            latency_ms = round((time.perf_counter() - started) * 1000, 1)
            logger.info("served %s %s%s: %s in %.1fms", what, self.model.name, " (stream)" if stream else "",
                        outcome, latency_ms, extra={"model": self.model.name, "stream": stream,
                                                    "outcome": outcome, "latency_ms": latency_ms})

    async def embed(self, call: BodyCall) -> ChatResult:
        """/v1/embeddings: a ``ChatReply`` whose ``completion`` is the embedding response."""
        return await self._reply(call, "embeddings", self.provider.embed(call.body, call.share))

    async def complete(self, call: BodyCall) -> ChatResult:
        """/v1/completions, JSON: a ``ChatReply`` whose ``completion`` is the ``text_completion``."""
        return await self._reply(call, "completions", self.provider.complete(self._capped(call), call.share))

    async def complete_stream(self, call: BodyCall) -> AsyncIterator[StreamItem]:
        """/v1/completions, streaming: ``text_completion`` chunks, then a ``StreamEnd`` (or an error last)."""
        async with contextlib.aclosing(self._body_stream(call, "completions", lambda: self.provider.complete_stream(
                self._capped(call), call.share))) as items:
            async for item in items:
                yield item

    async def respond(self, call: BodyCall) -> ChatResult:
        """/v1/responses forwarded to an upstream that speaks it: a ``ChatReply`` whose ``completion`` is
        the upstream's ``response`` object."""
        provider = self._forwarding()
        if isinstance(provider, PromptfleetError):
            return provider
        return await self._reply(call, "responses", provider.respond(self._capped(call, "max_output_tokens"),
                                                                     call.share))

    async def respond_stream(self, call: BodyCall) -> AsyncIterator[StreamItem]:
        """/v1/responses forwarded, streaming: the upstream's events, then a ``StreamEnd`` (or an error last)."""
        provider = self._forwarding()
        if isinstance(provider, PromptfleetError):
            yield provider
            return
        async with contextlib.aclosing(self._body_stream(call, "responses", lambda: provider.respond_stream(
                self._capped(call, "max_output_tokens"), call.share))) as items:
            async for item in items:
                yield item

    def _forwarding(self) -> ResponsesProvider | PromptfleetError:
        """The provider, if it forwards /v1/responses (only upstream models configured to are sent such calls)."""
        if isinstance(self.provider, ResponsesProvider):
            return self.provider
        return InvalidRequest(f"The model '{self.model.name}' does not forward /v1/responses.", param="model")

    async def _body_stream(
        self, call: BodyCall, what: str, source: Callable[[], AsyncIterator[dict[str, Any] | StreamEnd]]
    ) -> AsyncGenerator[StreamItem, None]:
        """A streamed body call's items from ``source()``, its error last as a value, and its log line."""
        request_ids.use(call.request_id)
        started = time.perf_counter()
        outcome = "cancelled"
        try:
            async for chunk in source():
                yield chunk
            outcome = "ok"
        except PromptfleetError as exc:
            outcome = exc.code
            yield exc
        finally:
            self._served_body(what, True, started, outcome)

    async def describe(self) -> ModelConfig:
        return self.model

    async def readiness(self) -> ModelReadiness:
        """For the Gateway's ``/readyz``: this replica answers; can it reach its upstream?"""
        if isinstance(self.model, OpenAIModel):
            up = await reachable(self.model.base_url)
            return ModelReadiness(replicas="up", upstream="ok" if up else "unreachable")
        return ModelReadiness(replicas="up", upstream="local")

    async def check_health(self) -> None:
        """Serve health check: a worker whose provider is gone is restarted."""
        if self.provider is None:
            raise RuntimeError("provider not loaded")

    async def __del__(self) -> None:
        await self.provider.close()


def _text(completion: dict[str, Any]) -> str | None:
    """The answer's text, for a content log line."""
    choices = completion.get("choices") or [{}]
    content = (choices[0].get("message") or {}).get("content")
    return content if isinstance(content, str) else None


def _delta(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or [{}]
    content = (choices[0].get("delta") or {}).get("content")
    return content if isinstance(content, str) else ""
