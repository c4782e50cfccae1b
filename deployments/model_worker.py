"""ModelWorker: one autoscaling Serve deployment per configured model.

Serves: ``chat(call)`` and ``chat_stream(call)`` (a streaming handle method); ``embed(call)``,
``complete(call)`` and ``complete_stream(call)`` for /v1/embeddings and /v1/completions, and
``respond(call)`` and ``respond_stream(call)`` for /v1/responses forwarded to an upstream that
speaks it (a ``BodyCall``: same conventions, the answer body in a ``ChatReply``); and
``describe()`` (its ``ModelConfig``, for batch drivers that build the model call path
outside the Gateway); called through a ``DeploymentHandle`` by the one model call
path, ``deployments.model_calls.ModelCalls`` (in the Gateway for local models, the TaskRunner and
batch jobs).
Calls: its provider — a loaded llama.cpp model or an AsyncOpenAI client — and,
for upstream models, the RateLimiter (shared budgets and 429 pauses).
Owns: the provider, i.e. the loaded weights or the upstream connection pool.

What crosses the handle is typed (``deployments.schemas``); the conventions of every method —
errors as values, the ``StreamEnd``, ``max_tokens`` bounded by the model's ``output_limit``, the
call's log line under its request id — are ``deployments.model_serving.ModelServing``'s, which
this deployment is a shell around. For an upstream model the Gateway serves its own HTTP calls the
same way in its process (``deployments.direct_transport``); the worker still serves task runs and
batch jobs, and keeps answering the Gateway's ``readiness`` probe.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

from ray.serve.handle import DeploymentHandle

from deployments import logs as logs_module
from deployments.collector import raise_first_generation
from deployments.config import LogsConfig, MetricsConfig, ModelConfig, OpenAIModel
from deployments.model_serving import ModelServing
from deployments.providers import Provider, build_provider
from deployments.schemas import ModelReadiness
from deployments.telemetry import LOCAL_WORKER_METRICS, UPSTREAM_WORKER_METRICS, metrics_for

logger = logging.getLogger("ray.serve")

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


class ModelWorker(ModelServing):
    def __init__(
        self,
        model: ModelConfig,
        limiter: DeploymentHandle | None = None,
        provider: Provider | None = None,
        logs: LogsConfig | None = None,
        metrics: MetricsConfig | None = None,
    ) -> None:
        logs_module.watch_serve_log()
        raise_first_generation()
        self.model = model
        recorder = metrics_for(metrics)
        recorder.declare(*(UPSTREAM_WORKER_METRICS if isinstance(model, OpenAIModel) else LOCAL_WORKER_METRICS))
        super().__init__(model, provider or build_provider(model, limiter=limiter, metrics=recorder), logs)
        logger.info("worker for model %r ready (provider %s)", model.name, model.provider)

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
