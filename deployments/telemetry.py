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
- the workers (``providers``): upstream calls, retries, 429s, timeouts, circuit breakers; the
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

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from deployments.config import MetricsConfig

__all__ = [
    "CATALOGUE",
    "Kind",
    "MemoryBackend",
    "MetricSpec",
    "Metrics",
    "NullMetrics",
    "metrics_for",
    "use_backend",
]

logger = logging.getLogger("ray.serve")

PREFIX = "promptfleet_"
RAY_PREFIX = "ray_"  # what Ray's metrics agent puts before every application metric
APPLICATION = "application"
MAX_LABEL_SETS = 10_000  # cached label dicts per process (a plain cache: cleared when full)
GAUGE_KEEPALIVE_S = 1.0  # below two of Ray's metrics report intervals (1 s at the least)
OTHER = "other"  # a label value that is not one of the configured names (unknown model, route…)


class Kind(StrEnum):
    COUNTER = "counter"
    HISTOGRAM = "histogram"
    GAUGE = "gauge"


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...]  # the application first, always
    why: str  # one line: what an operator learns from it (README, dashboard descriptions)
    buckets: tuple[float, ...] = ()
    unit: str = ""  # Grafana's unit for panels of it

    @property
    def exported(self) -> str:
        """The name Prometheus sees (histograms add ``_bucket``, ``_count`` and ``_sum``)."""
        return RAY_PREFIX + self.name + ("_total" if self.kind is Kind.COUNTER else "")


def _spec(name: str, kind: Kind, labels: tuple[str, ...], help: str, why: str, *,
          buckets: tuple[float, ...] = (), unit: str = "") -> MetricSpec:
    return MetricSpec(PREFIX + name, kind, help, (APPLICATION, *labels), why, buckets, unit)


# Seconds. LLM calls span milliseconds (a cached or tiny answer) to minutes (long generations).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
                   300.0, 600.0)
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

C, H, G = Kind.COUNTER, Kind.HISTOGRAM, Kind.GAUGE

REQUESTS = _spec(
    "requests", C, ("route", "model", "status_class", "error_code", "key"),
    "HTTP requests answered by the Gateway, by route template, requested model, status class and error code.",
    "Traffic and error rates per route and model; error_code says whose fault (429 pacing, upstream, bad input).",
    unit="reqps")
REQUEST_DURATION = _spec(
    "request_duration_seconds", H, ("route", "model"),
    "Seconds from a request's arrival to the end of its response (a stream: its last event).",
    "Latency percentiles as clients see them, queueing and rate-limit waits included.",
    buckets=LATENCY_BUCKETS, unit="s")
FIRST_TOKEN = _spec(
    "time_to_first_token_seconds", H, ("model",),
    "Seconds from a stream's start to its first chunk from the model.",
    "How long users stare at nothing: a slow first token with a fast total points at queues or prompt size.",
    buckets=FIRST_TOKEN_BUCKETS, unit="s")
TOKENS = _spec(
    "tokens", C, ("model", "kind", "key"),
    "Tokens of answered model calls (chat, streams, task runs, batch lines), kind=prompt|completion.",
    "What is being spent, per model: the provider's bill and the load on local models.",
    unit="short")
FALLBACKS = _spec(
    "fallbacks", C, ("model", "fallback", "reason"),
    "Calls that went on to a fallback model after `model` failed with the error code `reason`.",
    "A primary model that keeps failing over (rate limits, outages) while clients still get answers.",
    unit="short")
UPSTREAM_CALLS = _spec(
    "upstream_calls", C, ("model", "outcome"),
    "HTTP calls to an upstream model (every try), outcome=ok|rate_limited|timeout|error|rejected.",
    "Upstream health: 429s (rate_limited), timeouts and 5xx/connection errors (error) as they happen.",
    unit="reqps")
UPSTREAM_RETRIES = _spec(
    "upstream_retries", C, ("model",),
    "Tries that were repeated after a retryable upstream failure (429, 5xx, connection error).",
    "Retries cost time and upstream quota; a rising rate precedes failures clients see.",
    unit="short")
UPSTREAM_LATENCY = _spec(
    "upstream_latency_seconds", H, ("model",),
    "Seconds of one upstream try (a stream: until its headers).",
    "Whether slowness is the upstream's or ours (compare with request latency).",
    buckets=LATENCY_BUCKETS, unit="s")
