"""The overview page's numbers: gathered at once from everything the service knows.

- deployments and their replicas per node (``cluster.Deployments``) and this node's health
  (the ``/readyz`` check, ``gateway.health``);
- the run queue by status (``TaskStore.count_by_status``) and the limiter's budgets
  (``RateLimiter.state``);
- today's requests and tokens per model, and tokens per day of the last 14 (``TaskStore.today_by_model``
  and ``tokens_per_day``: summed by the database over those days, never the whole usage table);
- request rate, error rate and latency over the last hour, from Prometheus when there is one
  (``prometheus``).

Each source is asked concurrently and on its own: one that fails leaves its part empty with the
reason, never the whole page.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from deployments.clients.keys import KeysClient
from deployments.clients.limiter import LimiterClient
from deployments.clients.runs import RunsClient
from deployments.console.charts import bar_chart, day_points
from deployments.console.cluster import Deployments, Snapshot
from deployments.console.prometheus import Rates, query_rates
from deployments.gateway.health import HealthCheck
from deployments.limits.metering import Meter
from deployments.schemas import LimiterState, Readiness

logger = logging.getLogger("ray.serve")
DAYS = 14  # the tokens-per-day chart


@dataclass
class ModelToday:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass
class OverviewData:
    health: Readiness | None
    deployments: Snapshot | None
    queue: dict[str, int] | None
    limiter: LimiterState | None
    today: dict[str, ModelToday]
    rates: Rates
    tokens_chart: str
    requests_chart: str
    days_chart: str
    problems: list[str] = field(default_factory=list)


class Overview:
    def __init__(
        self,
        *,
        runs: RunsClient,
        keys: KeysClient,
        limiter: LimiterClient,
        health: HealthCheck,
        meter: Meter,
        prometheus_host: str | None,
        deployments: Deployments | None = None,
    ) -> None:
        self.runs = runs
        self.keys = keys
        self.limiter = limiter
        self.health = health
        self.meter = meter
        self.prometheus_host = prometheus_host
        self.deployments = deployments or Deployments()

    async def gather(self) -> OverviewData:
        await self.meter.flush()  # this replica's last second of usage
        names = ("health", "deployments", "queue", "limiter", "today", "days", "rates")
        results = await asyncio.gather(
            self.health.check(),
            self.deployments.get(),
            self.runs.count_by_status(),
            self.limiter.state(),
            self.keys.today_by_model(),
            self.keys.tokens_per_day(DAYS),
            query_rates(self.prometheus_host),
            return_exceptions=True,
        )
        problems = []
        values: dict[str, Any] = {}
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                logger.warning("console overview: %s failed: %r", name, result)
                problems.append(f"{name}: {type(result).__name__}")
                values[name] = None
            else:
                values[name] = result
        today = {
            row.model: ModelToday(row.requests, row.prompt_tokens, row.completion_tokens, row.total_tokens)
            for row in values["today"] or []
        }
        models = sorted(today)
        today_day = time.strftime("%Y-%m-%d", time.gmtime())
        days = day_points(values["days"] or [], DAYS, today_day)
        return OverviewData(
            health=values["health"],
            deployments=values["deployments"],
            queue=values["queue"],
            limiter=values["limiter"],
            today=dict(sorted(today.items())),
            rates=values["rates"] or Rates(source=self.prometheus_host, error="not asked"),
            tokens_chart=bar_chart([(m, today[m].total_tokens) for m in models], title="Tokens today per model"),
            requests_chart=bar_chart([(m, today[m].requests) for m in models], title="Requests today per model"),
            days_chart=bar_chart(days, title=f"Tokens per day ({DAYS} days)"),
            problems=problems,
        )
