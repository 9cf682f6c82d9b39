"""Charts as inline SVG written by hand: no JavaScript, no CDN, no plotting library.

Every function returns one ``<svg>`` element as a string, ready to be placed in an HTML
page. Every piece of text that reaches the markup (titles, category and series names,
numbers) goes through :func:`html.escape`, so a label such as ``<script>`` is drawn as
text. Values are plain floats; ``None`` (or NaN) is a missing value: no bar, a gap in a
line.

Layout without a browser: SVG text does not wrap and its width is only known once a
browser has laid it out, so :func:`text_width` estimates it from per-character advance
widths of DejaVu Sans (the default sans-serif of Linux, and wider than Helvetica, Arial
or Segoe UI, so the estimate errs on the wide side). Every label is placed from that
estimate so that none overlaps another, runs through a whisker or leaves the chart:
long category names wrap onto several lines (:func:`wrap`), value labels sit at the end
of their own bar (one row per bar), legends wrap onto several rows. The charts are drawn
at the page's text width (:data:`CHART_WIDTH`) and shrink with the page on a narrower
screen (``max-width: 100%`` in the report's style sheet).
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

#: Width of a full-width chart: the report's text column (``max-width`` of its body).
CHART_WIDTH = 1100
#: Width of a chart drawn two to a row (the row's 16 px gap between them).
HALF_WIDTH = (CHART_WIDTH - 16) // 2

# Advance widths of DejaVu Sans in em (its regular face); characters not listed take
# ``_WIDE`` (symbols such as ✓ or ±, letters of other scripts): an overestimate.
_ADVANCE = {
    **dict.fromkeys(" ,.:;!|'`il", 0.32),
    **dict.fromkeys("ijlI", 0.30),
    **dict.fromkeys("ftr()[]{}/\\-", 0.41),
    **dict.fromkeys('0123456789$_?sczJ"', 0.64),
    **dict.fromkeys("abdeghknopquvxyLFTZ", 0.64),
    **dict.fromkeys("ABCEKPRSVXY#&", 0.70),
    **dict.fromkeys("DGHNOQU", 0.79),
    **dict.fromkeys("mwMW%@=+<>~*^", 1.0),
}
_WIDE = 1.0
_BOLD = 1.12  # DejaVu Sans Bold is about 10% wider than the regular face
_SAFETY = 1.04


def colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def percent(value: float | None) -> str:
    """``0.7133`` -> ``"71.33%"``; the format every number of the reports uses."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.2f}%"


def text_width(text: str, size: float, bold: bool = False) -> float:
    """Estimated width in px of ``text`` at font size ``size`` (errs on the wide side)."""
    em = sum(_ADVANCE.get(ch, _WIDE) for ch in text)
    return em * size * _SAFETY * (_BOLD if bold else 1.0)


def wrap(text: str, max_width: float, size: float, bold: bool = False) -> list[str]:
    """``text`` broken into lines no wider than ``max_width`` (estimated).

    Breaks at spaces; a word wider than a line on its own is split between characters.
    Never returns an empty list, and never drops a character.
    """
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if text_width(candidate, size, bold) <= max_width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = ""
        if text_width(word, size, bold) <= max_width:
            current = word
            continue
        for piece in _pieces(word):  # a word too long for a line: break after / _ . -
            if current and text_width(current + piece, size, bold) > max_width:
                lines.append(current)
                current = ""
            for ch in piece:  # a piece still too long: between characters
                if current and text_width(current + ch, size, bold) > max_width:
                    lines.append(current)
                    current = ""
                current += ch
    lines.append(current)
    return lines


def _pieces(word: str) -> list[str]:
    """``word`` cut after each ``/ _ . -`` (the places a long name breaks best)."""
    pieces, current = [], ""
    for ch in word:
        current += ch
        if ch in "/_.-":
            pieces.append(current)
            current = ""
    return [*pieces, current] if current else pieces


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


