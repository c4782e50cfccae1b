"""promptfleet against its peers, in one run: req/s, latency and CPU per request, TTFT, idle cost, local model.

    python -m bench.peers                       everything: ~20 min on 2 cores (run under the Ray lock)
    python -m bench.peers --quick               a smoke run: 2 s cells, 16 and 256 concurrent
    python -m bench.peers --systems upstream,promptfleet --parts load --concurrency 256 --latencies 500
    python -m bench.peers --baseline ../promptfleet-previous   the previous release too, in the same run
    python -m bench.peers --systems promptfleet,baseline --baseline ../prev --kinds chat,stream,task --parts load
                                                 flat cost: CPU per request (per chunk) of each kind by level
    python -m bench.peers --systems upstream,promptfleet,promptfleet-keyed --parts load --kinds chat,stream,task \
        --concurrency 16,256 --repeats 3 --warmup 10   flat cost: each cell 3 times, ratios' median and range

Starts two fake upstreams (``tests.fakes.upstream``: 0 ms and 500 ms), then one system after the
other (``bench.peers.systems``: the upstream itself, nginx, SGLang Model Gateway, TensorZero, Portkey,
one FastAPI process, promptfleet with auth on and off, the previous release), each installed on first
use in its own environment under ``--cache`` (``bench.peers.install``). For every system, upstream
latency and concurrency it runs wrk (one thread, closed loop) for ``--duration`` seconds after a short
warm-up, and reads from /proc the CPU that every process of the system spent meanwhile, by group
(Gateway, worker, limiter, Serve proxy, Ray core …; ``bench.peers.procs``): CPU per request is that
over the answers wrk read. ``--kinds`` adds, on the systems that serve them, streamed chat
completions (``--stream-chunks`` content chunks each: CPU per chunk too) and synchronous task runs
(promptfleet's, through its TaskRunner); the flat-cost table sets each level's CPU per request
against the lowest level's. ``--repeats`` measures every system's load cells that many times (each
repeat after its own idle baseline, the levels in an order rotated per repeat); the tables then show
each cell's median, and the flat-cost table each level's median [min–max], the highest level against
the lowest as the median [min–max] of the repeats' ratios, a verdict against issue 22's 1.10 ("flat",
"grows" or "undecided") and the fake upstream's own ratio in the same cells. Then TTFT of one stream
at a time. Last, the default single-node cluster (embedded model on): its idle cost, and the embedded
model's tokens/s at 1 and 8 concurrent beside
raw llama.cpp on the same threads.

Prints the markdown report (``bench.peers.report``) and writes it with the JSON of every number
under ``--out``. A system that fails to install or start is reported as not measured; the others run.
Numbers from a shared machine move between runs: compare rows within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bench.kit import REPO
from bench.peers import clients, install, perf, procs, profile, repeats, report, wrk
from bench.peers.systems import (
    KINDS,
    STARTERS,
    Context,
    Running,
    Target,
    checkout_name,
    cluster,
    start_upstream,
    upstreams,
    wait_chat,
)
from bench.peers.wrk import SLOW_ROUNDS

ALL_SYSTEMS = ["upstream", *STARTERS]
PARTS = ["load", "ttft", "idle", "embedded"]
EMBEDDED_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
EMBEDDED_MAX_TOKENS = 64
# A later repeat's idle baseline waits for the previous cell's work to end: wrk stops with requests in
# flight, which the server still finishes (256 task runs or 500-chunk streams: seconds), and that tail
# counted as idle work (0.87 CPU s/s of a keyed cluster right after its task runs, against 0.18 before
# them) would be taken off every cell of the repeat. Waited for in 1 s windows, at most this long.
DRAIN_MAX_S = 20.0


def _csv(kind: type, allowed: list[str] | None = None) -> Any:
    def parse(text: str) -> list[Any]:
        try:
            values = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list of {kind.__name__}: {text!r}") from None
        bad = [v for v in values if allowed is not None and v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed or [])} (got {text!r})")
        return values

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", type=_csv(str, ALL_SYSTEMS), default=ALL_SYSTEMS,
                   help=f"comma-separated, in this order (default: all): {','.join(ALL_SYSTEMS)}")
    p.add_argument("--parts", type=_csv(str, PARTS), default=PARTS, help=f"default: {','.join(PARTS)}")
    p.add_argument("--concurrency", type=_csv(int), default=[16, 64, 256], help="levels (default: 16,64,256)")
    p.add_argument("--latencies", type=_csv(float), default=[0.0, 500.0], help="upstream ms (default: 0,500)")
    p.add_argument("--kinds", type=_csv(str, KINDS), default=["chat"],
                   help=f"requests to measure under load, each where a system serves it: {','.join(KINDS)} "
                        "(default: chat)")
    p.add_argument("--stream-chunks", type=int, default=500, help="content chunks per streamed answer of the "
                   "fake upstreams (default: %(default)s)")
    p.add_argument("--chunk-interval-ms", type=float, default=0.0, help="ms between a streamed answer's events "
                   "(a model's token cadence); 0 writes them all at once, so every read carries many "
                   "(default: %(default)s)")
    p.add_argument("--idle-baseline", type=float, default=4, help="seconds of each system's idle CPU, measured "
                   "before its load cells and subtracted from them for CPU per request above idle (default: 4; "
                   "0: not measured)")
    p.add_argument("--duration", type=float, default=8, help="seconds per cell (default: %(default)s)")
    p.add_argument("--slow-rounds", type=float, default=SLOW_ROUNDS, help="a cell runs at least this many "
                   "upstream latencies (500 ms: 20 s), so that the window's last unfinished round costs little "
                   "of its req/s (default: %(default)s; --quick: 0)")
    p.add_argument("--repeats", type=int, default=1, help="times each system's load cells are measured, each "
                   "repeat after its own idle baseline with the levels in a rotated order; the flat-cost table "
                   "then gives per cell the median and range, the highest level against the lowest as the "
                   "median and range of the repeats' ratios, and a verdict (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=2, help="unmeasured wrk seconds before each cell (default: 2); "
                   "Ray reports metrics every 10 s, so below that a cell's window still pays for the cell "
                   "before it (for --repeats, where cells are compared across positions: 10)")
    p.add_argument("--ttft-seconds", type=float, default=4, help="streams one at a time, per system (default: 4)")
    p.add_argument("--idle-seconds", type=float, default=20, help="idle window (default: 20)")
    p.add_argument("--settle", type=float, default=20, help="seconds after start-up before the idle window")
    p.add_argument("--embedded-seconds", type=float, default=20, help="per tokens/s measurement (default: 20)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 s cells at 16,256; short idle/embedded")
    p.add_argument("--baseline", type=Path, help="a checkout of the previous release, measured in the same run")
    p.add_argument("--cache", type=Path, default=install.DEFAULT_CACHE, help="peers' installs (default: %(default)s)")
    p.add_argument("--out", type=Path, help="directory for results.json, report.md and logs (default: a new one "
                   "under the cache's results/)")
    p.add_argument("--profile", action="store_true", help="py-spy record/dump promptfleet's Gateway and worker "
                   "replicas during each of their cells (into OUT/profiles; py-spy's CPU perturbs those cells); "
                   "without py-spy, an in-process sampler (bench/peers/sampling)")
    p.add_argument("--perf", action="store_true", help="Linux perf over every CPU during each cell: µs per request "
                   "by process group and by symbol below Python (kernel, interpreter, allocator, extensions); "
                   "compare levels with `python -m bench.peers.perf OUT`")
    p.add_argument("--sampler", action="store_true", help="with --profile: the in-process sampler even where py-spy "
                   "works (it also times the garbage collector per generation)")
    p.add_argument("--note", default="A shared, loaded machine (other jobs ran beside the bench): the absolute "
                   "numbers move between runs; compare rows within this run.", help="printed under the tables")
    return p


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _commit(path: Path) -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, check=False).stdout

    commit = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no").strip() else "")


def _profiled(running: Running, now: dict[int, procs.Proc]) -> dict[int, str]:
    """The Gateway, worker and TaskRunner replicas of a promptfleet system: pid → group."""
    tree = procs.descendants(now, running.roots, running.include_roots)
    wanted = ("Gateway", "worker", "runner")
    return {pid: group for pid in tree if (group := running.classify(now[pid].cmdline)) in wanted}


def _group_of(running: Running, now: dict[int, procs.Proc], upstream_pids: list[int]) -> Callable[[str, int], str]:
    """(command name, pid) → the system's group, ``upstream`` (the fake upstreams), ``wrk`` (gone by the time of
    ``now``: known by its name) or ``other`` (the rest of the machine)."""
    system = procs.descendants(now, running.roots, running.include_roots)
    upstream = procs.descendants(now, upstream_pids)

    def group_of(comm: str, pid: int) -> str:
        proc = now.get(pid)
        if pid in system and proc is not None:
            return running.classify(proc.cmdline) or "other"
        if pid in upstream:
            return "upstream"
        return "wrk" if comm == "wrk" else "other"
    return group_of


def row_name(running: Running, kind: str, chunks: int) -> str:
    """The system's name in the tables: chat rows as before, other kinds named after it."""
    return {"chat": running.name, "stream": f"{running.name} · stream ({chunks} chunks)",
            "task": f"{running.name} · task run"}[kind]


