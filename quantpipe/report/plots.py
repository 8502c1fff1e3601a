"""The report's plots as inline SVG strings (matplotlib, Agg-free SVG canvas, no pyplot state).

Each function builds its own `Figure` (never pyplot's global figure manager, so nothing leaks between
calls or into a user's interactive session) and returns SVG text ready to paste into report.html.
Output is byte-for-byte reproducible: the SVG id salt is fixed per plot and no date is written, so two
reports of the same results are identical files.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from quantpipe.deps import require
from quantpipe.report.rundir import TensorHistogram

__all__ = [
    "PRECISION_COLORS",
    "accuracy_vs_latency",
    "accuracy_vs_latency_figure",
    "latency_distributions",
    "sensitivity_bars",
    "activation_histograms",
]

PRECISION_COLORS = {"fp32": "#3b6ea8", "fp16": "#d9822b", "int8": "#2e8b57"}
METHOD_COLORS = {"entropy": "#d62728", "minmax": "#7b3fa0", "mse": "#139c8c", "percentile": "#e69f00", "best": "#1f5fa8"}
"""Fixed per method, so a method has the same colour in every report."""
_OTHER_COLORS = ["#555555", "#8c564b", "#e377c2"]
_BACKEND_MARKERS = {"onnxruntime": "o", "tensorrt": "s", "modelopt": "^"}
_WIDTH = 9.0
"""Inches: at the page's ~860 px plot width, matplotlib's 9 pt text shows at about the page's table size."""
_RC: dict[str, Any] = {
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],  # ships with matplotlib: the same layout on every machine
    "font.size": 9.0,
    "axes.titlesize": 10.0,
    "axes.labelsize": 9.0,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.edgecolor": "#666666",
    "axes.grid": True,
    "grid.color": "#e4e4e4",
    "grid.linewidth": 0.6,
    "xtick.color": "#444444",
    "ytick.color": "#444444",
    "legend.frameon": False,
    "svg.fonttype": "none",  # text stays text: smaller, selectable, crisp in print
}


def _rc(salt: str) -> Any:
    """The report's rcParams with a fixed SVG id salt (typed Any: matplotlib types keys as a Literal set)."""
    return {**_RC, "svg.hashsalt": salt}


def _figure(width: float, height: float, *, constrained: bool = True) -> Any:
    require("matplotlib", purpose="plots in report.html")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained" if constrained else None)


def _svg(fig: Any, key: str) -> str:
    """Render `fig` to inline SVG; `key` salts the element ids so several SVGs can share one page."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context(_rc(f"quantpipe-{key}")):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None}, bbox_inches=None)
    text = buf.getvalue()
    text = text[text.index("<svg"):]  # drop the XML declaration and DOCTYPE: the SVG lives inside HTML
    # Let CSS size the plot: keep the viewBox (aspect ratio), drop the fixed pt width/height.
    text = re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', rf'<svg\1 class="plot" role="img" aria-label="{key}"',
                  text, count=1)
    return text


def _with_rc(func: Any) -> Any:
    """Build the figure under the report's rcParams (fonts, grid) without touching the global ones."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import matplotlib

        with matplotlib.rc_context(_rc("quantpipe")):
            return func(*args, **kwargs)

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper


@_with_rc
def accuracy_vs_latency(points: pd.DataFrame, *, accuracy: str, batch_size: int, accuracy_label: str) -> str:
    """Scatter of accuracy (y) against median latency (x), one labelled point per variant, as inline SVG.

    `points` has columns variant, backend, precision, latency_ms, and `accuracy` (a fraction).
    """
    fig = accuracy_vs_latency_figure(points, accuracy=accuracy, batch_size=batch_size, accuracy_label=accuracy_label)
    return _svg(fig, "accuracy-vs-latency")


