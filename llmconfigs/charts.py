"""Charts drawn as SVG on the server for the admin's usage page: no script and no style attribute (the admin's CSP
allows neither inline), only presentation attributes; every label is escaped."""
from __future__ import annotations

import math
from collections.abc import Sequence

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

PALETTE = ("#2f7ed8", "#d9534f", "#f0ad4e", "#5cb85c", "#8e44ad", "#16a085", "#7f8c8d", "#c0392b")
FONT = 'font-family="sans-serif" font-size="11" fill="#444"'
LEFT, RIGHT, TOP, BOTTOM = 64, 12, 12, 44


def _nice_top(value: float) -> float:
    """The smallest 1, 2 or 5 x 10^n at or above `value` (the top of the value axis)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(step * power for step in (1, 2, 5, 10) if step * power >= value)


def _number(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:.3g}M"
    if value >= 1000:
        return f"{value / 1000:.3g}k"
    return f"{value:.4g}"


def _legend(names: Sequence[str], x: float, y: float) -> list[str]:
    parts = []
    for i, name in enumerate(names):
        left = x + i * 150
        parts.append(f'<rect x="{left}" y="{y - 9}" width="10" height="10" fill="{PALETTE[i % len(PALETTE)]}"/>'
                     f'<text x="{left + 14}" y="{y}" {FONT}>{escape(name[:20])}</text>')
    return parts


def _svg_open(title: str, width: int, height: int) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="usage-chart" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}"><title>{escape(title)}</title>')


def column_chart(*, title: str, labels: Sequence[str], series: Sequence[tuple[str, Sequence[float]]],
                 unit: str = "", width: int = 1180, height: int = 240) -> SafeString:
    """Stacked columns: one column per label, one colour per series (value axis from 0, a legend below)."""
    plot_w, plot_h = width - LEFT - RIGHT, height - TOP - BOTTOM
    totals = [sum(values[i] for _, values in series) for i in range(len(labels))]
    top = _nice_top(max(totals, default=0))
    parts = [_svg_open(title, width, height)]
    for tick in range(5):
        value = top * tick / 4
        y = TOP + plot_h - plot_h * tick / 4
        parts.append(f'<line x1="{LEFT}" x2="{width - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e3e3"/>'
                     f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" {FONT}>{_number(value)}{unit}</text>')
    if labels:
        slot = plot_w / len(labels)
        bar = max(slot * 0.8, 1)
        every = max(1, math.ceil(len(labels) / 12))  # at most about 12 axis labels, however many columns
        for i, label in enumerate(labels):
            x = LEFT + i * slot + (slot - bar) / 2
            base = TOP + plot_h
            for s, (name, values) in enumerate(series):
                h = plot_h * values[i] / top
                if h <= 0:
                    continue
                base -= h
                parts.append(f'<rect x="{x:.1f}" y="{base:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                             f'fill="{PALETTE[s % len(PALETTE)]}"><title>{escape(label)} {escape(name)}: '
                             f'{_number(values[i])}{unit}</title></rect>')
            if i % every == 0:
                parts.append(f'<text x="{x + bar / 2:.1f}" y="{TOP + plot_h + 14}" text-anchor="middle" {FONT}>'
                             f'{escape(label)}</text>')
    else:
        parts.append(f'<text x="{width / 2}" y="{TOP + plot_h / 2}" text-anchor="middle" {FONT}>No calls in this '
                     f'period.</text>')
    parts.extend(_legend([name for name, _ in series], LEFT, height - 8))
    parts.append("</svg>")
    return mark_safe("".join(parts))  # noqa: S308 - built above from numbers and escaped labels only


def bar_chart(*, title: str, rows: Sequence[tuple[str, Sequence[float | None]]], names: Sequence[str],
              unit: str = "", width: int = 580) -> SafeString:
    """Horizontal bars: one group per row (e.g. a model), one bar per name (e.g. p50 and p95)."""
    label_w, bar_h, gap = 170, 12, 10
    group_h = bar_h * len(names) + gap
    height = TOP + group_h * max(len(rows), 1) + 30
    plot_w = width - label_w - RIGHT - 50
    top = _nice_top(max((v or 0 for _, values in rows for v in values), default=0))
    parts = [_svg_open(title, width, height)]
    if not rows:
        parts.append(f'<text x="{width / 2}" y="{TOP + 12}" text-anchor="middle" {FONT}>No calls in this '
                     f'period.</text>')
    for r, (label, values) in enumerate(rows):
        y0 = TOP + r * group_h
        parts.append(f'<text x="{label_w - 6}" y="{y0 + bar_h * len(names) / 2 + 4:.1f}" text-anchor="end" {FONT}>'
                     f'{escape(label[:28])}</text>')
        for s, value in enumerate(values):
            if value is None:
                continue
            w = max(plot_w * value / top, 1)
            y = y0 + s * bar_h
            parts.append(f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h - 2}" '
                         f'fill="{PALETTE[s % len(PALETTE)]}"><title>{escape(label)} {escape(names[s])}: '
                         f'{value:g}{unit}</title></rect>'
                         f'<text x="{label_w + w + 4:.1f}" y="{y + bar_h - 3}" {FONT}>{_number(value)}{unit}</text>')
    parts.extend(_legend(names, label_w, height - 8))
    parts.append("</svg>")
    return mark_safe("".join(parts))  # noqa: S308 - built above from numbers and escaped labels only
