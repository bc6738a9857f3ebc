"""The report's PNG plots (matplotlib, imported on use): spectra, KS per layer, ppl against ratio.

Each plot is built by a `*_figure` function (returned open, for tests to inspect) and written by
its `plot_*` function. Value labels on the ppl plot are placed by `place_labels`: each inside the
axes, clear of every other label and, where it can be, of every marker.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np

from prunenet_jax.errors import UserError
from prunenet_jax.evaluation import measures
from prunenet_jax.formats.run_dir import HF, ORBAX, format_ratio

MATPLOTLIB_VERSION = "3.11.2"  # the version the plots are checked with
DPI = 110  # figures are laid out at the resolution they are saved with

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def check_plotting() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise UserError("--report_dir draws plots with matplotlib, which is not installed; "
                        f"pip install matplotlib=={MATPLOTLIB_VERSION}")


def _colors(n: int) -> list:
    """Black for the dense model, then tab10 (cycled) for the pruned ones."""
    plt = _pyplot()
    tab = plt.get_cmap("tab10").colors
    return ["black"] + [tab[i % len(tab)] for i in range(n - 1)]


def _plain_log_axis(axis) -> None:
    """Log-scale tick labels as plain numbers (0.6, 2, 300), not 6x10^-1; matplotlib still
    decides which ticks get a label (fewer minor labels over wider ranges)."""
    from matplotlib import ticker

    class Plain(ticker.LogFormatter):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    axis.set_major_formatter(Plain())
    axis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(1.5, 0.5)))


def _label(m: dict, first: bool) -> str:
    """A model in a legend: its name (the ratio added when the name does not already show it)."""
    if first:
        return f"dense (I={m['kept']})"
    ratio = format_ratio(m["ratio"])
    shown = ratio in str(m["name"]).replace("/", " ").replace("_", " ").split()
    return f"{m['name']} (k={m['kept']})" if shown else f"{m['name']} (ratio {ratio}, k={m['kept']})"


def _save(fig, path: str, **kw) -> None:
    plt = _pyplot()
    try:
        fig.savefig(path, dpi=DPI, **kw)
    finally:
        plt.close(fig)


def spectra_figure(models: list[dict], spectra: list[np.ndarray], layers: list[int]):
    """One panel per layer: each model's gate singular values, descending, log y."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(layers), figsize=(5.2 * len(layers), 4.2), squeeze=False, dpi=DPI)
    colors = _colors(len(models))
    for j, (ax, layer) in enumerate(zip(axes[0], layers)):
        for i, (m, sv) in enumerate(zip(models, spectra)):
            dense = i == 0  # dashed and on top: a pruned curve equal to it still shows
            ax.plot(np.arange(1, sv.shape[1] + 1), sv[j], color=colors[i], lw=1.8 if dense else 1.2,
                    ls="--" if dense else "-", zorder=3 if dense else 2, label=_label(m, dense))
        ax.set_yscale("log")
        _plain_log_axis(ax.yaxis)
        ax.set_title(f"layer {layer}: scored FFN matrix singular values")
        ax.set_xlabel("index (descending order)")
        ax.set_ylabel("singular value")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(len(models), 3), frameon=False)
    fig.tight_layout()
    return fig


def plot_spectra(path: str, models: list[dict], spectra: list[np.ndarray], layers: list[int]) -> None:
    _save(spectra_figure(models, spectra, layers), path, bbox_inches="tight")


