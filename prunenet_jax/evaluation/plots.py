"""The report's PNG plots (matplotlib, imported on use): spectra, KS per layer, ppl against ratio."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from prunenet_jax.errors import UserError
from prunenet_jax.evaluation import measures

MATPLOTLIB_VERSION = "3.11.2"  # the version the plots are checked with

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def check_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--report_dir draws plots with matplotlib, which is not installed; "
                        f"pip install matplotlib=={MATPLOTLIB_VERSION}") from None


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
    return f"dense (I={m['kept']})" if first else f"{m['name']} (ratio {m['ratio']:.2f}, k={m['kept']})"


def plot_spectra(path: str, models: list[dict], spectra: list[np.ndarray], layers: list[int]) -> None:
    """One panel per layer: each model's gate singular values, descending, log y."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(layers), figsize=(5.2 * len(layers), 4.2), squeeze=False)
    colors = _colors(len(models))
    for j, (ax, layer) in enumerate(zip(axes[0], layers)):
        for i, (m, sv) in enumerate(zip(models, spectra)):
            dense = i == 0  # dashed and on top: a pruned curve equal to it still shows
            ax.plot(np.arange(1, sv.shape[1] + 1), sv[j], color=colors[i], lw=1.8 if dense else 1.2,
                    ls="--" if dense else "-", zorder=3 if dense else 2, label=_label(m, dense))
        ax.set_yscale("log")
        _plain_log_axis(ax.yaxis)
        ax.set_title(f"layer {layer}: gate_proj singular values")
        ax.set_xlabel("index (descending order)")
        ax.set_ylabel("singular value")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(len(models), 3), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_ks(path: str, models: list[dict]) -> None:
    """KS statistic per layer for each pruned model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
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
    # Below the axes: lines span the whole width, so any legend inside would hide some.
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14),
              ncol=2 if len(models) > 4 else 1, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_ppl(path: str, models: list[dict], title: str, summary: Optional[dict] = None) -> None:
    """Perplexity against compression ratio, log y: one line per selection mode (models without a
    recorded mode form one "pruned" line), the dense model's level as a horizontal line; for
    recovered models also their recorded ppl before recovery, dashed, when comparable."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = models[0]
    if math.isfinite(dense["ppl"]):
        ax.axhline(dense["ppl"], color="black", ls="--", lw=1.2, label=f"dense: {dense['ppl']:.1f}")
    lines: dict = {}
    before: dict = {}
    for m in models[1:]:
        mode = m.get("mode") or "pruned"
        if math.isfinite(m["ppl"]):  # inf: overflow
            lines.setdefault(mode, []).append((m["ratio"], m["ppl"]))
        b = measures.ppl_before_recovery(m, summary or {})
        if b is not None and math.isfinite(b):
            before.setdefault(mode, []).append((m["ratio"], b))
    for (mode, points), color in zip(lines.items(), _colors(len(lines) + 1)[1:]):
        if mode in before:
            ax.plot(*zip(*sorted(before[mode])), marker="x", ms=5, ls=":", color=color,
                    label=f"{mode}, before recovery")
            mode = f"{mode}, recovered"
        points = sorted(points)
        ax.plot(*zip(*points), marker="o", ms=5, color=color, label=mode)
        for r, p in points:
            ax.annotate(f"{p:.1f}", (r, p), textcoords="offset points", xytext=(6, 6),
                        fontsize="small", color=color)
    ax.set_yscale("log")
    _plain_log_axis(ax.yaxis)
    ax.set_xlabel("compression ratio (share of FFN channels removed)")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize="medium")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