@_with_rc
def accuracy_vs_latency_figure(points: pd.DataFrame, *, accuracy: str, batch_size: int, accuracy_label: str) -> Any:
    """The `accuracy_vs_latency` figure; its variant labels are placed so that none overlaps another."""
    fig = _figure(_WIDTH, 3.9)
    ax = fig.add_subplot()
    for _, row in points.iterrows():
        ax.scatter(row["latency_ms"], row[accuracy] * 100, s=70, color=PRECISION_COLORS.get(row["precision"], "#777"),
                   marker=_BACKEND_MARKERS.get(row["backend"], "D"), edgecolor="white", linewidth=1.0, zorder=3)
    ax.set_xlabel(f"median latency at batch size {batch_size} (ms per batch, lower is better)")
    ax.set_ylabel(f"{accuracy_label} (%)")
    lo, hi = points["latency_ms"].min(), points["latency_ms"].max()
    pad = max((hi - lo) * 0.25, hi * 0.08)
    ax.set_xlim(max(0.0, lo - pad), hi + pad * 1.6)  # room on the right for the labels
    ylo, yhi = points[accuracy].min() * 100, points[accuracy].max() * 100
    ypad = max((yhi - ylo) * 0.3, 0.2)
    ax.set_ylim(ylo - ypad, min(100.0 + ypad * 0.2, yhi + ypad))
    handles = [_legend_marker(ax, PRECISION_COLORS[p], "o", p.upper()) for p in PRECISION_COLORS
               if p in set(points["precision"])]
    handles += [_legend_marker(ax, "#888888", m, b) for b, m in _BACKEND_MARKERS.items() if b in set(points["backend"])]
    legend = ax.legend(handles=handles, loc="lower right", fontsize=8, ncol=2)
    _place_labels(fig, ax, [(str(r["variant"]), float(r["latency_ms"]), float(r[accuracy]) * 100)
                            for _, r in points.iterrows()], avoid=[legend])
    return fig


# Offsets (points) tried in turn for a label: right of the marker first, then around it, then further out.
_LABEL_OFFSETS = [(7, 4), (7, -11), (-7, 4), (-7, -11), (0, 10), (0, -17)]
_LABEL_OFFSETS += [(dx * 2, dy * 2) for dx, dy in _LABEL_OFFSETS] + [(dx * 3, dy * 3) for dx, dy in _LABEL_OFFSETS]


