"""An in-process stack sampler for the bench's ``--profile`` where py-spy cannot attach (it cannot
read this machine's Python: "Failed to find python version from target process").

On ``PYTHONPATH`` (``bench.peers.profile.sampler_env``), Python imports this module at start-up in
every process of a promptfleet cluster the bench starts. With ``PROMPTFLEET_BENCH_SAMPLES=DIR`` set
it starts one daemon thread that looks for ``DIR/<pid>.start`` twice a second; the file holds a
number of seconds. It then samples every other thread's stack (Serve runs a replica's event loop
on a thread of its own; the main thread waits in Ray's task loop) every ``INTERVAL_S`` for that long
and writes the counts as py-spy's raw format (``thread NAME;frame;… count``, outermost first) to
``DIR/<pid>.txt``. A sample counts only if its thread spent CPU since the previous one (its
``pthread_getcpuclockid`` clock) and its innermost frame is not an event wait, so counts approximate
CPU time. Roughly: the sampler gets the GIL when another thread lets it go, so calls into C that
release it (Ray's metric recording, socket writes) collect more samples than their CPU; Ray's own
``Counter.inc`` costs 2-3 µs here, measured alone. Read it for what grows, not as a budget. The garbage
collector's own time, which no Python frame shows, is timed meanwhile through ``gc.callbacks``:
``DIR/<pid>.gc.json`` holds collections and seconds per generation. Without the variable it does
nothing.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import FrameType

INTERVAL_S = 0.004
IDLE = ("select", "poll", "run_forever", "_run_once", "wait", "sleep", "epoll")


def _frame(code: object) -> str:
    name = getattr(code, "co_qualname", getattr(code, "co_name", "?"))
    path = str(getattr(code, "co_filename", "?"))
    for marker in ("site-packages/", "/deployments/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})"


class _GcTimes:
    """Collections and seconds per generation, from ``gc.callbacks`` (start/stop pairs)."""

    def __init__(self) -> None:
        self.started = 0.0
        self.by_generation: dict[int, list[float]] = {}

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        entry = self.by_generation.setdefault(info["generation"], [0, 0.0])
        entry[0] += 1
        entry[1] += time.perf_counter() - self.started


def _cpu_s(ident: int) -> float:
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(ident))
    except (OSError, OverflowError):
        return 0.0  # the thread ended


def _sample(seconds: float) -> Counter[str]:
    # Every thread but this one (Serve runs a replica's event loop on a thread of its own), each
    # sample counted only if the thread spent CPU since the last one: a thread blocked in C (a
    # queue, a sleep, Ray's task loop) shows its last Python frame, which is not work.
    counts: Counter[str] = Counter()
    me = threading.get_ident()
    spent: dict[int, float] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        names = {t.ident: t.name for t in threading.enumerate()}
        for ident, top in sys._current_frames().items():
            cpu = _cpu_s(ident)
            busy, spent[ident] = cpu > spent.get(ident, cpu), cpu
            if ident == me or not busy:
                continue
            stack = []
            frame: FrameType | None = top
            while frame is not None:
                stack.append(_frame(frame.f_code))
                frame = frame.f_back
            if stack and not stack[0].split(" ", 1)[0].endswith(IDLE):
                counts[";".join([f"thread {names.get(ident, ident)}", *reversed(stack)])] += 1
        time.sleep(INTERVAL_S)
    return counts


def _watch(folder: Path) -> None:
    trigger = folder / f"{os.getpid()}.start"
    while True:
        time.sleep(0.5)
        try:
            seconds = float(trigger.read_text().strip() or 0)
        except (OSError, ValueError):
            continue
        trigger.unlink(missing_ok=True)
        times = _GcTimes()
        gc.callbacks.append(times)
        try:
            counts = _sample(seconds)
        finally:
            gc.callbacks.remove(times)
        (folder / f"{os.getpid()}.gc.json").write_text(json.dumps(
            {"gc": {str(g): {"collections": n, "seconds": round(t, 4)} for g, (n, t) in times.by_generation.items()},
             "objects": len(gc.get_objects()), "frozen": gc.get_freeze_count(), "threshold": gc.get_threshold()}))
        (folder / f"{os.getpid()}.txt").write_text("".join(f"{stack} {n}\n" for stack, n in counts.items()))


if folder := os.environ.get("PROMPTFLEET_BENCH_SAMPLES"):
    threading.Thread(target=_watch, args=(Path(folder),), daemon=True, name="bench-sampler").start()
