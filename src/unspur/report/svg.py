"""Charts as inline SVG written by hand: no JavaScript, no CDN, no plotting library.

Every function returns one ``<svg>`` element as a string, ready to be placed in an HTML
page. Every piece of text that reaches the markup (titles, category and series names,
numbers) goes through :func:`html.escape`, so a label such as ``<script>`` is drawn as
text. Values are plain floats; ``None`` (or NaN) is a missing value: no bar, a gap in a
line.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from html import escape

#: Colour-blind-safe palette (Okabe & Ito), cycled over series.
PALETTE = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#56B4E9",
    "#D55E00",
    "#F0E442",
    "#000000",
)


def colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def percent(value: float | None) -> str:
    """``0.7133`` -> ``"71.33%"``; the format every number of the reports uses."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.2f}%"


def _missing(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _nice_max(value: float) -> float:
    """A round upper bound for an axis: 1, 2, 2.5, 5 times a power of ten."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value:
            return step * power
    return 10 * power


def _ticks(top: float, n: int = 4) -> list[float]:
    return [top * i / n for i in range(n + 1)]


def _legend(names: Sequence[str], x: float, y: float) -> list[str]:
    parts, offset = [], 0.0
    for i, name in enumerate(names):
        parts.append(
            f'<rect x="{x + offset:.1f}" y="{y - 9:.1f}" width="10" height="10" '
            f'fill="{colour(i)}"/>'
        )
        parts.append(
            f'<text x="{x + offset + 14:.1f}" y="{y:.1f}" font-size="11">{escape(name)}</text>'
        )
        offset += 24 + 6.5 * len(name)
    return parts


def bar_chart(
    categories: Sequence[str],
    series: Sequence[tuple[str, Sequence[float | None]]],
    *,
    title: str = "",
    y_max: float | None = 1.0,
    fmt: Callable[[float | None], str] = percent,
    errors: Sequence[Sequence[float | None]] | None = None,
    height: int = 260,
) -> str:
    """Grouped vertical bars: one cluster per category, one bar per series.

    ``y_max=None`` scales the axis to the data (counts); every bar carries its value,
    written with ``fmt``, above it. ``errors`` (same shape as the series' values) draws
    +- whiskers (e.g. a standard deviation over seeds).
    """
    n_series = max(1, len(series))
    values = [v for _, vs in series for v in vs if not _missing(v)]
    top = y_max if y_max is not None else _nice_max(max(values, default=1.0))
    left, right, upper, lower = 48, 12, 34, 58
    slot = max(84, 14 * n_series + 24)
    width = left + right + slot * max(1, len(categories))
    width = max(width, 320)
    plot_h = height - upper - lower
    bar_w = (slot - 12) / n_series
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" class="chart">',
        f"<title>{escape(title)}</title>",
        f'<text x="{left}" y="14" font-size="13" font-weight="bold">{escape(title)}</text>',
    ]
    for tick in _ticks(top):
        y = upper + plot_h * (1 - tick / top)
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" '
            'stroke="#ddd" stroke-width="1"/>'
        )
        parts.append(
            f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">'
            f"{escape(fmt(tick) if y_max == 1.0 else f'{tick:g}')}</text>"
        )
    for c, category in enumerate(categories):
        x0 = left + slot * c + 6
        for s, (_, vs) in enumerate(series):
            value = vs[c] if c < len(vs) else None
            x = x0 + bar_w * s
            if _missing(value):
                parts.append(
                    f'<text x="{x + bar_w / 2:.1f}" y="{upper + plot_h - 3:.1f}" font-size="9" '
                    'text-anchor="middle" fill="#888">n/a</text>'
                )
                continue
            h = plot_h * min(max(value, 0.0), top) / top
            y = upper + plot_h - h
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(bar_w - 2, 1):.1f}" '
                f'height="{h:.1f}" fill="{colour(s)}"><title>'
                f"{escape(series[s][0])} - {escape(category)}: {escape(fmt(value))}"
                "</title></rect>"
            )
            error = errors[s][c] if errors is not None and c < len(errors[s]) else None
            if not _missing(error) and error > 0:
                hi = upper + plot_h * (1 - min(value + error, top) / top)
                lo = upper + plot_h * (1 - max(value - error, 0.0) / top)
                mid = x + (bar_w - 2) / 2
                parts.append(
                    f'<line x1="{mid:.1f}" x2="{mid:.1f}" y1="{hi:.1f}" y2="{lo:.1f}" '
                    'stroke="#333" stroke-width="1"/>'
                )
            parts.append(
                f'<text x="{x + (bar_w - 2) / 2:.1f}" y="{y - 3:.1f}" font-size="9" '
                f'text-anchor="middle">{escape(fmt(value))}</text>'
            )
        parts.append(
            f'<text x="{left + slot * c + slot / 2:.1f}" y="{upper + plot_h + 14:.1f}" '
            f'font-size="10" text-anchor="middle">{escape(_clip(category, slot))}'
            f"<title>{escape(category)}</title></text>"
        )
    parts.append(
        f'<line x1="{left}" x2="{width - right}" y1="{upper + plot_h}" y2="{upper + plot_h}" '
        'stroke="#333"/>'
    )
    parts += _legend([name for name, _ in series], left, height - 12)
    parts.append("</svg>")
    return "\n".join(parts)


def _clip(text: str, slot: float) -> str:
    limit = max(4, int(slot / 6))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def line_chart(
    series: Sequence[tuple[str, Sequence[tuple[float, float | None]]]],
    *,
    title: str = "",
    x_label: str = "epoch",
    y_range: tuple[float, float] | None = None,
    fmt: Callable[[float], str] = lambda v: f"{v:.3g}",
    width: int = 420,
    height: int = 240,
) -> str:
    """Lines over ``x`` (one per series) with a point at every value and a legend."""
    points = [(x, y) for _, xy in series for x, y in xy if not _missing(y)]
    left, right, upper, lower = 52, 14, 30, 52
    plot_w, plot_h = width - left - right, height - upper - lower
    xs = [x for x, _ in points] or [0.0, 1.0]
    ys = [y for _, y in points] or [0.0, 1.0]
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    if y_range is not None:
        y_lo, y_hi = y_range
    else:
        y_lo, y_hi = min(0.0, min(ys)), _nice_max(max(ys))
    if y_hi == y_lo:
        y_hi = y_lo + 1

    def px(x: float) -> float:
        return left + plot_w * (x - x_lo) / (x_hi - x_lo)

    def py(y: float) -> float:
        return upper + plot_h * (1 - (y - y_lo) / (y_hi - y_lo))

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" class="chart">',
        f"<title>{escape(title)}</title>",
        f'<text x="{left}" y="14" font-size="13" font-weight="bold">{escape(title)}</text>',
    ]
    for tick in _ticks(y_hi - y_lo):
        value = y_lo + tick
        y = py(value)
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
        )
        parts.append(
            f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">'
            f"{escape(fmt(value))}</text>"
        )
    for value in sorted({x_lo, x_hi, *(x for x in xs if float(x).is_integer())}):
        if len(set(xs)) > 12 and value not in (x_lo, x_hi):
            continue
        parts.append(
            f'<text x="{px(value):.1f}" y="{upper + plot_h + 14:.1f}" font-size="10" '
            f'text-anchor="middle">{escape(f"{value:g}")}</text>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{upper + plot_h + 28:.1f}" font-size="10" '
        f'text-anchor="middle">{escape(x_label)}</text>'
    )
    for s, (name, xy) in enumerate(series):
        segment: list[str] = []
        segments: list[list[str]] = []
        for x, y in xy:
            if _missing(y):
                if segment:
                    segments.append(segment)
                segment = []
                continue
            segment.append(f"{px(x):.1f},{py(y):.1f}")
            parts.append(
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{colour(s)}">'
                f"<title>{escape(name)} @ {escape(f'{x:g}')}: {escape(fmt(y))}</title></circle>"
            )
        if segment:
            segments.append(segment)
        for segment in segments:
            if len(segment) > 1:
                parts.append(
                    f'<polyline points="{" ".join(segment)}" fill="none" '
                    f'stroke="{colour(s)}" stroke-width="1.8"/>'
                )
    parts.append(
        f'<rect x="{left}" y="{upper}" width="{plot_w}" height="{plot_h}" fill="none" '
        'stroke="#333"/>'
    )
    parts += _legend([name for name, _ in series], left, height - 8)
    parts.append("</svg>")
    return "\n".join(parts)