BREAKER_STATE = _spec(
    "circuit_breaker_state", G, ("model",),
    "A worker replica's circuit breaker for its upstream: 0 closed, 1 half-open, 2 open.",
    "Replicas failing fast (503 circuit_open) because their upstream kept failing.",
    unit="short")
BREAKER_OPENS = _spec(
    "circuit_breaker_opens", C, ("model",),
    "Times a worker replica's circuit breaker opened.",
    "How often an upstream was declared down.",
    unit="short")
LOCAL_TOKENS = _spec(
    "local_generated_tokens", C, ("model",),
    "Completion tokens generated by local (llama.cpp) models.",
    "With local_generation_seconds: tokens per second of the local model, i.e. whether its CPUs keep up.",
    unit="short")
LOCAL_SECONDS = _spec(
    "local_generation_seconds", C, ("model",),
    "Seconds local (llama.cpp) models spent generating.",
    "Busy time of the local model's generation thread; rate() near 1 per replica means saturated.",
    unit="s")
LOCAL_QUEUE = _spec(
    "local_queue_length", G, ("model",),
    "Generations waiting or running in a local model replica (one runs at a time).",
    "Queued generations are latency clients pay; scale the worker out when it stays above 1.",
    unit="short")
LIMITER_WAIT = _spec(
    "limiter_wait_seconds", H, ("budget", "model", "key"),
    "Seconds a granted booking waited for its slot, budget=model (a model's rpm/tpm) or key (a key's).",
    "How much waiting the rate limits add; long waits mean a limit is the bottleneck.",
    buckets=WAIT_BUCKETS, unit="s")
LIMITER_REFUSALS = _spec(
    "limiter_refusals", C, ("budget", "model", "key"),
    "Bookings refused because their slot was past the caller's deadline (clients get 429).",
    "Demand beyond a model's or key's configured limit.",
    unit="short")
LIMITER_PAUSES = _spec(
    "limiter_pauses", C, ("model",),
    "Model-wide pauses started or extended because an upstream answered 429 with Retry-After.",
    "An upstream pushing back on the whole cluster.",
    unit="short")
LIMITER_PAUSED = _spec(
    "limiter_pause_remaining_seconds", G, ("model",),
    "Seconds left of the model-wide pause in force (0: none), sampled.",
    "Which models are paused right now, and for how long.",
    unit="s")
LIMITER_QUEUED = _spec(
    "limiter_queued", G, ("model",),
    "Calls waiting in a limited model's fair queue, sampled.",
    "Backlog behind a model's rpm/tpm.",
    unit="short")
RUNS_SUBMITTED = _spec(
    "runs_submitted", C, ("task",),
    "Async task runs queued (an idempotent repeat is not counted).",
    "Incoming async work per task.",
    unit="short")
RUNS_FINISHED = _spec(
    "runs_finished", C, ("task", "status"),
    "Async task runs that ended, status=succeeded|failed|cancelled.",
    "Outcome rates of async work; failed runs need a look at their error.",
    unit="short")
RUN_ATTEMPTS = _spec(
    "run_attempts", C, ("task",),
    "Starts of async task runs (a retried or reclaimed run starts again).",
    "Attempts per finished run above 1 mean transient failures or lost workers.",
    unit="short")
RUN_LEASE_EXPIRIES = _spec(
    "run_lease_expiries", C, ("task",),
    "Running runs whose lease expired (their runner died or stalled) and were requeued or failed.",
    "Runner replicas or nodes dying under work.",
    unit="short")
RUNS = _spec(
    "runs", G, ("status",),
    "Async task runs by status=queued|running, sampled by the TaskStore.",
    "Queue depth: work waiting and work in progress.",
    unit="short")
OLDEST_QUEUED = _spec(
    "oldest_queued_run_age_seconds", G, (),
    "Age of the oldest queued run (0 when none), sampled by the TaskStore.",
    "Whether the queue moves: a growing age means runners are short or stuck.",
    unit="s")
BATCH_LINES = _spec(
    "batch_lines", C, ("kind", "outcome"),
    "Batch lines processed by batch jobs, kind=chat|task|invalid (a line that could not be run), "
    "outcome=done|failed.",
    "Batch throughput and failure rate.",
    unit="short")
BATCHES = _spec(
    "batches", G, ("status",),
    "Batches of the Batches API by status, sampled by the BatchService.",
    "What the batch system is doing: validating, in progress, finished, failed.",
    unit="short")

