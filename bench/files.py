"""Benchmark: large files through the Files and Batches API, with MB/s and peak RSS per process.

    python -m bench.files [--upload-mb 200] [--lines 100000]

Starts the fake OpenAI upstream (no latency) and a private Ray cluster running ``configs/serve.yaml``
with one upstream model ``fake``, the default upload limit (``tasks.quotas.max_file_bytes``,
200 MiB) and a batch line limit (``max_batch_lines``) of ``--lines``, then, each step timed, while
a sampler reads the resident set size (``/proc/<pid>/status`` VmRSS, every 50 ms) of the Gateway
replica, the BatchService replica and the batch job's driver:

1. uploads a ``--upload-mb`` MB JSONL file (httpx, streamed from disk: the client holds no copy),
2. downloads it again and checks its SHA-256,
3. uploads a ``--lines`` line batch, runs it through the Batches API (a Ray job, ``jobs.batch``),
4. downloads the batch's output and checks it has exactly one line per input line (every
   ``custom_id`` once, none missing, none extra).

Prints, per step, MB/s and each process's RSS before the step and its peak during it. This is a
measurement, not a test: nothing is asserted but that the bytes came back whole (exit status 1
when the batch's output is not one line per input line).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx

from bench.kit import fake_model, fake_upstream, private_cluster

MB = 1_000_000
ROLES = {"Gateway": "ServeReplica:{app}:Gateway", "BatchService": "ServeReplica:{app}:BatchService",
         "batch job": "jobs.batch"}


def find_processes(app: str) -> dict[str, set[int]]:
    """The pids of each role's processes, from /proc/<pid>/cmdline (the batch job: its shell and
    its Python driver; the larger RSS is reported)."""
    found: dict[str, set[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        for role, needle in ROLES.items():
            if needle.format(app=app) in cmdline and "bench.files" not in cmdline:
                found.setdefault(role, set()).add(int(entry))
    return found


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / MB
    except OSError:
        return None
    return None


def largest_rss(pids: set[int]) -> float | None:
    values = [rss for pid in pids if (rss := rss_mb(pid)) is not None]
    return max(values) if values else None


class Sampler:
    """Peak RSS of each role during a step (the job's driver is looked for as it starts)."""

    def __init__(self, app: str) -> None:
        self.app = app
        self.pids = find_processes(app)
        self.peaks: dict[str, float] = {}
        self.before: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        self.peaks = {}
        self.pids = find_processes(self.app)
        self.before = {role: rss for role, pids in self.pids.items() if (rss := largest_rss(pids)) is not None}
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        try:
            yield
        finally:
            self._stop.set()
            self._thread.join()

    def _run(self) -> None:
        last_scan = 0.0
        while not self._stop.is_set():
            if time.monotonic() - last_scan > 0.5:  # a batch job's driver comes and goes
                self.pids = find_processes(self.app)
                last_scan = time.monotonic()
            for role, pids in self.pids.items():
                if (rss := largest_rss(pids)) is not None:
                    self.peaks[role] = max(self.peaks.get(role, 0.0), rss)
            self._stop.wait(0.05)

    def report(self) -> str:
        parts = []
        for role in ROLES:
            if role in self.peaks:
                before = self.before.get(role)
                start = f"{before:.0f} → " if before is not None else ""
                parts.append(f"{role} {start}{self.peaks[role]:.0f} MB")
        return "peak RSS: " + ", ".join(parts)


def write_input(path: Path, size: int | None = None, lines: int | None = None) -> int:
    """Batch lines into ``path``: ``lines`` of them, or as many as make ``size`` bytes; returns lines."""
    count, written = 0, 0
    with path.open("w") as f:
        while (lines is not None and count < lines) or (size is not None and written < size):
            line = json.dumps({"custom_id": f"b-{count}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": "fake", "max_tokens": 16,
                                        "messages": [{"role": "user", "content": f"line {count} " + "x" * 150}]}})
            written += f.write(line + "\n")
            count += 1
    return count


def upload(http: httpx.Client, path: Path) -> dict[str, object]:
    with path.open("rb") as f:
        response = http.post("/files", data={"purpose": "batch"}, files={"file": (path.name, f)})
    response.raise_for_status()
    result: dict[str, object] = response.json()
    return result


