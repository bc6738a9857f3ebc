"""The comparison as text: the console table and report.md."""
from __future__ import annotations

from typing import Optional

from prunenet_jax import perplexity
from prunenet_jax.evaluation import measures
from prunenet_jax.formats.run_dir import format_ratio


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pct(fraction) -> str:
    return _fmt(None if fraction is None else 100 * fraction, ".2f")


def _retained(m: dict, dense: dict) -> str:
    """The share of the dense model's top-1 accuracy kept, as "97.3%"; "-" when not defined
    (no accuracy, or a dense accuracy of 0)."""
    share = perplexity.accuracy_retention(m.get("accuracy"), dense.get("accuracy"))
    return "-" if share is None else f"{100 * share:.1f}%"


def _before(m: dict, summary: Optional[dict]) -> str:
    rec = m.get("recovery")
    if not rec or rec.get("ppl_before") is None:
        return "-"
    same = summary is not None and measures.ppl_before_recovery(m, summary) is not None
    return _fmt(rec["ppl_before"], ".3f") + ("" if same else " (other text)")


def table(models: list[dict], summary: Optional[dict] = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the models table (console and markdown); the top-1 accuracy columns
    only when an accuracy was measured, the lm-eval column only when lm-eval was asked for, the
    before-recovery one only when a model was recovered."""
    with_acc = any(m.get("accuracy") is not None for m in models)
    with_lm = any(m.get("lm_eval") is not None for m in models)
    with_rec = any(m.get("recovery") for m in models)
    header = (["model", "ratio", "kept", "params", "ppl"] + ["ppl before recovery"] * with_rec
              + ["top-1 acc", "retained"] * with_acc + ["mean KS"] + ["lm-eval avg %"] * with_lm)
    rows = []
    for m in models:
        avg = (m.get("lm_eval") or {}).get("average")
        acc = [_fmt(m.get("accuracy"), ".4f"), _retained(m, models[0])]
        rows.append([m["name"], format_ratio(m["ratio"]), str(m["kept"]), f"{m['params']:,}",
                     _fmt(m["ppl"], ".3f")] + [_before(m, summary)] * with_rec
                    + acc * with_acc + [f"{m['mean_ks']:.4f}"] + [_pct(avg)] * with_lm)
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
    if any(m.get("accuracy") is not None for m in models):
        out += ["\"top-1 acc\": share of the scored tokens the model predicts exactly (its most "
                "likely next token is the text's); \"retained\": that accuracy as a share of the "
                "dense model's (\"-\": not defined, the dense accuracy being 0 or not measured).", ""]
    if any(m.get("recovery") for m in models):
        out += ["\"ppl before recovery\": as recorded by the recovery run (launch.recover or "
                "--recover_steps) before its fine-tune; \"(other text)\": measured on other "
                "text, tokens or windows than this report, so not comparable and not plotted.", ""]
    out += ["| model | source |", "|---|---|", *(f"| {m['name']} | `{m['source']}` |" for m in models), ""]
    if any(m.get("continuation") is not None for m in models):
        quote = lambda t: (t or "").replace("|", "\\|").replace("\n", " ⏎ ")
        out += [f"## Greedy continuation of \"{measures.PROMPT}\"", "",
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
