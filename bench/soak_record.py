"""The chaos soak's record and its figures (``python -m bench.chaos``): what every client operation
and fault came to, counted at the end — runs once / lost / duplicated, chats and streams by
outcome, batch lines, the limited upstream's calls per window, latency per minute, recovery after
each fault — and the verdict the soak exits with."""

from __future__ import annotations

import bisect
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from deployments.limits.pacing import window_capacity
from tests.cluster.harness import HEAD_HOST, WORKER_HOSTS, LoopbackCluster

HOSTS = [HEAD_HOST, *WORKER_HOSTS]


@dataclass
class Op:
    """One client operation: when it started (monotonic), its kind, its outcome, how long it took."""

    t: float
    kind: str  # chat | stream | submit
    outcome: str  # "200", "503", …, "refused", "broken" (see failure()), "cut" (a stream that broke after 200)
    latency: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome in ("200", "202")  # a submission's 200: its key's run, replayed


@dataclass
class Fault:
    t: float  # monotonic
    kind: str  # node | component | taskstore
    target: str
    back_s: float | None = None  # node: its Gateway answered again, seconds after the kill
    note: str = ""


@dataclass
class Soak:
    cluster: LoopbackCluster
    started: float
    stop_at: float
    ops: list[Op] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    runs: dict[str, list[str]] = field(default_factory=dict)  # client key -> run ids the server gave it
    keyed: set[str] = field(default_factory=set)
    unanswered_submits: int = 0  # unkeyed submissions that got no answer: a client cannot know

    def base(self, i: int) -> str:
        return f"{self.cluster.api(HOSTS[i % len(HOSTS)])}/v1"


# -- figures ----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def max_in_window(times: list[float], window: float) -> int:
    times = sorted(times)
    return max((bisect.bisect_left(times, t + window) - i for i, t in enumerate(times)), default=0)


def recovery(soak: Soak, fault: Fault, horizon_s: float = 45) -> dict[str, Any]:
    """Failures of client operations that started after ``fault`` and before the next fault (at most
    ``horizon_s``), and when they stopped."""
    later = [f.t for f in soak.faults if f.t > fault.t]
    end = min([fault.t + horizon_s, *later])
    window = [op for op in soak.ops if fault.t <= op.t < end]
    failed = [op for op in window if not op.ok]
    last = max((op.t + op.latency for op in failed), default=None)
    first_ok_after = min((op.t + op.latency for op in window if op.ok and last is not None and op.t >= last),
                         default=None)
    return {
        "failures": dict(Counter(f"{op.kind}:{op.outcome}" for op in failed)),
        "errors_until_s": round(last - fault.t, 1) if last is not None else 0.0,
        "first_success_after_s": round(first_ok_after - fault.t, 1) if first_ok_after is not None else None,
    }


def figures(soak: Soak, views: dict[str, dict[str, Any]], batch: dict[str, Any], calls: list[float], rpm: int,
            wall_started: float) -> dict[str, Any]:
    runs: dict[str, Any] = {"accepted": 0, "succeeded_once": 0, "lost": [], "duplicated": [],
                            "unanswered_unkeyed_submits": soak.unanswered_submits}
    for key, ids in soak.runs.items():
        runs["accepted"] += 1
        if len(set(ids)) > 1:
            runs["duplicated"].append({"key": key, "runs": sorted(set(ids))})
        statuses = [views.get(run_id, {}).get("status", "never seen") for run_id in set(ids)]
        if "succeeded" in statuses:
            runs["succeeded_once"] += 1 if statuses.count("succeeded") == 1 else 0
        else:
            view = views.get(ids[0], {})
            runs["lost"].append({"run": ids[0], "status": statuses[0], "error": (view.get("error") or {}).get("code")})
    runs["attempts"] = dict(Counter(int(v.get("attempt", 0) or 0) for v in views.values()))
    by_kind: dict[str, Counter[str]] = defaultdict(Counter)
    for op in soak.ops:
        by_kind[op.kind][op.outcome] += 1
    per_minute = []
    for minute in range(int((soak.stop_at - soak.started) // 60) + 1):
        lat = [op.latency for op in soak.ops if op.kind == "chat" and op.ok
               and minute * 60 <= op.t - soak.started < (minute + 1) * 60]
        if lat:
            per_minute.append({"minute": minute + 1, "chats_ok": len(lat), "p50_ms": round(percentile(lat, 0.5) * 1000),
                               "p99_ms": round(percentile(lat, 0.99) * 1000)})
    capacity = window_capacity(rpm)
    rate = {"limit_rpm": rpm, "calls": len(calls), "max_in_60s": max_in_window(calls, 60.0),
            "max_in_10s": max_in_window(calls, 10.0), "bound_10s": round(capacity + rpm / 6, 1)}
    rate["over_limit_pct_60s"] = round(100 * (rate["max_in_60s"] - rpm) / rpm, 2)
    faults = [{"at_s": round(f.t - soak.started), "kind": f.kind, "target": f.target, "note": f.note,
               **({"node_gateway_back_s": round(f.back_s, 1) if f.back_s else None} if f.kind == "node" else {}),
               **recovery(soak, f)} for f in soak.faults]
    return {"runs": runs, "chats": dict(by_kind["chat"]), "streams": dict(by_kind["stream"]),
            "submits": dict(by_kind["submit"]), "batch": batch, "limited_upstream": rate,
            "latency_per_minute": per_minute, "faults": faults,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall_started))}