def _place_labels(fig: Any, ax: Any, labels: list[tuple[str, float, float]], avoid: list[Any]) -> None:
    """Annotate each (text, x, y), at the first offset whose box overlaps no earlier label, marker or `avoid`.

    Two variants of nearly equal latency and accuracy (ort-fp32 / ort-fp16 on a small model) would otherwise
    print their names over each other. Boxes are measured after a draw, so the layout is the final one.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig) if not isinstance(fig.canvas, FigureCanvasAgg) else fig.canvas
    canvas.draw()
    renderer = canvas.get_renderer()
    taken = [a.get_window_extent(renderer).expanded(1.02, 1.1) for a in avoid]
    for _, x, y in labels:  # the markers themselves (about 9 px across at s=70)
        px, py = ax.transData.transform((x, y))
        taken.append(_box(px - 6, py - 6, px + 6, py + 6))
    axes_box = ax.get_window_extent(renderer)
    for text, x, y in labels:
        best = None
        for i, (dx, dy) in enumerate(_LABEL_OFFSETS):
            far = i >= 6
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=8.5, color="#222222",
                              ha="left" if dx > 0 else "right" if dx < 0 else "center",
                              arrowprops={"arrowstyle": "-", "color": "#999999", "linewidth": 0.6} if far else None)
            box = ann.get_window_extent(renderer)
            inside = axes_box.x0 <= box.x0 and box.x1 <= axes_box.x1 and axes_box.y0 <= box.y0 and box.y1 <= axes_box.y1
            if inside and not any(box.overlaps(t) for t in taken):
                best = (ann, box)
                break
            ann.remove()
        if best is None:  # nowhere free: the first choice, as before
            ann = ax.annotate(text, (x, y), xytext=_LABEL_OFFSETS[0], textcoords="offset points", fontsize=8.5,
                              color="#222222")
            best = (ann, ann.get_window_extent(renderer))
        taken.append(best[1])


def _box(x0: float, y0: float, x1: float, y1: float) -> Any:
    from matplotlib.transforms import Bbox

    return Bbox([[x0, y0], [x1, y1]])


def _legend_marker(ax: Any, color: str, marker: str, label: str) -> Any:
    from matplotlib.lines import Line2D

    return Line2D([], [], linestyle="none", marker=marker, markersize=7, color=color, label=label)


@_with_rc
def latency_distributions(samples: Mapping[int, Sequence[tuple[str, str, Sequence[float]]]]) -> str:
    """Box plots of per-iteration latency: one panel per batch size, one box per variant.

    `samples[batch_size]` is a list of (variant, precision, samples_ms).
    """
    from matplotlib.ticker import FuncFormatter, NullFormatter

    sizes = sorted(samples)
    n_rows = max(len(samples[bs]) for bs in sizes)
    fig = _figure(_WIDTH, 0.5 + len(sizes) * (0.55 + 0.32 * n_rows))
    axes = fig.subplots(len(sizes), 1, squeeze=False)[:, 0]
    for ax, bs in zip(axes, sizes, strict=True):
        rows = list(reversed(samples[bs]))  # first variant on top
        data = [np.asarray(s, dtype=float) for _, _, s in rows]
        parts = ax.boxplot(data, **_horizontal(), widths=0.55, patch_artist=True, showfliers=True,
                           medianprops={"color": "#111111", "linewidth": 1.4},
                           flierprops={"marker": ".", "markersize": 3, "markeredgecolor": "#777777"},
                           whiskerprops={"color": "#777777"}, capprops={"color": "#777777"})
        for patch, (_, prec, _) in zip(parts["boxes"], rows, strict=True):
            patch.set_facecolor(PRECISION_COLORS.get(prec, "#999999"))
            patch.set_alpha(0.75)
            patch.set_edgecolor("#555555")
        ax.set_yticks(range(1, len(rows) + 1), [v for v, _, _ in rows])
        ax.set_title(f"batch size {bs}", loc="left")
        ax.grid(axis="y", visible=False)
        lo = min(float(d.min()) for d in data if d.size)
        hi = max(float(d.max()) for d in data if d.size)
        if lo > 0 and hi / lo > 20:
            # A few slow iterations (a cold cache, a scheduler hiccup) would squash every box to a line.
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("ms per batch (log scale)")
        else:
            ax.set_xlim(left=0.0)
            ax.set_xlabel("ms per batch")
    return _svg(fig, "latency-distributions")


def _horizontal() -> dict[str, Any]:
    """Horizontal boxes: `orientation=` since matplotlib 3.10, `vert=False` before (now deprecated)."""
    import matplotlib

    major, minor = (int(x) for x in matplotlib.__version__.split(".")[:2])
    return {"orientation": "horizontal"} if (major, minor) >= (3, 10) else {"vert": False}


@_with_rc
def sensitivity_bars(frame: pd.DataFrame, *, column: str, metric: str, axis_label: str) -> str:
    """Horizontal bars of the quantity the layers are ranked by, most costly layer on top.

    `frame` is `tables.sensitivity_frame` (already in rank order); `column` is the drawn column (the ranking
    key: `output_metric`, or `sqnr_db` when no output metric was measured) and `metric` its unit (gate
    metric name). A row without a value (not measured) keeps its place with no bar.
    """
    from matplotlib.ticker import FuncFormatter

    from quantpipe.gate import format_value

    rows = frame.iloc[::-1]  # barh draws bottom-up: the first rank goes on top
    fig = _figure(_WIDTH, 0.8 + 0.27 * len(rows))
    ax = fig.add_subplot()
    raw = pd.to_numeric(rows[column], errors="coerce").to_numpy(dtype=float)
    values = np.where(np.isnan(raw), 0.0, raw)
    labels = [f"{n}  ({op})" for n, op in zip(rows["node"], rows["op_type"], strict=True)]
    first = len(rows) - 1  # rank 1, the most costly layer
    if metric == "sqnr_db":
        worst = np.nanmin(raw) if np.isfinite(raw).any() else 0.0
        colors = ["#c0392b" if v <= worst + 3.0 else "#e59866" if v < 30.0 else "#7fb3d5" for v in values]
    else:
        colors = ["#c0392b" if i == first else "#7fb3d5" for i in range(len(rows))]
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.set_xlabel(axis_label)
    measured = raw[np.isfinite(raw)]
    if metric == "sqnr_db" or not measured.size:
        ax.barh(range(len(rows)), values, color=colors, height=0.62)
        ax.set_xlim(0, (float(measured.max()) if measured.size and measured.max() > 0 else 1.0) * 1.15)
    else:
        # Fractions near 1 (agreement, cosine) are equal-looking bars from 0: dots on a zoomed axis instead.
        lo, hi = float(measured.min()), float(measured.max())
        pad = max(hi - lo, abs(hi) * 1e-3, 1e-9) * 0.15
        ax.set_xlim(lo - pad, hi + pad * 4)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: format_value(metric, float(v))))
        values = np.where(np.isnan(raw), lo - pad, raw)
        ax.scatter(values[np.isfinite(raw)], np.flatnonzero(np.isfinite(raw)), s=40,
                   color=[c for c, ok in zip(colors, np.isfinite(raw), strict=True) if ok], zorder=3)
    for i, v in enumerate(raw):
        text = " not measured" if np.isnan(v) else f" {format_value(metric, float(v))}"
        ax.text(values[i], i, text, va="center", fontsize=7.5, color="#333333")
    ax.grid(axis="y", visible=False)
    return _svg(fig, "sensitivity")


def _rebin(h: TensorHistogram, max_bins: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Merge neighbouring bins so a 2048-bin histogram draws as <= max_bins steps (smaller SVG, same shape)."""
    nonzero = np.flatnonzero(h.counts)
    n = int(nonzero[-1]) + 1 if nonzero.size else h.counts.size  # drop empty bins above the largest value
    raw, raw_edges = h.counts[:n], h.edges[:n + 1]
    factor = max(1, math.ceil(n / max_bins))
    usable = (n // factor) * factor
    counts = raw[:usable].reshape(-1, factor).sum(axis=1)
    if usable < n:
        counts = np.append(counts, raw[usable:].sum())
    edges = np.append(raw_edges[:usable + 1:factor], raw_edges[-1]) if usable < n else raw_edges[::factor]
    return counts, edges


@_with_rc
def activation_histograms(hists: Sequence[TensorHistogram], thresholds: Mapping[str, Mapping[str, float]]) -> str:
    """|x| histograms (log counts) of a few tensors, each calibration method's amax drawn as a dashed line."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    cols = 3 if len(hists) > 4 else 2 if len(hists) > 1 else 1
    n_rows = math.ceil(len(hists) / cols)
    height = 0.75 + 2.0 * n_rows
    width = _WIDTH if cols > 1 else _WIDTH / 2
    # Fixed margins instead of constrained layout: it measures every tick label of every panel, which
    # was half the drawing time of this grid.
    fig = _figure(width, height, constrained=False)
    fig.subplots_adjust(left=0.06 * _WIDTH / width, right=0.99, top=1 - 0.62 / height, bottom=0.42 / height,
                        hspace=0.65, wspace=0.18)
    axes = fig.subplots(n_rows, cols, squeeze=False).reshape(-1)
    methods = sorted(thresholds)
    colors = {m: METHOD_COLORS.get(m, _OTHER_COLORS[i % len(_OTHER_COLORS)]) for i, m in enumerate(methods)}
    for ax, h in zip(axes, hists, strict=False):
        counts, edges = _rebin(h)
        ax.stairs(np.where(counts > 0, counts, np.nan), edges, fill=True, color="#a9c1de", edgecolor="#3b6ea8",
                  linewidth=0.6)
        ax.set_yscale("log")
        ax.yaxis.set_minor_locator(NullLocator())  # minor log ticks cost most of the drawing time and add nothing here
        ax.yaxis.set_major_locator(LogLocator(numticks=4))
        ax.yaxis.set_major_formatter(FuncFormatter(_count_label))  # plain text: mathtext 10^n labels are slow
        right = float(edges[-1])
        lines = [(m, thresholds[m][h.name]) for m in methods if h.name in thresholds[m]]
        for m, amax in lines:
            right = max(right, amax)
            ax.axvline(amax, color=colors[m], linestyle=(0, (4, 2)), linewidth=1.3)
        ax.set_xlim(0, right * 1.03)
        previous, drop = -math.inf, 0
        for m, amax in sorted(lines, key=lambda ml: ml[1]):
            # The value beside its line, rotated along it; labels of thresholds closer than ~6% of the
            # axis step down so they do not print over each other.
            drop = drop + 1 if amax - previous < 0.06 * right else 0
            previous = amax
            ax.annotate(f"{amax:.3g}", (amax, 1.0), xycoords=("data", "axes fraction"), xytext=(-2, -3 - 26 * (drop % 3)),
                        textcoords="offset points", rotation=90, ha="right", va="top", fontsize=7.5, color=colors[m])
        ax.set_title(_shorten(h.name, 40), loc="left", fontsize=8.5)
        ax.set_xlabel("|x|", fontsize=8, labelpad=1)
        ax.tick_params(labelsize=7.5)
    for ax in axes[len(hists):]:
        ax.set_visible(False)
    if methods:
        handles = [Line2D([], [], color=colors[m], linestyle=(0, (4, 2)), linewidth=1.3, label=f"{m} amax")
                   for m in methods]
        fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8.5, bbox_to_anchor=(0.5, 1.0))
    return _svg(fig, "histograms")


def _count_label(value: float, _pos: int) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= div:
            return f"{value / div:g}{suffix}"
    return f"{value:g}"


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]