def _count_axis(largest: float) -> tuple[float, list[float]]:
    """Top and ticks of an axis of counts: whole numbers, a round step, at most 6 ticks."""
    step = 1.0
    while largest / step > 5:
        for factor in (2, 2.5, 2):  # 1, 2, 5, 10, 20, 50, ...
            step *= factor
            if largest / step <= 5:
                break
    top = max(step, math.ceil(largest / step) * step)
    return top, [i * step for i in range(int(round(top / step)) + 1)]


def _text_lines(
    lines: Sequence[str],
    x: float,
    y: float,
    size: float,
    *,
    anchor: str = "start",
    bold: bool = False,
    css: str = "",
    tooltip: str = "",
) -> str:
    """One ``<text>`` with a ``<tspan>`` per line; ``y`` is the first line's baseline."""
    spans = "".join(
        f'<tspan x="{x:.1f}" dy="{0 if i == 0 else round(size * 1.25, 2)}">{escape(line)}</tspan>'
        for i, line in enumerate(lines)
    )
    weight = ' font-weight="bold"' if bold else ""
    klass = f' class="{css}"' if css else ""
    title = f"<title>{escape(tooltip)}</title>" if tooltip else ""
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"'
        f"{weight}{klass}>{title}{spans}</text>"
    )


def _title(title: str, width: float, x: float) -> tuple[list[str], float]:
    """The title's markup and the height it takes (wrapped to the chart's width)."""
    if not title:
        return [], 6.0
    lines = wrap(title, width - x - 8, 13, bold=True)
    return [_text_lines(lines, x, 16, 13, bold=True, css="title")], 8 + 16.25 * len(lines)


def _legend(names: Sequence[str], x: float, y: float, width: float) -> tuple[list[str], float]:
    """Swatches and names in rows no wider than ``width - x``, the first row's top at ``y``.

    A name too long for a row wraps onto several lines. Returns the markup and the
    height used.
    """
    size, line_h, gap = 12, 12 * 1.25, 5
    parts, dx, row_top, row_h = [], 0.0, y, line_h
    for i, name in enumerate(names):
        lines = wrap(name, width - x - 24, size)
        item_w = 14 + max(text_width(line, size) for line in lines) + 16
        if dx > 0 and x + dx + item_w > width - 4:
            dx, row_top, row_h = 0.0, row_top + row_h + gap, line_h
        parts.append(
            f'<rect x="{x + dx:.1f}" y="{row_top + 2:.1f}" width="10" height="10" '
            f'fill="{colour(i)}" class="swatch"/>'
        )
        parts.append(_text_lines(lines, x + dx + 14, row_top + size, size, css="legend"))
        row_h = max(row_h, len(lines) * line_h)
        dx += item_w
    return parts, row_top + row_h + gap - y