def print_figures(f: dict[str, Any]) -> None:
    r = f["runs"]
    print("\n== chaos soak figures ==")
    print(f"runs: {r['accepted']} accepted, {r['succeeded_once']} succeeded exactly once, {len(r['lost'])} lost, "
          f"{len(r['duplicated'])} run twice visibly; attempts {r['attempts']}; "
          f"{r['unanswered_unkeyed_submits']} unkeyed submissions unanswered (not resubmitted)")
    for lost in r["lost"][:10]:
        print(f"  lost: {lost}")
    print(f"run submissions by status: {f['submits']} (200: a keyed resubmission answered with the run an "
          "earlier, broken try had created)")
    print(f"chats by status: {f['chats']}")
    print(f"streams: {f['streams']} (200 = completed with [DONE]; cut = broke after 200)")
    print("  (refused: that node's Gateway was down, nothing sent, the client went on to another node; "
          "broken: the request was in flight when a process died)")
    b = f["batch"]
    print(f"batch ({b['lines']} lines on fake-limited, job {b['status']}): {b['once']} once, {b['missing']} missing, "
          f"{b['duplicated']} duplicated; line statuses {b['statuses']}")
    u = f["limited_upstream"]
    print(f"fake-limited upstream calls: {u['calls']}; max in any 60 s window {u['max_in_60s']} vs limit "
          f"{u['limit_rpm']} ({u['over_limit_pct_60s']:+.2f} %); max in 10 s {u['max_in_10s']} "
          f"(bound {u['bound_10s']})")
    print("chat latency per minute: " + "; ".join(
        f"{m['minute']}: p50 {m['p50_ms']} ms p99 {m['p99_ms']} ms ({m['chats_ok']} ok)"
        for m in f["latency_per_minute"]))
    print("faults:")
    for fault in f["faults"]:
        back = f", node's Gateway back at +{fault['node_gateway_back_s']} s" if fault.get("node_gateway_back_s") else ""
        seen = (f"errors until +{fault['errors_until_s']} s, first success after them "
                f"+{fault['first_success_after_s']} s; failures {fault['failures']}" if fault["failures"]
                else "no client operation failed")
        print(f"  +{fault['at_s']:4d}s {fault['kind']:9s} {fault['target']:12s} {fault['note']:24s} {seen}{back}")


def verdict(f: dict[str, Any]) -> list[str]:
    problems = []
    if f["runs"]["lost"]:
        problems.append(f"{len(f['runs']['lost'])} accepted runs lost")
    if f["runs"]["duplicated"]:
        problems.append(f"{len(f['runs']['duplicated'])} runs duplicated")
    if f["batch"]["missing"] or f["batch"]["duplicated"]:
        problems.append(f"batch lines missing {f['batch']['missing']}, duplicated {f['batch']['duplicated']}")
    if f["limited_upstream"]["over_limit_pct_60s"] > 1.0:
        problems.append(f"rpm exceeded by {f['limited_upstream']['over_limit_pct_60s']} % in a 60 s window")
    return problems
