"""Providers: what a worker holds to produce completions.

A provider turns an OpenAI-shaped chat body into a completion dict or a stream
of chunk dicts (or lists of them: ``StreamItem``) ended by one ``schemas.StreamEnd``
(and likewise a /v1/completions body; an embeddings body into an embedding response) (the usage of the generation,
whether or not the client asked for a usage chunk), and raises only
``deployments.errors`` exceptions. The body's ``max_tokens`` is within the
model's ``output_limit`` (``ModelWorker`` sees to it).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

from ray.serve.handle import DeploymentHandle

from deployments.config import LlamaCppModel, ModelConfig, embedded_model_path
from deployments.schemas import Budget, Chunks, Share, StreamEnd
from deployments.telemetry import NULL, Metrics

# What a provider's stream yields: a chunk dict, or ``Chunks`` that arrived together (an upstream's
# stream, ``providers.relay``), then one ``StreamEnd``. ``model_serving.ModelServing`` hands both on
# as ``Chunks``, so a local model's per-token chunks need no list of their own.
StreamItem = dict[str, Any] | Chunks | StreamEnd


class Provider(Protocol):
    """``share``: whose call it is, for the fair share of a limited model's budget (None: anonymous)."""

    async def chat(self, body: dict[str, Any], share: Share | None = None) -> dict[str, Any]: ...

    def stream(self, body: dict[str, Any], share: Share | None = None) -> AsyncIterator[StreamItem]: ...

    async def embed(self, body: dict[str, Any], share: Share | None = None) -> dict[str, Any]:
        """An OpenAI embedding response (``list`` of ``embedding`` objects, usage) for a validated body."""
        ...

    async def complete(self, body: dict[str, Any], share: Share | None = None) -> dict[str, Any]:
        """A ``text_completion`` for a validated /v1/completions body."""
        ...

    def complete_stream(
        self, body: dict[str, Any], share: Share | None = None
    ) -> AsyncIterator[StreamItem]: ...

    async def close(self) -> None: ...


@runtime_checkable
class ResponsesProvider(Protocol):
    """A provider that can forward a /v1/responses body to an upstream speaking the Responses API
    (``providers.openai_compat``): the ``response`` object, or its stream's events then a ``StreamEnd``."""

    async def respond(self, body: dict[str, Any], share: Share | None = None) -> dict[str, Any]: ...

    def respond_stream(
        self, body: dict[str, Any], share: Share | None = None
    ) -> AsyncIterator[StreamItem]: ...


def build_provider(
    config: ModelConfig,
    environ: Mapping[str, str] | None = None,
    limiter: DeploymentHandle | None = None,
    metrics: Metrics = NULL,
) -> Provider:
    """Build the provider a model's config asks for.

    The upstream key is resolved here, once, from the variable the config names;
    ``environ`` defaults to this process's environment (replicas get theirs from
    the Serve config's runtime_env).
    """
    if isinstance(config, LlamaCppModel):
        from deployments.providers.llamacpp import LlamaCppProvider

        path = config.model_path or embedded_model_path()
        return LlamaCppProvider(config, model_path=Path(path), metrics=metrics)

    from deployments.limits.breaker import CircuitBreaker
    from deployments.limits.guard import UpstreamGuard
    from deployments.providers.openai_compat import OpenAIProvider

    env = os.environ if environ is None else environ
    allowed = env.get("PROMPTFLEET_UPSTREAM_HOSTS")
    if allowed:
        # Egress allow-list (the test suite sets it to loopback so nothing reaches a real provider).
        host = urlsplit(config.base_url).hostname or ""
        if host not in {h.strip() for h in allowed.split(",")}:
            raise RuntimeError(
                f"model {config.name!r}: upstream host {host!r} is not in PROMPTFLEET_UPSTREAM_HOSTS={allowed}"
            )
    api_key = env.get(config.api_key_env) if config.api_key_env else None
    if config.api_key_env and not api_key:
        raise RuntimeError(
            f"model {config.name!r}: environment variable {config.api_key_env} is not set "
            "(add it to runtime_env.env_vars in configs/serve.yaml or the environment of `ray start`)"
        )
    guard = UpstreamGuard(
        config.name,
        budget=Budget(rpm=config.rpm, tpm=config.tpm),
        limiter=limiter,
        breaker=CircuitBreaker(threshold=config.breaker_threshold, cooldown_s=config.breaker_cooldown_s),
        max_pause_s=config.max_retry_after_s,
        metrics=metrics,
    )
    return OpenAIProvider(config, api_key=api_key, guard=guard, metrics=metrics)
