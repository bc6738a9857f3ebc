"""The evaluation report folder: report.json, report.md and the plots, written under a temporary
sibling name and renamed into place when complete (measures.py: what is measured; tables.py and
plots.py: how it is shown)."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from prunenet_jax.evaluation import plots, tables
from prunenet_jax.files import atomic, json_files, output_folder

JSON, MARKDOWN = "report.json", "report.md"
SPECTRA_PNG, KS_PNG, PPL_PNG = "spectra.png", "ks_per_layer.png", "ppl_vs_ratio.png"

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
        written = {"spectra": SPECTRA_PNG}
        plots.plot_spectra(os.path.join(tmp, SPECTRA_PNG), models, spectra, summary["spectra_layers"])
        if len(models) > 1:
            written["ks"] = KS_PNG
            plots.plot_ks(os.path.join(tmp, KS_PNG), models)
        if all(m["ppl"] is not None for m in models):
            written["ppl"] = PPL_PNG
            text = "/".join(os.path.normpath(summary.get("eval_text") or "").split(os.sep)[-2:])
            plots.plot_ppl(os.path.join(tmp, PPL_PNG), models,
                           f"Perplexity on {text} ({summary.get('tokens', '?')} tokens)", summary)
        summary = {**summary, "plots": written}
        atomic.write_json(os.path.join(tmp, JSON), json_files.finite(summary))
        with open(os.path.join(tmp, MARKDOWN), "w") as f:
            f.write(tables.markdown(summary))
    return summary

