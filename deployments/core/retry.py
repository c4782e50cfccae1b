"""Backoff for upstream retries: pure logic, tested without a network.

The policy is "full jitter" exponential backoff (AWS Architecture Blog,
"Exponential Backoff And Jitter"), with the server's ``Retry-After`` taking
precedence, and everything bounded by the caller's total deadline.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


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


def parse_retry_after(value: str | None, cap_s: float, now: float | None = None) -> float | None:
    """``Retry-After`` (RFC 9110: delta-seconds or an HTTP date) in seconds, within ``[0, cap_s]``.

    None when the header is absent. A value we cannot trust — ``inf``, ``nan``, negative, not a
    number nor a date — counts as ``cap_s``: the upstream did ask us to wait, and one bad header
    must not turn into an endless (or no) pause. Huge values are capped at ``cap_s`` too.
    """
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        seconds = _date_delta(text, now)
    if not math.isfinite(seconds) or seconds < 0:
        return cap_s
    return min(seconds, cap_s)


def _date_delta(text: str, now: float | None) -> float:
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return math.nan
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    reference = datetime.now(UTC).timestamp() if now is None else now
    return max(0.0, when.timestamp() - reference)
