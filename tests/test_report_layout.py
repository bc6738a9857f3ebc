"""How the report reads: plot labels inside the axes and apart (rendered with matplotlib Agg and
measured), models named by their `name` everywhere, ratios written one way, top-1 accuracy and
its retention, blank continuations explained, and the console tables' missing values."""
import itertools
import json

import numpy as np
import pytest

from prunenet_jax import perplexity, sources
from prunenet_jax.evaluation import measures, plots, report, tables
from prunenet_jax.formats import run_dir
from prunenet_jax.formats.run_dir import OutputEntry
from tests import tiny_models

EVAL = {"texts": ["t.txt"], "seq_len": 512, "max_tokens": 16384}
MODES = ("sample", "energy", "random")
RATIOS = (0.1, 0.2, 0.3)
# Realistic spreads (ppl 13 to 900): far apart, and nearly equal across modes.
SPREAD = {"sample": (40.0, 220.0, 900.0), "energy": (15.1, 21.0, 33.0), "random": (60.0, 350.0, 880.0)}
CLOSE = {"sample": (16.0, 22.0, 35.0), "energy": (15.1, 21.0, 33.0), "random": (15.5, 21.5, 34.0)}


def _row(name, ratio, ppl, source, mode=None, accuracy=None, **extra):
    return {"name": name, "source": source, "ratio": ratio, "kept": int(round((1 - ratio) * 1536)),
            "params": 1000, "ppl": ppl, "accuracy": accuracy, "ks": [0.0, 0.1], "mean_ks": 0.05,
            "lm_eval": None, **({"mode": mode} if mode else {}), **extra}


def realistic(modes, values, recovered: bool) -> tuple[list[dict], dict]:
    """Dense (ppl 13.2) + len(modes) x 3 ratios of one prune run; recovered: each model's ppl
    after recovery, with its recorded ppl before (measured on the report's text)."""
    models = [_row("dense", 0.0, 13.2, "default", accuracy=0.42)]
    for mode in modes:
        for r, p in zip(RATIOS, values[mode]):
            extra = {"recovery": {"steps": 100, "ppl_before": p, "eval": EVAL}} if recovered else {}
            models.append(_row(f"runs/default {mode} {r}", r, p * 0.4 + 10 if recovered else p,
                               f"runs/default/{mode}/ratio_{r}/hf", mode, 0.3, **extra))
    return models, {"eval": EVAL, "eval_text": "t.txt", "tokens": 16383, "max_tokens": 16384,
                    "seq_len": 512, "models": models, "spectra_layers": [0, 1], "lm_eval": None}


def label_problems(fig) -> list:
    """Every value label (axes text) not inside its axes, and every two labels that overlap,
    by their rendered window extents."""
    renderer = fig.canvas.get_renderer()
    problems = []
    for ax in fig.axes:
        frame = ax.get_window_extent(renderer)
        boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in ax.texts]
        for text, b in boxes:
            if b.x0 < frame.x0 or b.y0 < frame.y0 or b.x1 > frame.x1 or b.y1 > frame.y1:
                problems.append(("outside the axes", text, tuple(b.bounds), tuple(frame.bounds)))
        for (t1, b1), (t2, b2) in itertools.combinations(boxes, 2):
            if b1.overlaps(b2):
                problems.append(("overlap", t1, t2))
    return problems


@pytest.mark.parametrize("recovered", [False, True], ids=["plain", "recovery"])
@pytest.mark.parametrize("values", [SPREAD, CLOSE], ids=["spread", "close"])
@pytest.mark.parametrize("modes", [MODES[:2], MODES], ids=["2modes", "3modes"])
def test_ppl_plot_labels_inside_the_axes_and_apart(modes, values, recovered):
    models, summary = realistic(modes, values, recovered)
    fig = plots.ppl_figure(models, "Perplexity on t.txt (16383 tokens)", summary)
    try:
        ax = fig.axes[0]
        points = len(modes) * len(RATIOS) * (2 if recovered else 1)
        assert len(ax.texts) == points  # every point labelled, the before-recovery ones too
        assert label_problems(fig) == []
        # The highest point's label is not clipped: its value is there in full.
        top = max(max(m["ppl"], (m.get("recovery") or {}).get("ppl_before") or 0) for m in models)
        assert plots._value(top) in [t.get_text() for t in ax.texts]
    finally:
        plots._pyplot().close(fig)