CATALOGUE: tuple[MetricSpec, ...] = (
    REQUESTS, REQUEST_DURATION, FIRST_TOKEN, TOKENS, FALLBACKS,
    UPSTREAM_CALLS, UPSTREAM_RETRIES, UPSTREAM_LATENCY, BREAKER_STATE, BREAKER_OPENS,
    LOCAL_TOKENS, LOCAL_SECONDS, LOCAL_QUEUE,
    LIMITER_WAIT, LIMITER_REFUSALS, LIMITER_PAUSES, LIMITER_PAUSED, LIMITER_QUEUED,
    RUNS_SUBMITTED, RUNS_FINISHED, RUN_ATTEMPTS, RUN_LEASE_EXPIRIES, RUNS, OLDEST_QUEUED,
    BATCH_LINES, BATCHES,
)

# What each process declares (``Metrics.declare``) when it starts: the metrics it owns.
GATEWAY_METRICS = (REQUESTS, TOKENS, FALLBACKS)
RUNNER_METRICS = (TOKENS, FALLBACKS)
UPSTREAM_WORKER_METRICS = (UPSTREAM_CALLS, UPSTREAM_RETRIES, BREAKER_OPENS)
LOCAL_WORKER_METRICS = (LOCAL_TOKENS, LOCAL_SECONDS)
LIMITER_METRICS = (LIMITER_REFUSALS, LIMITER_PAUSES, LIMITER_PAUSED, LIMITER_QUEUED)
STORE_METRICS = (RUNS_SUBMITTED, RUNS_FINISHED, RUN_ATTEMPTS, RUN_LEASE_EXPIRIES)
BATCH_DRIVER_METRICS = (BATCH_LINES, TOKENS, FALLBACKS)

BREAKER_VALUES = {"closed": 0.0, "half_open": 1.0, "open": 2.0}
RUN_GAUGE_STATUSES = ("queued", "running")


def status_class(status: int) -> str:
    return f"{status // 100}xx"


# -- backends ------------------------------------------------------------------------------------

Record = Callable[[float, dict[str, str]], None]


class Backend(Protocol):
    def instrument(self, spec: MetricSpec) -> Record:
        """The function recording one value of ``spec`` with a full label dict."""
        ...

    def zero(self, spec: MetricSpec, tags: dict[str, str]) -> None:
        """Make a counter's series with ``tags`` exist, at 0."""
        ...


class RayBackend:
    """``ray.util.metrics`` instruments, created once per process."""

    def __init__(self) -> None:
        self.made: dict[str, Record] = {}
        self.lock = threading.Lock()

    def instrument(self, spec: MetricSpec) -> Record:
        record = self.made.get(spec.name)
        if record is not None:
            return record
        from ray.util import metrics

        with self.lock:
            if spec.name not in self.made:
                if spec.kind is Kind.COUNTER:
                    self.made[spec.name] = metrics.Counter(spec.name, spec.help, tag_keys=spec.labels).inc
                elif spec.kind is Kind.HISTOGRAM:
                    self.made[spec.name] = metrics.Histogram(
                        spec.name, spec.help, boundaries=list(spec.buckets), tag_keys=spec.labels
                    ).observe
                else:
                    self.made[spec.name] = metrics.Gauge(spec.name, spec.help, tag_keys=spec.labels).set
            return self.made[spec.name]

    def zero(self, spec: MetricSpec, tags: dict[str, str]) -> None:
        self.instrument(spec)
        # ray.util.metrics.Counter.inc refuses 0; the instrument underneath records it, which is
        # what makes the series (and the metric's name) appear in a scrape before the first event.
        counter = getattr(self.made[spec.name], "__self__", None)
        underlying = getattr(counter, "_metric", None)
        if underlying is not None:
            underlying.record(0, tags=tags)


