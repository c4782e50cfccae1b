"""Benchmark: the console and the admin API with 100,000 runs, 10,000 keys and 300,000 usage rows.

    python -m bench.console [--runs 100000] [--keys 10000] [--usage-rows 300000] [--repeat 20]

Runs (``--runs 0`` skips them):

Seeds a SQLite run store (in a temporary directory) with ``--runs`` runs of three tasks, five
statuses and fifty owners, straight through the store's database (one transaction), then times,
median over ``--repeat`` reads:

- the store query behind each console page of runs (``RunStore.list_runs``, 50 runs, keyset):
  the first page, a page 1,000 pages deep (by cursor), by status, by task, by owner, by time;
- ``count_by_status`` (the overview's queue depth);
- rendering the runs page's template with one page of runs.

Then the same queries without the admin-listing indexes this console added (``runs_by_created``,
``runs_by_status_created``, ``runs_by_task_created``), as the baseline, in the same run.

Keys and usage (``--keys 0`` skips them): seeds another SQLite store with ``--keys`` keys and
``--usage-rows`` usage rows (every key used on 3 models on some of the last 90 days), then times:

- ``GET /v1/admin/keys``, ``GET /v1/usage`` and the console's ``/keys``, ``/usage`` and
  ``/usage.csv`` (the whole export), in process over ASGI: the Gateway's routes, the TaskStore
  class and the templates, no Ray. The DeploymentHandle between them is a stand-in that pickles
  the arguments and the answer both ways, as Ray serializes them; the Ray hop itself is not in the
  numbers (it is the same whatever the page size);
- ``KeyStore.snapshot``: what every Gateway's key index polls every ``auth.cache_ttl_s``: the
  keys' version and every key's tokens (and, after a key change, every active key).

This part only uses URLs and constructors that older releases have too: run the file against an
older checkout (``PYTHONPATH=<checkout> python bench/console.py …``, or copy it there) for the
numbers before.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import pickle
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from deployments.clients.keys import KeysClient
from deployments.clients.runs import RunsClient
from deployments.clients.sessions import SessionsClient
from deployments.config import AuthConfig, TasksConfig
from deployments.console.app import build_console, templates
from deployments.console.pages import Pages
from deployments.gateway.admin_routes import KeyAdmin, build_admin_router
from deployments.gateway.auth import Authenticator
from deployments.gateway.caller import ANONYMOUS
from deployments.store import RunStore
from deployments.store.keys import KeyStore
from deployments.store.records import encode_cursor, new_run_id

PAGE = 50
TASKS = ("classify_ticket", "extract_contact", "summarize")
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
NEW_INDEXES = ("runs_by_created", "runs_by_status_created", "runs_by_task_created")


def seed(store: RunStore, runs: int) -> list[tuple[float, str]]:
    rng = random.Random(7)
    start = time.time() - runs  # one run a second, oldest first
    keys: list[tuple[float, str]] = []
    with store.database.transaction() as tx:
        for n in range(runs):
            run_id, created = new_run_id(), start + n
            status = rng.choices(STATUSES, weights=(2, 1, 80, 10, 7))[0]
            done = status in ("succeeded", "failed", "cancelled")
            tx.run(
                "INSERT INTO runs (id, task, owner, status, input, request_hash, created_at, updated_at, finished_at,"
                " attempt, result) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                run_id, TASKS[n % 3], f"key_{n % 50:016x}", status, '{"text":"hello"}', f"{n:064x}", created,
                created, created + 1 if done else None, 1 if status != "queued" else 0,
                '{"output":{"label":"a"}}' if status == "succeeded" else None,
            )
            keys.append((created, run_id))
    return keys


def median_ms(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def measure(store: RunStore, keys: list[tuple[float, str]], repeat: int) -> dict[str, float]:
    deep = encode_cursor(*keys[-PAGE * 1000])
    middle = encode_cursor(keys[len(keys) // 2][0], "run_" + "f" * 24)
    queries: dict[str, Callable[[], Any]] = {
        "first page": lambda: store.list_runs(None, limit=PAGE),
        "page 1,000": lambda: store.list_runs(None, limit=PAGE, cursor=deep),
        "status=failed": lambda: store.list_runs(None, status="failed", limit=PAGE),
        "task=summarize": lambda: store.list_runs(None, task="summarize", limit=PAGE),
        "one owner": lambda: store.list_runs("key_0000000000000007", limit=PAGE),
        "created before (middle)": lambda: store.list_runs(None, limit=PAGE, cursor=middle),
        "count_by_status": store.count_by_status,
    }
    return {name: median_ms(fn, repeat) for name, fn in queries.items()}


# -- keys and usage ------------------------------------------------------------------------------

MODELS = ("fake", "gpt-4o-mini", "smollm2")
DAYS = 90


def seed_keys(store: KeyStore, keys: int, usage_rows: int) -> None:
    """``keys`` keys, one a minute; ``usage_rows`` rows spread evenly over the keys, each key's on
    its own random days (3 models a day) among the last ``DAYS``."""
    rng = random.Random(11)
    start = time.time() - keys * 60
    today = time.time()
    per_key = max(1, usage_rows // max(1, keys))
    with store.database.transaction() as tx:
        for n in range(keys):
            tx.run(
                "INSERT INTO api_keys (id, name, key_hash, hint, created_at) VALUES (?, ?, ?, ?, ?)",
                f"key_{n:016x}", f"tenant {n}", f"{n:064x}", f"{n % 10000:04d}", start + n * 60,
            )
        left = usage_rows
        for n in range(keys):
            rows = min(left, per_key if n < keys - 1 else left)
            left -= rows
            days = rng.sample(range(DAYS), min(DAYS, (rows + len(MODELS) - 1) // len(MODELS)))
            for i in range(rows):
                day = time.strftime("%Y-%m-%d", time.gmtime(today - days[i // len(MODELS)] * 86400))
                prompt, completion = rng.randint(10, 2000), rng.randint(1, 500)
                tx.run(
                    "INSERT INTO usage (key_id, model, day, requests, prompt_tokens, completion_tokens, total_tokens)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    f"key_{n:016x}", MODELS[i % len(MODELS)], day, rng.randint(1, 50), prompt, completion,
                    prompt + completion,
                )


class Handle:
    """A DeploymentHandle stand-in: ``handle.method.remote(*args)`` awaits the method on this loop,
    its arguments and its answer pickled both ways (as Ray serializes them across the hop)."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._target, name)

        class Method:
            @staticmethod
            async def remote(*args: Any, **kwargs: Any) -> Any:
                args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))
                return pickle.loads(pickle.dumps(await method(*args, **kwargs)))

        return Method


