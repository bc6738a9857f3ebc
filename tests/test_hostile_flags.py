"""Hostile flag values and concurrent writers, launcher by launcher (issue 21): every numeric flag
has a range checked before anything is written, text flags and flag files that are not UTF-8 are
one error line, `generate` refuses a prompt past the model's context, each writing launcher holds
a lock on its output, and labels come from the weights (a tampered manifest is refused)."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from prunenet_jax.files import run_lock
from tests import tiny_models
from tests.test_user_errors import ENV, ROOT, _assert_user_error, _run, tree_hash

LAUNCHERS = ["prune", "batch_prune", "recover", "convert", "evaluate", "generate"]


# ----------------------------------------------------------------------------- numbers

_EVERY_NUMBER = textwrap.dedent("""
    import json, math, sys
    sys.argv = ["x"]
    import importlib
    from absl import flags
    launcher = importlib.import_module("launch." + {name!r})
    from prunenet_jax.errors import UserError
    from prunenet_jax.launch import flag_checks
    from prunenet_jax.launch import flags as launch_flags
    F = flags.FLAGS
    names = [n for ns in launch_flags.launcher_flags(launcher.__name__).values() for n in ns]
    numbers = [n for n in names if flag_checks.is_number(F[n])]
    base = ["x"] + [f"--{{n}}=somewhere" for n in ("input", "out_dir") if n in names]  # required
    F(base)
    flag_checks.check_flags(names)  # every default passes
    refused, missing = {{}}, [n for n in numbers if n not in flag_checks.RANGES]
    for n in numbers:
        if n in missing:
            continue
        rule, integer = flag_checks.RANGES[n], F[n].flag_type() == "int"
        bad = [rule.low - 1, rule.high + 1] + ([] if integer else ["nan", "inf", "-inf"])
        if rule.open_low:
            bad.append(rule.low)
        if rule.open_high:
            bad.append(rule.high)
        for value in bad:
            value = int(value) if integer and not isinstance(value, str) else value
            F.unparse_flags()
            F(base + [f"--{{n}}={{value}}"])
            try:
                flag_checks.check_flags(names)
                refused[f"{{n}}={{value}}"] = None
            except UserError as e:
                refused[f"{{n}}={{value}}"] = str(e)
        F.unparse_flags()
        F(base + [f"--{{n}}={{rule.example}}"])
        flag_checks.check_flags(names)  # the example passes
    print(json.dumps({{"numbers": numbers, "missing": missing, "refused": refused}}))
