"""ModelWorker: one autoscaling Serve deployment per configured model.

Serves: ``chat(body)`` and ``chat_stream(body)`` (a streaming handle method),
called by the Gateway (and by batch jobs) through a ``DeploymentHandle``.
Calls: its provider — a loaded llama.cpp model or an AsyncOpenAI client — and,
for upstream models, the RateLimiter (shared budgets and 429 pauses).
Owns: the provider, i.e. the loaded weights or the upstream connection pool.

Expected failures (a 429 upstream, a bad request) come back as *values*: the
method returns (or, when streaming, yields last) the ``PromptfleetError``
instead of raising it. A raised exception would be wrapped in a
``RayTaskError``, carry a formatted traceback across processes and be logged
as a replica crash; a returned one is a cheap pickle and the Gateway raises it.
Anything unexpected still raises and is rendered as a bare 500.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from ray.serve.handle import DeploymentHandle

from deployments.config import ModelConfig
from deployments.errors import PromptfleetError
from deployments.providers import Provider, build_provider
from deployments.schemas import Share

logger = logging.getLogger("ray.serve")

WorkerResult = dict[str, Any] | PromptfleetError


class ModelWorker:
    def __init__(
        self, model: ModelConfig, limiter: DeploymentHandle | None = None, provider: Provider | None = None
    ) -> None:
        self.model = model
        self.provider = provider or build_provider(model, limiter=limiter)
        logger.info("worker for model %r ready (provider %s)", model.name, model.provider)

    async def chat(self, body: dict[str, Any], share: Share | None = None) -> WorkerResult:
        """``share``: whose call it is (key, weight, priority), for the fair share of a limited model."""
        try:
            return await self.provider.chat(body, share)
        except PromptfleetError as exc:
            return exc

    async def chat_stream(self, body: dict[str, Any], share: Share | None = None) -> AsyncIterator[WorkerResult]:
        try:
            async for chunk in self.provider.stream(body, share):
                yield chunk
        except PromptfleetError as exc:
            yield exc

    async def check_health(self) -> None:
        """Serve health check: a worker whose provider is gone is restarted."""
        if self.provider is None:
            raise RuntimeError("provider not loaded")

    async def __del__(self) -> None:
        await self.provider.close()