class NoMeter:
    """The Meter's part the routes use: nothing waits to be flushed in a benchmark."""

    async def flush(self) -> None:
        pass


def admin_app(store: Any) -> FastAPI:
    """The Gateway's key and usage routes at /v1 and the console at /console, authentication off."""
    handle: Any = Handle(store)
    auth = Authenticator(AuthConfig(enabled=False), KeysClient(handle), None)
    keys = KeyAdmin(KeysClient(handle), RunsClient(handle), auth, None)
    app = FastAPI()
    app.include_router(build_admin_router(keys, NoMeter()))  # type: ignore[arg-type]
    pages = Pages(tasks=None, runs=RunsClient(handle), batches=None, keys=keys,  # type: ignore[arg-type]
                  meter=NoMeter(), overview=None, owner="anonymous")  # type: ignore[arg-type]
    app.mount("/console", build_console(pages, auth, SessionsClient(handle)))

    async def anonymous(scope: Any, receive: Any, send: Any) -> None:
        # What the Gateway's AuthGate does with authentication off: every caller is anonymous (the admin).
        scope.setdefault("state", {})["caller"] = ANONYMOUS
        await app(scope, receive, send)

    return anonymous  # type: ignore[return-value]


async def amedian_ms(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        await fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


async def measure_keys(folder: Path, keys: int, usage_rows: int, repeat: int) -> None:
    from deployments.task_store import TaskStore  # imported here: it starts nothing until built

    location = folder / "keys" / "tasks.sqlite3"
    location.parent.mkdir()
    with KeyStore(location) as seeding:
        started = time.perf_counter()
        seed_keys(seeding, keys, usage_rows)
        print(f"seeded {keys} keys and {usage_rows} usage rows in {time.perf_counter() - started:.1f} s")
    service = TaskStore(TasksConfig(state_dir=str(location.parent)))
    results: dict[str, tuple[float, str]] = {}
    try:
        transport = httpx.ASGITransport(app=admin_app(service), client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=600) as http:

            async def get(path: str) -> httpx.Response:
                response = await http.get(path)
                assert response.status_code == 200, (path, response.status_code, response.text[:300])
                return response

            one_key = f"key_{7:016x}"
            for path in ("/v1/admin/keys", "/v1/usage", f"/v1/usage?key_id={one_key}", "/console/keys",
                         "/console/usage", f"/console/usage?key_id={one_key}"):
                size = len((await get(path)).content)
                results[path] = (await amedian_ms(functools.partial(get, path), repeat), f"{size:,} bytes")
            size = len((await get("/console/usage.csv")).content)
            results["/console/usage.csv (all rows)"] = (
                await amedian_ms(lambda: get("/console/usage.csv"), max(1, repeat // 10)), f"{size:,} bytes"
            )
            # Deep pages, where the API pages (older releases answer everything at once).
            deep: dict[str, str] = {}
            cursor: str | None = None
            for _ in range(100):
                body = (await get("/v1/usage" + (f"?cursor={cursor}" if cursor else ""))).json()
                cursor = body.get("next_cursor")
                if not cursor:
                    break
            else:
                deep["/v1/usage, page 101 (cursor)"] = f"/v1/usage?cursor={cursor}"
            listing = (await get("/v1/admin/keys")).json()
            if listing.get("has_more"):
                middle = f"key_{keys // 2:016x}"
                deep["/v1/admin/keys, after the middle key"] = f"/v1/admin/keys?after={middle}"
            for name, path in deep.items():
                results[name] = (await amedian_ms(functools.partial(get, path), repeat), "")
        version = service.keys.version()
        results["KeyStore.snapshot (poll: tokens)"] = (
            median_ms(lambda: service.keys.snapshot(version), repeat), "")
        results["KeyStore.snapshot (keys changed)"] = (median_ms(lambda: service.keys.snapshot(None), repeat), "")

        def summed() -> Any:
            with service.database.autocommit() as tx:
                return tx.rows("SELECT key_id, SUM(total_tokens) AS n FROM usage GROUP BY key_id")

        results["the poll's SUM ... GROUP BY key_id alone"] = (median_ms(summed, repeat), "")
    finally:
        service.close()
    print(f"\nmedian of {repeat} requests ({max(1, repeat // 10)} for the export), in process, ms")
    for name, (ms, note) in results.items():
        print(f"  {name:<40} {ms:>10.2f}   {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--usage-rows", type=int, default=300_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args(argv)
    if args.keys:
        with tempfile.TemporaryDirectory() as folder:
            asyncio.run(measure_keys(Path(folder), args.keys, args.usage_rows, args.repeat))
    if not args.runs:
        return 0
    with tempfile.TemporaryDirectory() as folder, RunStore(Path(folder) / "runs.sqlite3") as store:
        started = time.perf_counter()
        keys = seed(store, args.runs)
        print(f"seeded {args.runs} runs in {time.perf_counter() - started:.1f} s")
        with_indexes = measure(store, keys, args.repeat)
        page = [run.detail() for run in store.list_runs(None, limit=PAGE)[0]]
        template = templates().get_template("runs.html")
        render_ms = median_ms(lambda: template.render(
            base="/console", auth_enabled=True, signed_in=True, csrf="x", csrf_field="csrf_token", nav="runs",
            runs=page, next_cursor="c", filters={"status": "", "task": "", "owner": "", "before": ""}, query={},
            statuses=STATUSES, task_names=TASKS, cursor="", took_ms=1.0,
        ), args.repeat)
        with store.database.transaction() as tx:
            for index in NEW_INDEXES:
                tx.run(f"DROP INDEX {index}")
        baseline = measure(store, keys, args.repeat)
    print(f"\nmedian of {args.repeat} reads, {PAGE} runs a page, ms   with the console's indexes   without (baseline)")
    for name, ms in with_indexes.items():
        print(f"  {name:<26} {ms:>10.2f} {baseline[name]:>24.2f}")
    print(f"  {'render runs.html':<26} {render_ms:>10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
