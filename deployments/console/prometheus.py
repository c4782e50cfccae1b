"""Request rate, error rate, latency and tokens per model, from Prometheus (when there is one).

Ray's dashboard reads Prometheus from ``RAY_PROMETHEUS_HOST``; the console does the same. The
Gateway's metrics are exported through Ray's metrics API, which prefixes them with ``ray_``. The
metric names and every PromQL query live here, in one place. Without ``RAY_PROMETHEUS_HOST`` (or
when Prometheus does not answer) the overview says so and shows what the service itself knows.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import httpx

logger = logging.getLogger("ray.serve")

PROMETHEUS_ENV = "RAY_PROMETHEUS_HOST"
REQUESTS = "ray_promptfleet_requests_total"  # labels: route, model, status_class
DURATION = "ray_promptfleet_request_duration_seconds_bucket"  # labels: route, model, le
TOKENS = "ray_promptfleet_tokens_total"  # labels: model, kind

WINDOW = "1h"
QUERIES = {
    "rate": f"sum by (model) (rate({REQUESTS}[{WINDOW}]))",
    "errors": f'sum by (model) (rate({REQUESTS}{{status_class="5xx"}}[{WINDOW}]))'
    f" / sum by (model) (rate({REQUESTS}[{WINDOW}]))",
    "p50": f"histogram_quantile(0.5, sum by (model, le) (rate({DURATION}[{WINDOW}])))",
    "p95": f"histogram_quantile(0.95, sum by (model, le) (rate({DURATION}[{WINDOW}])))",
    "tokens": f"sum by (model) (increase({TOKENS}[{WINDOW}]))",
}


@dataclass
class ModelRates:
    """The last hour of one model, as Prometheus has it (any value may be missing)."""

    rate: float | None = None  # requests per second
    errors: float | None = None  # fraction of requests answered 5xx
    p50: float | None = None  # seconds
    p95: float | None = None
    tokens: float | None = None


@dataclass
class Rates:
    source: str | None  # the Prometheus address, or None: no Prometheus configured
    error: str | None = None  # why there are no numbers, if Prometheus was asked and failed
    models: dict[str, ModelRates] = field(default_factory=dict)


async def query_rates(
    host: str | None, timeout_s: float = 2.0, transport: httpx.AsyncBaseTransport | None = None
) -> Rates:
    """Every query of ``QUERIES`` against the Prometheus at ``host`` (None: not configured)."""
    if not host:
        return Rates(source=None)
    rates = Rates(source=host)
    try:
        async with httpx.AsyncClient(base_url=host.rstrip("/"), timeout=timeout_s, transport=transport) as client:
            for name, promql in QUERIES.items():
                response = await client.get("/api/v1/query", params={"query": promql})
                response.raise_for_status()
                for sample in response.json()["data"]["result"]:
                    value = float(sample["value"][1])
                    model = sample["metric"].get("model", "?")
                    setattr(rates.models.setdefault(model, ModelRates()), name, None if math.isnan(value) else value)
    except (httpx.HTTPError, KeyError, ValueError, TypeError) as exc:
        logger.warning("console: Prometheus at %s did not answer: %s", host, exc)
        rates.error = f"Prometheus at {host} did not answer ({type(exc).__name__})."
    return rates
