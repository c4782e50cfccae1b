"""Small charts for the console as inline SVG, rendered on the server (pure; no JavaScript).

``bar_chart`` draws one bar per labelled value, scaled to the largest, with the value over each
bar and the label under it: enough for tokens per day or per model, and readable without a
chart library. ``day_points`` turns the store's tokens per day (days with usage only) into one
bar per calendar day.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, timedelta
from html import escape

from deployments.schemas import DayTokens


def compact(value: float) -> str:
    """1234 → 1.2k, 3400000 → 3.4M: numbers that fit over a bar."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.1f}{suffix}"
    return f"{value:g}"


def bar_chart(points: Sequence[tuple[str, float]], *, title: str, width: int = 640, height: int = 180) -> str:
    """An SVG bar chart of ``points`` (label, value); an empty chart says there is no data."""
    top, bottom = 24, 30
    plot = height - top - bottom
    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="100%" '
        f'preserveAspectRatio="xMinYMin meet" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
        f'<line x1="0" y1="{top + plot}" x2="{width}" y2="{top + plot}" class="axis"/>',
    ]
    if not points:
        parts.append(
            f'<text x="{width / 2}" y="{top + plot / 2}" text-anchor="middle" class="empty">no data yet</text>'
        )
    else:
        largest = max(value for _, value in points) or 1.0
        slot = width / len(points)
        bar = max(2.0, min(48.0, slot * 0.7))
        for i, (label, value) in enumerate(points):
            h = plot * value / largest
            x = i * slot + (slot - bar) / 2
            cx = i * slot + slot / 2
            parts.append(
                f'<rect x="{x:.1f}" y="{top + plot - h:.1f}" width="{bar:.1f}" height="{h:.1f}" class="bar">'
                f"<title>{escape(label)}: {value:g}</title></rect>"
            )
            parts.append(
                f'<text x="{cx:.1f}" y="{top + plot - h - 4:.1f}" text-anchor="middle">{compact(value)}</text>'
            )
            parts.append(f'<text x="{cx:.1f}" y="{height - 10}" text-anchor="middle">{escape(label[:16])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def day_points(totals: list[DayTokens], days: int, last: str) -> list[tuple[str, float]]:
    """One (MM-DD, tokens) bar for each of the ``days`` days ending with ``last``, 0 where none."""
    by_day = {point.day: point.total_tokens for point in totals}
    end = date.fromisoformat(last)
    labels = [(end - timedelta(days=n)).isoformat() for n in range(days - 1, -1, -1)]
    return [(day[5:], by_day.get(day, 0)) for day in labels]