def download(http: httpx.Client, file_id: str, into: Path | None = None) -> tuple[int, str]:
    """Bytes and SHA-256 of the file, streamed (the client holds no copy); also written to ``into``."""
    digest, size = hashlib.sha256(), 0
    with http.stream("GET", f"/files/{file_id}/content") as response, \
            (into.open("wb") if into is not None else contextlib.nullcontext()) as copy:
        response.raise_for_status()
        declared = int(response.headers["content-length"])
        for chunk in response.iter_bytes(1 << 20):
            digest.update(chunk)
            size += len(chunk)
            if copy is not None:
                copy.write(chunk)
    assert size == declared, (size, declared)
    return size, digest.hexdigest()


def output_problems(path: Path, lines: int) -> list[str]:
    """What is wrong with a batch output of ``lines`` input lines ``b-0`` … (empty: exactly one line each)."""
    with path.open("rb") as f:
        ids = Counter(json.loads(line)["custom_id"] for line in f if line.strip())
    expected = {f"b-{i}" for i in range(lines)}
    problems = []
    if missing := expected - ids.keys():
        problems.append(f"{len(missing)} input lines have no output line (e.g. {sorted(missing)[:3]})")
    if twice := [i for i, n in ids.items() if n > 1]:
        problems.append(f"{len(twice)} custom_ids have more than one output line (e.g. {twice[:3]})")
    if extra := ids.keys() - expected:
        problems.append(f"{len(extra)} output lines name no input line (e.g. {sorted(extra)[:3]})")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.files", description=__doc__.split("\n")[0])
    parser.add_argument("--upload-mb", type=float, default=200, help="size of the uploaded file (default: %(default)s)")
    parser.add_argument("--lines", type=int, default=100_000, help="lines of the batch (default: %(default)s)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_files_") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        big = work / "big.jsonl"
        write_input(big, size=int(args.upload_mb * MB))
        big_size = big.stat().st_size
        big_sha = hashlib.sha256(big.read_bytes()).hexdigest()
        lines_file = work / "lines.jsonl"
        write_input(lines_file, lines=args.lines)

        upstream = stack.enter_context(fake_upstream(0))
        # --lines may pass the default line limit of a batch (tasks.quotas.max_batch_lines, 50,000).
        cluster = stack.enter_context(private_cluster([fake_model("fake", upstream, timeout_s=600)], work / "state",
                                                      quotas={"max_batch_lines": args.lines}))
        http = stack.enter_context(httpx.Client(base_url=cluster.api, timeout=600))
        sampler = Sampler(cluster.app_name)
        print(f"\nbench_files: processes {sampler.pids}")
        results = []

        with sampler.step():
            started = time.monotonic()
            stored = upload(http, big)
            took = time.monotonic() - started
        assert stored["bytes"] == big_size, stored
        results.append(("upload", big_size, took, sampler.report()))

        with sampler.step():
            started = time.monotonic()
            size, sha = download(http, str(stored["id"]))
            took = time.monotonic() - started
        assert (size, sha) == (big_size, big_sha), "the download differs from the upload"
        results.append(("download", size, took, sampler.report()))
        http.delete(f"/files/{stored['id']}").raise_for_status()

        batch_input = upload(http, lines_file)
        with sampler.step():
            started = time.monotonic()
            batch = http.post("/batches", json={"input_file_id": batch_input["id"], "completion_window": "24h",
                                                "endpoint": "/v1/chat/completions"}).json()
            while batch["status"] not in ("completed", "failed", "cancelled"):
                time.sleep(2)
                batch = http.get(f"/batches/{batch['id']}").json()
            took = time.monotonic() - started
        counts = batch["request_counts"]
        results.append((f"batch of {args.lines} lines ({batch['status']}, {counts['completed']} ok, "
                        f"{counts['failed']} failed; {args.lines / took:.0f} lines/s)",
                        lines_file.stat().st_size, took, sampler.report()))

        output = work / "output.jsonl"
        with sampler.step():
            started = time.monotonic()
            size, _ = download(http, str(batch["output_file_id"]), into=output)
            took = time.monotonic() - started
        results.append(("batch output download", size, took, sampler.report()))
        problems = output_problems(output, args.lines)

    print(f"\nbench_files: {args.upload_mb:g} MB upload, {args.lines} line batch (fake upstream, no latency)")
    for name, size, took, rss in results:
        print(f"  {name}: {size / MB:.1f} MB in {took:.1f} s = {size / MB / took:.1f} MB/s; {rss}")
    print("  batch output: " + ("; ".join(problems) if problems else f"exactly one line per input line ({args.lines})"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