def bar_chart(
    categories: Sequence[str],
    series: Sequence[tuple[str, Sequence[float | None]]],
    *,
    title: str = "",
    y_max: float | None = 1.0,
    fmt: Callable[[float | None], str] = percent,
    errors: Sequence[Sequence[float | None]] | None = None,
    width: int = CHART_WIDTH,
) -> str:
    """Grouped horizontal bars: one block per category, one bar (row) per series.

    Horizontal so that category names of any length fit: they wrap onto as many lines
    as they need in the left margin, and the block grows to hold them. Every bar carries
    its value, written with ``fmt``, just past its end (past the whisker when there is
    one), on the bar's own row, so value labels cannot collide. ``y_max=None`` scales
    the value axis to the data (counts); ``errors`` (same shape as the series' values)
    draws +- whiskers (e.g. a standard deviation over seeds) and adds ``± error`` to the
    label.
    """
    values = [v for _, vs in series for v in vs if not _missing(v)]
    if y_max is None:
        top, ticks = _count_axis(max(values, default=1.0))
    else:
        top, ticks = y_max, _ticks(y_max)
    cat_size, value_size, tick_size = 13, 12, 11
    bar_h, bar_gap = 15, 5
    block_pad = 8 if len(categories) <= 20 else 3  # many groups: a shorter chart

    def error_of(s: int, c: int) -> float | None:
        if errors is None or s >= len(errors) or c >= len(errors[s]):
            return None
        e = errors[s][c]
        return None if _missing(e) or e <= 0 else e

    def label_of(s: int, c: int) -> str:
        vs = series[s][1]
        value = vs[c] if c < len(vs) else None
        if _missing(value):
            return "n/a"
        error = error_of(s, c)
        return fmt(value) if error is None else f"{fmt(value)} ± {fmt(error)}"

    labels = [[label_of(s, c) for c in range(len(categories))] for s in range(len(series))]
    value_w = max((text_width(t, value_size) for row in labels for t in row), default=0.0)
    right = value_w + 12
    # Category names take up to 30% of the width, wrapped; the rest is the plot.
    longest = max((text_width(c, cat_size) for c in categories), default=0.0)
    label_w = min(longest, 0.3 * width)
    left = label_w + 16
    plot_w = max(width - left - right, 60.0)
    wrapped = [wrap(c, label_w, cat_size) for c in categories]

    parts, title_h = _title(title, width, 8)
    legend, legend_h = _legend([name for name, _ in series], left, title_h, width)
    upper = title_h + legend_h + 4
    rows_h = len(series) * (bar_h + bar_gap) - bar_gap
    y = upper
    blocks = []
    for lines in wrapped:
        text_h = len(lines) * cat_size * 1.25
        block_h = max(rows_h, text_h) + 2 * block_pad
        blocks.append((y, block_h))
        y += block_h
    plot_bottom = y
    height = plot_bottom + 26

    def px(value: float) -> float:
        return left + plot_w * min(max(value, 0.0), top) / top

    head = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" '
        f'height="{height:.0f}" viewBox="0 0 {width} {height:.0f}" class="chart">',
        f"<title>{escape(title)}</title>",
    ]
    body = []
    for c, (block_top, block_h) in enumerate(blocks):
        if c % 2 == 1:
            body.append(
                f'<rect x="0" y="{block_top:.1f}" width="{width}" height="{block_h:.1f}" '
                'fill="#f5f5f5" class="band"/>'
            )
    for tick in ticks:
        x = px(tick)
        body.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{upper:.1f}" y2="{plot_bottom:.1f}" '
            'stroke="#ddd" stroke-width="1" class="grid"/>'
        )
        text = fmt(tick) if y_max is not None else f"{tick:g}"
        anchor = "end" if tick == top else ("start" if tick == 0 else "middle")
        body.append(_text_lines([text], x, plot_bottom + 15, tick_size, anchor=anchor, css="tick"))
    for c, category in enumerate(categories):
        block_top, block_h = blocks[c]
        lines = wrapped[c]
        text_h = len(lines) * cat_size * 1.25
        first_baseline = block_top + (block_h - text_h) / 2 + cat_size
        body.append(
            _text_lines(lines, 8, first_baseline, cat_size, css="category", tooltip=category)
        )
        row0 = block_top + (block_h - rows_h) / 2
        for s, (name, vs) in enumerate(series):
            value = vs[c] if c < len(vs) else None
            bar_y = row0 + s * (bar_h + bar_gap)
            baseline = bar_y + bar_h / 2 + value_size * 0.36
            if _missing(value):
                body.append(_text_lines(["n/a"], left + 4, baseline, value_size, css="value"))
                continue
            end = px(value)
            body.append(
                f'<rect x="{left:.1f}" y="{bar_y:.1f}" width="{max(end - left, 0.5):.1f}" '
                f'height="{bar_h}" fill="{colour(s)}" class="bar"><title>'
                f"{escape(name)} - {escape(category)}: {escape(labels[s][c])}"
                "</title></rect>"
            )
            error = error_of(s, c)
            if error is not None:
                lo, hi = px(value - error), px(value + error)
                mid = bar_y + bar_h / 2
                body.append(
                    f'<line x1="{lo:.1f}" x2="{hi:.1f}" y1="{mid:.1f}" y2="{mid:.1f}" '
                    'stroke="#222" stroke-width="1.2" class="whisker"/>'
                )
                for x in (lo, hi):
                    body.append(
                        f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{mid - 4:.1f}" '
                        f'y2="{mid + 4:.1f}" stroke="#222" stroke-width="1.2" class="whisker"/>'
                    )
                end = max(end, hi)
            body.append(_text_lines([labels[s][c]], end + 5, baseline, value_size, css="value"))
    body.append(
        f'<line x1="{left:.1f}" x2="{left:.1f}" y1="{upper:.1f}" y2="{plot_bottom:.1f}" '
        'stroke="#333" class="axis"/>'
    )
    return "\n".join([*head, *body, *parts, *legend, "</svg>"])


