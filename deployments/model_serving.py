"""ModelServing: how a model's provider serves one call — the conventions of the model call path.

Served by two shells: the ``ModelWorker`` deployment (every model; the only path of local models and
of calls from batch jobs) and, for upstream models, the Gateway and the TaskRunner themselves
(``deployments.direct_transport``: they call the upstream from their own process). Calls its
provider (``deployments.providers``). Owns nothing but the provider it was given.

One convention for every method (what ``model_calls.ModelCalls`` expects of a ``Transport``):

- in: a ``ModelCall`` — the validated ``ChatCompletionRequest``, its request id, its payer's
  ``Share`` — or, for /v1/embeddings, /v1/completions and /v1/responses forwarded to an upstream that
  speaks it (``respond``, ``respond_stream``), a ``BodyCall``;
- out, JSON: a ``ChatReply`` (the completion and its ``Usage``);
- out, streaming: ``Chunks`` — lists of chunk dicts (the OpenAI ``chat.completion.chunk`` bodies,
  sent to the client as they are): those an upstream delivered together, or one of a provider that
  yields chunk by chunk — then one ``StreamEnd`` with the generation's usage;
- expected failures (a 429 upstream, a bad request) are *values*: the method returns — or, when
  streaming, yields last — the ``PromptfleetError`` instead of raising it. Across a handle a raised
  exception would be wrapped in a ``RayTaskError``, carry a formatted traceback across processes and
  be logged as a replica crash; a returned one is a cheap pickle and the caller raises it. Anything
  unexpected still raises and becomes a bare 500.

A request's ``max_tokens`` above this model's ``output_limit`` is lowered to it here (the caller has
already refused such requests for the model they named; this bounds what a fallback model is asked
for).

Logs: each call is served under its ``request_id`` (``deployments.request_ids.use``, so every line
of the serving process about it carries the id) and, with ``logs.access_log``, ends with one line —
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

from deployments import request_ids
from deployments.config import LogsConfig, ModelConfig
from deployments.errors import InvalidRequest, PromptfleetError
from deployments.providers import Provider, ResponsesProvider
from deployments.providers import StreamItem as ProviderItem
from deployments.schemas import ChatReply, Chunks, ModelCall, StreamEnd
from deployments.schemas.calls import BodyCall

logger = logging.getLogger("ray.serve")

ChatResult = ChatReply | PromptfleetError
StreamItem = Chunks | StreamEnd | PromptfleetError


class ModelServing:
    """Serves calls to one model with ``provider``."""

    def __init__(self, model: ModelConfig, provider: Provider, logs: LogsConfig | None = None) -> None:
        self.model = model
        self.provider = provider
        logs = logs or LogsConfig()
        self.log_content = logs.content
        # The call's line goes with the Gateway's access line (or with content, which it carries).
        self.log_calls = logs.access_log or logs.content

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
            async for item in self.provider.stream(self.body(call), call.share):
                chunks = _chunks(item)
                if parts is not None and isinstance(chunks, list):
                    parts += map(_delta, chunks)
                yield chunks
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
        self, call: BodyCall, what: str, source: Callable[[], AsyncIterator[ProviderItem]]
    ) -> AsyncGenerator[StreamItem, None]:
        """A streamed body call's items from ``source()``, its error last as a value, and its log line."""
        request_ids.use(call.request_id)
        started = time.perf_counter()
        outcome = "cancelled"
        try:
            async for item in source():
                yield _chunks(item)
            outcome = "ok"
        except PromptfleetError as exc:
            outcome = exc.code
            yield exc
        finally:
            self._served_body(what, True, started, outcome)


def _chunks(item: ProviderItem) -> Chunks | StreamEnd:
    """A provider's item as served: a chunk on its own in a list of one."""
    return [item] if isinstance(item, dict) else item


def _text(completion: dict[str, Any]) -> str | None:
    """The answer's text, for a content log line."""
    choices = completion.get("choices") or [{}]
    content = (choices[0].get("message") or {}).get("content")
    return content if isinstance(content, str) else None


def _delta(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or [{}]
    content = (choices[0].get("delta") or {}).get("content")
    return content if isinstance(content, str) else ""
