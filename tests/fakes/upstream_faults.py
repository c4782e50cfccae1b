"""The fake upstream's fault injection: the fault config and the call statistics.

Fault modes (:class:`FaultConfig`): ``ok`` (optional ``latency_ms``), ``rate_limit`` (429 with
``Retry-After``), ``error`` (500), ``slow`` (``delay_s``, then normal), ``hang`` (no answer until
the client leaves or the server stops), ``drop_stream`` (two SSE chunks, then the connection is
closed; a non-streaming call gets the 500 of ``error``), ``stall_stream`` (two SSE chunks, then
silence until the client hangs up). ``fail_first_n`` limits the fault to the
first N model calls after configuring. ``api_key`` makes ``/v1`` calls without
``Authorization: Bearer <api_key>`` answer 401. Every model call, 401s included, is counted in the
stats (401s under the mode ``unauthorized``).

State: one :class:`Control` (fault config + stats) per server, touched by the server's event loop
and by the controlling thread, behind a lock that is never held across an ``await``.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Any

MODES = ("ok", "rate_limit", "error", "slow", "hang", "drop_stream", "stall_stream")
MAX_CALL_TIMES = 100_000
MAX_PROMPTS = 500


@dataclasses.dataclass(frozen=True)
class FaultConfig:
    """The whole fault configuration: each ``configure`` replaces it, unset fields default."""

    mode: str = "ok"
    latency_ms: float = 0.0  # sleep before answering (mode "ok")
    retry_after: float = 2  # Retry-After header, seconds (mode "rate_limit")
    delay_s: float = 1.0  # sleep before answering normally (mode "slow")
    fail_first_n: int | None = None  # only the first N model calls get the fault, then "ok"
    api_key: str | None = None  # if set, /v1 calls need "Authorization: Bearer <api_key>"
    # Content chunks of a chat stream: 0 cuts the answer into at most 4 pieces; N > 0 sends exactly
    # N one-character chunks (the answer repeated), so a bench can price a long stream per chunk.
    stream_chunks: int = 0
    # Pause between a chat stream's events, as a model's token cadence: 0 writes them all at once
    # (the bench's worst case for per-chunk cost); > 0 spaces them, one event per read downstream.
    chunk_interval_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {', '.join(MODES)}")
        for name in ("latency_ms", "retry_after", "delay_s", "chunk_interval_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0")
        chunks = self.stream_chunks
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 0:
            raise ValueError("stream_chunks must be an integer >= 0")
        n = self.fail_first_n
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError("fail_first_n must be an integer >= 0")
        if self.api_key is not None and not isinstance(self.api_key, str):
            raise ValueError("api_key must be a string")


class Control:
    """Fault config and call statistics, shared by the server loop and other threads."""

    def __init__(self, config: FaultConfig) -> None:
        self._lock = threading.Lock()
        self._initial = config
        self.config = config  # replaced, never mutated: reading it needs no lock
        self._faults_left = config.fail_first_n
        self._zero()

    def _zero(self) -> None:
        self.calls = self.in_flight = self.max_in_flight = 0
        self.calls_by_mode: collections.Counter[str] = collections.Counter()
        self.calls_by_route: collections.Counter[str] = collections.Counter()
        self.last_bodies: dict[str, Any] = {}
        self.call_times: collections.deque[float] = collections.deque(maxlen=MAX_CALL_TIMES)
        self.last_authorization: str | None = None
        self.prompts: collections.deque[str] = collections.deque(maxlen=MAX_PROMPTS)
        self.request_ids: collections.deque[str | None] = collections.deque(maxlen=MAX_PROMPTS)

    def record_prompt(self, prompt: str, route: str = "chat", body: Any = None) -> None:
        with self._lock:
            self.prompts.append(prompt)
            self.last_bodies[route] = body

    def configure(self, config: FaultConfig) -> None:
        with self._lock:
            self.config, self._faults_left = config, config.fail_first_n

    def reset(self) -> None:
        with self._lock:
            self.config, self._faults_left = self._initial, self._initial.fail_first_n
            in_flight = self.in_flight  # calls still running are still in flight after a reset
            self._zero()
            self.in_flight = self.max_in_flight = in_flight

    def begin_call(self, authorization: str | None, authorized: bool, route: str = "chat",
                   request_id: str | None = None) -> FaultConfig:
        """Count a model call; return the config it runs under ("ok" once faults ran out)."""
        with self._lock:
            self.request_ids.append(request_id)
            config = self.config
            if config.mode != "ok" and self._faults_left is not None:
                if self._faults_left > 0:
                    self._faults_left -= 1
                else:
                    config = dataclasses.replace(config, mode="ok")
            self.calls += 1
            self.calls_by_route[route] += 1
            self.calls_by_mode[config.mode if authorized else "unauthorized"] += 1
            self.call_times.append(time.time())
            self.last_authorization = authorization
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return config

    def end_call(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"calls": self.calls, "calls_by_mode": dict(self.calls_by_mode),
                    "calls_by_route": dict(self.calls_by_route),
                    "in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
                    "call_times": list(self.call_times),
                    "last_authorization": self.last_authorization, "prompts": list(self.prompts),
                    "last_bodies": dict(self.last_bodies), "request_ids": list(self.request_ids)}
