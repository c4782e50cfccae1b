"""The ``logs:`` and ``metrics:`` sections: what promptfleet's components log and record."""

from __future__ import annotations

from pydantic import Field

from deployments.config.base import _Strict


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