class MemoryBackend:
    """Keeps what is recorded, for tests: counters summed, histograms as lists, gauges' last values."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        self.observed: dict[tuple[str, frozenset[tuple[str, str]]], list[float]] = {}

    def instrument(self, spec: MetricSpec) -> Record:
        def record(value: float, tags: dict[str, str]) -> None:
            assert set(tags) == set(spec.labels), (spec.name, tags)
            key = (spec.name, frozenset(tags.items()))
            if spec.kind is Kind.COUNTER:
                assert value > 0, (spec.name, value)  # Ray refuses 0 and negative increments
                self.values[key] = self.values.get(key, 0.0) + value
            elif spec.kind is Kind.HISTOGRAM:
                self.observed.setdefault(key, []).append(value)
            else:
                self.values[key] = value

        return record

    def zero(self, spec: MetricSpec, tags: dict[str, str]) -> None:
        self.values.setdefault((spec.name, frozenset(tags.items())), 0.0)

    @staticmethod
    def _matches(key: tuple[str, frozenset[tuple[str, str]]], spec: MetricSpec, labels: Mapping[str, str]) -> bool:
        return key[0] == spec.name and all((k, v) in key[1] for k, v in labels.items())

    def total(self, spec: MetricSpec, **labels: str) -> float:
        """Sum of a counter's (or gauge's) series whose labels include ``labels``."""
        return sum(v for k, v in self.values.items() if self._matches(k, spec, labels))

    def observations(self, spec: MetricSpec, **labels: str) -> list[float]:
        return [x for k, v in self.observed.items() if self._matches(k, spec, labels) for x in v]


_backend: Backend = RayBackend()
_metrics: dict[tuple[str, bool, bool], Metrics] = {}


def use_backend(backend: Backend) -> None:
    """Record into ``backend`` from now on (tests: a ``MemoryBackend``); forgets the Metrics made so far."""
    global _backend
    _backend = backend
    _metrics.clear()


def replica_application() -> str:
    """The Serve application of the replica this code runs in ("" outside a replica: tests)."""
    try:
        from ray import serve

        return str(serve.get_replica_context().app_name)
    except Exception:
        return ""


def metrics_for(config: MetricsConfig | None, application: str | None = None) -> Metrics:
    """This process's recorder for ``application`` (one per process and settings)."""
    config = config or MetricsConfig()
    if application is None:
        application = replica_application()
    key = (application, config.enabled, config.per_key_label)
    made = _metrics.get(key)
    if made is None:
        made = Metrics(application, config.per_key_label) if config.enabled else NullMetrics(application)
        _metrics[key] = made
    return made


async def _sample_every(interval_s: float, sample: Callable[[], Awaitable[object]], name: str) -> None:
    failing = False
    while True:
        await asyncio.sleep(interval_s)
        try:
            await sample()
            failing = False
        except asyncio.CancelledError:
            raise
        except Exception:
            if not failing:  # once per outage, not every interval
                logger.warning("sampling %s metrics failed; trying again every %.0fs", name, interval_s,
                               exc_info=True)
            failing = True


def start_sampling(
    metrics: Metrics, interval_s: float, sample: Callable[[], Awaitable[object]], name: str
) -> asyncio.Task[None] | None:
    """Run ``sample`` every ``interval_s`` from now on (gauges read off the request path); None when
    metrics are off or no event loop runs (a shell built by a plain unit test)."""
    if not metrics.enabled:
        return None
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return loop.create_task(_sample_every(interval_s, sample, name), name=f"metrics-{name}")


# -- recording ----------------------------------------------------------------------------------


