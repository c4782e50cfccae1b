"""API keys and usage: `/v1/admin/keys`, `/v1/usage`, and the console's usage aggregates."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from deployments.schemas.base import OwnBody

# A key's fair-share weight. The fair queue advances a tenant's virtual time by 1/weight per call, so the
# bounds keep that step within [0.01, 100] (no infinity from a subnormal, no step lost to rounding) and
# the ratio between two keys within 10,000 : 1.
MIN_WEIGHT = 0.01
MAX_WEIGHT = 100.0


class KeyLimits(OwnBody):
    """Body of PATCH /v1/admin/keys/{id}: the limits it names change (`null`: unlimited), the others
    stay as they are (a JSON merge patch)."""

    rpm: int | None = Field(
        default=None, ge=1, le=1_000_000, description="Requests per minute (chat, task runs, batch lines)."
    )
    tpm: int | None = Field(
        default=None, ge=1, le=1_000_000_000, description="Tokens per minute (estimated, then settled)."
    )
    token_budget: int | None = Field(
        default=None, ge=1, le=10**15, description="Total tokens this key may ever use."
    )
    weight: float = Field(
        default=1.0, ge=MIN_WEIGHT, le=MAX_WEIGHT, allow_inf_nan=False,
        description=f"Share of a shared model budget when keys wait for it together: a key of weight 2 gets "
        f"twice the calls of a key of weight 1 while both have calls waiting ({MIN_WEIGHT:g} to {MAX_WEIGHT:g}).",
    )


class KeyCreate(KeyLimits):
    """Body of POST /v1/admin/keys."""

    name: str = Field(min_length=1, max_length=200, description="Who or what the key is for.")
    scope: Literal["tenant", "prompts"] = Field(
        default="tenant",
        description="`tenant`: the API's normal use. `prompts`: the same, and also checks, pushes, rolls back "
        "and reads the history of tasks (/v1/tasks/check, /push, /{name}/versions, /{name}/rollback, "
        "/{name}/render); nothing else that needs the admin key.",
    )


class KeyView(OwnBody):
    id: str = Field(description="Key id; also the owner of the runs and batches made with the key.")
    object: Literal["api_key"] = "api_key"
    name: str = Field(description="Who or what the key is for.")
    hint: str = Field(description="Last 4 characters of the key.")
    created_at: float = Field(description="Unix time of creation.")
    revoked_at: float | None = Field(description="Unix time of revocation; empty while active.")
    rpm: int | None = Field(description="Requests per minute, if limited.")
    tpm: int | None = Field(description="Tokens per minute, if limited.")
    token_budget: int | None = Field(description="Total tokens allowed, if limited.")
    weight: float = Field(description="Share of a shared model budget under contention (1 unless set).")
    tokens_used: int = Field(description="Tokens recorded for this key so far.")
    scope: Literal["tenant", "prompts"] = Field(default="tenant", description="`tenant` or `prompts` "
                                                "(may also manage tasks).")


class KeyCreated(KeyView):
    key: str = Field(description="The API key. Shown only in this response; store it now.")


class KeyList(OwnBody):
    """A page of GET /v1/admin/keys (OpenAI's list shape: pass `last_id` as `after` for the next)."""

    object: Literal["list"] = "list"
    data: list[KeyView]
    first_id: str | None = Field(default=None, description="Id of the first key of this page; empty if none.")
    last_id: str | None = Field(default=None, description="Id of the last key of this page; empty if none.")
    has_more: bool = Field(default=False, description="More keys follow `last_id` (pass it as `after`).")


class UsageRow(OwnBody):
    key_id: str = Field(description="The key the usage is billed to.")
    model: str = Field(description="The model called.")
    day: str = Field(description="UTC date, YYYY-MM-DD.")
    requests: int = Field(description="Model calls that day.")
    prompt_tokens: int = Field(description="Prompt tokens that day.")
    completion_tokens: int = Field(description="Completion tokens that day.")
    total_tokens: int = Field(description="Prompt and completion tokens that day.")


class UsageList(OwnBody):
    """A page of GET /v1/usage: newest day first, then by key and model."""

    object: Literal["list"] = "list"
    data: list[UsageRow]
    next_cursor: str | None = Field(default=None, description="Pass as `cursor` (with the same filters) for the "
                                    "next page; empty on the last.")


class UsageCsv(OwnBody):
    """A page of usage rows as CSV lines (the console's export streams these)."""

    csv: str = Field(description="CSV lines of the page's rows, after the header line on the first page.")
    next_cursor: str | None = Field(default=None, description="The cursor of the next page; empty on the last.")


class DayTokens(OwnBody):
    """One day of the console's tokens-per-day chart (summed by the store's database)."""

    day: str = Field(description="UTC date, YYYY-MM-DD.")
    total_tokens: int = Field(description="Tokens of every key and model that day (or of the key asked for).")


class ModelUsage(OwnBody):
    """One model's calls on one day, every key together (the console's overview of today)."""

    model: str = Field(description="The model called.")
    requests: int = Field(description="Model calls.")
    prompt_tokens: int = Field(description="Prompt tokens.")
    completion_tokens: int = Field(description="Completion tokens.")
    total_tokens: int = Field(description="Prompt and completion tokens.")
