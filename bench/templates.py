"""Benchmark: what bounding template renders costs, and what it saves (issue 19). No Ray.

    python -m bench.templates [--items 3000] [--repeat 200]

In one process, each render once "before" (Jinja's plain ``SandboxedEnvironment``, on the event loop, as
promptfleet rendered until issue 19) and once "after" (the bounded sandbox, through ``TemplateRenderer``'s
worker thread, default budgets: 1 s, 1,000,000 characters):

1. Hostile templates: wall time and growth of peak RSS of one render — nested loops over ``--items`` input
   items, ``text * n`` (n = 10**8: 100 MB before; 10**9 would take a GB) and ``lipsum(20000)``.
2. Event-loop stall: a 1 ms ticker runs on the loop while the nested-loop template renders; prints the
   gaps between ticks (p50, p99, max) and ticks per second, with no render (what the machine's load alone
   does), before and after.
3. Cost on ordinary templates: median microseconds per render of a typical prompt (a loop over a few
   items, filters, a 2 KB input), plain vs bounded, the same compiled template rendered ``--repeat`` times,
   and the median wait of a render through the worker thread (submit to result).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

from jinja2.sandbox import SandboxedEnvironment

from deployments.core.prompting import DEFAULT_LIMITS, TemplateRenderer, render_template
from deployments.core.taskdefs import TaskDefinition
from deployments.errors import TemplateFailed

NESTED = "{% for a in items %}{% for b in items %}{% if a == b %}{% endif %}{% endfor %}{% endfor %}{{ text }}"
ORDINARY = ("You label support tickets for {{ company }}.\n{% for item in items %}- {{ item.name|title }}: "
            "{{ item.note|truncate(80) }}\n{% endfor %}Ticket:\n{{ text|trim }}\n"
            "Answer in {{ lang|default('English') }}.")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(call: Callable[[], object]) -> tuple[float, str]:
    started = time.perf_counter()
    try:
        call()
        outcome = "rendered"
    except TemplateFailed as exc:
        outcome = "422: " + exc.message.split(": ", 1)[-1][:70]
    return time.perf_counter() - started, outcome


def definition(prompt: str) -> TaskDefinition:
    return TaskDefinition.model_validate({
        "name": "bench", "description": "Bench.", "model": "m", "prompt": prompt,
        "input_schema": {"type": "object"}, "output_schema": {"type": "object"},
    })


async def loop_stall(render: Callable[[], Any]) -> tuple[list[float], float]:
    """(gaps between 1 ms ticks, sorted; render seconds) while ``render()`` (a coroutine) runs."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticks = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    started = time.perf_counter()
    try:
        await render()
    except TemplateFailed:
        pass
    took = time.perf_counter() - started
    done.set()
    await ticks
    return sorted(gaps), took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=3000, help="input items of the nested-loop template")
    parser.add_argument("--repeat", type=int, default=200, help="renders of the ordinary template per side")
    parser.add_argument("--stall-runs", type=int, default=3, help="renders per side of the event-loop stall")
    args = parser.parse_args(argv)
    plain = SandboxedEnvironment()
    items = [f"item-{i}" for i in range(args.items)]
    hostile: list[tuple[str, str, dict[str, Any]]] = [
        (f"nested loops, {args.items:,} items", NESTED, {"items": items, "text": "x"}),
        ("text * 10**8", "{{ text * n }}", {"text": "x", "n": 10**8}),
        ("lipsum(20000)", "{{ lipsum(20000) }}", {}),
    ]
    renderer = TemplateRenderer(DEFAULT_LIMITS)
    defn = {name: definition(source) for name, source, _ in hostile}

    print(f"1. hostile templates (after: budgets {DEFAULT_LIMITS.timeout_s:g} s, {DEFAULT_LIMITS.max_chars:,} chars)")
    for name, source, variables in hostile:
        before_rss = rss_mb()
        before_s, _ = timed(lambda: plain.from_string(source).render(variables))  # noqa: B023 - called at once
        grew_before = rss_mb() - before_rss
        after_s, outcome = timed(lambda: asyncio.run(renderer.render(defn[name], variables)))  # noqa: B023
        print(f"   {name:28} before {before_s:7.2f} s (peak RSS +{grew_before:6.0f} MB)   "
              f"after {after_s:5.2f} s, {outcome}")

    print(f"2. event-loop stall while the nested-loop template renders (1 ms ticker on the same loop; "
          f"{args.stall_runs} runs each, gaps pooled)")
    nested_vars = {"items": items, "text": "x"}

    async def idle() -> None:
        await asyncio.sleep(1.0)  # what this machine's load alone does to a 1 ms ticker

    async def on_loop() -> None:
        plain.from_string(NESTED).render(nested_vars)

    async def in_thread() -> None:
        await renderer.render(defn[hostile[0][0]], nested_vars)

    for label, render in (("no render (machine load)", idle), ("before (on the loop)", on_loop),
                          ("after (worker thread)", in_thread)):
        gaps: list[float] = []
        took: list[float] = []
        for _ in range(args.stall_runs):
            run_gaps, run_took = asyncio.run(loop_stall(render))
            gaps += run_gaps
            took.append(run_took)
        gaps.sort()
        p50, p99 = gaps[len(gaps) // 2], gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))]
        print(f"   {label:26} gap p50 {p50 * 1000:6.1f} ms  p99 {p99 * 1000:7.1f} ms  max {gaps[-1] * 1000:7.1f} ms  "
              f"ticks/s {len(gaps) / sum(took):5.0f}")

    print(f"3. ordinary template, median of {args.repeat} renders")
    variables = {"company": "Acme", "lang": "French", "text": "My order arrived broken. " * 80,
                 "items": [{"name": f"rule {i}", "note": "Be polite and brief. " * 6} for i in range(8)]}
    compiled = plain.from_string(ORDINARY)
    assert compiled.render(variables) == render_template(ORDINARY, variables)

    def median_us(call: Callable[[], object]) -> float:
        runs = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            call()
            runs.append(time.perf_counter() - started)
        return statistics.median(runs) * 1e6

    plain_us = median_us(lambda: compiled.render(variables))
    bounded_us = median_us(lambda: render_template(ORDINARY, variables))
    ordinary = definition(ORDINARY)

    async def through_thread() -> float:
        runs = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            await renderer.render(ordinary, variables)
            runs.append(time.perf_counter() - started)
        return statistics.median(runs) * 1e6

    thread_us = asyncio.run(through_thread())
    print(f"   plain sandbox {plain_us:7.0f} us   bounded {bounded_us:7.0f} us ({bounded_us / plain_us:.2f}x)   "
          f"bounded through the worker thread {thread_us:7.0f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
