"""The bench's results as markdown tables ready for the docs (pure: a results dict in, text out).

The results dict is what ``python -m bench.peers --json`` writes: ``meta`` (date, commit, machine,
levels, latencies, duration), ``load`` (one row per system × kind × upstream latency × concurrency;
``kind``: chat, stream or task, streams with ``cpu_us_per_chunk``), ``ttft``, ``idle``, ``embedded``,
``failures`` (system → why it was not measured). With ``meta.repeats`` above 1, ``load`` holds every
repeat's rows (``repeat``: 0, 1 …): the tables of one number per cell show the medians
(``bench.peers.repeats``), and the flat-cost table the spread over the repeats and a verdict.
"""

from __future__ import annotations

from typing import Any

from bench.peers import repeats, wrk

DASH = "—"


def num(value: float | None, digits: int = 0) -> str:
    """1234.5 → "1,234" (digits=0), 0.234 → "0.23" (digits=2); None → "—"."""
    if value is None:
        return DASH
    return f"{value:,.{digits}f}"


def _cells(load: list[dict[str, Any]], system: str, latency: float) -> dict[int, dict[str, Any]]:
    return {row["concurrency"]: row for row in load if row["system"] == system and row["latency_ms"] == latency}


def _systems(load: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(row["system"] for row in load))


def _cpu_digits(value: float | None) -> int:
    return 3 if value is not None and value < 0.1 else 2


