"""launch.evaluate with pruned models, a report folder and lm-eval, end to end on tiny models."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from prunenet_jax import sources
from prunenet_jax.evaluation import lm_eval
from prunenet_jax.evaluation import report
from prunenet_jax.method import spectral
from prunenet_jax.models import registry
from tests import tiny_models
from tests.test_report import kept_indices, save_sliced, save_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "The quick brown fox jumps over the lazy dog, and pruning keeps the spectrum. " * 12


def _launch(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "launch.evaluate", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _offline_env(tmp):
    """An unreachable hub (the discard port refuses at once) and an empty datasets cache."""
    return {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp / "hf_home"),
            "HF_DATASETS_CACHE": str(tmp / "hf_home" / "datasets"),
            "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A dense tiny model, a copy of it (ratio 0), a 36-of-48 slice, and a prune run folder whose
    manifest lists one finished HF output (ratio 0.5), one finished output without an HF export
    (ratio 0.25, in its orbax_dir slot) and a failed one."""
    tmp = tmp_path_factory.mktemp("eval")
    hf = tiny_models.make_hf_model("llama_tied")
    dense = tiny_models.save_hf_model(hf, tmp / "dense")
    save_tokenizer(dense)
    same = shutil.copytree(dense, tmp / "same")
    L, I = 3, 48
    sliced = save_sliced(hf, kept_indices(L, I, 36), tmp / "sliced")
    run = tmp / "run"
    save_sliced(hf, kept_indices(L, I, 24, seed=1), run / "ratio_0.5" / "hf")
    save_sliced(hf, kept_indices(L, I, 36, seed=2), run / "ratio_0.25" / "orbax")
    (run / "manifest.json").write_text(json.dumps({"outputs": [
        {"ratio": 0.5, "kept": 24, "params": 1, "ppl": None, "orbax_dir": "ratio_0.5/orbax",
         "hf_dir": "ratio_0.5/hf", "status": "done"},
        {"ratio": 0.25, "kept": 36, "params": 1, "ppl": None, "orbax_dir": "ratio_0.25/orbax",
         "hf_dir": None, "status": "done"},
        {"ratio": 0.75, "kept": 12, "params": 1, "ppl": None, "orbax_dir": "ratio_0.75/orbax",
         "hf_dir": None, "status": "failed"}]}))
    text = tmp / "text.txt"
    text.write_text(TEXT)
    return {"tmp": tmp, "dense": dense, "same": str(same), "sliced": sliced, "run": str(run),
            "text": str(text)}


@pytest.fixture(scope="module")
def full_run(setup):
    out = setup["tmp"] / "report"
    proc = _launch(f"--model={setup['dense']}", f"--pruned={setup['same']},{setup['sliced']},{setup['run']}",
                   f"--eval_text={setup['text']}", "--seq_len=32", f"--report_dir={out}")
    return proc, _ok(proc), out


def test_report_folder_and_numbers(setup, full_run):
    proc, summary, out = full_run
    assert sorted(os.listdir(out)) == sorted([report.JSON, report.MARKDOWN, report.SPECTRA_PNG,
                                              report.KS_PNG, report.PPL_PNG])
    data = json.loads((out / report.JSON).read_text())
    assert {**data, "report_dir": str(out)} == summary  # the last line is the report
    names = [m["name"] for m in data["models"]]
    assert names == ["dense", "same", "sliced", "run/ratio_0.5", "run/ratio_0.25"]  # failed: skipped
    dense, same, sliced, half, quarter = data["models"]
    assert same["ks"] == [0.0] * 3 and same["ratio"] == 0.0 and same["ppl"] == dense["ppl"]
    assert sliced["kept"] == 36 and sliced["ratio"] == 0.25  # from the config: 1 - 36/48
    assert half["ratio"] == 0.5 and half["kept"] == 24 and quarter["ratio"] == 0.25  # the manifest's
    assert quarter["source"] == os.path.join(setup["run"], "ratio_0.25/orbax")  # hf_dir null: orbax_dir
    # KS: the launcher's numbers equal a direct computation on the gate matrices as stored.
    W = sources.load_model(setup["dense"]).layers[registry.GATE]
    Ws = sources.load_model(setup["sliced"]).layers[registry.GATE]
    want = [float(spectral.ks_statistic(spectral.singular_values(jnp.asarray(W[l])),
                                        spectral.singular_values(jnp.asarray(Ws[l])))) for l in range(3)]
    np.testing.assert_allclose(sliced["ks"], want, rtol=1e-6)
    assert min(sliced["ks"]) > 0 and sliced["mean_ks"] == pytest.approx(np.mean(want))
    assert sliced["params"] == dense["params"] - 3 * 3 * 12 * 32
    assert all(m["lm_eval"] is None for m in data["models"])
    # The console: the dense per-text table, then one row per model.
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split() == ["text", "tokens", "ppl"]
    header = next(i for i, l in enumerate(lines) if l.startswith("model "))
    assert [l.split()[0] for l in lines[header + 1:-1]] == names


def test_report_ppl_equals_plain_runs(setup, full_run):
    _, summary, _ = full_run
    plain = _ok(_launch(f"--model={setup['dense']}", f"--eval_text={setup['text']}", "--seq_len=32"))
    assert set(plain) == {"ppl", "tokens", "accuracy", "files"}  # a plain run: ppl, top-1 accuracy
    assert summary["ppl"] == plain["ppl"] and summary["models"][0]["ppl"] == plain["ppl"]
    sliced = _ok(_launch(f"--model={setup['sliced']}", f"--eval_text={setup['text']}", "--seq_len=32"))
    assert summary["models"][2]["ppl"] == sliced["ppl"] != plain["ppl"]


