"""Backoff for upstream retries: pure logic, tested without a network.

The policy is "full jitter" exponential backoff (AWS Architecture Blog,
"Exponential Backoff And Jitter"), with the server's ``Retry-After`` taking
precedence, and everything bounded by the caller's total deadline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BackoffPolicy:
    base_s: float = 0.2
    cap_s: float = 8.0
    rng: random.Random = field(default_factory=random.Random, compare=False)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        if retry_after is not None and retry_after >= 0:
            return retry_after
        ceiling = min(self.cap_s, self.base_s * (2 ** (attempt - 1)))
        return self.rng.uniform(0, ceiling)


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds form; HTTP dates are rare from LLM APIs and ignored)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
