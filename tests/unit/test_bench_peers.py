"""bench.peers' pure parts: wrk's report parsed, CPU accounted per process group from /proc, tables rendered."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from bench.peers import clients, procs, profile, report, wrk
from bench.peers.systems import PROMPT, TASK_INPUT, Running, Target, write_tasks
from deployments.core.taskdefs import TaskDefinition

# Recorded from Debian's wrk 4.1.0 (-t1 --latency) against the fake upstream.
WRK_OK = """Running 2s test @ http://127.0.0.1:19100/v1/chat/completions
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    55.67ms   10.29ms  90.50ms   71.69%
    Req/Sec   286.85     40.40   346.00     80.00%
  Latency Distribution
     50%   52.80ms
     75%   60.04ms
     90%   71.95ms
     99%    1.02s
  590 requests in 2.07s, 263.96KB read
Requests/sec:    284.55
Transfer/sec:    127.30KB
"""
WRK_ERRORS = """Running 1s test @ http://127.0.0.1:19100/v1/nothing
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   812.00us   10.13ms  72.00ms   82.05%
    Req/Sec   150.60     22.13   165.00     90.00%
  Latency Distribution
     50%  812.00us
     75%   56.02ms
     90%   63.90ms
     99%   72.00ms
  156 requests in 1.02s, 42.24KB read
  Socket errors: connect 0, read 3, write 0, timeout 7
  Non-2xx or 3xx responses: 150
