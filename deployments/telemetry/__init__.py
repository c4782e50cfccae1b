"""promptfleet's metrics: every metric's name, help, labels and buckets, and the one way to record them.

Metrics go through Ray's own metrics API (``ray.util.metrics``), so Ray's metrics agent on each
node exports them with Ray's: Prometheus scrapes them from the targets in Ray's service-discovery
file, and the dashboard's Grafana shows them (``configs/grafana/promptfleet.json``, generated from
``CATALOGUE`` by ``cluster.grafana``). Ray's agent puts ``ray_`` before every application metric
and ``_total`` after a counter's name: ``promptfleet_requests`` is scraped as
``ray_promptfleet_requests_total`` (``MetricSpec.exported``).

``CATALOGUE`` is the one list of what exists. Labels are bounded: the application, a route
template, a configured model or task name, a status class, a stable error code, and — only when
``metrics.per_key_label`` is on — an API key id. Ray adds its own (``SessionName``, ``NodeAddress``,
``WorkerId``…): a gauge reported by several replicas is one series per replica, summed by queries.

Who records what (each process records its own part; nothing crosses a process to be counted):

- the Gateway's ASGI layer (``gateway.request_metrics``): requests and their latency;
- the model call path (``model_calls``, in the Gateway, the TaskRunner and batch drivers): tokens,
  fallbacks, time to first token of streams;
- whoever calls an upstream (``providers``: the Gateway for HTTP calls, the TaskRunner for task
  runs, workers for batch lines): upstream calls, retries, 429s, timeouts, circuit breakers; the
  local model's generation speed and queue;
- the RateLimiter: booked waits, refusals, pauses (and, sampled, pauses in force and queues);
- the TaskStore: runs submitted, attempts, lease expiries and final statuses as they happen, and,
  sampled every ``metrics.sample_interval_s``, runs by status and the oldest queued run's age;
- batch drivers (``jobs.batch``): lines done and failed; the BatchService, sampled, batches by status.

Cost: a call site makes one method call on the process's ``Metrics`` (``metrics_for``); label
dicts are built once per distinct label set and kept; with ``metrics.enabled: false`` the object is a
``NullMetrics`` whose methods do nothing. Ray's instruments are created on first use, once per
process. Pure logic (``deployments.core``) records nothing; the shells around it do.
"""

from deployments.telemetry.backends import Backend, MemoryBackend, RayBackend, Record
from deployments.telemetry.catalogue import (
    APPLICATION,
    BATCH_DRIVER_METRICS,
    BATCH_LINES,
    BATCHES,
    BREAKER_OPENS,
    BREAKER_STATE,
    BREAKER_VALUES,
    CATALOGUE,
    FALLBACKS,
    FIRST_TOKEN,
    FIRST_TOKEN_BUCKETS,
    GATEWAY_METRICS,
    LATENCY_BUCKETS,
    LIMITER_METRICS,
    LIMITER_PAUSED,
    LIMITER_PAUSES,
    LIMITER_QUEUED,
    LIMITER_REFUSALS,
    LIMITER_WAIT,
    LOCAL_QUEUE,
    LOCAL_SECONDS,
    LOCAL_TOKENS,
    LOCAL_WORKER_METRICS,
    OLDEST_QUEUED,
    OTHER,
    PREFIX,
    RAY_PREFIX,
    REQUEST_DURATION,
    REQUESTS,
    RUN_ATTEMPTS,
    RUN_GAUGE_STATUSES,
    RUN_LEASE_EXPIRIES,
    RUNNER_METRICS,
    RUNS,
    RUNS_FINISHED,
    RUNS_SUBMITTED,
    STORE_METRICS,
    TOKENS,
    UPSTREAM_CALLS,
    UPSTREAM_LATENCY,
    UPSTREAM_RETRIES,
    UPSTREAM_WORKER_METRICS,
    WAIT_BUCKETS,
    Kind,
    MetricSpec,
    status_class,
)
from deployments.telemetry.recording import (
    NULL,
    Metrics,
    NullMetrics,
    metrics_for,
    replica_application,
    start_sampling,
    use_backend,
)

__all__ = [
    "APPLICATION",
    "BATCHES",
    "BATCH_DRIVER_METRICS",
    "BATCH_LINES",
    "BREAKER_OPENS",
    "BREAKER_STATE",
    "BREAKER_VALUES",
    "CATALOGUE",
    "FALLBACKS",
    "FIRST_TOKEN",
    "FIRST_TOKEN_BUCKETS",
    "GATEWAY_METRICS",
    "LATENCY_BUCKETS",
    "LIMITER_METRICS",
    "LIMITER_PAUSED",
    "LIMITER_PAUSES",
    "LIMITER_QUEUED",
    "LIMITER_REFUSALS",
    "LIMITER_WAIT",
    "LOCAL_QUEUE",
    "LOCAL_SECONDS",
    "LOCAL_TOKENS",
    "LOCAL_WORKER_METRICS",
    "NULL",
    "OLDEST_QUEUED",
    "OTHER",
    "PREFIX",
    "RAY_PREFIX",
    "REQUESTS",
    "REQUEST_DURATION",
    "RUNNER_METRICS",
    "RUNS",
    "RUNS_FINISHED",
    "RUNS_SUBMITTED",
    "RUN_ATTEMPTS",
    "RUN_GAUGE_STATUSES",
    "RUN_LEASE_EXPIRIES",
    "STORE_METRICS",
    "TOKENS",
    "UPSTREAM_CALLS",
    "UPSTREAM_LATENCY",
    "UPSTREAM_RETRIES",
    "UPSTREAM_WORKER_METRICS",
    "WAIT_BUCKETS",
    "Backend",
    "Kind",
    "MemoryBackend",
    "MetricSpec",
    "Metrics",
    "NullMetrics",
    "RayBackend",
    "Record",
    "metrics_for",
    "replica_application",
    "start_sampling",
    "status_class",
    "use_backend",
]
