"""Line charts drawn on the server as inline SVG (no chart library, nothing fetched: the home network may
be offline). Colours come from the page's style sheet through the series' CSS class, so the charts follow
the light and dark themes. The SVG scales to its card's width (on a phone, the style sheet draws its text
larger, so that it stays legible scaled down); the legend is HTML above it, and wraps."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from html import escape

WIDTH, HEIGHT = 800, 230
LEFT, RIGHT, TOP, BOTTOM = 64, 28, 20, 36
MAX_DOTS = 40  # a longer series is drawn as a line only


@dataclass
class Series:
    """One line: its name (legend), CSS class (colour) and points; `hollow` marks points by index."""

    name: str
    css: str
    points: list[tuple[float, float]]
    hollow: set[int] = field(default_factory=set)


def line_chart(
    series: list[Series],
    *,
    label: str,
    y_range: tuple[float, float] | None = None,
    y_format: Callable[[float], str] = lambda v: f"{v:g}",
    x_ticks: list[tuple[float, str]] | None = None,
    x_format: Callable[[float], str] = lambda v: f"{v:g}",
) -> str:
    """An SVG line chart of `series` (a dot with a tooltip per point, for series of up to MAX_DOTS
    points) under its legend (HTML); `label` is the chart's accessible name. Without `x_ticks` or
    `y_range`, round values are chosen."""
    points = [p for s in series for p in s.points]
    if not points:
        return ""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    y_ticks = nice_ticks(*(y_range or (min(0.0, min(ys)), max(ys))))
    y0, y1 = y_ticks[0], y_ticks[-1]
    inner_w, inner_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * inner_w

    def sy(y: float) -> float:
        y = min(max(y, y0), y1)
        return TOP + (1 - (y - y0) / (y1 - y0)) * inner_h

    legend = "".join(f'<span class="{s.css}">&#9632; {escape(s.name)}</span>' for s in series)
    out = [
        f'<div class="legend">{legend}</div>'
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(label)}" '
        'xmlns="http://www.w3.org/2000/svg">'
    ]
    for y in y_ticks:  # horizontal grid lines with their values
        at = sy(y)
        out.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{at:.1f}" y2="{at:.1f}"/>'
            f'<text class="tick" x="{LEFT - 6}" y="{at:.1f}" text-anchor="end" dominant-baseline="middle">'
            f"{escape(y_format(y))}</text>"
        )
    ticks = x_ticks if x_ticks is not None else [(x, "") for x in nice_ticks(x0, x1) if x0 <= x <= x1]
    for x, text in ticks:
        anchor = "end" if x >= x1 else "middle"  # the last one ends at the edge (its text may be large)
        out.append(
            f'<text class="tick" x="{sx(x):.1f}" y="{HEIGHT - 8}" text-anchor="{anchor}">'
            f"{escape(text or x_format(x))}</text>"
        )
    for s in series:
        if len(s.points) > 1:
            line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s.points)
            out.append(f'<polyline class="line {s.css}" points="{line}"/>')
        for i, (x, y) in enumerate(s.points if len(s.points) <= MAX_DOTS else []):
            kind = "dot hollow" if i in s.hollow else "dot"
            out.append(
                f'<circle class="{kind} {s.css}" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5">'
                f"<title>{escape(s.name)}: {escape(y_format(y))} ({escape(x_format(x))})</title></circle>"
            )
    out.append("</svg>")
    return "".join(out)


def nice_ticks(lo: float, hi: float, count: int = 4) -> list[float]:
    """About `count` + 1 round values (steps of 1, 2, 2.5 or 5 times a power of ten) covering lo..hi."""
    if hi <= lo:
        lo, hi = lo - 1, lo + 1
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first, last = math.floor(lo / step), math.ceil(hi / step)
    return [round(i * step, 10) for i in range(first, last + 1)]
