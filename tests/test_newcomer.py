"""What a newcomer sees (issue 25): each launcher's --help lists its own flags, grouped, with
defaults; a CPU run prints no backend-probe noise; log lines go above the progress bars; the
warnings for a refit that made things worse and for `--mode=sample` alone fire when they should
and stay quiet otherwise."""
import io
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from prunenet_jax import progress, prune, sources
from prunenet_jax.recovery import refit
from prunenet_jax.recovery.config import RecoverConfig
from prunenet_jax.recovery.recover import RecoverSpec, recover_weights
from tests import tiny_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = {**os.environ, "JAX_PLATFORMS": "cpu"}

KEY_FLAGS = {
    "prune": ["--mode", "--ratios", "--export_hf", "--eval_text", "--episodes", "--recover_steps",
              "--refit_rows", "--model", "--out_dir", "--coordinator_address", "--mesh"],
    "batch_prune": ["--checkpoints", "--ratios", "--policy", "--mode", "--export_hf", "--mesh"],
    "recover": ["--input", "--recover_steps", "--refit_rows", "--eval_text", "--refit", "--out_dir"],
    "evaluate": ["--model", "--pruned", "--eval_text", "--report_dir"],
    "generate": ["--model", "--prompt"],
    "convert": ["--input", "--output"],
}
ABSL_INTERNALS = ["logtostderr", "--flagfile", "--undefok", "--verbosity", "only_check_args",
                  "--helpxml", "absl.", "jax_"]


