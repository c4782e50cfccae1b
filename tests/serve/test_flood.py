"""Issue 10 item 4: user traffic cannot starve lease renewals (the application with auth on).

Async runs execute with a short lease (``lease_s: 3`` in tests/fixtures.py auth_app, renewed every
second) on an upstream slower than the lease, while thousands of requests with distinct bogus
keys, long-polls of those runs and run listings hit the same Gateway and TaskStore. If a renewal
were delayed past the lease, the run would be claimed again: its ``attempt`` would be 2 and the
upstream would see a second call. Neither may happen.

This is the end-to-end check; the two mechanisms behind it are pinned deterministically by unit
tests that fail without them: renewals on a lane of their own
(tests/unit/test_store_service.py::test_renewals_do_not_queue_behind_user_traffic) and no store
call per distinct bogus key (tests/unit/test_auth.py). On a 2-core machine the flood here reaches
some 60 refused requests per second; that was not enough to starve renewals even with a single
database lane and a store call per unknown key (tried once as a negative control, 2026-12-02).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from tests.fixtures import ADMIN_KEY, ServeApp
from tests.waiting import until

pytestmark = pytest.mark.serve

RUNS = 12
UPSTREAM_LATENCY_MS = 4500  # 1.5 leases: every run must renew its lease to finish once
BOGUS_CONCURRENCY = 48
LONG_POLLS_PER_RUN = 4
MIN_BOGUS_REQUESTS = 2000
HELLO = [{"role": "user", "content": "x"}]


async def flood(app: ServeApp, key: str) -> tuple[list[dict[str, Any]], Counter[str], int]:
    """Submit the runs, flood until they all end; returns (final runs, bogus answers, long-polls)."""
    valid = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=BOGUS_CONCURRENCY + RUNS * LONG_POLLS_PER_RUN + 8)
    async with httpx.AsyncClient(base_url=app.auth_base_url, timeout=120, limits=limits) as client:
        ids = []
        for i in range(RUNS):
            response = await client.post("/tasks/label_fake/submit", json={"input": {"text": f"f{i}"}}, headers=valid)
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        done = asyncio.Event()
        bogus: Counter[str] = Counter()
        long_polls = 0

        async def bogus_caller(n: int) -> None:
            # Distinct made-up keys on every route kind: reads, long-polls, submits, chat.
            requests = [
                ("GET", f"/runs/{ids[n % RUNS]}", {"params": {"wait": 5}}),
                ("POST", "/tasks/label_fake/submit", {"json": {"input": {"text": "x"}}}),
                ("GET", "/runs", {}),
                ("POST", "/chat/completions", {"json": {"model": "fake", "messages": HELLO}}),
                ("GET", "/models", {}),
            ]
            i = 0
            while not done.is_set() or sum(bogus.values()) < MIN_BOGUS_REQUESTS:
                method, path, kwargs = requests[i % len(requests)]
                i += 1
                headers = {"Authorization": f"Bearer pf-{secrets.token_urlsafe(32)}"}
                response = await client.request(method, path, headers=headers, **kwargs)
                bogus[str(response.status_code)] += 1

        async def long_poller(run_id: str) -> None:
            nonlocal long_polls
            while not done.is_set():
                response = await client.get(f"/runs/{run_id}", params={"wait": 10}, headers=valid)
                assert response.status_code == 200, response.text
                long_polls += 1
                if response.json()["status"] in ("succeeded", "failed", "cancelled"):
                    return

        async def lister() -> None:
            while not done.is_set():
                response = await client.get("/runs", params={"limit": 50}, headers=valid)
                assert response.status_code == 200, response.text

        async def watch() -> list[dict[str, Any]]:
            runs: list[dict[str, Any]] = []

            async def finished() -> list[dict[str, Any]] | None:
                nonlocal runs
                runs = [(await client.get(f"/runs/{i}", headers=valid)).json() for i in ids]
                return runs if all(r["status"] in ("succeeded", "failed", "cancelled") for r in runs) else None

            try:
                return await until(finished, 180, interval_s=0.5,
                                   message=lambda: f"runs unfinished: {Counter(r['status'] for r in runs)}")
            finally:
                done.set()

        tasks = [asyncio.create_task(bogus_caller(n)) for n in range(BOGUS_CONCURRENCY)]
        tasks += [asyncio.create_task(long_poller(i)) for i in ids for _ in range(LONG_POLLS_PER_RUN)]
        tasks.append(asyncio.create_task(lister()))
        try:
            runs = await watch()
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
        return runs, bogus, long_polls


def test_lease_renewals_survive_a_flood_of_bogus_keys_and_long_polls(app: ServeApp, record_property: Any) -> None:
    created = httpx.post(
        f"{app.auth_base_url}/admin/keys", json={"name": "flood"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert created.status_code == 201, created.text
    app.upstream.configure(mode="ok", latency_ms=UPSTREAM_LATENCY_MS)
    started = time.monotonic()

    runs, bogus, long_polls = asyncio.run(flood(app, created.json()["key"]))
    record_property("flood", {"bogus_requests": sum(bogus.values()), "long_polls": long_polls,
                              "seconds": round(time.monotonic() - started, 1)})

    # The flood was real: thousands of refused requests, all while the runs were executing.
    assert sum(bogus.values()) >= MIN_BOGUS_REQUESTS and set(bogus) == {"401"}, bogus
    assert long_polls >= RUNS * LONG_POLLS_PER_RUN
    # Every run finished in its first start: no lease expired, nothing ran twice.
    assert [(r["status"], r["attempt"]) for r in runs] == [("succeeded", 1)] * RUNS
    assert app.upstream.stats()["calls"] == RUNS
    assert time.monotonic() - started >= UPSTREAM_LATENCY_MS / 1000  # the runs outlived their lease