def ks_figure(models: list[dict]):
    """KS statistic per layer for each pruned model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=DPI)
    colors = _colors(len(models))
    for i, m in enumerate(models[1:], 1):
        ax.plot(np.arange(len(m["ks"])), m["ks"], marker="o", ms=3, color=colors[i],
                label=f"{_label(m, False)}: mean {m['mean_ks']:.3f}")
    from matplotlib import ticker

    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("KS statistic vs dense")
    ax.set_title("Gate spectra: KS statistic per layer, pruned vs dense")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    # Below the axes: lines span the whole width, so any legend inside would hide some.
    _legend_below(ax, ncol=2 if len(models) > 4 else 1)
    return fig


def plot_ks(path: str, models: list[dict]) -> None:
    _save(ks_figure(models), path, bbox_inches="tight")


def _legend_below(ax, **kw) -> None:
    """The legend under the x axis's tick labels and label (the figure is saved with
    bbox_inches="tight", which takes it in); call it once the layout is done."""
    renderer = ax.figure.canvas.get_renderer()
    bottom = ax.xaxis.get_tightbbox(renderer).y0 - 4 * ax.figure.dpi / 72  # 4 points below
    y = ax.transAxes.inverted().transform((0, bottom))[1]
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, y), frameon=False, **kw)


def _family(m: dict) -> Optional[str]:
    """The folder holding a model's ratio_<r>/ folder (a prune run, or one mode of it), when its
    source has that layout: the models of one family and mode form one line."""
    parts = os.path.normpath(str(m.get("source") or "")).split(os.sep)
    if parts[-1] in (HF, ORBAX):
        parts = parts[:-1]
    if len(parts) > 1 and parts[-1].startswith("ratio_"):
        return os.sep.join(parts[:-1])
    return None


def ppl_series(models: list[dict]) -> list[tuple[str, list[dict]]]:
    """The pruned models grouped into lines, each with its legend label: the models of one run
    folder and mode (or of one mode, outside a run folder) form one line; a model with neither,
    or at a ratio its line already has, is a line of its own. A line of one model is labelled by
    its name; lines of several by their modes when those differ, else by run folder and mode."""
    groups: dict = {}
    for m in models[1:]:
        family, mode = _family(m), m.get("mode")
        key = (family, mode) if family or mode else ("model", m["name"])
        if any(format_ratio(o["ratio"]) == format_ratio(m["ratio"]) for o in groups.get(key, [])):
            key = ("model", m["name"])  # a line has one point per ratio: this one stands alone
        groups.setdefault(key, []).append(m)
    modes = [k[1] for k, ms in groups.items() if len(ms) > 1 and k[0] != "model"]
    by_mode = all(modes) and len(set(modes)) == len(modes)
    out = []
    for (family, mode), ms in groups.items():
        if len(ms) == 1:
            label = str(ms[0]["name"])
        elif by_mode:
            label = mode
        else:
            label = " ".join(x for x in (_run_name(family, mode), mode) if x) or str(ms[0]["name"])
        out.append((label, ms))
    return out


def _run_name(family: Optional[str], mode: Optional[str]) -> str:
    """The run folder's name: `family` is <run> or, with several modes, <run>/<mode>."""
    parts = os.path.normpath(family).split(os.sep) if family else []
    if mode and len(parts) > 1 and parts[-1] == mode:
        parts = parts[:-1]
    return parts[-1] if parts else ""


def _value(p: float) -> str:
    """A perplexity as a point's label: 3 significant digits or more (13.4, 127, 903)."""
    return f"{p:.1f}" if p < 100 else f"{p:.0f}"


def ppl_figure(models: list[dict], title: str, summary: Optional[dict] = None):
    """Perplexity against compression ratio, log y: one line per run and mode (`ppl_series`), the
    dense model's level as a horizontal line, each point labelled with its value; for recovered
    models also their recorded ppl before recovery, dotted, when comparable. The legend lies below
    the axes, so it hides no point or label."""
    plt = _pyplot()
    series = ppl_series(models)
    recovered = any(measures.ppl_before_recovery(m, summary or {}) is not None for m in models[1:])
    entries = len(series) * (1 + recovered) + 1
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=DPI)
    dense = models[0]
    if dense["ppl"] is not None and math.isfinite(dense["ppl"]):
        ax.axhline(dense["ppl"], color="black", ls="--", lw=1.2, label=f"dense: {_value(dense['ppl'])}")
    labels = []  # (x, y, text, color, muted)
    ratios = set()
    for (name, ms), color in zip(series, _colors(len(series) + 1)[1:]):
        points = sorted((m["ratio"], m["ppl"]) for m in ms  # inf: overflow
                        if m["ppl"] is not None and math.isfinite(m["ppl"]))
        before = sorted((m["ratio"], b) for m in ms
                        if (b := measures.ppl_before_recovery(m, summary or {})) is not None
                        and math.isfinite(b))
        if before:
            ax.plot(*zip(*before), marker="x", ms=6, ls=":", color=color,
                    label=f"{name}, before recovery")
            labels += [(r, p, _value(p), color, True) for r, p in before]
            name = f"{name}, recovered"
        if points:
            ax.plot(*zip(*points), marker="o", ms=5, color=color, label=name)
            labels += [(r, p, _value(p), color, False) for r, p in points]
        ratios.update(r for r, _ in points + before)
    ax.set_yscale("log")
    _plain_log_axis(ax.yaxis)
    ticks = sorted({format_ratio(r): r for r in sorted(ratios)}.values())  # one per written form
    span = ticks[-1] - ticks[0] if ticks else 0.0
    if 0 < len(ticks) <= 10 and all(b - a >= 0.08 * span for a, b in zip(ticks, ticks[1:])):
        ax.set_xticks(ticks, [format_ratio(r) for r in ticks])  # the ratios, written as everywhere
    ax.margins(x=0.12, y=0.1)  # headroom (in the log scale's terms) for the labels at the edges
    ax.set_xlabel("compression ratio (share of FFN channels removed)")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize="medium")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    _legend_below(ax, ncol=2 if entries > 3 else entries)
    place_labels(ax, labels)
    return fig


