"""One resolver for "a pruned model" (pruned_models.py), used by every launcher: a prune run folder
(with --ratio/--mode to pick), a [<mode>/]ratio_<r> folder, an orbax folder and an HF folder all
name pruned models for launch.generate, launch.convert, launch.evaluate --pruned and
launch.recover --input; an ambiguous run folder is refused listing what it holds; labels are
source + mode + ratio; evaluate warns when --pruned was pruned from another model than --model."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from prunenet_jax import pruned_models, sources
from prunenet_jax.errors import UserError
from prunenet_jax.evaluation import comparison
from prunenet_jax.recovery import job as recovery_job
from tests import tiny_models
from tests.test_report import save_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
RECOVER_FAST = ["--recover_steps=1", "--train_seq_len=16", "--lora_rank=2", "--pool_rows=2",
                "--train_batch=1", "--refit_rows=2", "--recover_checkpoint_every=0"]
ALL = ["energy/ratio_0.25", "random/ratio_0.25", "energy/ratio_0.5", "random/ratio_0.5"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny dense model (with a tokenizer), another of the same shapes, and a prune run folder
    made in process: modes energy and random at ratios 0.25 and 0.5, with HF exports; plus a copy
    of its energy/ folder outside any run folder."""
    from prunenet_jax.method import calibration, episode
    from prunenet_jax.run import prune_run

    root = tmp_path_factory.mktemp("pruned_models")
    dense = tiny_models.save_hf_model(tiny_models.make_hf_model("llama_tied"), root / "dense")
    save_tokenizer(dense)
    other = tiny_models.save_hf_model(tiny_models.make_hf_model("llama_tied", seed=1), root / "other")
    save_tokenizer(other)
    run = root / "run"
    prune_run.run(prune_run.PruneJob(
        model=dense, ratios=(0.25, 0.5), training=prune_run.Training(episode.TrainConfig(ratio=0.5)),
        outputs=prune_run.OutputOptions(modes=("energy", "random"), export_hf=True),
        out_dir=str(run), calibration=calibration.Calibration(sequences=2, seq_len=8)), lambda: None)
    shutil.copytree(run / "energy", root / "copied")
    return {"root": root, "dense": dense, "other": other, "run": str(run),
            "ratio": str(run / "energy" / "ratio_0.5"), "copied": str(root / "copied")}