def _x_ticks(xs: Sequence[float], lo: float, hi: float, plot_w: float) -> list[float]:
    """Integer ticks (or the data's x values) spaced at least ~48 px apart."""
    if all(float(x).is_integer() for x in xs):
        room = max(1, int(plot_w // 48))
        span = hi - lo
        step = 1.0
        for candidate in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000):
            step = float(candidate)
            if span / step <= room:
                break
        start = math.ceil(lo / step) * step
        ticks = [start + i * step for i in range(int((hi - start) // step) + 1)]
        return ticks or [lo, hi]
    return [lo, hi]


def line_chart(
    series: Sequence[tuple[str, Sequence[tuple[float, float | None]]]],
    *,
    title: str = "",
    x_label: str = "epoch",
    y_range: tuple[float, float] | None = None,
    fmt: Callable[[float], str] = lambda v: f"{v:.3g}",
    width: int = HALF_WIDTH,
    height: int = 260,
) -> str:
    """Lines over ``x`` (one per series) with a legend, and a dot (with its value as a
    tooltip) at every point while the points are at least 8 px apart.

    ``height`` is the plot's height plus axes; the title and legend add their own rows.
    """
    points = [(x, y) for _, xy in series for x, y in xy if not _missing(y)]
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
    tick_size = 11
    y_ticks = [y_lo + t for t in _ticks(y_hi - y_lo)]
    left = max(text_width(fmt(v), tick_size) for v in y_ticks) + 12
    right = 16  # room for half of the last x tick label
    parts, title_h = _title(title, width, left)
    upper = title_h + 6
    plot_w = width - left - right
    plot_h = height - 52
    lower_axis = upper + plot_h
    legend, legend_h = _legend([name for name, _ in series], left, lower_axis + 42, width)
    total_h = lower_axis + 42 + legend_h

    def px(x: float) -> float:
        return left + plot_w * (x - x_lo) / (x_hi - x_lo)

    def py(y: float) -> float:
        return upper + plot_h * (1 - (y - y_lo) / (y_hi - y_lo))

    head = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" '
        f'height="{total_h:.0f}" viewBox="0 0 {width} {total_h:.0f}" class="chart">',
        f"<title>{escape(title)}</title>",
    ]
    body = []
    for value in y_ticks:
        y = py(value)
        body.append(
            f'<line x1="{left:.1f}" x2="{width - right:.1f}" y1="{y:.1f}" y2="{y:.1f}" '
            'stroke="#ddd" class="grid"/>'
        )
        body.append(_text_lines([fmt(value)], left - 4, y + 4, tick_size, anchor="end", css="tick"))
    for value in _x_ticks(xs, x_lo, x_hi, plot_w):
        body.append(
            _text_lines(
                [f"{value:g}"], px(value), lower_axis + 18, tick_size, anchor="middle", css="tick"
            )
        )
    body.append(
        _text_lines([x_label], left + plot_w / 2, lower_axis + 33, tick_size, anchor="middle")
    )
    dots = plot_w / max(len(set(xs)), 1) >= 8  # a dot per point while they stay apart
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
            if dots:
                body.append(
                    f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{colour(s)}">'
                    f"<title>{escape(name)} @ {escape(f'{x:g}')}: {escape(fmt(y))}</title></circle>"
                )
        if segment:
            segments.append(segment)
        for segment in segments:
            if len(segment) > 1:
                body.append(
                    f'<polyline points="{" ".join(segment)}" fill="none" '
                    f'stroke="{colour(s)}" stroke-width="1.8"/>'
                )
    body.append(
        f'<rect x="{left:.1f}" y="{upper:.1f}" width="{plot_w:.1f}" height="{plot_h}" '
        'fill="none" stroke="#333"/>'
    )
    return "\n".join([*head, *body, *parts, *legend, "</svg>"])