""")


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_every_numeric_flag_has_a_range_that_refuses_out_of_range_values(launcher):
    proc = subprocess.run([sys.executable, "-c", _EVERY_NUMBER.format(name=launcher)], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["numbers"] and out["missing"] == [], out["missing"]
    for flag_value, message in out["refused"].items():
        name, value = flag_value.split("=", 1)
        assert message is not None, f"--{flag_value} was accepted"
        assert message.startswith(f"--{name}=") and "must be" in message and "e.g." in message, message


@pytest.mark.parametrize("args,fragment", [
    (["--recover_lr=nan"], "--recover_lr=nan must be a finite number"),
    (["--lora_alpha=inf"], "--lora_alpha=inf must be"),
    (["--recover_seed=-1"], "--recover_seed=-1 must be an integer in [0, 2**63 - 1]"),
    (["--recover_steps=100000000000"], "--recover_steps=100000000000 must be an integer in"),
    (["--clip_norm=0"], "--clip_norm=0.0 must be"),
])
def test_recover_refuses_bad_numbers_before_anything_is_written(tmp_path, args, fragment):
    out = tmp_path / "out"
    proc = _run("launch.recover", f"--input={tmp_path}", f"--out_dir={out}", *args)
    _assert_user_error(proc, fragment)
    assert not out.exists()


# ----------------------------------------------------------------------------- text

@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_flag_file_that_is_not_utf8_is_one_error_line(launcher, tmp_path):
    flagfile = tmp_path / "flags.txt"
    flagfile.write_bytes(b"--out_dir=caf\xe9\n")
    _assert_user_error(_run(f"launch.{launcher}", f"--flagfile={flagfile}"),
                       f"--flagfile={flagfile}: not UTF-8 text")
    assert sorted(os.listdir(tmp_path)) == ["flags.txt"]


def test_a_prompt_that_is_not_utf8_is_one_error_line():
    proc = subprocess.run([sys.executable.encode(), b"-m", b"launch.generate",
                           b"--prompt=caf\xe9 au lait"], cwd=ROOT, env=ENV, capture_output=True,
                          timeout=300)
    proc.stderr = proc.stderr.decode(errors="replace")
    _assert_user_error(proc, "--prompt holds bytes that are not UTF-8 text")


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny random model (vocab 97, no tokenizer), a prune run of it (random, two ratios), and
    a tiny model with the default model's tokenizer, a 48-token context and a zero lm_head (its
    top-1 accuracy on any text is 0)."""
    root = tmp_path_factory.mktemp("flags")
    tiny = tiny_models.save_hf_model(
        tiny_models.make_hf_model("llama_gqa_untied", num_hidden_layers=2, intermediate_size=40),
        root / "tiny")
    run = root / "run"
    proc = _run("launch.prune", f"--model={tiny}", "--ratios=0.25,0.5", "--mode=random",
                f"--out_dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from prunenet_jax.formats import gguf, gguf_tokenizer

    tokenizer = gguf_tokenizer.load_gguf_tokenizer(gguf.default_model_path())
    short = tiny_models.make_hf_model("llama_gqa_untied", num_hidden_layers=2, intermediate_size=40,
                                      vocab_size=len(tokenizer), max_position_embeddings=48)
    with torch.no_grad():
        short.lm_head.weight.zero_()
    short_dir = tiny_models.save_hf_model(short, root / "short")
    tokenizer.save_pretrained(short_dir)
    text = root / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    return {"root": root, "tiny": tiny, "run": run, "short": short_dir, "text": text}


# ----------------------------------------------------------------------------- generate

def test_generate_refuses_a_prompt_past_the_context_and_truncates_when_asked(models):
    prompt = "one two three four five six seven eight nine ten " * 4  # > 40 tokens
    proc = _run("launch.generate", f"--model={models['short']}", f"--prompt={prompt}",
                "--max_new_tokens=8")
    _assert_user_error(proc, "exceed the model's context of 48 tokens", "--truncate_prompt")
    _assert_user_error(_run("launch.generate", f"--model={models['short']}", "--prompt=hi",
                            "--max_new_tokens=48"), "leaves no room for the prompt")
    proc = _run("launch.generate", f"--model={models['short']}", f"--prompt={prompt}",
                "--max_new_tokens=8", "--truncate_prompt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: --truncate_prompt: the prompt's first" in proc.stderr
    assert len(json.loads(proc.stdout.strip().splitlines()[-1])["tokens"]) == 8


# ----------------------------------------------------------------------------- reports

def test_a_dense_accuracy_of_zero_reports_retention_as_not_defined(models, tmp_path):
    proc = _run("launch.prune", f"--model={models['short']}", "--ratios=0.5", "--mode=random",
                f"--out_dir={tmp_path / 'out'}", f"--eval_text={models['text']}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["dense_accuracy"] == 0.0
    assert [o["accuracy_retention"] for o in result["outputs"]] == [None]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["outputs"][0]["accuracy_retention"] is None


# ----------------------------------------------------------------------------- locks

def _writer(launcher, models, out):
    if launcher == "convert":
        return "launch.convert", [f"--input={models['run']}", "--ratio=0.5", f"--output={out}"]
    return "launch.evaluate", [f"--model={models['tiny']}", f"--pruned={models['run']}",
                               f"--report_dir={out}"]


@pytest.mark.parametrize("launcher", ["convert", "evaluate"])
def test_a_locked_output_is_refused_and_nothing_is_written(models, tmp_path, launcher):
    out = tmp_path / "out"
    before = tree_hash(models["root"])
    module, args = _writer(launcher, models, out)
    with run_lock.hold_beside(str(out), flag="--output"):
        proc = _run(module, *args)
    flag = "--output" if launcher == "convert" else "--report_dir"
    _assert_user_error(proc, f"{flag}={out} is in use by another run (pid {os.getpid()}")
    assert os.listdir(tmp_path) == [] and tree_hash(models["root"]) == before


@pytest.mark.parametrize("launcher", ["convert", "evaluate"])
def test_two_writers_started_together_one_is_refused_the_other_intact(models, tmp_path, launcher):
    out = tmp_path / "out"
    module, args = _writer(launcher, models, out)
    procs = [subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], [r[2][-2000:] for r in results]
    loser = next(r for r in results if r[0] == 2)
    last = loser[2].rstrip("\n").split("\n")[-1]
    assert "is in use by another run" in last or "not empty" in last or "exists" in last, last
    assert "Traceback" not in loser[2]
    if launcher == "convert":
        from prunenet_jax import sources

        assert sources.load_model(str(out)).config.intermediate_size == 20
    else:
        assert len(json.loads((out / "report.json").read_text())["models"]) == 3
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no lock file or temporary folder left


# ----------------------------------------------------------------------------- labels

def _tampered(models, tmp_path, **changes):
    run = tmp_path / "run"
    shutil.copytree(models["run"], run)
    manifest = json.loads((run / "manifest.json").read_text())
    entry = next(o for o in manifest["outputs"] if o["ratio"] == 0.5)
    entry.update(changes)
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


@pytest.mark.parametrize("changes,fragment", [
    ({"ratio": 0.75}, "records ratio 0.75"),
    ({"mode": "energy"}, "records mode 'energy'"),
])
def test_a_manifest_label_that_disagrees_with_the_model_is_refused(models, tmp_path, changes,
                                                                   fragment):
    run = _tampered(models, tmp_path, **changes)
    before = tree_hash(run)
    out = tmp_path / "report"
    proc = _run("launch.evaluate", f"--model={models['tiny']}", f"--pruned={run}",
                f"--report_dir={out}")
    _assert_user_error(proc, fragment)
    assert not out.exists() and tree_hash(run) == before


def test_a_recorded_ratio_is_checked_against_the_weights():
    from prunenet_jax import pruned_models
    from prunenet_jax.errors import UserError

    assert pruned_models.weights_ratio(0.2, 1228, 1536, "m") == 0.2
    assert pruned_models.weights_ratio(None, 1228, 1536, "m") == pytest.approx(1 - 1228 / 1536)
    for bad in (0.5, 0, True, "0.2", float("nan")):
        with pytest.raises(UserError, match="m records ratio"):
            pruned_models.weights_ratio(bad, 1228, 1536, "m")
    assert np.isclose(pruned_models.weights_ratio(0.0, 40, 40, "m"), 0.0)