@pytest.fixture(scope="module")
def helps():
    """{launcher: finished --help process}, the six run side by side."""
    procs = {name: subprocess.Popen([sys.executable, "-m", f"launch.{name}", "--help"], cwd=ROOT,
                                    env=CPU, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for name in KEY_FLAGS}
    return {name: (p.wait(timeout=300), *p.communicate()) for name, p in procs.items()}


@pytest.mark.parametrize("launcher", sorted(KEY_FLAGS))
def test_help_lists_the_launchers_flags_grouped_with_defaults_and_no_absl_internals(helps, launcher):
    code, out, err = helps[launcher]
    assert code == 0, err[-2000:]
    listed = {line.split(":")[0].strip() for line in out.splitlines() if line.startswith("  --")}
    missing = [f for f in KEY_FLAGS[launcher] if f not in listed]
    assert not missing, (missing, out)
    assert not [x for x in ABSL_INTERNALS if x in out], out
    assert "--helpfull" in out  # where the rest are
    headings = [line for line in out.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert "model:" in headings and "other:" not in headings, headings  # every flag in a group
    assert "(default: " in out


def test_help_shows_defaults_and_groups_of_launch_prune(helps):
    _, out, _ = helps["prune"]
    lines = out.splitlines()
    at = lines.index("  --episodes: Training episodes")
    assert lines[at + 1].strip() == "(default: 20)"
    assert "(default: 'sample')" in out and "(default: off)" in out
    # the group a flag is in: --episodes under policy training, --mesh under devices
    heading = lambda flag: next(l for l in reversed(lines[:lines.index(
        next(l for l in lines if l.startswith(f"  {flag}:")))]) if l.endswith(":") and l[0] != " ")
    assert heading("--episodes").startswith("policy training")
    assert heading("--coordinator_address") == "devices:"
    assert heading("--refit_rows") == "recovery fine-tuning:"


def test_helpfull_is_still_absls(helps):
    proc = subprocess.run([sys.executable, "-m", "launch.generate", "--helpfull"], cwd=ROOT,
                          env=CPU, capture_output=True, text=True, timeout=300)
    assert "--prompt" in proc.stdout and "--[no]logtostderr" in proc.stdout


def test_a_cpu_run_prints_no_backend_probe(tmp_path):
    model = tiny_models.save_hf_model(tiny_models.make_hf_model("llama_tied"), tmp_path / "m")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # jax probes every backend
    proc = subprocess.run([sys.executable, "-m", "launch.convert", f"--input={model}",
                           f"--output={tmp_path / 'out'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [line for line in proc.stderr.splitlines()
                if "libtpu" in line or "Unable to initialize backend" in line], proc.stderr


def test_the_backend_filter_keeps_jax_warnings_and_other_info():
    from prunenet_jax.launch import common

    record = lambda name, level: logging.LogRecord(name, level, __file__, 1, "m", None, None)
    quiet = common._QuietBackends()
    assert not quiet.filter(record("jax._src.xla_bridge", logging.INFO))
    assert quiet.filter(record("jax._src.xla_bridge", logging.WARNING))
    assert quiet.filter(record("prunenet_jax.method.scores", logging.INFO))
    assert quiet.filter(record("jaxtyping", logging.INFO))


def test_log_records_go_through_once_above_the_bars():
    logger = logging.getLogger("test_newcomer.bars")
    logger.propagate = False
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.INFO)
    logger.handlers, logger.level = [handler], logging.DEBUG
    progress.log_above_bars(logger)
    progress.log_above_bars(logger)  # once: not wrapped twice
    bar = progress.bar(total=2, desc="test", file=io.StringIO())
    logger.info("one %.1f", 1.0)
    logger.debug("below the handler's level")
    bar.close()
    assert stream.getvalue() == "one 1.0\n"
    assert len(logger.handlers) == 1 and logger.handlers[0].handler is handler


# ----------------------------------------------------------------------------- --mode=sample alone

@pytest.mark.parametrize("modes,warns", [(("sample",), True), (("sample", "energy"), False),
                                         (("energy",), False), (("topk",), False),
                                         (("random", "sample"), False)])
def test_sample_alone_warns_once(capsys, modes, warns):
    assert prune.warn_if_sample_alone(modes) == warns
    err = capsys.readouterr().err
    assert (err.count("warning: ") == 1 and "--mode=energy" in err and "docs/modes.md" in err
            and len(err.splitlines()) == 1) if warns else err == ""


def test_the_prune_launchers_warn_at_the_start_of_a_sample_run(tmp_path):
    """The warning comes once the job's own checks pass (here the model then fails to load)."""
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    procs = {(launcher, mode): subprocess.Popen(
        [sys.executable, "-m", f"launch.{launcher}", f"--{what}={bad}", f"--mode={mode}",
         "--ratios=0.5", f"--out_dir={tmp_path / launcher / mode}"], cwd=ROOT, env=CPU,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for launcher, what in (("prune", "model"), ("batch_prune", "checkpoints"))
        for mode in ("sample", "energy")}
    for (launcher, mode), proc in procs.items():
        err = proc.communicate(timeout=300)[1]
        assert proc.returncode in (1, 2) and "Traceback" not in err, (launcher, err)
        assert err.strip().splitlines()[-1].startswith("error: "), (launcher, err)
        warned = [line for line in err.splitlines() if line.startswith("warning: --mode=sample")]
        assert len(warned) == (mode == "sample"), (launcher, mode, err)


# ----------------------------------------------------------------------------- the refit's harm

INFO = {"layer_error_before": [0.5, 0.4, 0.3], "layer_error_after": [0.2, 0.1, 0.05]}


def test_refit_harm_by_perplexity_when_measured():
    assert refit.harm(INFO, 52.76204692737599, 60.1) == (
        "the refit raised perplexity from 52.762 to 60.100")
    assert refit.harm(INFO, 52.7, 40.0) is None
    assert refit.harm(INFO, 52.7, 52.7) is None
    assert refit.harm(INFO, 52.7, float("nan")) is not None  # a refit to NaN made it worse
    # perplexity decides when it was measured, even where a layer's fit error rose
    assert refit.harm({**INFO, "layer_error_after": [0.6, 0.1, 0.05]}, 52.7, 40.0) is None


def test_refit_harm_by_layer_error_without_perplexity():
    assert refit.harm(INFO, None, None) is None
    worse = refit.harm({**INFO, "layer_error_after": [0.6, 0.1, 0.35]}, None, None)
    assert worse.startswith("the refit raised the relative fit error of layers 0 (0.5000 -> "
                            "0.6000), 2 (0.3000 -> 0.3500)")
    many = {"layer_error_before": [0.1] * 7, "layer_error_after": [0.2] * 7}
    assert refit.harm(many, 1.0, None).endswith("and 3 more")


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    folder = tiny_models.save_hf_model(tiny_models.make_hf_model("llama_gqa_untied"),
                                       tmp_path_factory.mktemp("dense") / "dense")
    dense = sources.load_model(folder)
    L, I = dense.config.num_hidden_layers, dense.config.intermediate_size
    rng = np.random.default_rng(0)
    kept = np.sort(np.stack([rng.choice(I, I // 2, replace=False) for _ in range(L)]), axis=1)
    return dense, prune.slice_weights(dense, kept)


@pytest.mark.parametrize("steps,refit_ppl,warns", [(0, 30.0, True), (0, 10.0, False), (1, 30.0, True)])
def test_recovery_warns_when_the_refit_raised_perplexity(capsys, tiny_pair, steps, refit_ppl, warns):
    """ppl of the pruned model 20; of the refit model `refit_ppl` (the first model measured after
    the pruned one: with 0 steps, the refit model is also the recovered one)."""
    dense, pruned = tiny_pair
    measured = []

    def ppl(weights):
        measured.append(weights)
        return 20.0 if len(measured) == 1 else refit_ppl

    cfg = RecoverConfig(steps=steps, seq_len=16, pool_rows=4, refit_rows=4, lora_rank=4, warmup=0)
    recover_weights(pruned, dense, RecoverSpec(cfg), tokenizer=None, ppl=ppl)
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning: ")]
    if warns:
        assert len(lines) == 1 and "raised perplexity from 20.000 to 30.000" in lines[0], lines
        assert "--norefit" in lines[0] and "24 channels" in lines[0]
    else:
        assert lines == []
    capsys.readouterr()


def test_recovery_without_eval_text_judges_the_refit_by_its_fit_error(capsys, tiny_pair):
    dense, pruned = tiny_pair
    cfg = RecoverConfig(steps=0, seq_len=16, pool_rows=4, refit_rows=4, lora_rank=4)
    _, info = recover_weights(pruned, dense, RecoverSpec(cfg), tokenizer=None)
    fit = info["recovery"]["refit"]
    assert all(a <= b for a, b in zip(fit["layer_error_after"], fit["layer_error_before"]))
    assert "warning: " not in capsys.readouterr().err  # least squares lowered every layer's error
