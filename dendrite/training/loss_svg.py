"""A loss curve as a small self-contained SVG, written without a plotting library.

The training run logs ``step, loss`` rows; MODEL.md shows the curve. plotly's static export
(kaleido) and matplotlib are not dependencies, and an SVG of a few polylines is a few kilobytes
of text that diffs and renders anywhere. Loss is drawn on a log scale (it spans decades).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

WIDTH, HEIGHT = 640, 360
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 32, 48
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def _nice_steps(lo: float, hi: float) -> list[float]:
    """Round tick values between ``lo`` and ``hi`` (linear axis)."""
    span = max(hi - lo, 1e-12)
    unit = 10 ** math.floor(math.log10(span / 5))
    step = next(m * unit for m in (1, 2, 5, 10) if span / (m * unit) <= 6)
    start = math.ceil(lo / step) * step
    return [start + k * step for k in range(int((hi - start) / step) + 1)]


def loss_svg(
    series: Mapping[str, Sequence[tuple[float, float]]], title: str = "training loss"
) -> str:
    """SVG text of ``{name: [(step, loss), ...]}`` with a log-scale y axis."""
    points = [(x, y) for s in series.values() for x, y in s if y > 0]
    if not points:
        raise ValueError("no positive loss values to plot")
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    ly0, ly1 = (math.log10(min(p[1] for p in points)), math.log10(max(p[1] for p in points)))
    ly0, ly1 = math.floor(ly0 * 4) / 4, math.ceil(ly1 * 4) / 4
    x1 = x1 if x1 > x0 else x0 + 1
    ly1 = ly1 if ly1 > ly0 else ly0 + 1
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return TOP + (ly1 - math.log10(y)) / (ly1 - ly0) * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="18" text-anchor="middle" font-size="13">{title}</text>',
        f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>',
    ]
    for tick in _nice_steps(x0, x1):
        x = px(tick)
        out.append(
            f'<line x1="{x:.1f}" y1="{TOP + ph}" x2="{x:.1f}" y2="{TOP + ph + 4}" stroke="#888"/>'
        )
        out.append(f'<text x="{x:.1f}" y="{TOP + ph + 16}" text-anchor="middle">{tick:g}</text>')
    for decade in range(math.floor(ly0), math.ceil(ly1) + 1):
        for m in (1, 2, 5):
            v = m * 10.0**decade
            if ly0 <= math.log10(v) <= ly1:
                y = py(v)
                out.append(
                    f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + pw}" y2="{y:.1f}" stroke="#eee"/>'
                )
                out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>')
    out.append(f'<text x="{LEFT + pw / 2}" y="{HEIGHT - 10}" text-anchor="middle">step</text>')
    out.append(
        f'<text x="14" y="{TOP + ph / 2}" text-anchor="middle" '
        f'transform="rotate(-90 14 {TOP + ph / 2})">loss (log scale)</text>'
    )
    for k, (name, pts) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts if y > 0)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        ly = TOP + 14 + 16 * k
        out.append(
            f'<line x1="{LEFT + pw - 150}" y1="{ly - 4}" x2="{LEFT + pw - 130}" '
            f'y2="{ly - 4}" stroke="{colour}" stroke-width="2"/>'
        )
        out.append(f'<text x="{LEFT + pw - 124}" y="{ly}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_loss_svg(
    path: str | Path, series: Mapping[str, Sequence[tuple[float, float]]], title: str
) -> None:
    Path(path).write_text(loss_svg(series, title))


__all__ = ["loss_svg", "write_loss_svg"]