def idle_rate(running: Running, seconds: float) -> float:
    """CPU seconds per second that the system's processes spend with no request at all."""
    before, started = procs.snapshot(), time.monotonic()
    time.sleep(seconds)
    after = procs.snapshot()
    groups = procs.cpu_by_group(before, after, procs.descendants(after, running.roots, running.include_roots),
                                running.classify)
    return sum(groups.values()) / (time.monotonic() - started)


def drain(running: Running, first_idle: float) -> float:
    """Wait until the system's CPU rate is back near its idle rate of the first repeat (within a quarter
    and 0.05 CPU s/s) or DRAIN_MAX_S have passed; the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < DRAIN_MAX_S and idle_rate(running, 1.0) > first_idle * 1.25 + 0.05:
        pass
    return time.monotonic() - started


def measure_cell(running: Running, latency: float, concurrency: int, args: argparse.Namespace, tools: dict[str, Any],
                 upstream_pids: list[int], kind: str = "chat", idle: float | None = None) -> dict[str, Any]:
    """One wrk run on one system: req/s, latency, and the CPU of the system's process groups per request."""
    target = (running.targets_of(kind) or {})[latency]
    script = tools["scripts"] / f"{abs(hash((target.url, target.model))) % 10**8}.lua"
    script.write_text(wrk.lua_script(target.body(), target.headers))
    binary, env = tools["wrk"]
    if args.warmup > 0:
        wrk.run(wrk.command(binary, target.url, script, concurrency, args.warmup), env)
    before, started = procs.snapshot(), time.monotonic()
    label = f"{re.sub(r'[^a-z0-9]+', '-', running.name.lower())}-{kind}-{latency:g}ms-{concurrency}"
    seconds = wrk.cell_seconds(args.duration, latency, args.slow_rounds)
    perf_data = tools["profiles"] / f"{label}.perf.data" if args.perf else None
    with profile.recording(_profiled(running, before) if args.profile else {}, args.duration, tools["profiles"],
                           label, tools.get("samples")), perf.recording(seconds, perf_data):
        result = wrk.run(wrk.command(binary, target.url, script, concurrency, seconds), env)
    after, window = procs.snapshot(), time.monotonic() - started
    groups = procs.cpu_by_group(before, after, procs.descendants(after, running.roots, running.include_roots),
                                running.classify)
    upstream = procs.cpu_by_group(before, after, procs.descendants(after, upstream_pids), procs.everything("up"))
    answers = max(1, result.requests)  # a cell with no answer at all reports CPU per request as None

    def per_request(seconds: float) -> float | None:
        return round(seconds * 1000 / answers, 4) if result.requests else None

    cpu = per_request(sum(groups.values()))
    # What the requests cost beyond the system's own idle work (health checks, metrics, Ray), which a
    # cell of few requests (slow upstream, low concurrency) would otherwise spread over them.
    above = per_request(max(0.0, sum(groups.values()) - idle * window)) if idle is not None else None
    perf_rows = {"perf": perf.attribute(perf_data, _group_of(running, after, upstream_pids), answers)} if (
        perf_data is not None and perf_data.exists()) else {}
    per_chunk = {"cpu_us_per_chunk": round((above or cpu) * 1000 / args.stream_chunks, 2)} if (
        kind == "stream" and cpu) else {}
    return {"system": row_name(running, kind, args.stream_chunks), "kind": kind, "base_system": running.name,
            "latency_ms": latency, "concurrency": concurrency, "rps": round(result.ok_rps, 1), **per_chunk,
            "p50_ms": result.latency_ms.get("50"),
            "p99_ms": result.latency_ms.get("99"), "errors": result.errors,
            "cpu_ms_per_request": cpu, "cpu_ms_above_idle": above, "idle_cpu_s_per_s": idle,
            "cpu_ms_by_group": {g: per_request(s) for g, s in sorted(groups.items()) if result.requests},
            "upstream_cpu_ms_per_request": per_request(sum(upstream.values())),
            "wrk": result.to_json(), **perf_rows}


