"""Which routes a model serves: the one check every model route makes (pure, no I/O).

A model's config lists its ``capabilities`` (``deployments.config.Capability``): ``chat``,
``completions``, ``responses``, ``embeddings``. A call to a model that lacks the capability of
its route is the client's mistake — a 400 naming ``model`` (as OpenAI answers an embedding
call to a chat model), never a 404 (the model exists) nor a 500 (the worker would not know the
call). ``deployments.model_calls.ModelCalls.chain`` applies it to the model asked for, and drops
fallback models that lack it.
"""

from __future__ import annotations

from deployments.config import Capability, ModelConfig
from deployments.errors import InvalidRequest

# The route of each capability, for messages.
ROUTES: dict[Capability, str] = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "responses": "/v1/responses",
    "embeddings": "/v1/embeddings",
}


def require_capability(config: ModelConfig, capability: Capability) -> None:
    """Raise a 400 naming ``model`` unless ``config``'s model serves ``capability``."""
    if capability not in config.capabilities:
        raise InvalidRequest(
            f"The model '{config.name}' does not serve {ROUTES[capability]} (its capabilities: "
            f"{', '.join(config.capabilities)}).",
            param="model",
        )