Requests/sec:    152.95
Transfer/sec:     41.42KB
"""


def test_wrk_report_parsed() -> None:
    result = wrk.parse(WRK_OK)
    assert (result.requests, result.seconds, result.rps) == (590, 2.07, 284.55)
    assert result.latency_ms == {"50": 52.8, "75": 60.04, "90": 71.95, "99": 1020.0}
    assert result.non_2xx == 0 and result.socket_errors == {} and result.errors == 0
    assert result.ok == 590 and result.ok_rps == pytest.approx(590 / 2.07)


def test_wrk_errors_are_not_counted_as_answers() -> None:
    result = wrk.parse(WRK_ERRORS)
    assert result.non_2xx == 150 and result.socket_errors == {"read": 3, "timeout": 7}
    assert result.ok == 6 and result.errors == 160
    assert result.latency_ms["50"] == 0.812


def test_wrk_output_without_totals_is_an_error() -> None:
    with pytest.raises(ValueError, match="no totals"):
        wrk.parse("unable to connect to 127.0.0.1:1 Connection refused\n")
    with pytest.raises(ValueError, match="not a wrk duration"):
        wrk.duration_ms("12 parsecs")


def test_wrk_script_and_command() -> None:
    script = wrk.lua_script({"model": 'a"b', "messages": []}, {"Authorization": "Bearer k\\1"})
    assert 'wrk.method = "POST"' in script
    assert r'wrk.body = "{\"model\": \"a\\\"b\", \"messages\": []}"' in script
    assert r'wrk.headers["Authorization"] = "Bearer k\\1"' in script
    argv = wrk.command(Path("/x/wrk"), "http://h/v1/chat/completions", Path("s.lua"), 256, 8)
    assert argv == ["/x/wrk", "-t1", "-c256", "-d8s", "--timeout=30s", "--latency", "-s", "s.lua",
                    "http://h/v1/chat/completions"]


def test_slow_cells_run_enough_rounds_that_the_last_costs_little() -> None:
    # With a 500 ms upstream a 4 s window holds 7 of the 8 rounds an ideal one would, for any system
    # slower than exactly 500 ms: 87.5 % of ideal at best. 40 rounds (20 s) cap it at 97.5 %.
    assert wrk.round_cap(4, 500) == 7 / 8
    assert wrk.round_cap(8, 500) == 15 / 16
    assert wrk.cell_seconds(4, 500) == 20 and wrk.round_cap(20, 500) == 39 / 40
    assert wrk.cell_seconds(8, 0) == 8 and wrk.round_cap(8, 0) is None  # no rounds to count
    assert wrk.cell_seconds(30, 500) == 30  # a longer --duration stays
    assert wrk.cell_seconds(2, 500, rounds=0) == 2  # --quick


def test_summary_says_what_the_window_allows() -> None:
    results = _results()
    for row in results["load"]:  # type: ignore[attr-defined]
        row["wrk"] = {"seconds": 20.0}
    assert report.summary_table(results).splitlines()[3].endswith("| 5 % (the window allows 97.5 %) |")


def _stat(pid: int, name: str, ppid: int, utime: int, stime: int, start: int, rss: int = 10) -> str:
    fields = ["S", ppid, *[0] * 9, utime, stime, *[0] * 6, start, 0, rss]
    return f"{pid} ({name}) " + " ".join(str(f) for f in fields)


def test_stat_parsed_even_with_parentheses_in_the_name() -> None:
    assert procs.parse_stat(_stat(7, "ray::Serve) (x", 1, 30, 12, 999, 55)) == (1, 42, 999, 55)


def _fake_proc(root: Path, pid: int, stat: str, cmdline: str) -> None:
    (root / str(pid)).mkdir(parents=True, exist_ok=True)
    (root / str(pid) / "stat").write_text(stat)
    (root / str(pid) / "cmdline").write_bytes(cmdline.replace(" ", "\0").encode() + b"\0")


def test_snapshot_reads_a_proc_tree(tmp_path: Path) -> None:
    _fake_proc(tmp_path, 10, _stat(10, "python", 1, 5, 5, 100), "python serve_child.py")
    _fake_proc(tmp_path, 11, _stat(11, "raylet", 10, 7, 3, 101, rss=4), "/venv/ray/core/src/ray/raylet/raylet --x")
    (tmp_path / "self").mkdir()
    (tmp_path / "12").mkdir()  # a process that vanished between listdir and read
    found = procs.snapshot(tmp_path)
    assert sorted(found) == [10, 11]
    assert found[11] == procs.Proc(11, 10, 101, 10, 4 * procs.PAGE_KIB, "/venv/ray/core/src/ray/raylet/raylet --x")


def _p(pid: int, ppid: int, ticks: int, cmdline: str, start: int = 1) -> procs.Proc:
    return procs.Proc(pid, ppid, start, ticks, 1024, cmdline)


def test_cpu_accounted_per_group_over_the_tree_only() -> None:
    tick = procs.TICKS_PER_S
    before = {1: _p(1, 0, 0, "driver"), 2: _p(2, 1, 10, "ray::ServeReplica:app:Gateway"),
              3: _p(3, 1, 20, "ray::ServeReplica:app:worker-fake"), 4: _p(4, 1, 5, "ray::ProxyActor"),
              5: _p(5, 0, 0, "someone else"), 6: _p(6, 1, 50, "ray::ServeReplica:app:Gateway", start=7)}
    after = {1: _p(1, 0, 99, "driver"), 2: _p(2, 1, 10 + tick, "ray::ServeReplica:app:Gateway"),
             3: _p(3, 1, 20 + 2 * tick, "ray::ServeReplica:app:worker-fake"), 4: _p(4, 1, 5 + tick, "ray::ProxyActor"),
             5: _p(5, 0, 10 * tick, "someone else"),
             6: _p(6, 1, tick, "ray::ServeReplica:twin:Gateway", start=8),  # pid reused: counted from zero
             8: _p(8, 3, tick, "ray::ServeReplica:app:worker-fake", start=9)}  # born during the window
    tree = procs.descendants(after, [1], include_roots=False)
    assert tree == {2, 3, 4, 6, 8}
    spent = procs.cpu_by_group(before, after, tree, lambda c: procs.ray_group(c, "app"))
    assert spent == {"Gateway": 1.0, "worker": 3.0, "Serve proxy": 1.0}  # the twin's Gateway is not ours
    everything = procs.cpu_by_group(before, after, procs.descendants(after, [1]), procs.everything("all"))
    assert everything == {"all": pytest.approx((99 + tick + 2 * tick + tick + tick + tick) / tick)}


@pytest.mark.parametrize(("cmdline", "group"), [
    ("ray::ServeReplica:promptfleet:Gateway", "Gateway"),
    ("ray::ServeReplica:promptfleet:Gateway.check_health", "Gateway"),  # titled with the running method
    ("ray::ServeReplica:promptfleet:worker-fake-500ms", "worker"),
    ("ray::ServeReplica:promptfleet:RateLimiter", "limiter"),
    ("ray::ServeReplica:promptfleet:TaskStore", "store"),
    ("ray::ServeReplica:promptfleet:Console", "Console"),
    ("ray::ProxyActor", "Serve proxy"),
    ("ray::ServeController", "Serve controller"),
    ("ray::IDLE", "idle workers"),
    ("/v/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server --x", "Ray core"),
    ("/v/bin/python /v/site-packages/ray/dashboard/agent.py --x", "Ray dashboard and agents"),
    ("node start-server.js", "other"),
])
def test_ray_groups(cmdline: str, group: str) -> None:
    assert procs.ray_group(cmdline) == group
    assert procs.ray_group("ray::ServeReplica:other:Gateway", "promptfleet") is None


def test_real_proc_snapshot_holds_this_process() -> None:
    me = procs.snapshot()[os.getpid()]
    assert me.ppid == os.getppid() and me.rss_kib > 0 and "python" in me.cmdline


def _results() -> dict[str, object]:
    def row(system: str, lat: float, c: int, rps: float, cpu: float) -> dict[str, object]:
        return {"system": system, "latency_ms": lat, "concurrency": c, "rps": rps, "p50_ms": 1.5, "p99_ms": 9.25,
                "errors": 2 if c == 256 else 0, "cpu_ms_per_request": cpu,
                "cpu_ms_by_group": {"Gateway": cpu * 0.4, "worker": cpu * 0.6, "Ray core": 0.001}}

    load = [row(s, lat, c, rps * (0.06 if lat else 1), cpu) for s, rps, cpu in (("nginx", 20490.4, 0.03),
                                                                                 ("promptfleet", 413.2, 4.2))
            for lat in (0.0, 500.0) for c in (16, 256)]
    return {"meta": {"date": "2026-12-07 03:00 UTC", "commit": "abc1234", "levels": [16, 256],
                     "latencies": [0.0, 500.0], "duration_s": 8,
                     "machine": {"cores": 2, "loadavg_start": "8.1 4.3 1.9", "loadavg_end": "7 7 7",
                                 "note": "Loaded."}},
            "load": load,
            "ttft": [{"system": "fake upstream, direct (no hop)", "n": 100, "p50_ms": 1.0, "p99_ms": 2.0,
                      "total_p50_ms": 1.5, "errors": {}},
                     {"system": "promptfleet", "n": 90, "p50_ms": 4.5, "p99_ms": 9.0, "total_p50_ms": 6.0,
                      "errors": {"500": 3}}],
            "idle": {"seconds": 20, "cpu_pct": 24.4, "rss_mib": 1712.0, "pss_mib": 1200.0, "processes": 27,
                     "biggest": [{"name": "ray::ServeReplica:promptfleet:Gateway", "group": "Gateway",
                                  "rss_mib": 150.2, "cpu_pct": 3.1}]},
            "embedded": {"model": "smollm2", "max_tokens": 64, "n_threads": 1,
                         "one": {"tokens_per_s": 50.0, "requests": 10, "p50_ms": 1200.0, "errors": {}},
                         "eight": {"tokens_per_s": 55.0, "requests": 11, "p50_ms": 9000.0, "errors": {}},
                         "raw": {"tokens_per_s": 60.0, "requests": 12}, "ratio_8_vs_1": 1.1, "one_vs_raw": 0.83},
            "systems": [{"name": "promptfleet", "note": "twin idles beside it"}], "failures": {"portkey": "npm: no"}}


def test_summary_table() -> None:
    lines = report.summary_table(_results()).splitlines()
    assert lines[0] == ("| system | req/s at 16 / 256 concurrent, 0 ms upstream | CPU ms per request | "
                        "req/s, 500 ms upstream (ideal 32 / 512) | % of ideal at 256 |")
    assert lines[1] == "|---|---|---|---|---|"
    # An 8 s window (the results' duration, no --slow-rounds) holds 15 of 16 rounds of 500 ms.
    assert lines[2] == "| nginx | 20,490 / 20,490 | 0.030 / 0.030 | 1,229 / 1,229 | 240 % (the window allows 93.8 %) |"
    assert lines[3] == "| promptfleet | 413 / 413 | 4.20 / 4.20 | 25 / 25 | 5 % (the window allows 93.8 %) |"


def test_detail_tables() -> None:
    latency = report.latency_table(_results()).splitlines()
    assert latency[0] == "| system | upstream | p50 / p99 ms at 16 | p50 / p99 ms at 256 | errors |"
    assert latency[2] == "| nginx | 0 ms | 1.5 / 9.2 | 1.5 / 9.2 | 2 |"  # 9.25 → 9.2: half to even
    groups = report.group_table(_results()).splitlines()
    assert groups[2] == "| nginx | 0 ms | 16 | 0.030 | worker 0.02, Gateway 0.01 |"  # below 0.005 ms: left out
    assert "| promptfleet | 500 ms | 256 | 4.20 | worker 2.52, Gateway 1.68 |" in groups
    ttft = report.ttft_table(_results()).splitlines()
    assert ttft[3] == "| promptfleet | 4.50 | 9.00 | 3.50 | 6.00 | 90 | 500: 3 |"


def test_markdown_report_says_when_where_and_what_failed() -> None:
    text = report.markdown(_results())
    assert text.startswith("Measured 2026-12-07 03:00 UTC on commit `abc1234`: 2 cores, load average 8.1 4.3 1.9")
    assert "**24.4 % of one core**, **1,712 MiB RSS** (PSS 1,200 MiB) over **27 processes**" in text
    assert "| ray::ServeReplica:promptfleet:Gateway | Gateway | 150 | 3.1 |" in text
    assert "| promptfleet, 8 concurrent | 55.0 | 11 | 9,000 | 0 |" in text
    assert "8 concurrent / 1 concurrent: **1.10×**; one stream / raw llama.cpp: **0.83**." in text
    assert "- promptfleet: twin idles beside it" in text and "- portkey: not measured: npm: no" in text


def test_report_says_when_streams_were_paced() -> None:
    results = _results()
    assert "spaces a stream's events" not in report.markdown(results)
    results["meta"].update(kinds=["chat", "stream"], chunk_interval_ms=20.0)
    assert "The fake upstream spaces a stream's events 20 ms apart." in report.markdown(results)


def test_embedded_report_puts_the_baseline_beside_this_checkout() -> None:
    results = _results()
    results["embedded"]["baseline"] = {
        "name": "85e30fa", "one": {"tokens_per_s": 40.0, "requests": 8, "p50_ms": 1500.0, "errors": {}},
        "eight": {"tokens_per_s": 60.0, "requests": 12, "p50_ms": 8000.0, "errors": {}},
        "ratio_8_vs_1": 1.5, "one_vs_raw": 0.67}
    text = report.markdown(results)
    assert "| previous release (85e30fa), 8 concurrent | 60.0 | 12 | 8,000 | 0 |" in text
    assert ("8 concurrent / 1 concurrent: **1.10×**; one stream / raw llama.cpp: **0.83**; previous release: "
            "8 concurrent / 1 concurrent: **1.50×**; previous release: one stream / raw llama.cpp: **0.67**.") in text


def test_report_without_optional_parts() -> None:
    results = _results()
    for key in ("ttft", "idle", "embedded", "systems", "failures"):
        results.pop(key)
    text = report.markdown(results)
    assert "### Throughput" in text and "### Idle" not in text and "### Notes" not in text


def test_py_spy_stacks_summed_per_request() -> None:
    raw = ("MainThread;run (asyncio/base_events.py:1);chat (gateway/chat.py:10);dumps (json/__init__.py:5) 30\n"
           "MainThread;run (asyncio/base_events.py:1);chat (gateway/chat.py:10) 10\n"
           "MainThread;run (asyncio/base_events.py:1);_run_once (asyncio/base_events.py:2) 60\n"
           "not a stack line\n")
    assert profile.parse_collapsed(raw)[1] == (
        ["MainThread", "run (asyncio/base_events.py:1)", "chat (gateway/chat.py:10)"], 10)
    assert profile.top_frames(raw, requests=20, limit=2) == [("_run_once (asyncio/base_events.py:2)", 3.0),
                                                           ("dumps (json/__init__.py:5)", 1.5)]
    total = dict(profile.top_frames(raw, requests=10, total=True))
    assert total["run (asyncio/base_events.py:1)"] == 10.0 and total["chat (gateway/chat.py:10)"] == 4.0


def test_answer_tokens_count_for_their_share_of_the_window() -> None:
    share_inside = clients.share_inside
    assert share_inside(2.0, 4.0, 0.0, 10.0) == 1.0
    assert share_inside(-1.0, 1.0, 0.0, 10.0) == 0.5  # begun in the warm-up
    assert share_inside(9.0, 13.0, 0.0, 10.0) == 0.25  # cut by the window's end
    assert share_inside(10.0, 12.0, 0.0, 10.0) == 0.0
    assert share_inside(-1.0, 11.0, 0.0, 10.0) == 10 / 12


def test_flat_cost_table_sets_each_level_against_the_lowest() -> None:
    results = _results()
    results["meta"]["levels"] = [16, 64, 256]
    results["load"] = [{"system": "pf · stream (500 chunks)", "kind": "stream", "latency_ms": 0.0, "concurrency": c,
                        "cpu_ms_per_request": cpu, "cpu_ms_above_idle": cpu - 1,
                        "cpu_us_per_chunk": cpu * 2} for c, cpu in ((16, 10.0),
                                                                                               (64, 11.0),
                                                                                               (256, 12.5))]
    lines = report.flat_table(results).splitlines()
    assert lines[0] == ("| system | upstream | CPU ms per request at 16 / 64 / 256 | above idle | µs per chunk "
                        "(above idle) | 256 vs 16 | above idle, 256 vs 16 |")
    assert lines[2] == ("| pf · stream (500 chunks) | 0 ms | 10.00 / 11.00 / 12.50 | 9.00 / 10.00 / 11.50 | "
                        "20.00 / 22.00 / 25.00 | 1.25× | 1.28× |")
    assert "### Flat cost" in report.markdown(results)


def test_targets_of_each_kind(tmp_path: Path) -> None:
    chat = Target("http://h/v1/chat/completions", "fake")
    assert chat.body() == {"model": "fake", "messages": PROMPT, "max_tokens": 16}
    task = Target("http://h/v1/tasks/bench-fake/run", "fake", payload={"input": TASK_INPUT})
    assert task.body() == {"input": TASK_INPUT}
    running = Running("pf", {0.0: chat}, [1], lambda _: "x", kinds={"task": {0.0: task}})
    assert running.targets_of("chat") == {0.0: chat} and running.targets_of("stream") is None
    write_tasks(tmp_path, {0.0: "fake", 500.0: "fake-500ms"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench-fake-500ms.yaml", "bench-fake.yaml"]
    definition = TaskDefinition.model_validate(yaml.safe_load((tmp_path / "bench-fake.yaml").read_text()))
    assert definition.model == "fake" and definition.output_schema["additionalProperties"] is False
