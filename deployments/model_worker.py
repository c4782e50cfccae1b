"""ModelWorker: one autoscaling Serve deployment per configured model.

Serves: ``chat(call)`` and ``chat_stream(call)`` (a streaming handle method), and
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
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from ray.serve.handle import DeploymentHandle

from deployments.config import MetricsConfig, ModelConfig, OpenAIModel
from deployments.errors import PromptfleetError
from deployments.providers import Provider, build_provider
from deployments.schemas import ChatReply, ModelCall, StreamEnd
from deployments.telemetry import LOCAL_WORKER_METRICS, UPSTREAM_WORKER_METRICS, metrics_for

logger = logging.getLogger("ray.serve")

ChatResult = ChatReply | PromptfleetError
StreamItem = dict[str, Any] | StreamEnd | PromptfleetError


class ModelWorker:
    def __init__(
        self,
        model: ModelConfig,
        limiter: DeploymentHandle | None = None,
        provider: Provider | None = None,
        metrics: MetricsConfig | None = None,
    ) -> None:
        self.model = model
        recorder = metrics_for(metrics)
        recorder.declare(*(UPSTREAM_WORKER_METRICS if isinstance(model, OpenAIModel) else LOCAL_WORKER_METRICS))
        self.provider = provider or build_provider(model, limiter=limiter, metrics=recorder)
        logger.info("worker for model %r ready (provider %s)", model.name, model.provider)

    def body(self, call: ModelCall) -> dict[str, Any]:
        body = call.body()
        limit = self.model.output_limit
        for name in ("max_tokens", "max_completion_tokens"):
            if name in body and body[name] > limit:
                body[name] = limit
        return body

    async def chat(self, call: ModelCall) -> ChatResult:
        # ``call.share``: whose call it is (key, weight, priority), for the fair share of a limited model.
        try:
            completion = await self.provider.chat(self.body(call), call.share)
        except PromptfleetError as exc:
            return exc
        return ChatReply.of(completion)

    async def chat_stream(self, call: ModelCall) -> AsyncIterator[StreamItem]:
        try:
            async for chunk in self.provider.stream(self.body(call), call.share):
                yield chunk
        except PromptfleetError as exc:
            yield exc

    async def describe(self) -> ModelConfig:
        return self.model

    async def check_health(self) -> None:
        """Serve health check: a worker whose provider is gone is restarted."""
        if self.provider is None:
            raise RuntimeError("provider not loaded")

    async def __del__(self) -> None:
        await self.provider.close()