def measure_system(running: Running, args: argparse.Namespace, tools: dict[str, Any], upstream_pids: list[int],
                   results: dict[str, Any]) -> None:
    # Each repeat measures its own idle rate and then every cell once, the levels in an order rotated per
    # repeat: a repeat's cells of one kind and latency lie close in time, and drift of the shared machine
    # over the run hits every level alike (bench.peers.repeats).
    first_idle: float | None = None
    for repeat in range(args.repeats if "load" in args.parts else 0):
        waited = drain(running, first_idle) if repeat and first_idle is not None else 0.0
        idle = idle_rate(running, args.idle_baseline) if args.idle_baseline > 0 else None
        first_idle = idle if not repeat else first_idle
        label = f"repeat {repeat + 1}/{args.repeats} " if args.repeats > 1 else ""
        if idle is not None:
            print(f"  {running.name[:56]:<56} {label}idle: {idle:.3f} CPU s/s"
                  + (f" (after {waited:.0f} s for the last cell's requests to end)" if repeat else ""),
                  file=sys.stderr, flush=True)
        for kind in (k for k in args.kinds if running.targets_of(k)):
            for latency in args.latencies:
                for concurrency in repeats.order(args.concurrency, repeat):
                    row = measure_cell(running, latency, concurrency, args, tools, upstream_pids, kind, idle)
                    results["load"].append(row | {"repeat": repeat})
                    print(f"  {label}{row['system'][:56]:<56} {latency:>5g} ms {concurrency:>4} conc: "
                          f"{row['rps']:>9,.1f} req/s "
                          f"p50 {row['p50_ms']} p99 {row['p99_ms']} ms, CPU {row['cpu_ms_per_request']} ms/req "
                          f"{row['cpu_ms_by_group']} errors {row['errors']}", file=sys.stderr, flush=True)
    if "ttft" in args.parts and running.streams:
        measured = clients.ttft(running.targets[min(args.latencies)], args.ttft_seconds)
        results["ttft"].append({"system": running.name, **measured.summary()})
        print(f"  {running.name[:44]:<44} TTFT {measured.summary()}", file=sys.stderr, flush=True)


