"""Benchmark: a new replica loading a 2,000-task / 50 MB catalogue, and the steady-state poll.

    python -m bench.catalogue [--tasks 2000] [--prompt-bytes 26000] [--repeat 5]

Seeds a SQLite ``TaskVersionStore`` (in a temporary directory) with ``--tasks`` tasks whose prompts
are ``--prompt-bytes`` of distinct text, through ``push`` in batches of 40, then times, median
over ``--repeat``:

- a new replica's first load: a ``CatalogueFollower`` paging the whole catalogue in from the store
  and parsing every definition (what a Gateway or TaskRunner does at start). The handle between
  them is a stand-in that pickles the arguments and the answer both ways, as Ray serializes them,
  and runs the store call in a thread as the TaskStore's lane does; the Ray hop itself (~1 ms a
  call here) is not in the numbers: multiply it by the page count printed;
- the steady-state poll: one ``refresh`` when nothing changed (one call, one primary-key read),
  and the size of its pickled answer;
- one push of one task, then the ``refresh`` that applies it (one call with the change).

It also prints the largest page's pickled size against the whole catalogue's (what one call used
to carry).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import pickle
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deployments.catalogue import CatalogueFollower
from deployments.core.taskdefs import TaskDefinition
from deployments.core.taskfile import canonical, content_hash
from deployments.store.tasks import TaskVersionStore, VersionInput


def item(i: int, prompt_bytes: int, marker: str = "") -> VersionInput:
    name = f"bulk-{i:04d}"
    filler = "".join(hashlib.sha256(f"{name}-{marker}-{j}".encode()).hexdigest() for j in range(prompt_bytes // 64))
    defn = TaskDefinition.model_validate({
        "name": name, "description": "A task of the big catalogue.", "model": "fake",
        "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
        "output_schema": {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"],
                          "additionalProperties": False},
        "prompt": f"{name}: {filler} {{{{ text }}}}",
    })
    return VersionInput(name=name, definition=canonical(defn), content_hash=content_hash(defn), source=f"# {name}\n")


class Handle:
    """Stand-in for the TaskStore's handle: pickles both ways, runs the call in a thread; counts."""

    def __init__(self, store: TaskVersionStore) -> None:
        self.store = store
        self.calls = 0
        self.largest = 0
        self.last = 0

    async def changes(self, since: int | None, version: int | None, after: str) -> Any:
        args = pickle.loads(pickle.dumps((since, version, after)))
        page = await asyncio.to_thread(self.store.changes, *args)
        data = pickle.dumps(page)
        self.calls += 1
        self.last = len(data)
        self.largest = max(self.largest, len(data))
        return pickle.loads(data)

    async def fetch(self, name: str, version: int) -> Any:
        return self.store.get(name, version)


def median_s(run: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--prompt-bytes", type=int, default=26_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp, TaskVersionStore(Path(tmp) / "tasks.sqlite3") as store:
        items = [item(i, args.prompt_bytes) for i in range(args.tasks)]
        total = sum(len(i.definition.encode()) for i in items)
        started = time.perf_counter()
        for start in range(0, len(items), 40):
            store.push(items[start:start + 40], author="bench")
        print(f"seeded {args.tasks} tasks, {total / 1e6:.1f} MB of definitions, in "
              f"{time.perf_counter() - started:.1f}s")

        handle = Handle(store)

        def first_load() -> None:
            follower = CatalogueFollower(handle.changes, handle.fetch, poll_s=1)
            handle.calls = 0
            asyncio.run(follower.refresh())
            assert len(follower.catalogue.tasks) == args.tasks

        load_s = median_s(first_load, args.repeat)
        pages, largest = handle.calls, handle.largest
        whole = len(pickle.dumps(store.changes(None, max_bytes=10**12, max_count=10**9)))
        print(f"new replica, first load: {load_s:.2f}s median of {args.repeat} ({pages} calls; largest page "
              f"{largest / 1e6:.2f} MB pickled; the whole catalogue in one call would be {whole / 1e6:.1f} MB)")

        follower = CatalogueFollower(handle.changes, handle.fetch, poll_s=1)

        async def steady() -> tuple[float, float, float, int]:
            await follower.refresh()
            times = []
            for _ in range(200):
                started = time.perf_counter()
                await follower.refresh()
                times.append(time.perf_counter() - started)
            poll = statistics.median(times)
            size = handle.last
            apply_times, push_times = [], []
            for r in range(args.repeat):
                started = time.perf_counter()
                store.push([item(r % args.tasks, args.prompt_bytes, marker=f"r{r}")], author="bench")
                pushed = time.perf_counter()
                await follower.refresh()
                push_times.append(pushed - started)
                apply_times.append(time.perf_counter() - pushed)
            return poll, statistics.median(push_times), statistics.median(apply_times), size

        poll_s, push_s, apply_s, size = asyncio.run(steady())
        print(f"steady-state poll (nothing changed): {poll_s * 1e3:.2f} ms median of 200, answer {size} bytes "
              "pickled, one store call")
        print(f"one pushed task: stored in {push_s * 1e3:.1f} ms, applied by a replica's refresh in "
              f"{apply_s * 1e3:.1f} ms (medians of {args.repeat})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
