"""The ``auth:`` and ``admission:`` sections: API keys, and how their limits pace and share budgets."""

from __future__ import annotations

from pydantic import Field

from deployments.config.base import _Strict


class AuthConfig(_Strict):
    """API keys. Off for a local single-user start; on for anything shared."""

    enabled: bool = Field(
        default=False, description="Require `Authorization: Bearer <key>` on every /v1 request."
    )
    admin_key_env: str = Field(
        default="PROMPTFLEET_ADMIN_KEY",
        pattern=r"^[A-Z_][A-Z0-9_]*$",
        description="Environment variable holding the admin key (manages keys via /v1/admin/keys).",
    )
    cache_ttl_s: float = Field(
        default=5.0,
        ge=0,
        le=300,
        description="How often a Gateway replica refreshes its index of active API keys and their token "
        "counts; a key revoked through another replica stops working within it.",
    )


class AdmissionConfig(_Strict):
    """How per-key limits pace and how keys share a model's budget (the RateLimiter)."""

    key_burst_s: float = Field(
        default=1.0,
        ge=0,
        le=60,
        description="A key's burst: its `rpm`/`tpm` admits this many seconds' worth of its rate at once "
        "(at least `key_min_burst` requests or `key_min_burst` × 1000 tokens, never more than the per-minute "
        "limit); the rest is paced at the rate.",
    )
    key_min_burst: int = Field(
        default=5, ge=1, le=10000, description="Requests a key with an `rpm` may always send at once."
    )
    max_wait_s: float = Field(
        default=300.0,
        gt=0,
        le=3600,
        description="Cap on the deadline a client asks for: no request waits longer than this for its slot.",
    )
    max_queued_per_key: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="Calls of one key that may wait for a budget at once; more get 429 with Retry-After.",
    )
    background_share: float = Field(
        default=0.25,
        ge=0.01,  # 1 / background_share is a lane's step in the fair queue: kept finite and <= 100
        le=1,
        description="Weight of a key's async task runs and batch lines against its interactive calls "
        "when both wait for the same model: they count against the key's share, served "
        "`background_share` as often.",
    )
    grant_ahead_s: float = Field(
        default=0.1,
        ge=0,
        le=5,
        description="A waiting call is told its slot this long before it starts (covers the hop to the "
        "caller); a call arriving later can still be served first within this window, so fairness holds "
        "to within it.",
    )

    def key_bursts(self, rpm: int | None, tpm: int | None) -> tuple[float | None, float | None]:
        """The burst of a key's requests and tokens per the rule above (None where unlimited)."""
        seconds = self.key_burst_s / 60
        rpm_burst = None if rpm is None else float(min(rpm, max(self.key_min_burst, rpm * seconds)))
        tpm_burst = None if tpm is None else float(min(tpm, max(self.key_min_burst * 1000, tpm * seconds)))
        return rpm_burst, tpm_burst
