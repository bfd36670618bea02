"""The report's figures, drawn with matplotlib's object API (no pyplot: no global figure state,
no backend switched at import) and returned as PNG bytes.

Every function takes plain data (the report's records) and returns a ``matplotlib.figure.Figure``;
``png`` renders one. Callers decide which figures exist: a function is never called with nothing
to draw.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from lowbit.report.clipping import ActivationClipping, WeightClipping
from lowbit.report.collect import LayerError

DPI = 100
PANEL_COLUMNS = 4
"""Most panels side by side before a figure wraps to a new row."""
GRID_EDGE = "#d62728"
"""Colour of the lines that mark where a quantization grid ends."""


def png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def size_vs_kl(points: Sequence[tuple[str, float, float]], peers: Sequence[tuple[str, float, float]],
               xlabel: str) -> Figure:
    """Mean KL divergence (log scale) against size: ``(label, x, kl)`` of this report's runs, and
    of peers (grey, smaller) when given. Points with KL <= 0 cannot sit on a log axis and are
    left out by the caller."""
    fig = Figure(figsize=(9, 5.5), layout="tight")
    ax = fig.add_subplot()
    if peers:
        ax.scatter([p[1] for p in peers], [p[2] for p in peers], s=22, color="0.55", marker="s",
                   label="peers", zorder=2)
    ax.scatter([p[1] for p in points], [p[2] for p in points], s=46, color="#1f77b4", label="runs", zorder=3)
    labels = [ax.annotate(label, (x, y), xytext=(5, 3), textcoords="offset points", fontsize=8.5, color="#0b3d66")
              for label, x, y in points]
    labels += [ax.annotate(label, (x, y), xytext=(4, -2), textcoords="offset points", fontsize=6.5, color="0.4")
               for label, x, y in peers]
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean KL divergence to the float model (log scale)")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="upper right")
    _drop_overlapping(fig, labels)
    return fig


def _drop_overlapping(fig: Figure, labels: list) -> None:
    """Remove each label that would overlap one placed before it (runs' labels come first)."""
    canvas = FigureCanvasAgg(fig)
    fig.draw_without_rendering()  # runs the layout, so that label boxes are where they will be drawn
    renderer = canvas.get_renderer()
    placed = []
    for label in labels:
        box = label.get_window_extent(renderer)
        if any(box.overlaps(other) for other in placed):
            label.remove()
        else:
            placed.append(box)


def layer_heatmaps(panels: Sequence[tuple[str, str, Sequence[LayerError]]]) -> Figure:
    """One heatmap per run: rows are decoder layers, columns the linear kinds, colour the
    layer's error (log scale, shared by runs with the same metric); grey where a layer has
    no value. ``panels``: (run label, metric name, layer errors)."""
    kinds: list[str] = []
    indices: set[int] = set()
    for _, _, layers in panels:
        for e in layers:
            if e.layer is not None:
                indices.add(e.layer)
                if e.kind not in kinds:
                    kinds.append(e.kind)
    rows = sorted(indices)
    norms = {}
    for _, metric, layers in panels:
        values = [e.value for e in layers if e.value is not None and e.value > 0 and e.layer is not None]
        lo, hi = norms.get(metric, (math.inf, 0.0))
        if values:
            norms[metric] = (min(lo, min(values)), max(hi, max(values)))
    cols = min(PANEL_COLUMNS, len(panels))
    grid_rows = math.ceil(len(panels) / cols)
    height = max(2.8, 0.2 * len(rows) + 1.6)
    fig = Figure(figsize=(max(4.2, 3.6 * cols), height * grid_rows), layout="tight")
    cmap = colormaps["viridis"].with_extremes(bad="0.85")
    for i, (label, metric, layers) in enumerate(panels):
        ax = fig.add_subplot(grid_rows, cols, i + 1)
        matrix = np.full((len(rows), len(kinds)), np.nan)
        for e in layers:
            if e.layer is not None and e.value is not None and e.value > 0:
                matrix[rows.index(e.layer), kinds.index(e.kind)] = e.value
        lo, hi = norms.get(metric, (1e-6, 1.0))
        image = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", cmap=cmap,
                          norm=LogNorm(vmin=lo, vmax=max(hi, lo * 1.0001)), interpolation="nearest")
        ax.set_title(label, fontsize=10)
        ax.set_xticks(range(len(kinds)), [k.removesuffix("_proj") for k in kinds], rotation=45, fontsize=8)
        step = max(1, len(rows) // 15)
        ax.set_yticks(range(0, len(rows), step), [str(r) for r in rows[::step]], fontsize=8)
        ax.set_ylabel("decoder layer")
        fig.colorbar(image, ax=ax, shrink=0.9).set_label(metric.replace("_", " "), fontsize=8)
    return fig


def weight_histograms(layers: Sequence[tuple[str, Sequence[tuple[str, WeightClipping]]]]) -> Figure:
    """Rows: layers; columns: runs. Each panel is the histogram (log count) of the float weights
    normalised by their own representable interval, u = (w - lo) / (hi - lo); the red lines at 0
    and 1 are where the grid ends, weights beyond them are clipped."""
    cols = max(len(runs) for _, runs in layers)
    fig = Figure(figsize=(max(5.0, 3.4 * cols), 2.5 * len(layers)), layout="tight")
    for r, (name, runs) in enumerate(layers):
        for c, (label, clip) in enumerate(runs):
            ax = fig.add_subplot(len(layers), cols, r * cols + c + 1)
            u = clip.normalised
            lo, hi = min(float(u.min()), -0.05), max(float(u.max()), 1.05)
            ax.hist(u, bins=120, range=(lo, hi), color="#1f77b4", log=True)
            for edge in (0.0, 1.0):
                ax.axvline(edge, color=GRID_EDGE, linestyle="--", linewidth=1.2)
            ax.set_title(f"{_short(name)}\n{label}: {clip.clipped_fraction:.2%} clipped"
                         + (" (rescaled)" if clip.rescaled else ""), fontsize=8.5)
            ax.set_xlabel("(w - lo) / (hi - lo)", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.yaxis.set_minor_formatter(NullFormatter())
    return fig


def reach_histograms(layers: Sequence[tuple[str, Sequence[tuple[str, np.ndarray]]]]) -> Figure:
    """One panel per layer: per group, how far the grid reaches towards the group's extreme
    weights (1 = exactly to it, below 1 = clipped), one outline per run."""
    cols = min(PANEL_COLUMNS, len(layers))
    grid_rows = math.ceil(len(layers) / cols)
    fig = Figure(figsize=(max(5.0, 3.8 * cols), 2.9 * grid_rows), layout="tight")
    for i, (name, runs) in enumerate(layers):
        ax = fig.add_subplot(grid_rows, cols, i + 1)
        values = np.concatenate([r for _, r in runs if len(r)]) if any(len(r) for _, r in runs) else np.ones(1)
        lo, hi = min(float(np.quantile(values, 0.001)), 0.95), max(float(np.quantile(values, 0.999)), 1.05)
        for j, (label, reach) in enumerate(runs):
            if len(reach):  # line styles differ, so that runs with the same grid stay visible
                ax.hist(np.clip(reach, lo, hi), bins=60, range=(lo, hi), histtype="step", label=label,
                        linewidth=2.2 - 0.4 * (j % 3), linestyle=("-", "--", ":", "-.")[j % 4])
        ax.axvline(1.0, color=GRID_EDGE, linestyle="--", linewidth=1.0)
        ax.set_title(_short(name), fontsize=9)
        ax.set_xlabel("grid reach / group extreme", fontsize=8)
        ax.set_ylabel("groups", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    return fig


def activation_histograms(layers: Sequence[ActivationClipping]) -> Figure:
    """One panel per layer: the float model's input activations (log count), with the range
    each run's activation scheme picks (dashed) where it has one."""
    cols = min(PANEL_COLUMNS - 1, len(layers))
    grid_rows = math.ceil(len(layers) / cols)
    fig = Figure(figsize=(max(5.0, 4.4 * cols), 3.0 * grid_rows), layout="tight")
    for i, act in enumerate(layers):
        ax = fig.add_subplot(grid_rows, cols, i + 1)
        ax.hist(act.values, bins=150, color="#2ca02c", log=True)
        for j, rng in enumerate(act.ranges):
            color = colormaps["tab10"](j % 10)
            ax.axvline(rng.low, color=color, linestyle="--", linewidth=1.2, label=rng.label)
            ax.axvline(rng.high, color=color, linestyle="--", linewidth=1.2)
        ax.set_title(f"{_short(act.name)} inputs (absmax {act.absmax:.3g})", fontsize=9)
        ax.set_xlabel("activation value", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.yaxis.set_minor_formatter(NullFormatter())
        if act.ranges:
            ax.legend(fontsize=6.5)
    return fig


def code_histograms(layers: Sequence[tuple[str, Sequence[tuple[str, str, np.ndarray]]]]) -> Figure:
    """Rows: layers; columns: runs. How many weights use each code of the format (the grid's
    levels, lowest code left): a grid whose outer codes are rare spends bits on outliers."""
    cols = max(len(runs) for _, runs in layers)
    fig = Figure(figsize=(max(5.0, 3.4 * cols), 2.4 * len(layers)), layout="tight")
    for r, (name, runs) in enumerate(layers):
        for c, (label, fmt, counts) in enumerate(runs):
            ax = fig.add_subplot(len(layers), cols, r * cols + c + 1)
            ax.bar(range(len(counts)), counts, width=0.9, color="#9467bd")
            ax.set_title(f"{_short(name)}\n{label} ({fmt})", fontsize=8.5)
            ax.set_xlabel("stored code", fontsize=8)
            ax.tick_params(labelsize=7)
    return fig


def _short(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``layers.3.self_attn.q_proj``."""
    return name.removeprefix("model.")
