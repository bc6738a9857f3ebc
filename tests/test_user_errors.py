"""The user-error matrix: every launcher, every bad input -> one `error:` line naming the input and
the fix, exit code 2 (a batch item fails alone: exit 1), no traceback, nothing written, and the
input files unchanged byte for byte."""
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from tests import tiny_models
from tests.test_gguf import make_tensors, write_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def tree_hash(path) -> dict:
    """sha256 of every file under `path` (or of the file itself)."""
    path = str(path)
    if os.path.isfile(path):
        return {path: hashlib.sha256(open(path, "rb").read()).hexdigest()}
    out = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """name -> (path of a bad model input, text the error must contain)."""
    root = tmp_path_factory.mktemp("bad")
    good = pathlib.Path(tiny_models.save_hf_model(
        tiny_models.make_hf_model("llama_gqa_untied", num_hidden_layers=2, intermediate_size=40),
        root / "good"))
    cases = {"missing": (root / "no_such_model", "no such file or folder")}

    no_config = root / "no_config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(open(good / "model.safetensors", "rb").read())
    cases["no_config"] = (no_config, "config.json")

    gpt2 = pathlib.Path(tiny_models.save_hf_model(
        tiny_models.make_hf_model("llama_gqa_untied", num_hidden_layers=2, intermediate_size=40), root / "gpt2"))
    cfg = json.load(open(gpt2 / "config.json"))
    cfg["model_type"] = "gpt2"
    json.dump(cfg, open(gpt2 / "config.json", "w"))
    cases["model_type"] = (gpt2, "gpt2")

    truncated = pathlib.Path(tiny_models.save_hf_model(
        tiny_models.make_hf_model("llama_gqa_untied", num_hidden_layers=2, intermediate_size=40), root / "truncated"))
    data = open(truncated / "model.safetensors", "rb").read()
    open(truncated / "model.safetensors", "wb").write(data[: len(data) // 2])
    cases["truncated_safetensors"] = (truncated, "truncated")

    gguf_path = write_gguf(root / "tiny.gguf", make_tensors())
    data = open(gguf_path, "rb").read()
    open(root / "truncated.gguf", "wb").write(data[: len(data) * 2 // 3])
    cases["truncated_gguf"] = (root / "truncated.gguf", "truncated")

    nan_model = tiny_models.make_hf_model("llama_gqa_untied", num_hidden_layers=2, intermediate_size=40)
    with torch.no_grad():
        nan_model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    cases["nan"] = (tiny_models.save_hf_model(nan_model, root / "nan"),
                    "'model.layers.1.mlp.up_proj.weight' has 1 NaN or Inf")
    text = root / "text.txt"
    text.write_text("Some English text to score. " * 20)
    return root, cases, text


def _run(module, *args):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


def _command(launcher, model, out, text):
    if launcher == "prune":
        return "launch.prune", [f"--model={model}", "--ratios=0.5", "--episodes=1", f"--out_dir={out}"]
    if launcher == "convert":
        return "launch.convert", [f"--input={model}", f"--output={out}"]
    return "launch.evaluate", [f"--model={model}", f"--eval_text={text}", f"--report_dir={out}"]


def _assert_user_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # lines end at "\n" only: a progress bar's "\r" redraws must not share the error's line
    last = proc.stderr.rstrip("\n").split("\n")[-1]
    assert last.startswith("error: ") and "\r" not in last, repr(last[-500:])
    for f in fragments:
        assert f in last, (f, last)
    return last


CASES = ["missing", "no_config", "model_type", "truncated_safetensors", "truncated_gguf", "nan"]


@pytest.mark.parametrize("launcher", ["prune", "convert", "evaluate"])
@pytest.mark.parametrize("case", CASES)
def test_bad_model_input(bad, tmp_path, launcher, case):
    root, cases, text = bad
    model, fragment = cases[case]
    before = tree_hash(root)
    out = tmp_path / "out"
    module, args = _command(launcher, model, out, text)
    last = _assert_user_error(_run(module, *args), fragment)
    assert os.path.basename(str(model)) in last  # names the offending input
    assert not out.exists()
    assert tree_hash(root) == before


def test_bad_batch_items_fail_alone(bad, tmp_path):
    root, cases, text = bad
    policy_run = tmp_path / "policy_run"
    proc = _run("launch.prune", f"--model={root / 'good'}", "--ratios=0.5", "--episodes=1",
                f"--out_dir={policy_run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = tree_hash(root)
    items = [str(cases[c][0]) for c in CASES] + [str(root / "good")]
    out = tmp_path / "out"
    proc = _run("launch.batch_prune", f"--checkpoints={','.join(items)}", "--ratios=0.5",
                f"--policy={policy_run / 'policy'}", f"--out_dir={out}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    for case in CASES:
        path, fragment = cases[case]
        name = os.path.basename(str(path)).removesuffix(".gguf")
        assert any(line.startswith(f"error: {name}: ") and fragment in line for line in errors), \
            (case, errors)
    manifest = json.load(open(out / "manifest.json"))
    status = {e["checkpoint"]: e["status"] for e in manifest["outputs"]}
    assert status.pop("good") == "done" and set(status.values()) == {"failed"}
    assert tree_hash(root) == before


@pytest.fixture(scope="module")
def good_run(bad, tmp_path_factory):
    root = bad[0]
    out = tmp_path_factory.mktemp("good_run") / "out"
    proc = _run("launch.prune", f"--model={root / 'good'}", "--ratios=0.5", "--episodes=1",
                f"--out_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


FLAG_CASES = [
    (["--ratios=abc"], "--ratios"),
    (["--ratios=-0.2"], "ratio -0.2"),
    (["--ratios=1"], "ratio 1.0"),
    (["--ratios=0.99"], "keeps no channel"),
    (["--episodes=0"], "--episodes=0"),
    (["--checkpoint_every=0"], "--checkpoint_every=0"),
    (["--mode=fast"], "--mode"),
    (["--update_schedule=daily"], "--update_schedule"),
    (["--mesh=9"], "--mesh=9"),
    (["--eval_text={empty}"], "is empty"),
    (["--out_dir={file}/sub"], "cannot be written"),
]


@pytest.mark.parametrize("launcher", ["prune", "batch_prune"])
@pytest.mark.parametrize("extra,fragment", FLAG_CASES)
def test_bad_flags(bad, tmp_path, launcher, extra, fragment):
    root = bad[0]
    empty, file = tmp_path / "empty.txt", tmp_path / "file"
    empty.write_text("  \n")
    file.write_text("x")
    model_flag = "--model" if launcher == "prune" else "--checkpoints"
    args = [f"{model_flag}={root / 'good'}", "--ratios=0.5", "--episodes=1",
            f"--out_dir={tmp_path / 'out'}"]
    args += [e.format(empty=empty, file=file) for e in extra]
    before = tree_hash(root)
    _assert_user_error(_run(f"launch.{launcher}", *args), fragment)
    assert not (tmp_path / "out").exists()
    assert tree_hash(root) == before


def test_existing_out_dir_with_other_content(bad, tmp_path):
    root = bad[0]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = _run("launch.prune", f"--model={root / 'good'}", "--ratios=0.5", "--episodes=1",
                f"--out_dir={out}")
    _assert_user_error(proc, str(out), "--overwrite")
    assert os.listdir(out) == ["notes.txt"]


def test_a_full_run_leaves_the_input_unchanged(bad, good_run, tmp_path):
    root, _, text = bad
    before = tree_hash(root / "good")
    for module, args in [
        ("launch.prune", [f"--model={root / 'good'}", "--ratios=0.25,0.5", "--episodes=2",
                          f"--out_dir={tmp_path / 'p'}", "--export_hf", "--torch_format"]),
        ("launch.convert", [f"--input={root / 'good'}", f"--output={tmp_path / 'c'}"]),
        ("launch.batch_prune", [f"--checkpoints={root / 'good'}", "--ratios=0.5",
                                f"--policy={good_run / 'policy'}", f"--out_dir={tmp_path / 'b'}",
                                "--export_hf"]),
        ("launch.evaluate", [f"--model={root / 'good'}", f"--pruned={tmp_path / 'p'}",
                             f"--report_dir={tmp_path / 'r'}"]),
    ]:
        proc = _run(module, *args)
        assert proc.returncode == 0, (module, proc.stderr[-3000:])
    assert tree_hash(root / "good") == before
