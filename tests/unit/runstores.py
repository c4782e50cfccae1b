"""The run store's test helpers: a run, a claim (the fixtures that open stores are in conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from deployments.store import RunRecord, RunStore

LEASE = 30.0
OpenStore = Callable[..., RunStore]


def new_run(
    store: RunStore, n: int = 0, *, owner: str = "alice", now: float = 100.0, **kw: Any
) -> RunRecord:
    run, created = store.create_run(
        task="classify", input={"text": f"t{n}"}, owner=owner, idempotency_key=kw.get("key"), now=now
    )
    assert created or kw.get("key")
    return run


def claim_one(store: RunStore, now: float, worker: str = "w1") -> RunRecord:
    (run,) = store.claim(worker_id=worker, lease_s=LEASE, now=now)
    return run
