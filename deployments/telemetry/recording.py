"""Recording: one ``Metrics`` per process and application (``metrics_for``), and the sampled gauges."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping

from deployments.config import MetricsConfig
from deployments.telemetry.backends import Backend, RayBackend, Record
from deployments.telemetry.catalogue import (
    BATCH_LINES,
    BATCHES,
    BREAKER_OPENS,
    BREAKER_STATE,
    BREAKER_VALUES,
    FALLBACKS,
    FIRST_TOKEN,
    LIMITER_PAUSED,
    LIMITER_PAUSES,
    LIMITER_QUEUED,
    LIMITER_REFUSALS,
    LIMITER_WAIT,
    LOCAL_QUEUE,
    LOCAL_SECONDS,
    LOCAL_TOKENS,
    OLDEST_QUEUED,
    OTHER,
    REQUEST_DURATION,
    REQUESTS,
    RUN_ATTEMPTS,
    RUN_GAUGE_STATUSES,
    RUN_LEASE_EXPIRIES,
    RUNS,
    RUNS_FINISHED,
    RUNS_SUBMITTED,
    TOKENS,
    UPSTREAM_CALLS,
    UPSTREAM_LATENCY,
    UPSTREAM_RETRIES,
    Kind,
    MetricSpec,
    status_class,
)

logger = logging.getLogger("ray.serve")

MAX_LABEL_SETS = 10_000  # cached label dicts per process (a plain cache: cleared when full)
GAUGE_KEEPALIVE_S = 1.0  # outside a Ray worker; in one, half of Ray's metrics report interval (keepalive_s)

_backend: Backend = RayBackend()
_metrics: dict[tuple[str, bool, bool], Metrics] = {}


def keepalive_s() -> float:
    """How often a process sets its gauges again: half of Ray's metrics report interval in a Ray worker
    (``metrics_report_interval_ms``, 10 s unless the cluster was started with another; so 5 s), below
    the two intervals after which the agent forgets a gauge; ``GAUGE_KEEPALIVE_S`` elsewhere. Waking
    every second instead cost each replica CPU at idle for no fresher number (docs/performance.md)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return GAUGE_KEEPALIVE_S
    try:
        from ray._raylet import Config  # type: ignore[attr-defined]

        return max(GAUGE_KEEPALIVE_S, float(Config.metrics_report_interval_ms()) / 2000)
    except Exception:  # Ray's private config moved: the safe, busier interval
        return GAUGE_KEEPALIVE_S


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
        ``keepalive_s()`` (while an event loop runs in it)."""
        self._record(spec)(value, self._tags(spec, *values))
        self.gauges[(spec.name, *values)] = (spec, value, values)
        if self.keepalive is None or self.keepalive.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # not on an event loop's thread: the next gauge set on it starts the keepalive
            self.keepalive = loop.create_task(self._keep_gauges(), name="metrics-gauges")

    async def _keep_gauges(self) -> None:
        interval_s = keepalive_s()
        while True:
            await asyncio.sleep(interval_s)
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