class Metrics:
    """Records promptfleet's metrics for one application; one method per event (cheap: see module doc)."""

    enabled = True

    def __init__(self, application: str, per_key_label: bool = False, backend: Backend | None = None) -> None:
        self.application = application
        self.per_key_label = per_key_label
        self.backend = backend or _backend
        self.records: dict[str, Record] = {}
        self.tags: dict[tuple[str, ...], dict[str, str]] = {}
        self.gauges: dict[tuple[str, ...], tuple[MetricSpec, float, tuple[str, ...]]] = {}  # the last values
        self.keepalive: asyncio.Task[None] | None = None

    def _record(self, spec: MetricSpec) -> Record:
        record = self.records.get(spec.name)
        if record is None:
            record = self.records[spec.name] = self.backend.instrument(spec)
        return record

    def _tags(self, spec: MetricSpec, *values: str) -> dict[str, str]:
        """The label dict of ``spec`` with ``values`` (after the application), built once."""
        cache_key = (spec.name, *values)
        tags = self.tags.get(cache_key)
        if tags is None:
            if len(self.tags) >= MAX_LABEL_SETS:
                self.tags.clear()
            tags = self.tags[cache_key] = dict(zip(spec.labels, (self.application, *values), strict=True))
        return tags

    def _set(self, spec: MetricSpec, value: float, *values: str) -> None:
        """Set a gauge, and keep it set: Ray's metrics agent forgets a gauge that its process has not
        set again for two report intervals, so this process sets its gauges again every
        ``GAUGE_KEEPALIVE_S`` (while an event loop runs in it)."""
        self._record(spec)(value, self._tags(spec, *values))
        self.gauges[(spec.name, *values)] = (spec, value, values)
        if self.keepalive is None or self.keepalive.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # not on an event loop's thread: the next gauge set on it starts the keepalive
            self.keepalive = loop.create_task(self._keep_gauges(), name="metrics-gauges")

    async def _keep_gauges(self) -> None:
        while True:
            await asyncio.sleep(GAUGE_KEEPALIVE_S)
            for spec, value, values in list(self.gauges.values()):
                self._record(spec)(value, self._tags(spec, *values))

    def declare(self, *specs: MetricSpec) -> None:
        """Make ``specs`` visible before their first event (series at 0 with only the application
        label), so dashboards show 0 rather than no data. Histograms appear with their first value."""
        for spec in specs:
            tags = self._tags(spec, *("" for _ in spec.labels[1:]))
            if spec.kind is Kind.COUNTER:
                self.backend.zero(spec, tags)
            elif spec.kind is Kind.GAUGE:
                self._set(spec, 0, *("" for _ in spec.labels[1:]))

    def key(self, key_id: str | None) -> str:
        """The ``key`` label value: the key's id when per-key labels are on, else empty (no label)."""
        return (key_id or "") if self.per_key_label else ""

    def _budget(self, name: str) -> tuple[str, str, str]:
        kind, _, rest = name.partition(":")
        if kind == "model":
            return "model", rest, ""
        return kind or OTHER, "", self.key(rest)

    # The Gateway's HTTP layer

    def request(self, route: str, model: str, status: int, error_code: str, key_id: str | None,
                seconds: float) -> None:
        self._record(REQUESTS)(1, self._tags(REQUESTS, route, model, status_class(status), error_code,
                                             self.key(key_id)))
        self._record(REQUEST_DURATION)(seconds, self._tags(REQUEST_DURATION, route, model))

    # The model call path

    def first_token(self, model: str, seconds: float) -> None:
        self._record(FIRST_TOKEN)(seconds, self._tags(FIRST_TOKEN, model))

    def tokens(self, model: str, prompt: int, completion: int, key_id: str | None) -> None:
        key = self.key(key_id)
        if prompt > 0:
            self._record(TOKENS)(prompt, self._tags(TOKENS, model, "prompt", key))
        if completion > 0:
            self._record(TOKENS)(completion, self._tags(TOKENS, model, "completion", key))

    def fallback(self, model: str, fallback: str, reason: str) -> None:
        self._record(FALLBACKS)(1, self._tags(FALLBACKS, model, fallback, reason))

    # Workers

    def upstream_call(self, model: str, outcome: str, seconds: float) -> None:
        self._record(UPSTREAM_CALLS)(1, self._tags(UPSTREAM_CALLS, model, outcome))
        self._record(UPSTREAM_LATENCY)(seconds, self._tags(UPSTREAM_LATENCY, model))

    def upstream_retry(self, model: str) -> None:
        self._record(UPSTREAM_RETRIES)(1, self._tags(UPSTREAM_RETRIES, model))

    def breaker(self, model: str, state: str, opened: bool) -> None:
        """A breaker changed state (``opened``: it has just opened)."""
        self._set(BREAKER_STATE, BREAKER_VALUES.get(state, 0.0), model)
        if opened:
            self._record(BREAKER_OPENS)(1, self._tags(BREAKER_OPENS, model))

    def local_generation(self, model: str, tokens: int, seconds: float) -> None:
        if tokens > 0:
            self._record(LOCAL_TOKENS)(tokens, self._tags(LOCAL_TOKENS, model))
        if seconds > 0:
            self._record(LOCAL_SECONDS)(seconds, self._tags(LOCAL_SECONDS, model))

    def local_queue(self, model: str, length: int) -> None:
        self._set(LOCAL_QUEUE, length, model)

    # The RateLimiter

    def limiter_wait(self, budget: str, seconds: float) -> None:
        self._record(LIMITER_WAIT)(max(seconds, 0.0), self._tags(LIMITER_WAIT, *self._budget(budget)))

    def limiter_refusal(self, budget: str) -> None:
        self._record(LIMITER_REFUSALS)(1, self._tags(LIMITER_REFUSALS, *self._budget(budget)))

    def limiter_pause(self, budget: str) -> None:
        kind, model, _ = self._budget(budget)
        if kind == "model":
            self._record(LIMITER_PAUSES)(1, self._tags(LIMITER_PAUSES, model))

    def limiter_state(self, paused: Mapping[str, float], queued: Mapping[str, int]) -> None:
        """Sampled: seconds of pause left and calls queued, per model budget (every budget it knows)."""
        for budget, remaining in paused.items():
            kind, model, _ = self._budget(budget)
            if kind == "model":
                self._set(LIMITER_PAUSED, max(remaining, 0.0), model)
        for budget, count in queued.items():
            kind, model, _ = self._budget(budget)
            if kind == "model":
                self._set(LIMITER_QUEUED, count, model)

    # The TaskStore

    def run_submitted(self, task: str) -> None:
        self._record(RUNS_SUBMITTED)(1, self._tags(RUNS_SUBMITTED, task))

    def run_moved(self, task: str, event: str, status: str, lease_expired: bool) -> None:
        """A run changed status (``runstate``'s event and the status it led to)."""
        if event == "start":
            self._record(RUN_ATTEMPTS)(1, self._tags(RUN_ATTEMPTS, task))
        if lease_expired:
            self._record(RUN_LEASE_EXPIRIES)(1, self._tags(RUN_LEASE_EXPIRIES, task))
        if status in ("succeeded", "failed", "cancelled"):
            self._record(RUNS_FINISHED)(1, self._tags(RUNS_FINISHED, task, status))

    def run_queue(self, by_status: Mapping[str, int], oldest_queued_age_s: float) -> None:
        """Sampled: runs by status and the oldest queued run's age."""
        for status in RUN_GAUGE_STATUSES:
            self._set(RUNS, by_status.get(status, 0), status)
        self._set(OLDEST_QUEUED, max(oldest_queued_age_s, 0.0))

    # Batches

    def batch_line(self, kind: str, ok: bool) -> None:
        self._record(BATCH_LINES)(1, self._tags(BATCH_LINES, kind, "done" if ok else "failed"))

    def batches(self, by_status: Mapping[str, int], statuses: Iterable[str]) -> None:
        """Sampled: batches by status (every one of ``statuses``, 0 included)."""
        for status in statuses:
            self._set(BATCHES, by_status.get(status, 0), status)