def test_lm_eval_offline_says_so_and_still_reports(setup, tmp_path):
    out = tmp_path / "report"
    proc = _launch(f"--model={setup['dense']}", f"--pruned={setup['run']}", "--lm_eval_tasks=paper",
                   f"--report_dir={out}", env=_offline_env(tmp_path))
    if importlib.util.find_spec("lm_eval") is None:
        assert proc.returncode == 2 and "pip install lm-eval==" in proc.stderr.splitlines()[-1]
        assert not out.exists()
        return
    summary = _ok(proc)
    warnings = [l for l in proc.stderr.splitlines() if l.startswith("warning: lm-eval:")]
    assert warnings == [
        "warning: lm-eval: cannot load the datasets of piqa, winogrande, hellaswag, arc_easy, "
        "arc_challenge: the Hugging Face dataset hub (http://127.0.0.1:9) is unreachable and they "
        "are not in the local datasets cache; their zero-shot accuracy is reported as unavailable "
        "(perplexity and spectra are not affected)"]
    data = json.loads((out / report.JSON).read_text())
    assert data["models"] == summary["models"] and len(data["models"]) == 3
    assert data["lm_eval"]["tasks"] == list(lm_eval.PAPER_TASKS)
    assert data["lm_eval"]["metrics"]["winogrande"] == "acc" and data["lm_eval"]["metrics"]["piqa"] == "acc_norm"
    dense, half, quarter = data["models"]
    for m in (dense, half):  # HF folders: unavailable for want of datasets
        assert m["lm_eval"]["available"] is False and "unreachable" in m["lm_eval"]["reason"]
    assert "not a Hugging Face folder" in quarter["lm_eval"]["reason"]  # no HF export
    assert all(m["ppl"] is None for m in data["models"]) and half["mean_ks"] > 0
    assert not (out / report.PPL_PNG).exists()  # no --eval_text: no perplexity plot
    assert "unavailable" in (out / report.MARKDOWN).read_text()


@pytest.mark.parametrize("args,fragment", [
    (["--pruned=/no/such/model"], "/no/such/model"),
    (["--pruned={bad_run}"], "no finished output"),
    (["--pruned={sliced}", "--report_dir={sliced}/report"], "inside the input"),
    (["--pruned={sliced}", "--report_dir={full}"], "--overwrite"),
    (["--pruned={sliced}", "--eval_text={empty}"], "empty"),
    (["--lm_eval_limit=-1", "--pruned={sliced}"], "--lm_eval_limit"),
    (["--lm_eval_batch_size=0", "--pruned={sliced}"], "--lm_eval_batch_size"),
    (["--lm_eval_tasks=piqa,no_such_task"], "no_such_task"),
])
def test_user_errors_exit_2_before_any_report(setup, tmp_path, args, fragment):
    if "no_such_task" in fragment and importlib.util.find_spec("lm_eval") is None:
        fragment = "pip install lm-eval=="
    bad_run = tmp_path / "bad_run"
    bad_run.mkdir()
    (bad_run / "manifest.json").write_text(json.dumps({"outputs": [{"ratio": 0.1, "status": "failed"}]}))
    (tmp_path / "empty.txt").write_text("")
    full = tmp_path / "full"
    full.mkdir()
    (full / "old.txt").write_text("old")
    args = [a.format(bad_run=bad_run, sliced=setup["sliced"], empty=tmp_path / "empty.txt",
                     full=full) for a in args]
    if not any(a.startswith("--report_dir") for a in args):
        args.append(f"--report_dir={tmp_path / 'report'}")
    before = sorted(os.listdir(setup["sliced"]))
    proc = _launch(f"--model={setup['dense']}", *args, env=_offline_env(tmp_path), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and fragment in last, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "report").exists() and os.listdir(full) == ["old.txt"]
    assert sorted(os.listdir(setup["sliced"])) == before


def test_a_real_prune_run_folder(setup, tmp_path):
    """launch.prune's own --out_dir (manifest, orbax and HF outputs) as --pruned: its HF export
    and its orbax checkpoint of the same output are the same model to every measure."""
    run = tmp_path / "run"
    prune = subprocess.run([sys.executable, "-m", "launch.prune", f"--model={setup['dense']}",
                            "--ratios=0.25", "--episodes=2", f"--out_dir={run}", "--export_hf"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert prune.returncode == 0, prune.stderr[-3000:]
    summary = _ok(_launch(f"--model={setup['dense']}", f"--pruned={run},{run}/ratio_0.25/orbax",
                          f"--eval_text={setup['text']}", "--seq_len=32"))
    dense, hf, orbax = summary["models"]
    assert hf["source"] == os.path.join(str(run), "ratio_0.25/hf")
    # named by source + mode + ratio (pruned_models.py), told apart when they repeat
    assert hf["name"] == "dense sample 0.25" and orbax["name"] == "dense sample 0.25#2"
    for key in ("ratio", "kept", "params", "ks", "ppl"):
        assert hf[key] == orbax[key], key
    assert hf["ratio"] == 0.25 and hf["kept"] == 36 and hf["mean_ks"] > 0 and hf["ppl"] != dense["ppl"]