def plot_ppl(path: str, models: list[dict], title: str, summary: Optional[dict] = None) -> None:
    _save(ppl_figure(models, title, summary), path, bbox_inches="tight")


def _overlap(a, b) -> float:
    """Area shared by two boxes (x0, y0, x1, y1)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def _line_samples(ax, step: float) -> np.ndarray:
    """Points every `step` display pixels along every line of `ax` (display coordinates, (n, 2)):
    what a label had better not cover."""
    found = []
    for line in ax.get_lines():
        xy = line.get_transform().transform(np.asarray(line.get_xydata(), float))
        xy = xy[np.isfinite(xy).all(axis=1)]
        for a, b in zip(xy[:-1], xy[1:]):
            n = max(int(np.hypot(*(b - a)) / step), 1)
            found.append(a + (b - a) * np.linspace(0, 1, n + 1)[:, None])
    return np.concatenate(found) if found else np.zeros((0, 2))


def place_labels(ax, labels: list[tuple], fontsize: str = "small") -> list:
    """Annotates each (x, y, text, color, muted) point of `ax` with its text, on a white ground,
    placed in display space once the layout is final. Each label takes, of the spots beside its
    point (right or left, above or below), the first that lies inside the axes and overlaps no
    placed label and no marker, and crosses the fewest lines; only when none of those is free, a
    spot further up or down (staggered); failing that too, the spot inside the axes that overlaps
    least. Returns the annotations. Call it after the limits are set and the layout is done."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    px = fig.dpi / 72.0  # display pixels per point
    ground = 1.5 * px  # the white ground's margin around the text
    inner = (frame.x0 + 1 + ground, frame.y0 + 1 + ground, frame.x1 - 1 - ground, frame.y1 - 1 - ground)
    marker = 4.0 * px
    centers = [ax.transData.transform((x, y)) for x, y, *_ in labels]
    markers = [(cx - marker, cy - marker, cx + marker, cy + marker) for cx, cy in centers]
    lines = _line_samples(ax, 2.0 * px)
    placed, annotations = [], []
    # The highest points first (the least headroom), then downwards; left to right within a height.
    order = sorted(range(len(labels)), key=lambda i: (-centers[i][1], centers[i][0]))
    for i in order:
        x, y, text, color, muted = labels[i]
        a = ax.annotate(text, (x, y), textcoords="offset points", xytext=(0, 0), ha="center",
                        va="center", fontsize=fontsize, color=color, alpha=0.8 if muted else 1.0,
                        fontstyle="italic" if muted else "normal", annotation_clip=False,
                        bbox=dict(boxstyle=f"square,pad={ground / px / 8:.3f}", fc="white",
                                  ec="none", alpha=0.75))
        box = a.get_window_extent(renderer)
        w, h = box.width + 2 * ground, box.height + 2 * ground  # with its ground: kept apart
        cx, cy = centers[i]
        side, up = w / 2 + marker, h / 2 + px
        near = [(side, up), (side, -up), (-side, up), (-side, -up), (0, h / 2 + marker + px),
                (0, -(h / 2 + marker + px)), (side, 0), (-side, 0)]
        far = [(sx, sy * (up + k * h)) for k in range(1, 5) for sy in (1, -1) for sx in (side, -side)]
        best, best_cost = None, None
        for n, (dx, dy) in enumerate(near + far):
            b = (cx + dx - w / 2, cy + dy - h / 2, cx + dx + w / 2, cy + dy + h / 2)
            if b[0] < inner[0] - ground or b[1] < inner[1] - ground or b[2] > inner[2] + ground \
                    or b[3] > inner[3] + ground:
                continue
            labels_hit = sum(_overlap(b, o) for o in placed)
            markers_hit = sum(_overlap(b, o) for o in markers)
            crossed = int(((lines[:, 0] > b[0]) & (lines[:, 0] < b[2]) & (lines[:, 1] > b[1])
                           & (lines[:, 1] < b[3])).sum())
            cost = (labels_hit > 0, markers_hit > 0, n >= len(near), crossed > 0, labels_hit,
                    markers_hit, crossed, n)
            if best_cost is None or cost < best_cost:
                best, best_cost = (dx, dy), cost
        if best is None:  # no spot inside: the axes are too small for the text; keep it at its point
            best = (0.0, 0.0)
        dx, dy = best
        a.set_position((dx / px, dy / px))
        placed.append((cx + dx - w / 2, cy + dy - h / 2, cx + dx + w / 2, cy + dy + h / 2))
        annotations.append(a)
    return annotations