def test_ppl_plot_labels_hold_for_a_single_point_and_overflow():
    models = [_row("dense", 0.0, 13.2, "default"), _row("one", 0.5, 900.0, "one"),
              _row("over", 0.3, float("inf"), "over")]
    fig = plots.ppl_figure(models, "t", {})
    try:
        assert [t.get_text() for t in fig.axes[0].texts] == ["900"] and label_problems(fig) == []
    finally:
        plots._pyplot().close(fig)


def test_legends_name_each_model_never_a_generic_pruned():
    """Models passed as folders (no mode, no run layout) are labelled by their names."""
    models = [_row("dense", 0.0, 13.2, "default"),
              _row("smollm2 sample 0.2", 0.2, 30.0, "/data/a"),
              _row("smollm2 energy 0.3", 0.3, 45.0, "/data/b")]
    fig = plots.ppl_figure(models, "t", {})
    try:
        legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert legend == ["dense: 13.2", "smollm2 sample 0.2", "smollm2 energy 0.3"]
    finally:
        plots._pyplot().close(fig)
    fig = plots.ks_figure(models)
    try:
        legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        # The ratio is in the name already: not repeated.
        assert legend == ["smollm2 sample 0.2 (k=1229): mean 0.050",
                          "smollm2 energy 0.3 (k=1075): mean 0.050"]
        assert not any("pruned" in t for t in legend)
    finally:
        plots._pyplot().close(fig)
    # One run's models of one mode share a line, named by the mode; two runs of one mode: by run.
    models, _ = realistic(MODES[:2], SPREAD, False)
    assert [label for label, _ in plots.ppl_series(models)] == ["sample", "energy"]
    other = [dict(m, name=m["name"] + "'", source=m["source"].replace("default", "other"))
             for m in models[1:4]]
    assert [label for label, _ in plots.ppl_series(models + other)] == [
        "default sample", "default energy", "other sample"]


def test_ratios_are_written_by_one_formatter():
    models = [_row("dense", 0.0, 13.2, "default"), _row("m", 0.2, 30.0, "m"),
              _row("measured", 1 - 1227 / 1536, 31.0, "x")]  # from kept/width: 0.2012...
    header, rows = tables.table(models)
    assert [r[1] for r in rows] == ["0", "0.2", "0.201"]
    assert plots._label(models[1], False) == "m (ratio 0.2, k=1229)"
    models, summary = realistic(MODES, SPREAD, False)
    models[1]["ratio"] = 0.1 + 1e-12  # a nominal ratio that went through arithmetic
    fig = plots.ppl_figure(models, "t", summary)
    try:
        ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
        assert ticks == [run_dir.format_ratio(r) for r in RATIOS] == ["0.1", "0.2", "0.3"]
    finally:
        plots._pyplot().close(fig)


def _accuracy_summary(dense_accuracy):
    models = [_row("dense", 0.0, 13.2, "default", accuracy=dense_accuracy),
              _row("half", 0.5, 40.0, "half", "energy", accuracy=0.3)]
    measures.add_retention(models)
    return {"models": models, "eval_text": "t.txt", "tokens": 100, "max_tokens": 0, "seq_len": 16,
            "spectra_layers": [0, 1], "lm_eval": None}


def test_report_has_top1_accuracy_and_retention(tmp_path):
    summary = _accuracy_summary(0.4)
    assert [m["accuracy_retention"] for m in summary["models"]] == [1.0, pytest.approx(0.75)]
    md = tables.markdown(summary)
    assert "| model | ratio | kept | params | ppl | top-1 acc | retained | mean KS |" in md
    assert "| dense | 0 | 1536 | 1,000 | 13.200 | 0.4000 | 100.0% | 0.0500 |" in md
    assert "| half | 0.5 | 768 | 1,000 | 40.000 | 0.3000 | 75.0% | 0.0500 |" in md
    console = tables.format_table(summary["models"], summary).splitlines()
    assert console[0].split()[5:9] == ["top-1", "acc", "retained", "mean"]
    assert console[2].split()[5:7] == ["0.3000", "75.0%"]
    spectra = [np.ones((2, 4))] * 2
    report.write_report(str(tmp_path / "r"), summary, spectra)
    data = json.loads((tmp_path / "r" / report.JSON).read_text())
    assert data["models"][1]["accuracy"] == 0.3
    assert data["models"][1]["accuracy_retention"] == pytest.approx(0.75)
    assert "| 0.3000 | 75.0% |" in (tmp_path / "r" / report.MARKDOWN).read_text()