def _launch(name, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", f"launch.{name}", *map(str, args)], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=timeout)


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _refused(proc, *fragments):
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(f in last for f in fragments), last
    assert "Traceback" not in proc.stderr
    return last


def _same_arrays(a, b):
    na, nb = dict(sources.load_model(a, dtype=None).named_arrays()), dict(
        sources.load_model(b, dtype=None).named_arrays())
    assert na.keys() == nb.keys()
    for n in na:
        np.testing.assert_array_equal(na[n], nb[n], err_msg=n)


# ----------------------------------------------------------------------------- the resolver

def test_the_four_ways_name_the_same_models(made):
    run, ratio = made["run"], made["ratio"]
    every = pruned_models.resolve(run)
    assert [m.where for m in every] == ALL
    assert [m.label for m in every] == ["dense energy 0.25", "dense random 0.25", "dense energy 0.5",
                                        "dense random 0.5"]
    m = every[2]
    assert (m.ratio, m.mode, m.guard, m.source, m.recovery) == (0.5, "energy", False, made["dense"], None)
    assert m.orbax_dir == os.path.join(ratio, "orbax") and m.hf_dir == os.path.join(ratio, "hf")
    assert [x.where for x in pruned_models.resolve(os.path.join(run, "energy"))] == ["ratio_0.25", "ratio_0.5"]
    for path, orbax_dir, hf_dir in [(ratio, m.orbax_dir, m.hf_dir),
                                    (m.orbax_dir, m.orbax_dir, None), (m.hf_dir, None, m.hf_dir)]:
        one = pruned_models.resolve_one(path)
        assert (one.label, one.ratio, one.mode, one.source) == ("dense energy 0.5", 0.5, "energy", made["dense"])
        assert (one.orbax_dir, one.hf_dir) == (orbax_dir, hf_dir), path
    # Copied out of the run folder: read from the orbax metadata (an HF folder from its sibling).
    copied = pruned_models.resolve(made["copied"])
    assert [(x.where, x.label) for x in copied] == [("ratio_0.25", "dense energy 0.25"),
                                                    ("ratio_0.5", "dense energy 0.5")]
    for sub in ("ratio_0.5", "ratio_0.5/orbax", "ratio_0.5/hf"):
        one = pruned_models.resolve_one(os.path.join(made["copied"], sub))
        assert (one.label, one.ratio, one.mode, one.source) == ("dense energy 0.5", 0.5, "energy", made["dense"])
    plain = pruned_models.resolve_one(made["other"])  # an HF folder of no run: its folder name
    assert (plain.label, plain.ratio, plain.hf_dir, plain.orbax_dir) == ("other", None, made["other"], None)
    assert pruned_models.resolve("default") is None  # sources.py's: default, .gguf, hub ids


def test_ratio_and_mode_pick_and_ambiguity_lists_the_choices(made):
    run = made["run"]
    with pytest.raises(UserError) as e:
        pruned_models.resolve_one(run)
    assert str(e.value) == (f"--model={run} holds 4 pruned models: {', '.join(ALL)}; pick one with "
                            f"--ratio=R [--mode=M], or pass one's folder, e.g. {run}/energy/ratio_0.25/orbax")
    with pytest.raises(UserError, match="holds 2 pruned models of --ratio=0.5: energy/ratio_0.5, random/ratio_0.5"):
        pruned_models.resolve_one(run, ratio=0.5)
    assert pruned_models.resolve_one(run, 0.5, "random").where == "random/ratio_0.5"
    assert [m.where for m in pruned_models.resolve(run, mode="energy")] == ["energy/ratio_0.25", "energy/ratio_0.5"]
    with pytest.raises(UserError, match=r"holds no pruned model of --ratio=0.3; it holds 4: energy/ratio_0.25"):
        pruned_models.resolve(run, ratio=0.3)
    with pytest.raises(UserError, match="holds no pruned model of --mode=random"):
        pruned_models.resolve_one(made["ratio"], mode="random")
    with pytest.raises(UserError, match="holds no pruned model of --ratio=0.3 and --mode=energy"):
        pruned_models.resolve_one(run, ratio=0.3, mode="energy")
    with pytest.raises(UserError, match="--input=default: is not a folder; --ratio/--mode pick"):
        pruned_models.resolve("default", ratio=0.5, flag="--input")
    labels = [m.label for m in pruned_models.unique_labels(pruned_models.resolve(made["ratio"]) * 2)]
    assert labels == ["dense energy 0.5", "dense energy 0.5#2"]


def test_recover_inputs_accept_the_four_ways(made):
    run, ratio = made["run"], made["ratio"]
    assert [p.where for p in recovery_job.pruned_inputs(run)] == ALL
    assert [p.where for p in recovery_job.pruned_inputs(run, mode="random")] == ["random/ratio_0.25",
                                                                                "random/ratio_0.5"]
    for path in (ratio, os.path.join(ratio, "orbax"), os.path.join(ratio, "hf")):
        [p] = recovery_job.pruned_inputs(path)
        assert (p.ratio, p.mode, p.source) == (0.5, "energy", made["dense"])
    with pytest.raises(UserError, match="neither a prune run folder nor a pruned model's folder"):
        recovery_job.pruned_inputs(str(made["root"] / "run" / "policy_missing_here"))


def test_source_warning_only_when_the_sources_differ(made):
    pruned = comparison.expand_pruned(made["ratio"])
    assert pruned[0].pruned_from == made["dense"] and pruned[0].name == "dense energy 0.5"
    assert comparison.warn_other_source(made["dense"], pruned) == []
    assert comparison.warn_other_source(made["dense"] + os.sep, pruned) == []  # the same folder
    [line] = comparison.warn_other_source(made["other"], pruned)
    assert line.startswith("warning: dense energy 0.5: pruned from ") and made["other"] in line
    unknown = comparison.expand_pruned(made["other"])  # records no source: nothing to compare
    assert comparison.warn_other_source(made["dense"], unknown) == []
    from prunenet_jax.formats import gguf

    recorded = [comparison.Pruned("x", "x", "x", 0.5, None, pruned_from="default")]
    assert comparison.warn_other_source(gguf.default_model_path(), recorded) == []
    assert len(comparison.warn_other_source(made["dense"], recorded)) == 1


# ----------------------------------------------------------------------------- the launchers

def test_generate_accepts_the_four_ways(made):
    """The launcher with a run folder and --ratio/--mode; the other ways through its job (one
    compile)."""
    from prunenet_jax import generation

    run, ratio = made["run"], made["ratio"]
    first = _ok(_launch("generate", f"--model={run}", "--ratio=0.5", "--mode=energy",
                        "--prompt=The quick brown", "--max_new_tokens=4"))
    for model in (ratio, f"{ratio}/orbax", f"{ratio}/hf", f"{made['copied']}/ratio_0.5"):
        got = generation.generate(generation.GenerateJob(model=model, prompt="The quick brown",
                                                         max_new_tokens=4))
        assert got["tokens"] == first["tokens"], model
    assert len(first["tokens"]) >= 1


@pytest.mark.parametrize("launcher", ["generate", "convert"])
def test_one_model_launchers_refuse_an_ambiguous_run_folder(made, tmp_path, launcher):
    run = made["run"]
    flag = "--model" if launcher == "generate" else "--input"
    extra = ["--prompt=hi"] if launcher == "generate" else [f"--output={tmp_path / 'out'}"]
    _refused(_launch(launcher, f"{flag}={run}", *extra), f"{flag}={run} holds 4 pruned models: ",
             ", ".join(ALL), "--ratio=R [--mode=M]", f"{run}/energy/ratio_0.25/orbax")
    _refused(_launch(launcher, f"{flag}={run}", "--ratio=0.25", *extra),
             "holds 2 pruned models of --ratio=0.25: energy/ratio_0.25, random/ratio_0.25")
    assert not (tmp_path / "out").exists()


def test_convert_accepts_the_four_ways(made, tmp_path):
    run, ratio = made["run"], made["ratio"]
    orbax_dir = os.path.join(ratio, "orbax")
    for i, (inp, extra, fmt) in enumerate([(run, ["--ratio=0.5", "--mode=energy"], "orbax"),
                                           (ratio, [], "orbax"), (orbax_dir, [], "orbax"),
                                           (f"{ratio}/hf", [], "hf")]):
        out = _ok(_launch("convert", f"--input={inp}", f"--output={tmp_path / str(i)}", *extra))
        assert out["input_format"] == fmt and out["intermediate_size"] == 24
        _same_arrays(orbax_dir, str(tmp_path / str(i)))
    # An orbax folder made from the HF export records how it was pruned, as the original does.
    back = pruned_models.resolve_one(str(tmp_path / "3"))
    assert (back.label, back.ratio, back.mode, back.source) == ("dense energy 0.5", 0.5, "energy", made["dense"])


def test_evaluate_accepts_the_four_ways_and_warns_on_another_source(made):
    run, ratio = made["run"], made["ratio"]
    proc = _launch("evaluate", f"--model={made['dense']}",
                   f"--pruned={ratio},{ratio}/orbax,{ratio}/hf,{made['copied']}/ratio_0.25")
    summary = _ok(proc)
    assert [m["name"] for m in summary["models"]] == [
        "dense", "dense energy 0.5", "dense energy 0.5#2", "dense energy 0.5#3", "dense energy 0.25"]
    assert [m["source"] for m in summary["models"][1:4]] == [f"{ratio}/hf", f"{ratio}/orbax", f"{ratio}/hf"]
    assert len({tuple(m["ks"]) for m in summary["models"][1:4]}) == 1
    assert "warning" not in proc.stderr
    summary = _ok(_launch("evaluate", f"--model={made['dense']}", f"--pruned={run}", "--mode=energy"))
    assert [(m["name"], m["ratio"], m.get("mode")) for m in summary["models"][1:]] == [
        ("dense energy 0.25", 0.25, "energy"), ("dense energy 0.5", 0.5, "energy")]
    proc = _launch("evaluate", f"--model={made['other']}", f"--pruned={run}", "--ratio=0.5")
    assert [m["name"] for m in _ok(proc)["models"]] == ["dense", "dense energy 0.5", "dense random 0.5"]
    warnings = [l for l in proc.stderr.splitlines() if l.startswith("warning:")]
    assert warnings == [f"warning: dense energy 0.5, dense random 0.5: pruned from {made['dense']}, "
                        f"not from --model={made['other']}; its KS and perplexity are measured "
                        "against --model all the same"]
    _refused(_launch("evaluate", f"--model={made['dense']}", f"--pruned={run}", "--ratio=0.3"),
             f"--pruned={run} holds no pruned model of --ratio=0.3")


def test_recover_accepts_a_ratio_folder_an_hf_folder_and_a_picked_run(made, tmp_path):
    run, ratio = made["run"], made["ratio"]
    out = _ok(_launch("recover", f"--input={run}", "--ratio=0.25", "--mode=random",
                      f"--out_dir={tmp_path / 'a'}", *RECOVER_FAST))["outputs"]
    assert [(e["ratio"], e["mode"], e["orbax_dir"]) for e in out] == [(0.25, "random", "ratio_0.25/orbax")]
    out = _ok(_launch("recover", f"--input={ratio}/hf", f"--out_dir={tmp_path / 'b'}", *RECOVER_FAST))["outputs"]
    assert [(e["ratio"], e["mode"], e["source"]) for e in out] == [(0.5, "energy", made["dense"])]
    [m] = pruned_models.resolve(str(tmp_path / "b"))  # a recovery run folder names its outputs too
    assert m.label == "dense energy 0.5 recovered" and m.recovery["steps"] == 1


def test_a_batch_run_folder_names_its_items(made, tmp_path):
    """<out_dir>/<name>/ratio_<r>/: each item labelled by its name; a name's folder picks it."""
    from prunenet_jax.formats import run_dir

    manifest = run_dir.Manifest(str(tmp_path), {"checkpoints": {}}, resume=False)
    for name in ("a", "b"):
        shutil.copytree(made["ratio"], tmp_path / name / "ratio_0.5")
        manifest.record(run_dir.OutputEntry(
            ratio=0.5, checkpoint=name, orbax_dir=f"{name}/ratio_0.5/orbax", hf_dir=f"{name}/ratio_0.5/hf",
            recipe={"mode": "energy"}, extra={"source": f"/models/{name}"}))
    both = pruned_models.resolve(str(tmp_path))
    assert [(m.where, m.label, m.checkpoint, m.source) for m in both] == [
        ("a/ratio_0.5", "a energy 0.5", "a", "/models/a"), ("b/ratio_0.5", "b energy 0.5", "b", "/models/b")]
    with pytest.raises(UserError, match="holds 2 pruned models of --ratio=0.5: a/ratio_0.5, b/ratio_0.5"):
        pruned_models.resolve_one(str(tmp_path), ratio=0.5)
    one = pruned_models.resolve_one(str(tmp_path / "b"))
    assert (one.where, one.label, one.orbax_dir) == ("ratio_0.5", "b energy 0.5",
                                                      str(tmp_path / "b" / "ratio_0.5" / "orbax"))
