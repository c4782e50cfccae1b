"""Benchmark: the console's runs list with 100,000 runs in the store.

    python -m bench.console [--runs 100000] [--repeat 20]

Seeds a SQLite run store (in a temporary directory) with ``--runs`` runs of three tasks, five
statuses and fifty owners, straight through the store's database (one transaction), then times,
median over ``--repeat`` reads:

- the store query behind each console page of runs (``RunStore.list_runs``, 50 runs, keyset):
  the first page, a page 1,000 pages deep (by cursor), by status, by task, by owner, by time;
- ``count_by_status`` (the overview's queue depth);
- rendering the runs page's template with one page of runs.

Then the same queries without the admin-listing indexes this console added (``runs_by_created``,
``runs_by_status_created``, ``runs_by_task_created``), as the baseline, in the same run.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deployments.console.app import templates
from deployments.store import RunStore
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args(argv)
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
