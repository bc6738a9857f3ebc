"""launch.recover end to end on a tiny pruned model: SIGKILL then --resume equals an uninterrupted
run bit for bit; bad inputs exit 2 with one line and write nothing."""
import glob
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from prunenet_jax import sources
from tests import tiny_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
FAST = ["--train_seq_len=32", "--lora_rank=4", "--pool_rows=8", "--train_batch=2"]


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny dense model and its pruned run folder (ratio 0.25)."""
    base = tmp_path_factory.mktemp("recover")
    dense = tiny_models.save_hf_model(tiny_models.make_hf_model("llama_gqa_untied"), base / "dense")
    proc = _run("launch.prune", f"--model={dense}", "--ratios=0.25", "--episodes=1",
                f"--out_dir={base / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dense, str(base / "run")


def _recover(inp, out, *extra):
    return ["launch.recover", f"--input={inp}", f"--out_dir={out}", *FAST, *extra]


def _arrays(folder):
    w = sources.load_model(folder)
    return {n: a for n, a in w.named_arrays()}


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, pruned):
    _, run = pruned
    steps = ["--recover_steps=300", "--recover_checkpoint_every=25"]
    full = _run(*_recover(run, tmp_path / "full", *steps))
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", *_recover(run, out, *steps)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "recover_state" / "ratio_0.25"
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if any(d.isdigit() and int(d) >= 50 for d in (os.listdir(state) if state.is_dir() else [])):
            break
        time.sleep(0.002)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "ratio_0.25").exists()  # nothing written but the training state

    resumed = _run(*_recover(run, out, *steps, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    entry = json.loads(resumed.stdout.strip().splitlines()[-1])["outputs"][0]
    assert entry["recovery"]["resumed_after"] >= 50
    a, b = _arrays(str(tmp_path / "full" / "ratio_0.25" / "orbax")), _arrays(str(out / "ratio_0.25" / "orbax"))
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    before = _arrays(os.path.join(run, "ratio_0.25", "orbax"))
    assert not np.array_equal(a["model.layers.0.mlp.up_proj.weight"],
                              before["model.layers.0.mlp.up_proj.weight"])  # it did train
    full_entry = json.loads(full.stdout.strip().splitlines()[-1])["outputs"][0]
    assert full_entry["recovery"]["tokens_seen"] == entry["recovery"]["tokens_seen"] > 0


def _tree_hash(folder):
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(folder, "**"), recursive=True)):
        if os.path.isfile(path):
            h.update(path.encode())
            h.update(open(path, "rb").read())
    return h.hexdigest()


def test_bad_inputs_exit_2_and_write_nothing(tmp_path, pruned):
    dense, run = pruned
    other = tiny_models.save_hf_model(tiny_models.make_hf_model("llama_gqa_untied", seed=5), tmp_path / "other")
    wider = tiny_models.save_hf_model(tiny_models.make_hf_model("llama_gqa_untied", hidden_size=48),
                                      tmp_path / "wider")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    cases = {
        "rank": (["--lora_rank=17"], "--lora_rank=17 must be between 1 and 16"),
        "empty_text": (["--objective=lm", f"--train_text={empty}"], "train text"),
        "not_parent": ([f"--dense={other}"], "was not pruned from"),
        "other_shape": ([f"--dense={wider}"], "cannot be a pruned version"),
        "steps": (["--recover_steps=0", "--norefit"], "--recover_steps=0 must be at least 1"),
        "refit_rows": (["--refit_rows=-1"], "--refit_rows=-1 must be an integer in [0,"),
        "no_text": (["--objective=lm"], "--objective=lm trains on text"),
    }
    before = _tree_hash(run), _tree_hash(dense)
    for name, (extra, message) in cases.items():
        out = tmp_path / f"out_{name}"
        proc = _run(*_recover(run, out, "--recover_steps=2", *extra))
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        assert lines[-1].startswith("error: ") and message in lines[-1], (name, lines[-1])
        assert "Traceback" not in proc.stderr, name
        assert not out.exists(), name
    assert (_tree_hash(run), _tree_hash(dense)) == before


def test_refit_alone_changes_down_proj_only_and_records_its_fit(tmp_path, pruned):
    _, run = pruned
    proc = _run(*_recover(run, tmp_path / "out", "--recover_steps=0", "--refit_rows=6"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    entry = json.loads(proc.stdout.strip().splitlines()[-1])["outputs"][0]["recovery"]
    fit = entry["refit"]
    assert entry["steps"] == 0 and entry["tokens_seen"] == 0
    assert fit["rows"] == 6 and fit["tokens"] > 0 and len(fit["layer_error_after"]) == 3
    assert all(a <= b for a, b in zip(fit["layer_error_after"], fit["layer_error_before"]))
    before = _arrays(os.path.join(run, "ratio_0.25", "orbax"))
    after = _arrays(str(tmp_path / "out" / "ratio_0.25" / "orbax"))
    for name in before:
        same = np.array_equal(before[name], after[name])
        assert same == ("down_proj" not in name), name


def test_prune_with_recovery_refuses_a_bad_rank_before_training(tmp_path, pruned):
    dense, _ = pruned
    out = tmp_path / "out"
    proc = _run("launch.prune", f"--model={dense}", "--ratios=0.25", "--episodes=1",
                f"--out_dir={out}", "--recover_steps=2", "--lora_rank=17")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --lora_rank=17 must be between 1 and 16")
    assert not out.exists()


def test_recovering_a_run_of_several_modes_keeps_them_apart_and_reports_before_after(tmp_path):
    """A prune run with two modes at one ratio: launch.recover writes <mode>/ratio_<r>/ for each
    (not one over the other), records each entry's mode and what its ppl was measured on, and the
    report shows the recorded before-recovery ppl beside its own and plots it."""
    from tests.test_report import save_tokenizer

    dense = tiny_models.save_hf_model(tiny_models.make_hf_model("llama_gqa_untied"), tmp_path / "dense")
    save_tokenizer(dense)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    run, out, rep = tmp_path / "run", tmp_path / "recovered", tmp_path / "report"
    ev = [f"--eval_text={text}", "--seq_len=64"]
    proc = _run("launch.prune", f"--model={dense}", "--ratios=0.25", "--episodes=1",
                "--mode=sample,random", f"--out_dir={run}", *ev)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pruned_ppl = {e["mode"]: e["ppl"] for e in json.loads(proc.stdout.strip().splitlines()[-1])["outputs"]}
    proc = _run(*_recover(run, out, "--recover_steps=3", *ev))
    assert proc.returncode == 0, proc.stderr[-3000:]
    entries = json.load(open(out / "manifest.json"))["outputs"]
    assert sorted(e["mode"] for e in entries) == ["random", "sample"]
    for e in entries:
        assert e["orbax_dir"] == f"{e['mode']}/ratio_0.25/orbax" and os.path.isdir(out / e["orbax_dir"])
        rec = e["recovery"]
        assert rec["ppl_before"] == pytest.approx(pruned_ppl[e["mode"]], rel=1e-5)
        assert rec["eval"] == {"text": str(text), "max_tokens": 0, "seq_len": 64}
    assert len({_tree_hash(out / e["orbax_dir"]) for e in entries}) == 2

    proc = _run("launch.evaluate", f"--model={dense}", f"--pruned={out}", f"--report_dir={rep}", *ev)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.load(open(rep / "report.json"))
    recovered = summary["models"][1:]
    assert sorted(m["mode"] for m in recovered) == ["random", "sample"]
    for m in recovered:
        assert m["recovery"]["ppl_before"] == pytest.approx(pruned_ppl[m["mode"]], rel=1e-5)
        assert m["ppl"] == pytest.approx(m["recovery"]["ppl_after"], rel=1e-4)
    md = open(rep / "report.md").read()
    not_comparable = re.compile(r"\d \(other text\) \|")
    assert "ppl before recovery" in md and not not_comparable.search(md)
    assert os.path.getsize(rep / "ppl_vs_ratio.png") > 0

    # Measured on other windows, the recorded values are shown as not comparable (and not plotted).
    proc = _run("launch.evaluate", f"--model={dense}", f"--pruned={out}", f"--report_dir={rep}",
                "--overwrite", f"--eval_text={text}", "--seq_len=32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(not_comparable.findall(open(rep / "report.md").read())) == 2


def test_teacher_cache_end_to_end(tmp_path, pruned):
    _, run = pruned
    out = tmp_path / "cached"
    proc = _run(*_recover(run, out, "--recover_steps=2", "--teacher_cache=on", "--teacher_topk=8"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.load(open(out / "manifest.json"))["outputs"][0]["recovery"]
    assert rec["teacher_cached"] is True and rec["config"]["teacher_topk"] == 8
    assert all(np.isfinite(rec["losses"]))


def test_prune_with_recover_steps_equals_prune_then_recover(tmp_path, pruned):
    """--recover_steps on launch.prune recovers each output before writing it, exactly as
    launch.recover does afterwards (same refit, pool and steps), and records it in the recipe."""
    dense, run = pruned
    out = tmp_path / "pruned_and_recovered"
    proc = _run("launch.prune", f"--model={dense}", "--ratios=0.25", "--episodes=1",
                f"--out_dir={out}", "--recover_steps=2", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entry = json.load(open(out / "manifest.json"))["outputs"][0]
    assert entry["recovery"]["steps"] == 2 and entry["recovery"]["refit"]["rows"] == 8
    assert entry["recover_recipe"]["refit"] is True
    later = tmp_path / "recovered_later"
    proc = _run(*_recover(run, later, "--recover_steps=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = _arrays(str(out / "ratio_0.25" / "orbax"))
    b = _arrays(str(later / "ratio_0.25" / "orbax"))
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def test_recover_flag_runs_the_default_recovery_and_refuses_zero_steps(tmp_path, pruned):
    """--recover on launch.prune is --recover_steps at launch.recover's default; with
    --recover_steps=0 beside it the run is refused before anything is written."""
    from prunenet_jax.recovery.config import RecoverConfig

    dense, _ = pruned
    out = tmp_path / "out"
    proc = _run("launch.prune", f"--model={dense}", "--ratios=0.25", "--episodes=1",
                f"--out_dir={out}", "--recover", "--recover_steps=0")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--recover asks for the default recovery and --recover_steps=0" in proc.stderr
    assert not out.exists()
    proc = _run("launch.prune", f"--model={dense}", "--ratios=0.25", "--episodes=1",
                f"--out_dir={out}", "--recover", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entry = json.load(open(out / "manifest.json"))["outputs"][0]
    assert entry["recovery"]["steps"] == RecoverConfig.steps == 60
    assert len(entry["recovery"]["losses"]) == 60
