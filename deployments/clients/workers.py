"""A model's workers, for what is not a model call: ``WorkerClient``.

Model calls (chat, streams, embeddings, completions) go through ``model_calls.HandleTransport``,
the one model-call path. This client is the rest of a ``ModelWorker``'s surface: the model's
config (``describe``: a batch driver has no copy of the app's arguments) and its readiness
(``/readyz``). Ray's failures become ``Overloaded`` naming the model (``clients.failures``).
"""

from __future__ import annotations

from ray.serve.handle import DeploymentHandle

from deployments.clients.base import HandleClient
from deployments.config import ModelConfig
from deployments.schemas import ModelReadiness


class WorkerClient(HandleClient):
    def __init__(self, handle: DeploymentHandle, model: str) -> None:
        super().__init__(handle)
        self.model = model
        self.who = f"Model '{model}'"

    async def describe(self) -> ModelConfig:
        """The model's config as the worker was deployed with it (fallbacks, output limit, …)."""
        config: ModelConfig = await self._answer(self.handle.describe.remote())
        return config

    async def readiness(self) -> ModelReadiness:
        """Whether a replica answers, and for an upstream model whether it reaches the upstream."""
        readiness: ModelReadiness = await self._answer(self.handle.readiness.remote())
        return readiness