class NullMetrics(Metrics):
    """``metrics.enabled: false``: every event is a no-op."""

    enabled = False

    def __init__(self, application: str = "") -> None:
        super().__init__(application)

    def declare(self, *specs: MetricSpec) -> None:
        pass

    def request(self, route: str, model: str, status: int, error_code: str, key_id: str | None,
                seconds: float) -> None:
        pass

    def first_token(self, model: str, seconds: float) -> None:
        pass

    def tokens(self, model: str, prompt: int, completion: int, key_id: str | None) -> None:
        pass

    def fallback(self, model: str, fallback: str, reason: str) -> None:
        pass

    def upstream_call(self, model: str, outcome: str, seconds: float) -> None:
        pass

    def upstream_retry(self, model: str) -> None:
        pass

    def breaker(self, model: str, state: str, opened: bool) -> None:
        pass

    def local_generation(self, model: str, tokens: int, seconds: float) -> None:
        pass

    def local_queue(self, model: str, length: int) -> None:
        pass

    def limiter_wait(self, budget: str, seconds: float) -> None:
        pass

    def limiter_refusal(self, budget: str) -> None:
        pass

    def limiter_pause(self, budget: str) -> None:
        pass

    def limiter_state(self, paused: Mapping[str, float], queued: Mapping[str, int]) -> None:
        pass

    def run_submitted(self, task: str) -> None:
        pass

    def run_moved(self, task: str, event: str, status: str, lease_expired: bool) -> None:
        pass

    def run_queue(self, by_status: Mapping[str, int], oldest_queued_age_s: float) -> None:
        pass

    def batch_line(self, kind: str, ok: bool) -> None:
        pass

    def batches(self, by_status: Mapping[str, int], statuses: Iterable[str]) -> None:
        pass


NULL = NullMetrics()
