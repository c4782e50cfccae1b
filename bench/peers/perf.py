"""Linux ``perf`` over the whole machine during a cell: where every process's CPU went, per request.

``python -m bench.peers --perf …`` samples every CPU (``perf record -a``, the ``cpu-clock`` software
event, no call graphs) for the measured window of each cell. :func:`attribute` then folds the samples
by process group (the system's own classifier, the fake upstream, wrk) and by the symbol the CPU was
in: the kernel's network and scheduler functions, the interpreter's evaluation loop, its allocator
and garbage collector, pydantic's and Ray's compiled code. Python frames are not visible (3.11 has
no perf trampoline), but what the interpreter calls into is, which is what the in-process sampler
and py-spy could not show: the cost a process pays below Python. Samples are per process, so a
cell at 16 concurrent and one at 256 can be set side by side symbol by symbol
(``python -m bench.peers.perf OUT``).

perf costs little (a sample every ~1 ms per busy CPU) but it is not free: compare cells measured
with ``--perf`` only with each other.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

FREQUENCY_HZ = 999
IDLE_PID = 0  # the kernel's idle task: a CPU with nothing to run


def perf() -> str | None:
    return shutil.which("perf")


@contextlib.contextmanager
def recording(seconds: float, data: Path | None) -> Iterator[None]:
    """``perf record -a`` into ``data`` for ``seconds`` (no-op when ``data`` is None or perf is missing)."""
    binary = perf()
    if data is None or binary is None:
        yield
        return
    data.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([binary, "record", "-a", "-F", str(FREQUENCY_HZ), "-o", str(data), "--",
                             "sleep", f"{seconds:g}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        try:
            proc.wait(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            proc.kill()


def dso_kind(dso: str) -> str:
    """A coarse home for a sample: the kernel, the interpreter, libc, or the extension it ran in."""
    name = dso.rsplit("/", 1)[-1]
    if name.startswith("[kernel") or name.startswith("[vdso"):
        return "kernel"
    if name.startswith("libpython") or name.startswith("python"):
        return "python"
    if name.startswith("libc.so") or name.startswith("libc-") or name.startswith("ld-linux"):
        return "libc"
    return name.split(".cpython")[0].split(".so")[0] or "unknown"


# `perf script -F comm,pid,ip,sym,dso`: "  comm  PID  ADDRESS symbol (dso)"; a thread's name may hold spaces.
SAMPLE_LINE = re.compile(r"^\s*(?P<comm>.*?)\s+(?P<pid>\d+)\s+[0-9a-f]+\s+(?P<symbol>.*?)\s*\((?P<dso>[^()]*)\)$")


def samples(data: Path) -> Iterator[tuple[str, int, str, str]]:
    """(command name, pid, symbol, dso) of every sample in a ``perf record`` file."""
    binary = perf()
    if binary is None:
        return
    out = subprocess.run([binary, "script", "-i", str(data), "-F", "comm,pid,ip,sym,dso"], capture_output=True,
                         text=True, check=False).stdout
    for line in out.splitlines():
        if match := SAMPLE_LINE.match(line):
            yield match["comm"], int(match["pid"]), match["symbol"] or "[unknown]", match["dso"]


def attribute(data: Path, group_of: Callable[[str, int], str | None], requests: int, top: int = 120) -> dict[str, Any]:
    """µs of CPU per request by group, by group and kind of code, and by group and symbol (the ``top`` most)."""
    per_sample_us = 1e6 / FREQUENCY_HZ / max(1, requests)
    by_group: Counter[str] = Counter()
    by_kind: dict[str, Counter[str]] = defaultdict(Counter)
    by_symbol: Counter[tuple[str, str]] = Counter()
    for comm, pid, symbol, dso in samples(data):
        if pid == IDLE_PID or (group := group_of(comm, pid)) is None:
            continue
        kind = dso_kind(dso)
        by_group[group] += 1
        by_kind[group][kind] += 1
        by_symbol[(group, f"{symbol} [{kind}]")] += 1

    def us(count: int) -> float:
        return round(count * per_sample_us, 2)

    return {"us_per_request": {g: us(n) for g, n in by_group.most_common()},
            "by_kind": {g: {k: us(n) for k, n in kinds.most_common()} for g, kinds in by_kind.items()},
            "top": [[g, s, us(n)] for (g, s), n in by_symbol.most_common(top)]}


def growth(low: dict[str, Any], high: dict[str, Any], limit: int = 25) -> list[tuple[str, str, float, float]]:
    """The (group, symbol) whose µs per request grew most from ``low`` to ``high``: (group, symbol, low, high)."""
    a = {(g, s): v for g, s, v in low["top"]}
    b = {(g, s): v for g, s, v in high["top"]}
    rows = [(g, s, a.get((g, s), 0.0), b.get((g, s), 0.0)) for g, s in set(a) | set(b)]
    return sorted(rows, key=lambda r: r[3] - r[2], reverse=True)[:limit]


def main(argv: list[str] | None = None) -> int:
    """Print, per system, kind and latency, each group's and kind of code's µs per request at the lowest
    and highest concurrency, and the symbols that grew most, from a run's results.json."""
    parser = argparse.ArgumentParser(prog="python -m bench.peers.perf", description=main.__doc__)
    parser.add_argument("out", type=Path, help="the run's --out directory")
    args = parser.parse_args(argv)
    rows = [r for r in json.loads((args.out / "results.json").read_text())["load"] if r.get("perf")]
    cells: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        cells[(row["system"], row["latency_ms"])].append(row)
    for (system, latency), group in cells.items():
        low, high = min(group, key=lambda r: r["concurrency"]), max(group, key=lambda r: r["concurrency"])
        if low is high:
            continue
        print(f"\n## {system}, {latency:g} ms upstream: µs of CPU per request, "
              f"{low['concurrency']} → {high['concurrency']} concurrent")
        lp, hp = low["perf"], high["perf"]
        for name in dict.fromkeys([*lp["us_per_request"], *hp["us_per_request"]]):
            lk, hk = lp["by_kind"].get(name, {}), hp["by_kind"].get(name, {})
            detail = ", ".join(f"{k} {lk.get(k, 0):g}→{hk.get(k, 0):g}" for k in list(dict.fromkeys([*lk, *hk]))[:6])
            print(f"  {name:<12} {lp['us_per_request'].get(name, 0):>9g} → {hp['us_per_request'].get(name, 0):>9g}"
                  f"   ({detail})")
        print("  grew most:")
        for g, s, a, b in growth(lp, hp):
            print(f"    {g:<10} {a:>8g} → {b:>8g}  {s[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
