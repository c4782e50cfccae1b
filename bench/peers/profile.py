"""py-spy on promptfleet's replicas during a cell, and what the samples say per request.

``python -m bench.peers --profile …`` records every Gateway and worker replica with
``py-spy record --format raw`` (collapsed stacks: ``frame;frame;… count``, idle threads left out, so
samples approximate CPU time) for the whole of each promptfleet cell, and dumps their stacks once
mid-cell. :func:`top_frames` then turns a recording into samples per request by frame ("self":
the innermost frame; "total": anywhere on the stack), so a cell at 16 concurrent and one at 256 can
be compared: what costs more per request with more requests in flight grows with them.
py-spy itself costs CPU: cells measured with ``--profile`` are not comparable with others.

Where py-spy cannot attach (it cannot read the Python of this machine's interpreters), the bench
starts promptfleet's clusters with ``sampler_env`` instead: ``sampling/sitecustomize.py`` runs in
each of their processes and samples its own busy threads when asked (a trigger file), writing the
same raw format.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path


def py_spy() -> str | None:
    """py-spy from this interpreter's environment (``pip install py-spy``) or the PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


SAMPLER = Path(__file__).resolve().parent / "sampling"


def sampler_env(folder: Path, pythonpath: str) -> dict[str, str]:
    """Environment for a cluster whose processes sample themselves on request (into ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    return {"PROMPTFLEET_BENCH_SAMPLES": str(folder), "PYTHONPATH": f"{pythonpath}{os.pathsep}{SAMPLER}"}


@contextlib.contextmanager
def sampled(pids: dict[int, str], seconds: float, folder: Path, out: Path, label: str) -> Iterator[None]:
    """The in-process sampler on each pid for ``seconds`` (→ ``out/LABEL-GROUP-PID.txt``)."""
    out.mkdir(parents=True, exist_ok=True)
    for pid in pids:
        (folder / f"{pid}.txt").unlink(missing_ok=True)
        (folder / f"{pid}.start").write_text(f"{seconds:g}")
    try:
        yield
    finally:
        deadline = time.monotonic() + 5
        for pid, group in pids.items():
            result = folder / f"{pid}.txt"
            while not result.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            if result.exists():
                result.replace(out / f"{label}-{group}-{pid}.txt")
            if (gc_times := folder / f"{pid}.gc.json").exists():
                gc_times.replace(out / f"{label}-{group}-{pid}.gc.json")


@contextlib.contextmanager
def recording(pids: dict[int, str], seconds: float, out: Path, label: str,
              samples: Path | None = None) -> Iterator[None]:
    """``py-spy record`` on each pid (→ ``out/LABEL-GROUP-PID.txt``) for ``seconds``; one dump mid-way.
    With ``samples`` (the clusters run with ``sampler_env(samples)``): the in-process sampler instead."""
    if samples is not None and pids:
        with sampled(pids, seconds, samples, out, label):
            yield
        return
    binary = py_spy()
    if binary is None or not pids:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    recorders = [subprocess.Popen([binary, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
                                   "--rate", "200", "--format", "raw", "--nonblocking",
                                   "-o", str(out / f"{label}-{group}-{pid}.txt")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for pid, group in pids.items()]
    try:
        time.sleep(seconds / 2)
        for pid, group in pids.items():
            dump = subprocess.run([binary, "dump", "--pid", str(pid), "--nonblocking"], capture_output=True,
                                  text=True, check=False, timeout=60)
            (out / f"{label}-{group}-{pid}.dump.txt").write_text(dump.stdout + dump.stderr)
        yield
    finally:
        for proc in recorders:
            try:
                proc.wait(timeout=seconds + 60)
            except subprocess.TimeoutExpired:
                proc.kill()


def parse_collapsed(text: str) -> list[tuple[list[str], int]]:
    """py-spy's raw output: one ``frame;frame;…;frame count`` per line → (frames outermost first, count)."""
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def top_frames(text: str, requests: int, limit: int = 15, total: bool = False) -> list[tuple[str, float]]:
    """The frames with the most samples per request: innermost frame only, or (``total``) anywhere on the stack."""
    counts: Counter[str] = Counter()
    for frames, count in parse_collapsed(text):
        for frame in (dict.fromkeys(frames) if total else frames[-1:]):
            counts[frame] += count
    return [(frame, n / max(1, requests)) for frame, n in counts.most_common(limit)]
