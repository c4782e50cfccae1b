"""Where recorded values go: Ray's metrics API in a cluster, memory in tests."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Protocol

from deployments.telemetry.catalogue import Kind, MetricSpec

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