def embedded_and_idle(args: argparse.Namespace, logs: Path, results: dict[str, Any]) -> None:
    """The default single-node cluster (embedded model on): idle cost, then tokens/s; raw llama.cpp first,
    and the previous release's cluster last when ``--baseline`` names one."""
    config = yaml.safe_load((REPO / "configs/serve.yaml").read_text())
    local = next(m for m in config["applications"][0]["args"]["models"] if m["provider"] == "llamacpp")
    threads = int(local.get("n_threads", 1))
    body = {"model": local["name"], "messages": [{"role": "user", "content": EMBEDDED_PROMPT}],
            "max_tokens": EMBEDDED_MAX_TOKENS}
    embedded: dict[str, Any] = {"model": local["name"], "max_tokens": EMBEDDED_MAX_TOKENS, "n_threads": threads}
    if "embedded" in args.parts:
        print("  raw llama.cpp …", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, str(Path(__file__).parent / "llama_raw.py"), str(args.embedded_seconds),
                               str(threads), str(EMBEDDED_MAX_TOKENS), EMBEDDED_PROMPT],
                              capture_output=True, text=True, check=True, timeout=600)
        embedded["raw"] = json.loads(done.stdout.strip().splitlines()[-1])
    spec = {"state": str(logs / "embedded-state"), "models": None, "local_models": True}
    with cluster(REPO, spec, logs / "embedded.log") as (pid, ready):
        api = next(iter(ready["apps"].values()))
        wait_chat(Target(f"{api}/chat/completions", local["name"]), 300)
        if "idle" in args.parts:
            time.sleep(args.settle)
            before = procs.snapshot()
            time.sleep(args.idle_seconds)
            after = procs.snapshot()
            pids = procs.descendants(after, [pid], include_roots=False)
            per_pid = {p: procs.cpu_by_group(before, after, {p}, procs.everything("x")).get("x", 0.0) for p in pids}
            biggest = sorted(pids, key=lambda p: -after[p].rss_kib)[:10]
            results["idle"] = {
                "seconds": args.idle_seconds, "processes": len(pids),
                "cpu_pct": round(100 * sum(per_pid.values()) / args.idle_seconds, 1),
                "rss_mib": round(sum(after[p].rss_kib for p in pids) / 1024, 1),
                "pss_mib": round(sum(procs.pss_kib(p) for p in pids) / 1024, 1),
                "biggest": [{"name": procs.short_name(after[p].cmdline), "group": procs.ray_group(after[p].cmdline),
                             "rss_mib": round(after[p].rss_kib / 1024, 1),
                             "cpu_pct": round(100 * per_pid[p] / args.idle_seconds, 1)} for p in biggest]}
            print(f"  idle: {results['idle']['cpu_pct']} % of a core, {results['idle']['rss_mib']} MiB RSS, "
                  f"{len(pids)} processes", file=sys.stderr, flush=True)
        if "embedded" in args.parts:
            embedded |= tokens_at_1_and_8(f"{api}/chat/completions", body, args.embedded_seconds, "")
    if "embedded" in args.parts and args.baseline is not None:
        spec = {"state": str(logs / "embedded-baseline-state"), "models": None, "local_models": True}
        with cluster(args.baseline, spec, logs / "embedded-baseline.log") as (_, ready):
            api = next(iter(ready["apps"].values()))
            wait_chat(Target(f"{api}/chat/completions", local["name"]), 300)
            embedded["baseline"] = {"name": checkout_name(args.baseline), **tokens_at_1_and_8(
                f"{api}/chat/completions", body, args.embedded_seconds, "previous release ")}
    if "embedded" in args.parts:
        raw = embedded["raw"]["tokens_per_s"]
        for rates in (embedded, embedded.get("baseline") or {}):
            if rates:
                rates["one_vs_raw"] = round(rates["one"]["tokens_per_s"] / raw, 2) if raw else None
        results["embedded"] = embedded


