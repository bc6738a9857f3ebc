"""The evaluation report of a dense model and its pruned versions: report.json, report.md, plots.

Spectra: each model's gate matrices (L, I, H) are the only weights needed; their singular values
are computed once per model (`spectral.singular_values`, in jax). A pruned model's distance to the
dense one is, per layer, the KS statistic of the two gate spectra (`spectral.ks_statistic`): the
quantity whose inverse PruneNet's policy is rewarded with.

The report folder is written under a temporary sibling name and renamed into place when complete.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prunenet_jax.errors import UserError
from prunenet_jax.method import spectral
from prunenet_jax.models import registry
from prunenet_jax.files import atomic, output_folder
from prunenet_jax.weights import ModelWeights

JSON, MARKDOWN = "report.json", "report.md"
SPECTRA_PNG, KS_PNG, PPL_PNG = "spectra.png", "ks_per_layer.png", "ppl_vs_ratio.png"
MATPLOTLIB_VERSION = "3.11.2"  # the version the plots are checked with

_layer_sv = jax.jit(spectral.singular_values)
_ks = jax.jit(spectral.spectra_ks)


# ----------------------------------------------------------------------------- numbers

def gate_spectra(weights: ModelWeights) -> np.ndarray:
    """Singular values of every layer's gate matrix, (L, min(I, H)), descending, float32.

    One layer at a time, so device memory holds one matrix whatever the model size."""
    W = weights.layers[registry.GATE]
    return np.stack([np.asarray(_layer_sv(jnp.asarray(W[l], jnp.float32))) for l in range(len(W))])


def gate_ks(dense_sv: np.ndarray, sv: np.ndarray) -> np.ndarray:
    """KS statistic per layer between the dense model's gate spectra (L, m) and another model's
    (L, m') (method/spectral.layer_ks is the same statistic inside training, from kept rows)."""
    if len(dense_sv) != len(sv):
        raise UserError(f"a pruned model has {len(sv)} layers but the dense model {len(dense_sv)}; "
                        "compare models pruned from the same dense model")
    return np.asarray(_ks(jnp.asarray(dense_sv), jnp.asarray(sv)))


def compare(dense: ModelWeights, pruned: Sequence[ModelWeights]) -> tuple[list, list]:
    """(spectra, ks) for the dense model followed by each pruned one; the dense model's KS is 0."""
    spectra = [gate_spectra(w) for w in (dense, *pruned)]
    return spectra, [gate_ks(spectra[0], sv) for sv in spectra]


def plotted_layers(num_layers: int) -> list[int]:
    """First, middle and last layer."""
    return sorted({0, num_layers // 2, num_layers - 1})


def ratio_of(weights: ModelWeights, dense_intermediate: int) -> float:
    """1 - I_pruned / I_dense, for a pruned model whose ratio is not recorded anywhere."""
    return 1.0 - weights.config.intermediate_size / dense_intermediate


def model_record(name: str, source: str, weights: ModelWeights, ratio: float, ks: np.ndarray,
                 perplexity: Optional[dict] = None, mode: Optional[str] = None,
                 continuation: Optional[str] = None, recovery: Optional[dict] = None) -> dict:
    """One model's row of report.json. `perplexity`: perplexity.perplexity's result, or None;
    `mode`: how a pruned model's channels were chosen; `continuation`: its greedy continuation
    of PROMPT; `recovery`: the manifest's record of its recovery fine-tune."""
    record = {"name": name, "source": source, "ratio": float(ratio),
              "kept": int(weights.config.intermediate_size), "params": int(weights.num_params()),
              "ppl": perplexity["ppl"] if perplexity else None,
              "accuracy": perplexity.get("accuracy") if perplexity else None,
              "ppl_files": perplexity["files"] if perplexity else None,
              "ks": [float(x) for x in ks], "mean_ks": float(np.mean(ks)), "lm_eval": None}
    if mode is not None:
        record["mode"] = mode
    if continuation is not None:
        record["continuation"] = continuation
    if recovery:
        record["recovery"] = {k: recovery.get(k) for k in
                              ("steps", "method", "objective", "ppl_before", "ppl_after", "eval")}
    return record


def ppl_before_recovery(model: dict, summary: dict) -> Optional[float]:
    """A recovered model's recorded ppl before its fine-tune, when it was measured as this report
    measures (same texts, tokens and windows), so it can stand beside the report's own values."""
    rec = model.get("recovery")
    if not rec or rec.get("ppl_before") is None or not summary.get("eval"):
        return None
    return rec["ppl_before"] if rec.get("eval") == summary["eval"] else None


PROMPT = "The Python programming language is"
CONTINUATION_TOKENS = 24


def continuation(weights: ModelWeights, tokenizer) -> str:
    """The model's greedy continuation of PROMPT (CONTINUATION_TOKENS tokens at most)."""
    from prunenet_jax.models import decoder, decode

    model = decoder.from_named_arrays(weights.config, weights.named_arrays())
    ids = list(tokenizer(PROMPT)["input_ids"])
    eos = weights.hf_config.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
    out = decode.generate(model, [ids], CONTINUATION_TOKENS, eos_ids=eos)[0]
    return tokenizer.decode(out, skip_special_tokens=True)


# ----------------------------------------------------------------------------- tables

def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pct(fraction) -> str:
    return _fmt(None if fraction is None else 100 * fraction, ".2f")


def _before(m: dict, summary: Optional[dict]) -> str:
    rec = m.get("recovery")
    if not rec or rec.get("ppl_before") is None:
        return "-"
    same = summary is not None and ppl_before_recovery(m, summary) is not None
    return _fmt(rec["ppl_before"], ".3f") + ("" if same else " (other text)")


def table(models: list[dict], summary: Optional[dict] = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the models table (console and markdown); the lm-eval column only when
    lm-eval was asked for, the before-recovery one only when a model was recovered."""
    with_lm = any(m.get("lm_eval") is not None for m in models)
    with_rec = any(m.get("recovery") for m in models)
    header = (["model", "ratio", "kept", "params", "ppl"] + ["ppl before recovery"] * with_rec
              + ["mean KS"] + ["lm-eval avg %"] * with_lm)
    rows = []
    for m in models:
        avg = (m.get("lm_eval") or {}).get("average")
        rows.append([m["name"], f"{m['ratio']:.3f}", str(m["kept"]), f"{m['params']:,}",
                     _fmt(m["ppl"], ".3f")] + [_before(m, summary)] * with_rec
                    + [f"{m['mean_ks']:.4f}"] + [_pct(avg)] * with_lm)
    return header, rows


def format_table(models: list[dict], summary: Optional[dict] = None) -> str:
    header, rows = table(models, summary)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join(line(r) for r in [header] + rows)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def markdown(summary: dict) -> str:
    models = summary["models"]
    out = ["# PruneNet evaluation report", "",
           f"Dense model: `{models[0]['source']}`. Pruned: {len(models) - 1} model(s).", ""]
    if summary.get("eval_text"):
        first = f"first {summary['max_tokens']} tokens" if summary.get("max_tokens") else "all tokens"
        out += [f"Perplexity on `{summary['eval_text']}` ({first} of each text, windows of "
                f"{summary.get('seq_len')}): {summary.get('tokens', '?')} scored tokens per model.", ""]
    else:
        out += ["Perplexity: not measured (no --eval_text).", ""]
    out += ["KS: two-sample Kolmogorov-Smirnov statistic between a layer's gate-matrix singular "
            "values and the dense model's (0: same spectrum), averaged over layers.", ""]
    out += ["## Models", "", *_md_table(*table(models, summary)), ""]
    if any(m.get("recovery") for m in models):
        out += ["\"ppl before recovery\": as recorded by the recovery run (launch.recover or "
                "--recover_steps) before its fine-tune; \"(other text)\": measured on other "
                "text, tokens or windows than this report, so not comparable and not plotted.", ""]
    out += ["| model | source |", "|---|---|", *(f"| {m['name']} | `{m['source']}` |" for m in models), ""]
    if any(m.get("continuation") is not None for m in models):
        quote = lambda t: (t or "").replace("|", "\\|").replace("\n", " ⏎ ")
        out += [f"## Greedy continuation of \"{PROMPT}\"", "",
                "| model | continuation |", "|---|---|",
                *(f"| {m['name']} | {quote(m.get('continuation'))} |" for m in models), ""]
    lm = summary.get("lm_eval")
    if lm:
        tasks = lm["tasks"]
        header = ["model", *(f"{t} ({lm['metrics'][t]})" for t in tasks), "average"]
        rows = []
        for m in models:
            r = m.get("lm_eval") or {}
            per = r.get("tasks") or {}
            rows.append([m["name"], *(_pct((per.get(t) or {}).get("value")) for t in tasks),
                         _pct(r.get("average"))])
        out += ["## Zero-shot accuracy (lm-eval, %)", "", *_md_table(header, rows), ""]
        if lm.get("limit"):
            out += [f"At most {lm['limit']} examples per task (--lm_eval_limit).", ""]
        out += [f"- {m['name']}: unavailable: {m['lm_eval']['reason']}" for m in models
                if m.get("lm_eval") and m["lm_eval"].get("reason")]
        out += [""]
    plots = summary.get("plots", {})
    captions = {"spectra": "Gate singular values (first, middle, last layer)",
                "ks": "KS statistic per layer, pruned vs dense", "ppl": "Perplexity against ratio"}
    if plots:
        out += ["## Plots", ""]
        out += [f"![{captions[k]}]({v})\n" for k, v in plots.items()]
    return "\n".join(out).rstrip() + "\n"


# ----------------------------------------------------------------------------- plots

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
        b = ppl_before_recovery(m, summary or {})
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


# ----------------------------------------------------------------------------- the folder

def check_report_dir(report_dir: str, inputs: Sequence[str], overwrite: bool) -> None:
    """Refuses a report_dir inside an input (or holding one), a non-empty one without
    `overwrite`, and one that cannot be created. Creates nothing."""
    output_folder.check_out_dir(report_dir, inputs, reuse=overwrite, name=f"--report_dir={report_dir}",
                          fix="pass --overwrite to replace it, or choose a new folder", replaced=True)


def write_report(report_dir: str, summary: dict, spectra: list[np.ndarray],
                 overwrite: bool = False) -> dict:
    """Writes report.json, report.md and the plots; returns the summary with "plots" added.

    `spectra[i]`: model i's singular values at `summary["spectra_layers"]`, (layers, m_i).
    """
    models = summary["models"]
    final = os.path.abspath(report_dir)
    check_report_dir(report_dir, [], overwrite)
    with atomic.staged_dir(final) as tmp:  # the old report stays whole until the new one is in
        plots = {"spectra": SPECTRA_PNG}
        plot_spectra(os.path.join(tmp, SPECTRA_PNG), models, spectra, summary["spectra_layers"])
        if len(models) > 1:
            plots["ks"] = KS_PNG
            plot_ks(os.path.join(tmp, KS_PNG), models)
        if all(m["ppl"] is not None for m in models):
            plots["ppl"] = PPL_PNG
            text = "/".join(os.path.normpath(summary.get("eval_text") or "").split(os.sep)[-2:])
            plot_ppl(os.path.join(tmp, PPL_PNG), models,
                     f"Perplexity on {text} ({summary.get('tokens', '?')} tokens)", summary)
        summary = {**summary, "plots": plots}
        atomic.write_json(os.path.join(tmp, JSON), json_safe(summary))
        with open(os.path.join(tmp, MARKDOWN), "w") as f:
            f.write(markdown(summary))
    return summary


def json_safe(obj):
    """JSON has no inf/nan: an overflowing perplexity is written as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