@pytest.mark.parametrize("dense_accuracy", [0.0, None])
def test_retention_is_a_dash_when_not_defined(dense_accuracy):
    summary = _accuracy_summary(dense_accuracy)
    assert [m["accuracy_retention"] for m in summary["models"]] == [None, None]  # no division by 0
    md = tables.markdown(summary)
    assert "| half | 0.5 | 768 | 1,000 | 40.000 | 0.3000 | - | 0.0500 |" in md
    assert "-%" not in md
    row = tables.format_table(summary["models"]).splitlines()[2].split()
    assert row[5:7] == ["0.3000", "-"]
    assert perplexity.accuracy_retention(0.3, 0.0) is None
    assert perplexity.accuracy_retention(None, 0.5) is None
    assert perplexity.accuracy_retention(0.25, 0.5) == 0.5


def test_blank_continuations_are_explained():
    assert measures.blank_continuation([6] * 16, {6}) == "(16 special tokens, id 6)"
    assert measures.blank_continuation([2, 6, 2], {2, 6}) == "(3 special tokens, ids 2, 6)"
    assert measures.blank_continuation([1], {1}) == "(1 special token, id 1)"
    assert measures.blank_continuation([], {1}) == "(no tokens)"
    assert measures.blank_continuation([5, 5], set()) == "(2 tokens, whitespace only)"
    assert measures.blank_continuation([5, 6], {6}) == "(2 tokens: 1 special, id 6; the rest whitespace)"


class _Tokenizer:
    """A tokenizer whose every id is special (decode drops them all) unless `text` is given."""
    all_special_ids = [0, 1, 2]

    def __init__(self, text=""):
        self.text = text

    def __call__(self, prompt):
        return {"input_ids": [1, 5, 7]}

    def decode(self, ids, skip_special_tokens=False):
        return self.text if skip_special_tokens else "<s>" * len(ids)


def test_continuation_of_special_tokens_only_says_so(tmp_path, monkeypatch):
    from prunenet_jax.models import decode

    folder = tiny_models.save_hf_model(tiny_models.make_hf_model("llama_tied"), tmp_path / "tiny")
    weights = sources.load_model(folder)
    monkeypatch.setattr(decode, "generate", lambda model, prompts, n, eos_ids=(): [[6] * 16])
    tok = _Tokenizer()
    tok.all_special_ids = [6]
    text = measures.continuation(weights, tok)
    assert text == "(16 special tokens, id 6)"
    md = tables.markdown({"models": [_row("dense", 0.0, None, "d", continuation=text)]})
    assert "| dense | (16 special tokens, id 6) |" in md
    assert measures.continuation(weights, _Tokenizer(" is a language")) == " is a language"


def test_batch_table_retained_is_a_dash_not_dash_percent():
    from prunenet_jax.run.batch import BatchResult

    entries = [OutputEntry(ratio=0.2, kept=1229, params=10, ppl=None, checkpoint="a",
                           recipe={"mode": "energy"}),
               OutputEntry(ratio=0.25, kept=1152, params=10, ppl=30.0, checkpoint="b",
                           recipe={"mode": "energy"}, extra={"accuracy_retention": 0.877})]
    lines = BatchResult(entries, "m.json", 2).format_table().splitlines()
    assert lines[1].split() == ["a", "0.2", "energy", "1229", "10", "-", "-", "done"]
    assert lines[2].split() == ["b", "0.25", "energy", "1152", "10", "30.000", "87.7%", "done"]
    assert "-%" not in "\n".join(lines)


def test_prune_table_ratios_and_undefined_retention():
    from prunenet_jax.run.prune_run import PruneResult

    entries = [OutputEntry(ratio=0.2, kept=1229, params=10, ppl=30.0, recipe={"mode": "sample"},
                           extra={"accuracy": 0.0, "accuracy_retention": None})]
    table = PruneResult({}, entries, 20, 13.0, 0.0, {"0.2": {"ppl": 40.0, "accuracy": 0.0,
                                                          "accuracy_retention": None}}).format_table()
    rows = [line.split() for line in table.splitlines()[2:]]
    assert rows[0][0] == "0.2" and rows[0][-1] == "-"
    assert rows[1][0] == "0.2" and rows[1][-1] == "-" and "random" in rows[1]
