"""Repeated load cells (``--repeats``): the order of each repeat's levels, and what the repeats show (pure).

One measurement of a cell on this shared machine scatters by ±15 % (two runs of the same code path
gave 256-vs-16 ratios of 1.09× and 1.26×), more than the 10 % issue 22's flat-cost goal allows. So
each system's cells are measured ``--repeats`` times, a repeat's levels one after the other in an
order rotated per repeat (drift of the machine hits every level alike), and per system, kind and
upstream latency the report gives the median and the range of each level's CPU per request (above
idle), the highest level's against the lowest's as the median and range of the per-repeat ratios,
and a verdict that claims no more than that range shows. The fake upstream's own ratio stands beside
it: when the upstream, a bare uvicorn process, grows alike, the growth is the machine's, not ours.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

FLAT_LIMIT = 1.10  # issue 22, goal 1: CPU per request at 256 concurrent within 10 % of that at 16
RATIO_DIGITS = 3  # ratios are rounded before the verdict, so 0.44 / 0.40 is 1.10, not 1.1000000000000003

# Fields of a load row that are one measurement each (their median stands for the cell) and those that
# are counts (summed over the repeats).
MEDIAN_FIELDS = ("rps", "p50_ms", "p99_ms", "cpu_ms_per_request", "cpu_ms_above_idle", "cpu_us_per_chunk",
                 "idle_cpu_s_per_s", "upstream_cpu_ms_per_request")
SUMMED_FIELDS = ("errors",)
UPSTREAM = "upstream_cpu_ms_per_request"  # the fake upstream's own CPU in the same cell (not above idle)


def order(levels: list[int], repeat: int) -> list[int]:
    """The levels in the order repeat ``repeat`` measures them: rotated by one per repeat, so each level
    is measured first, middle and last alike (16, 256 · 256, 16 · 16, 256 …)."""
    if not levels:
        return []
    shift = repeat % len(levels)
    return levels[shift:] + levels[:shift]


@dataclass(frozen=True)
class Spread:
    """What ``n`` measurements of one quantity show: their median, lowest and highest."""

    median: float
    low: float
    high: float
    n: int

    def text(self, digits: int = 2, unit: str = "") -> str:
        """"1.09× [1.02–1.15×]"; one measurement alone: "1.09×"."""
        if self.n == 1:
            return f"{self.median:.{digits}f}{unit}"
        return f"{self.median:.{digits}f}{unit} [{self.low:.{digits}f}–{self.high:.{digits}f}{unit}]"


def spread(values: Iterable[float | None], digits: int | None = None) -> Spread | None:
    """Median (rounded to ``digits`` if given: the mean of the middle two has float noise), min and max of
    the values that were measured (``None``: not measured); ``None`` if none were."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    median = statistics.median(present)
    return Spread(median if digits is None else round(median, digits), min(present), max(present), len(present))


def ratio(high: float | None, low: float | None) -> float | None:
    """``high / low`` rounded to RATIO_DIGITS; ``None`` when either is missing or ``low`` is not positive
    (above idle, a cell of few requests can come out at 0)."""
    if high is None or low is None or low <= 0:
        return None
    return round(high / low, RATIO_DIGITS)


def verdict(ratios: Spread | None, limit: float = FLAT_LIMIT) -> str:
    """"flat" when every repeat's ratio is at most ``limit``, "grows" when every one is above it,
    otherwise "undecided" — also with fewer than two ratios, since one measurement has no spread to
    tell it from the noise."""
    if ratios is None or ratios.n < 2:
        return "undecided"
    if ratios.high <= limit:
        return "flat"
    if ratios.low > limit:
        return "grows"
    return "undecided"


def cpu_of(row: dict[str, Any]) -> float | None:
    """A cell's CPU ms per request above the system's idle where that was measured, else in all."""
    above = row.get("cpu_ms_above_idle")
    return above if above is not None else row.get("cpu_ms_per_request")


def _by_cell(load: list[dict[str, Any]]) -> dict[tuple[str, float], dict[int, dict[int, dict[str, Any]]]]:
    """(system, latency) → repeat → concurrency → row, in the order the rows came."""
    cells: dict[tuple[str, float], dict[int, dict[int, dict[str, Any]]]] = {}
    for row in load:
        repeats = cells.setdefault((row["system"], row["latency_ms"]), {})
        repeats.setdefault(row.get("repeat", 0), {})[row["concurrency"]] = row
    return cells


def _per_level(by_repeat: dict[int, dict[int, dict[str, Any]]], levels: list[int],
               value: Callable[[dict[str, Any]], float | None]) -> dict[str, dict[str, Any] | None]:
    """Level → the spread of ``value`` over the repeats that measured it (JSON: the level as a string)."""
    spreads = {level: spread(value(cells[level]) for cells in by_repeat.values() if level in cells)
               for level in levels}
    return {str(level): asdict(s) if s else None for level, s in spreads.items()}


def flat_cost(load: list[dict[str, Any]], levels: list[int], repeats: int) -> list[dict[str, Any]]:
    """Per system (with its kind) and upstream latency: each level's CPU ms per request over the repeats,
    the highest level's against the lowest's per repeat (ours and the fake upstream's) and the verdict.

    ``repeats`` is how many were asked for: a cell measured fewer times says so (``n`` below it)."""
    low, high = min(levels), max(levels)
    out = []
    for (system, latency), by_repeat in _by_cell(load).items():
        pairs = [cells for cells in by_repeat.values() if low in cells and high in cells]
        ours = [ratio(cpu_of(c[high]), cpu_of(c[low])) for c in pairs]
        theirs = [ratio(c[high].get(UPSTREAM), c[low].get(UPSTREAM)) for c in pairs]
        kind = next(row.get("kind", "chat") for cells in by_repeat.values() for row in cells.values())
        ratios, upstream = spread(ours, RATIO_DIGITS), spread(theirs, RATIO_DIGITS)
        out.append({"system": system, "kind": kind, "latency_ms": latency, "repeats": repeats, "low": low,
                    "high": high, "cpu_ms": _per_level(by_repeat, levels, cpu_of),
                    "upstream_cpu_ms": _per_level(by_repeat, levels, lambda row: row.get(UPSTREAM)),
                    "ratios": ours, "ratio": asdict(ratios) if ratios else None, "verdict": verdict(ratios),
                    "upstream_ratios": theirs, "upstream_ratio": asdict(upstream) if upstream else None})
    return out


def collapse(load: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per system, latency and level out of its repeats, for the tables that show one number per
    cell: medians of the measurements (per process group too), errors summed; wrk's raw counts left out."""
    out = []
    for by_repeat in _by_cell(load).values():
        levels = list(dict.fromkeys(c for cells in by_repeat.values() for c in cells))
        for level in levels:
            rows = [cells[level] for cells in by_repeat.values() if level in cells]
            row = {k: v for k, v in rows[0].items() if k not in ("wrk", "repeat", *MEDIAN_FIELDS, *SUMMED_FIELDS)}
            for key in MEDIAN_FIELDS:
                if (s := spread(r.get(key) for r in rows)) is not None:
                    row[key] = s.median
            for key in SUMMED_FIELDS:
                row[key] = sum(r.get(key) or 0 for r in rows)
            groups = list(dict.fromkeys(g for r in rows for g in r.get("cpu_ms_by_group") or {}))
            row["cpu_ms_by_group"] = {g: s.median for g in groups
                                      if (s := spread((r.get("cpu_ms_by_group") or {}).get(g) for r in rows))}
            row["repeats"] = len(rows)
            out.append(row)
    return out