def tokens_at_1_and_8(url: str, body: dict[str, Any], seconds: float, label: str) -> dict[str, Any]:
    """Tokens/s of one closed-loop client, then of eight, and their ratio."""
    rates: dict[str, Any] = {}
    for key, concurrency in (("one", 1), ("eight", 8)):
        rates[key] = clients.tokens_per_s(url, body, concurrency, seconds).summary()
        print(f"  {label}embedded {concurrency} concurrent: {rates[key]}", file=sys.stderr, flush=True)
    one, eight = rates["one"]["tokens_per_s"], rates["eight"]["tokens_per_s"]
    rates["ratio_8_vs_1"] = round(eight / one, 2) if one else None
    return rates


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.repeats < 1:
        parser().error("--repeats: at least 1")
    if args.quick:
        args.duration, args.warmup, args.ttft_seconds = min(args.duration, 2), min(args.warmup, 1), 1
        args.slow_rounds = 0
        args.idle_seconds, args.settle, args.embedded_seconds = 5, 5, 5
        if args.concurrency == [16, 64, 256]:
            args.concurrency = [16, 256]
    if "baseline" in args.systems and args.baseline is None:
        args.systems = [s for s in args.systems if s != "baseline"]
    out: Path = args.out or args.cache / "results" / datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "meta": {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "commit": _commit(REPO),
                 "levels": args.concurrency, "latencies": args.latencies, "duration_s": args.duration,
                 "slow_rounds": args.slow_rounds,
                 "repeats": args.repeats,
                 "kinds": args.kinds, "stream_chunks": args.stream_chunks,
                 "chunk_interval_ms": args.chunk_interval_ms,
                 "quick": args.quick, "baseline": str(args.baseline) if args.baseline else None,
                 "machine": {"cores": len(os.sched_getaffinity(0)), "loadavg_start": _loadavg(),
                             "note": args.note}},
        "load": [], "ttft": [], "systems": [], "failures": {}}
    needs_wrk = "load" in args.parts and args.systems
    tools: dict[str, Any] = {"scripts": Path(tempfile.mkdtemp(prefix="wrk-", dir=logs)), "profiles": out / "profiles"}
    if needs_wrk:
        tools["wrk"] = install.wrk(args.cache)
    if args.profile:
        tools["py_spy"] = None if args.sampler else profile.py_spy()
    with contextlib.ExitStack() as stack:
        bases, upstream_pids = (stack.enter_context(upstreams(args.latencies, logs, args.stream_chunks,
                                                                 args.chunk_interval_ms))
                                if args.systems else ({}, []))
        samples = out / "samples" if args.profile and not tools.get("py_spy") else None
        ctx = Context(args.cache, logs, bases, args.baseline, samples)
        tools["samples"] = samples
        for name in args.systems:
            print(f"{name} …", file=sys.stderr, flush=True)
            try:
                starter = start_upstream(ctx, upstream_pids) if name == "upstream" else STARTERS[name](ctx)
                with starter as running_systems:
                    for running in running_systems:
                        results["systems"].append({"name": running.name, "note": running.note})
                        measure_system(running, args, tools, upstream_pids, results)
            except Exception as exc:  # one peer that will not run must not cost the others their numbers
                results["failures"][name] = f"{type(exc).__name__}: {str(exc)[:300]}"
                print(f"  {name} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
    if {"idle", "embedded"} & set(args.parts):
        print("single-node cluster with the embedded model …", file=sys.stderr, flush=True)
        try:
            embedded_and_idle(args, logs, results)
        except Exception as exc:
            results["failures"]["idle/embedded"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(traceback.format_exc(), file=sys.stderr, flush=True)
    results["meta"]["machine"]["loadavg_end"] = _loadavg()
    if args.repeats > 1 and len(args.concurrency) > 1:
        results["flat_repeats"] = repeats.flat_cost(results["load"], args.concurrency, args.repeats)
    text = report.markdown(results)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "report.md").write_text(text)
    print(text)
    print(f"results: {out / 'results.json'}, {out / 'report.md'}", file=sys.stderr)
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