def summary_table(results: dict[str, Any]) -> str:
    """One row per system: req/s and CPU per request at each level, fast and slow upstream."""
    meta, load = results["meta"], results["load"]
    levels: list[int] = meta["levels"]
    fast, slow = min(meta["latencies"]), max(meta["latencies"])
    slash = " / ".join(str(c) for c in levels)
    head = [f"req/s at {slash} concurrent, {fast:g} ms upstream", "CPU ms per request"]
    if slow != fast:
        ideal = " / ".join(num(c * 1000 / slow) for c in levels)
        head += [f"req/s, {slow:g} ms upstream (ideal {ideal})", f"% of ideal at {levels[-1]}"]
    lines = ["| system | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for system in _systems(load):
        cells = _cells(load, system, fast)
        row = [" / ".join(num(cells.get(c, {}).get("rps")) for c in levels),
               " / ".join(num(v := cells.get(c, {}).get("cpu_ms_per_request"), _cpu_digits(v)) for c in levels)]
        if slow != fast:
            slow_cells = _cells(load, system, slow)
            row.append(" / ".join(num(slow_cells.get(c, {}).get("rps")) for c in levels))
            top_cell = slow_cells.get(levels[-1], {})
            # wrk's own run time; the cell's planned window where repeats were collapsed into medians.
            seconds = top_cell.get("wrk", {}).get("seconds") or wrk.cell_seconds(
                meta["duration_s"], slow, meta.get("slow_rounds", 0))
            top, cap = top_cell.get("rps"), wrk.round_cap(seconds, slow)
            row.append(DASH if top is None else f"{100 * top / (levels[-1] * 1000 / slow):.0f} %"
                       + ("" if cap is None else f" (the window allows {100 * cap:.1f} %)"))
        lines.append(f"| {system} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def latency_table(results: dict[str, Any]) -> str:
    """p50 / p99 latency (ms) per system, upstream latency and level, with the errors wrk counted."""
    meta, load = results["meta"], results["load"]
    levels: list[int] = meta["levels"]
    lines = ["| system | upstream | " + " | ".join(f"p50 / p99 ms at {c}" for c in levels) + " | errors |",
             "|---|---|" + "---|" * len(levels) + "---|"]
    for system in _systems(load):
        for latency in meta["latencies"]:
            cells = _cells(load, system, latency)
            if not cells:
                continue
            errors = sum(row.get("errors", 0) for row in cells.values())
            ms = [f"{num(cells.get(c, {}).get('p50_ms'), 1)} / {num(cells.get(c, {}).get('p99_ms'), 1)}"
                  for c in levels]
            lines.append(f"| {system} | {latency:g} ms | " + " | ".join(ms) + f" | {errors:,} |")
    return "\n".join(lines)


def group_table(results: dict[str, Any]) -> str:
    """CPU ms per request of each process group (the biggest first), per system, latency and level."""
    meta, load = results["meta"], results["load"]
    lines = ["| system | upstream | concurrent | total CPU ms / request | by process group (ms / request) |",
             "|---|---|---|---|---|"]
    for system in _systems(load):
        for latency in meta["latencies"]:
            for c, row in sorted(_cells(load, system, latency).items()):
                groups = sorted(row.get("cpu_ms_by_group", {}).items(), key=lambda kv: -kv[1])
                parts = ", ".join(f"{name} {value:.2f}" for name, value in groups if value >= 0.005) or DASH
                total = row.get("cpu_ms_per_request")
                lines.append(f"| {system} | {latency:g} ms | {c} | {num(total, _cpu_digits(total))} | {parts} |")
    return "\n".join(lines)


def flat_table(results: dict[str, Any]) -> str:
    """Issue 22's flat cost: CPU per request (streams: µs per chunk too) at each level, and the highest
    level's against the lowest's, per system, kind and upstream latency; also above the system's idle
    CPU (with a slow upstream and few requests in flight, idle work is most of a request's share)."""
    meta, load = results["meta"], results["load"]
    levels: list[int] = meta["levels"]
    if len(levels) < 2:
        return ""
    slash = " / ".join(str(c) for c in levels)
    lines = [f"| system | upstream | CPU ms per request at {slash} | above idle | µs per chunk (above idle) "
             f"| {levels[-1]} vs {levels[0]} | above idle, {levels[-1]} vs {levels[0]} |",
             "|---|---|---|---|---|---|---|"]
    for system in _systems(load):
        for latency in meta["latencies"]:
            cells = _cells(load, system, latency)
            if not cells:
                continue
            cpu = [cells.get(c, {}).get("cpu_ms_per_request") for c in levels]
            above = [cells.get(c, {}).get("cpu_ms_above_idle") for c in levels]
            chunk = [cells.get(c, {}).get("cpu_us_per_chunk") for c in levels]

            def ratio(values: list[float | None]) -> str:
                return f"{values[-1] / values[0]:.2f}×" if values[0] and values[-1] else DASH

            def row(values: list[float | None]) -> str:
                return " / ".join(num(v, _cpu_digits(v)) for v in values) if any(values) else DASH

            chunks = " / ".join(num(v, 2) for v in chunk) if any(chunk) else DASH
            lines.append(f"| {system} | {latency:g} ms | {row(cpu)} | {row(above)} | {chunks} | {ratio(cpu)} | "
                         f"{ratio(above)} |")
    return "\n".join(lines)


def flat_repeats_table(results: dict[str, Any]) -> str:
    """Issue 22's flat cost over ``--repeats``: per system, kind and upstream latency, each level's CPU ms
    per request above idle (median [min–max]), the highest level's against the lowest's as the median
    [min–max] of the per-repeat ratios, its verdict against 1.10, and the fake upstream's own ratio in
    the same cells (growth it shares is the machine's)."""
    meta = results["meta"]
    levels: list[int] = sorted(meta["levels"])
    if len(levels) < 2:
        return ""
    rows = repeats.flat_cost(results["load"], levels, meta.get("repeats", 1))
    low, high = levels[0], levels[-1]
    lines = ["| system | upstream | " + " | ".join(f"CPU ms per request at {c}, above idle" for c in levels)
             + f" | {high} vs {low} | verdict (≤ {repeats.FLAT_LIMIT:.2f}× in every repeat) "
             f"| fake upstream's {high} vs {low} |", "|---|---|" + "---|" * (len(levels) + 3)]

    def shown(value: dict[str, Any] | None, digits: int, unit: str = "") -> str:
        if value is None:
            return DASH
        s = repeats.Spread(**value)
        missing = f", {s.n} of {meta.get('repeats', 1)}" if s.n < meta.get("repeats", 1) else ""
        return s.text(digits, unit) + missing

    for row in rows:
        cpu = [row["cpu_ms"][str(c)] for c in levels]
        lines.append(f"| {row['system']} | {row['latency_ms']:g} ms | "
                     + " | ".join(shown(v, _cpu_digits(v and v["median"])) for v in cpu)
                     + f" | {shown(row['ratio'], 2, '×')} | {row['verdict']} | "
                     f"{shown(row['upstream_ratio'], 2, '×')} |")
    return "\n".join(lines)


def ttft_table(results: dict[str, Any]) -> str:
    rows = results.get("ttft") or []
    if not rows:
        return ""
    direct = next((r["p50_ms"] for r in rows if r["system"].startswith("fake upstream")), None)
    lines = ["| system | TTFT p50 ms | TTFT p99 ms | added p50 ms (vs upstream direct) | whole stream p50 ms "
             "| streams | errors |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        added = None if direct is None or r["p50_ms"] is None else r["p50_ms"] - direct
        errors = ", ".join(f"{k}: {v}" for k, v in r.get("errors", {}).items()) or "0"
        lines.append(f"| {r['system']} | {num(r['p50_ms'], 2)} | {num(r['p99_ms'], 2)} | {num(added, 2)} | "
                     f"{num(r.get('total_p50_ms'), 2)} | {r['n']} | {errors} |")
    return "\n".join(lines)


def idle_text(results: dict[str, Any]) -> str:
    idle = results.get("idle")
    if not idle:
        return ""
    head = (f"Idle single-node cluster (the default configs/serve.yaml with the embedded model, auth off), "
            f"{idle['seconds']:g} s with no traffic: **{idle['cpu_pct']:.1f} % of one core**, "
            f"**{idle['rss_mib']:,.0f} MiB RSS** (PSS {idle['pss_mib']:,.0f} MiB) "
            f"over **{idle['processes']} processes**."
            "\n\n| process | group | RSS MiB | CPU % of a core |\n|---|---|---|---|")
    rows = [f"| {p['name']} | {p['group']} | {p['rss_mib']:.0f} | {p['cpu_pct']:.1f} |" for p in idle["biggest"]]
    return "\n".join([head, *rows])


def embedded_text(results: dict[str, Any]) -> str:
    emb = results.get("embedded")
    if not emb:
        return ""
    lines = [f"Embedded model `{emb['model']}` (max_tokens {emb['max_tokens']}, n_threads {emb['n_threads']}), "
             "completion tokens per second:", "",
             "| | tokens/s | requests | p50 ms | errors |", "|---|---|---|---|---|"]
    base = emb.get("baseline") or {}
    rows = [("promptfleet, 1 concurrent", emb.get("one")), ("promptfleet, 8 concurrent", emb.get("eight")),
            (f"previous release ({base.get('name')}), 1 concurrent", base.get("one")),
            (f"previous release ({base.get('name')}), 8 concurrent", base.get("eight")),
            ("raw llama.cpp (llama-cpp-python), one stream, same threads", emb.get("raw"))]
    for label, r in rows:
        if r:
            errors = ", ".join(f"{k}: {v}" for k, v in (r.get("errors") or {}).items()) or "0"
            lines.append(f"| {label} | {num(r['tokens_per_s'], 1)} | {r.get('requests', DASH)} | "
                         f"{num(r.get('p50_ms'), 0)} | {errors} |")
    ratios = []
    for who, rates in (("", emb), ("previous release: ", base)):
        if rates.get("ratio_8_vs_1") is not None:
            ratios.append(f"{who}8 concurrent / 1 concurrent: **{rates['ratio_8_vs_1']:.2f}×**")
        if rates.get("one_vs_raw") is not None:
            ratios.append(f"{who}one stream / raw llama.cpp: **{rates['one_vs_raw']:.2f}**")
    return "\n".join(lines + (["", "; ".join(ratios) + "."] if ratios else []))


def markdown(results: dict[str, Any]) -> str:
    """The whole report: a header saying when, on what and how loaded, then every table."""
    meta = results["meta"]
    machine = meta["machine"]
    times = meta.get("repeats", 1)
    # One number per cell in the tables below: with repeats, the median of them.
    cells = results if times == 1 else {**results, "load": repeats.collapse(results["load"])}
    each = "" if times == 1 else (f" Each system's cells {times} times, the levels in an order rotated per "
                                  "repeat; one number per cell: the median.")
    if "stream" in meta.get("kinds", []) and meta.get("chunk_interval_ms"):
        each += f" The fake upstream spaces a stream's events {meta['chunk_interval_ms']:g} ms apart."
    parts = [f"Measured {meta['date']} on commit `{meta['commit']}`: {machine['cores']} cores, load average "
             f"{machine['loadavg_start']} at the start and {machine['loadavg_end']} at the end. "
             f"{machine['note']} wrk, one thread, {meta['duration_s']:g} s per cell.{each}",
             "### Throughput and CPU per request", summary_table(cells),
             "### Latency (wrk)", latency_table(cells),
             "### CPU per request by process group", group_table(cells)]
    flat = (("### Flat cost: CPU per request by concurrency", flat_table(results)) if times == 1 else
            (f"### Flat cost: CPU per request by concurrency, {times} repeats", flat_repeats_table(results)))
    for title, text in (flat,
                        ("### Streaming: time to first token", ttft_table(results)),
                        ("### Idle", idle_text(results)), ("### Embedded model", embedded_text(results))):
        if text:
            parts += [title, text]
    notes = [f"- {s['name']}: {s['note']}" for s in results.get("systems", []) if s.get("note")]
    notes += [f"- {name}: not measured: {why}" for name, why in (results.get("failures") or {}).items()]
    if notes:
        parts += ["### Notes", "\n".join(notes)]
    return "\n\n".join(parts) + "\n"
