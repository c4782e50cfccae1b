"""`/healthz` and `/readyz` bodies."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Liveness(BaseModel):
    """`/healthz`: this Gateway replica's event loop answers (always 200; nothing else is asked)."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["ok"] = Field(description="Always `ok`: an answer at all is the signal.")
    node: str = Field(description="Address of the node this Gateway replica runs on.")


class ModelReadiness(BaseModel):
    """What a model's worker says about itself (``ModelWorker.readiness``), as `/readyz` shows it."""

    model_config = ConfigDict(extra="forbid")

    replicas: Literal["up", "down"] = Field(
        description="`up` when a worker replica answered within the probe's timeout (a model whose replicas "
        "are all busy or gone reads `down`)."
    )
    upstream: Literal["ok", "unreachable", "local", "unknown"] = Field(
        description="An upstream model: whether the worker could open a TCP connection to its `base_url`. "
        "`local`: a llama.cpp model (nothing to reach). `unknown`: no replica answered."
    )

    @property
    def serving(self) -> bool:
        return self.replicas == "up" and self.upstream in ("ok", "local")


class CatalogueStatus(BaseModel):
    """The task catalogue one Gateway or TaskRunner replica holds (``CatalogueFollower.status``)."""

    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(description="The catalogue version this replica applied (none yet: null).")
    tasks: int = Field(description="Active tasks it holds.")
    state: Literal["loading", "current", "stale"] = Field(
        description="`loading`: no catalogue yet (task routes answer 503). `current`: it reached the store within "
        "the last 30 s + 10 × `tasks.catalogue_poll_s`. `stale`: it did not; it serves its last catalogue."
    )
    refreshed_s_ago: float | None = Field(description="Seconds since it last reached the store and caught up.")
    error: str | None = Field(description="Kind of the last refresh's failure, if the last one failed.")
    not_loaded: list[str] = Field(
        description="Tasks whose active definition this replica cannot load (it keeps their last good one); "
        "at most 20 names."
    )
    first_load_s: float | None = Field(
        default=None, description="Seconds this replica's first load took (every page fetched and parsed)."
    )


class Readiness(BaseModel):
    """`/readyz`: whether this node's Gateway can serve (200) or not (503), for a load balancer and a person."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["ok", "unavailable"] = Field(
        description="`ok` when the store answers and at least one model can serve (a replica up, its upstream "
        "reachable); else `unavailable` (HTTP 503)."
    )
    store: Literal["ok", "unreachable"] = Field(description="Whether the TaskStore answered its health check.")
    models: dict[str, ModelReadiness] = Field(description="Per model this gateway routes to: replicas, upstream.")
    node: str = Field(description="Address of the node this Gateway replica runs on.")
    catalogue: CatalogueStatus | None = Field(
        default=None, description="This replica's task catalogue; a `stale` or `loading` one makes it `unavailable`."
    )
