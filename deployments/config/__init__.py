"""Typed configuration: the ``args`` of ``configs/serve.yaml``.

``AppArgs`` is what ``deployments.app:build_app`` receives from Serve. It is the
single source of truth for which models exist and how their providers reach
them; replica counts, autoscaling and actor options stay in the ``deployments:``
section of the same file (Serve applies them by deployment name).

Secrets never live here: an upstream model names the environment variable that
holds its key (``api_key_env``), and the variable reaches the replicas through
the Serve config's ``runtime_env``.

The sections live in submodules, one per concern (``models``, ``gateway``, ``keys``,
``telemetry``, ``tasks``); this package re-exports their public names, so
``deployments.config`` stays the one import surface.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from deployments.config.base import _Strict
from deployments.config.gateway import NODE_IP, GatewayConfig
from deployments.config.keys import AdmissionConfig, AuthConfig
from deployments.config.models import (
    DEFAULT_ADMISSION_WAIT_S,
    LLAMACPP_PROMPT_RESERVE,
    MODEL_NAME_PATTERN,
    TEXT_CAPABILITIES,
    Capability,
    LlamaCppModel,
    ModelConfig,
    OpenAIModel,
    embedded_model_path,
)
from deployments.config.tasks import (
    DATABASE_URL_ENV,
    QuotasConfig,
    RetentionConfig,
    TasksConfig,
    is_postgres_url,
)
from deployments.config.telemetry import LogsConfig, MetricsConfig

__all__ = [
    "DATABASE_URL_ENV",
    "DEFAULT_ADMISSION_WAIT_S",
    "LLAMACPP_PROMPT_RESERVE",
    "MODEL_NAME_PATTERN",
    "NODE_IP",
    "TEXT_CAPABILITIES",
    "AdmissionConfig",
    "AppArgs",
    "AuthConfig",
    "Capability",
    "GatewayConfig",
    "LlamaCppModel",
    "LogsConfig",
    "MetricsConfig",
    "ModelConfig",
    "OpenAIModel",
    "QuotasConfig",
    "RetentionConfig",
    "TasksConfig",
    "embedded_model_path",
    "is_postgres_url",
]


class AppArgs(_Strict):
    """The `args` of the promptfleet application in configs/serve.yaml."""

    models: list[ModelConfig] = Field(
        min_length=1, description="Models served; each becomes one worker deployment."
    )
    gateway: GatewayConfig = Field(default_factory=GatewayConfig, description="HTTP ingress settings.")
    tasks: TasksConfig = Field(default_factory=TasksConfig, description="Prompt tasks and the run queue.")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API keys and per-key limits.")
    admission: AdmissionConfig = Field(
        default_factory=AdmissionConfig, description="Pacing of per-key limits and fair share of model budgets."
    )
    logs: LogsConfig = Field(default_factory=LogsConfig, description="Access lines and prompt logging.")
    metrics: MetricsConfig = Field(
        default_factory=MetricsConfig, description="promptfleet's Prometheus metrics (through Ray's metrics agent)."
    )

    @model_validator(mode="after")
    def _consistent_models(self) -> AppArgs:
        seen: set[str] = set()
        for model in self.models:
            if model.name in seen:
                raise ValueError(f"models: duplicate model name {model.name!r}")
            seen.add(model.name)
        for model in self.models:
            unknown = [f for f in model.fallback_models if f not in seen or f == model.name]
            if unknown:
                raise ValueError(f"models: {model.name}: fallback_models: unknown or self: {unknown}")
        return self

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    def task_models(self) -> dict[str, str]:
        """Name → provider of the models tasks may run on: those that chat (tasks call chat)."""
        return {m.name: m.provider for m in self.models if "chat" in m.capabilities}
